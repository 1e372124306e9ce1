"""The notebooks are stored as the documentation shows them: run top to bottom, with figures.

CI runs them again with ``pytest --nbmake`` (see ``.ci/run``); this checks what is committed,
since the site renders the stored outputs without running anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks() -> None:
    assert {path.stem for path in NOTEBOOKS} >= {"quickstart", "scaling", "spatialdata"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_executed_in_order_with_figures(path: Path) -> None:
    cells: list[dict[str, Any]] = json.loads(path.read_text())["cells"]
    code = [cell for cell in cells if cell["cell_type"] == "code"]
    counts = [cell["execution_count"] for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name} was not run top to bottom: {counts}"
    outputs = [output for cell in code for output in cell["outputs"]]
    errors = [output for output in outputs if output["output_type"] == "error"]
    assert not errors, f"{path.name} is stored with an error: {errors[0].get('ename')}"
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert figures, f"{path.name} is stored without figures"
