"""harpy's own tests of ``RasterAggregator``, run against ours with only the import changed.

harpy's licence (academic, non-commercial) allows neither redistributing nor modifying its files,
so its test file is not copied into this repository: point ``HARPY_SOURCE`` at a harpy checkout
(the folder holding ``src/harpy``) and this test copies ``test_aggregate.py`` into a temporary
folder, changes its import lines to ours, gives it the ``sdata`` fixture of harpy's conftest
(spatialdata's ``blobs`` dataset) and runs it. Without ``HARPY_SOURCE`` it is skipped.

harpy's module-level helpers ``_get_mask_area`` and ``get_instance_size`` are not part of the
class's interface; their four tests are deselected.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TEST_FILE = Path("src/harpy/_tests/test_utils/test_aggregate.py")
HARPY_IMPORTS = """from harpy.utils import get_instance_size
from harpy.utils._aggregate import RasterAggregator, _get_mask_area
from harpy.utils._keys import _CELLSIZE_KEY, _INSTANCE_KEY
"""
OUR_IMPORTS = """from xr_rasteragg import RasterAggregator

_INSTANCE_KEY, _CELLSIZE_KEY = "cell_ID", "shapeSize"
"""
CONFTEST = """import pytest
from spatialdata.datasets import blobs


@pytest.fixture
def sdata():
    yield blobs(length=1000, n_channels=3)
"""
HELPER_TESTS = "not get_mask_area and not get_instance_size"


def test_harpys_aggregator_tests_pass_on_ours(tmp_path: Path) -> None:
    pytest.importorskip("spatialdata")
    pytest.importorskip("xrspatial")  # harpy's test file imports it
    source = os.environ.get("HARPY_SOURCE")
    if not source:
        pytest.skip("set HARPY_SOURCE to a harpy checkout to run harpy's tests of RasterAggregator")
    text = (Path(source) / TEST_FILE).read_text()
    assert HARPY_IMPORTS in text, "harpy's import lines changed: update HARPY_IMPORTS"
    (tmp_path / "test_harpy_aggregate.py").write_text(text.replace(HARPY_IMPORTS, OUR_IMPORTS))
    (tmp_path / "conftest.py").write_text(CONFTEST)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore",
        "-k",
        HELPER_TESTS,
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
