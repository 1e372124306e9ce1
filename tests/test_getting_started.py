"""docs/getting-started.md: its commands do what their comments say, its printed output is current."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import xr_rasteragg

PAGE = Path(__file__).resolve().parents[1] / "docs" / "getting-started.md"


def test_install_check_prints_the_version() -> None:
    (line,) = [line for line in PAGE.read_text().splitlines() if "python -m xr_rasteragg" in line]
    assert line.startswith(".venv/bin/python -m xr_rasteragg --version  #")
    done = subprocess.run(
        [sys.executable, "-m", "xr_rasteragg", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rasteragg {xr_rasteragg.__version__}"


def test_first_table_prints_what_the_page_shows() -> None:
    text = PAGE.read_text()
    section = text[text.index("## Your first table") :]
    code, shown = re.search(r"```python\n(.*?)```\s*```text\n(.*?)```", section, re.DOTALL).groups()  # type: ignore[union-attr]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(PAGE), "exec"), {})
    assert [line.rstrip() for line in out.getvalue().splitlines()] == shown.rstrip("\n").splitlines()
