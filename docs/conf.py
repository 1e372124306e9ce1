"""Sphinx configuration of the xr_rasteragg documentation.

Build: ``sphinx-build -W --keep-going -b html docs docs/_build/html``. Notebooks are
rendered from their stored outputs (CI runs them with ``pytest --nbmake``); the build
never executes them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import xr_rasteragg

HERE = Path(__file__).parent

project = "xr_rasteragg"
author = "xr_rasteragg developers"
copyright = "2026, xr_rasteragg developers"
version = release = xr_rasteragg.__version__

extensions = [
    "myst_nb",
    "sphinx_design",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# -- pages that other work brings in ---------------------------------------------------
# These pages arrive with their features (SpatialData and the command line, GPU,
# bad input, benchmarks). Until a page is there, its toctree entry is dropped, so
# that the build passes with warnings as errors on every branch; once it is there, it
# appears where index.md, reference.md, guide/index.md and api/index.md place it.
# Every other page in a toctree must exist.
OPTIONAL_PAGES = {
    "guide/spatialdata",
    "guide/cli",
    "guide/gpu",
    "bad-input",
    "benchmarks",
    "api/spatialdata",
}
# The SpatialData API page documents a module that may not be there yet.
if not (Path(xr_rasteragg.__file__).parent / "spatialdata.py").exists():
    exclude_patterns.append("api/spatialdata.md")


def _absent(page: str) -> bool:
    if f"{page}.md" in exclude_patterns:
        return True
    suffixes = (".md", ".ipynb", ".rst")
    return not any((HERE / f"{page}{suffix}").exists() for suffix in suffixes)


def _drop_absent_pages(app: Any, docname: str, source: list[str]) -> None:
    """Remove toctree lines that name an absent optional page (``source-read``)."""
    folder = docname.rpartition("/")[0]
    missing = {
        page.removeprefix(f"{folder}/") if folder else page
        for page in OPTIONAL_PAGES
        if _absent(page)
    }
    if missing:
        names = "|".join(re.escape(name) for name in sorted(missing))
        source[0] = re.sub(rf"^({names})\s*$", "", source[0], flags=re.MULTILINE)


def _alias_names(
    app: Any,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    ret: str | None,
) -> tuple[str | None, str | None]:
    """Type aliases by their name (Sphinx 9 prints ``TypeAliasForwardRef('…')``)."""

    def clean(text: str | None) -> str | None:
        return (
            None
            if text is None
            else re.sub(r"TypeAliasForwardRef\('([^']+)'\)", r"\1", text)
        )

    return clean(signature), clean(ret)


def setup(app: Any) -> None:
    app.connect("source-read", _drop_absent_pages)
    app.connect("autodoc-process-signature", _alias_names)


# -- MyST and notebooks ----------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist", "fieldlist"]
myst_heading_anchors = 3
# CI runs the notebooks with nbmake; the site shows their stored outputs.
nb_execution_mode = "off"
nb_merge_streams = True

# -- API reference ---------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "signature"
# NumPy's array-like aliases by name, not as the unions they stand for.
autodoc_type_aliases = {"ArrayLike": "ArrayLike", "NDArray": "NDArray"}
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- HTML ------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = "xr_rasteragg"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_theme_options = {
    "navbar_align": "left",
    "header_links_before_dropdown": 6,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "navigation_with_keys": False,
}
html_context = {"default_mode": "light"}
pygments_style = "friendly"
