"""The ``rasteragg`` command line, run as a separate process as a user would run it.

Each case that must not change the store compares a hash of every file (names and bytes) of the
store before and after. Failures are injected by a small driver that patches the engine's kernel
(mid-aggregation) or the table commit inside the child process, then calls the command line.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tree_hash

spatialdata = pytest.importorskip("spatialdata")
from spatialdata.models import Image2DModel, Labels2DModel, TableModel  # noqa: E402

from xr_rasteragg.cli import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)

CHANNELS = ["DAPI", "CD3", "CD20"]

#: Runs the command line in the child after patching something (``PATCH``) in it.
DRIVER = """
import sys
import xr_rasteragg.engine as engine
import xr_rasteragg.spatialdata as adapter
from xr_rasteragg.cli import main

real_kernel_for = engine.kernel_for
calls = []

def failing_kernel_for(block):
    kernel = real_kernel_for(block)
    def run(*args):
        calls.append(None)
        if len(calls) == 3:  # some blocks are done, others not yet
            raise {error}
        return kernel(*args)
    return run

def failing_consolidate(store):
    raise OSError("disk full")

{patch}
sys.exit(main(sys.argv[1:]))
"""


def make_store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 5, 9], size=(8, 10)).repeat(4, 0).repeat(4, 1).astype(np.int32)
    image = rng.integers(0, 1000, size=(3, *labels.shape)).astype(np.uint16)
    sdata = spatialdata.SpatialData(
        images={
            "img": Image2DModel.parse(image, dims=("c", "y", "x"), c_coords=CHANNELS, chunks=(1, 16, 16))
        },
        labels={"cells": Labels2DModel.parse(labels, dims=("y", "x"), chunks=(16, 16))},
    )
    sdata.write(path)
    return path


def rasteragg(
    *args: str, patch: str = "", error: str = "RuntimeError('injected')"
) -> subprocess.CompletedProcess[str]:
    if patch:
        command = [sys.executable, "-c", DRIVER.format(patch=patch, error=error), *args]
    else:
        command = [sys.executable, "-m", "xr_rasteragg.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def read_table(path: Path, name: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata.read_zarr(path).tables[name]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "data.zarr")


def test_console_script_is_declared() -> None:
    (script,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "rasteragg"]
    assert script.value == "xr_rasteragg.cli:main"


def test_aggregate_writes_the_table(store: Path) -> None:
    result = rasteragg(
        "aggregate",
        str(store),
        "--image",
        "img",
        "--labels",
        "cells",
        "--stats",
        "mean,var,max",
        "--table",
        "t",
    )
    assert result.returncode == 0, result.stderr
    assert "wrote table 't'" in result.stdout
    assert "Completed" in result.stderr  # the progress bar
    table = read_table(store, "t")
    TableModel().validate(table)
    assert list(table.var_names) == CHANNELS
    assert set(table.layers) == {"var", "max"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from xr_rasteragg.spatialdata import aggregate

        expected = aggregate(spatialdata.read_zarr(store), "img", "cells", ["mean", "var", "max"])
    np.testing.assert_array_equal(table.X, expected.X)
    np.testing.assert_array_equal(table.obsm["spatial"], expected.obsm["spatial"])
    assert [p.name for p in store.parent.iterdir()] == ["data.zarr"]  # no staging left beside it


def test_overwrite_replaces_a_table(store: Path) -> None:
    """The refusal without ``--overwrite``: ``cli-table-exists`` in tests/test_bad_input.py."""
    both = ["aggregate", str(store), "--image", "img", "--labels", "cells", "--no-progress"]
    assert main(both) == 0
    assert main([*both, "--stats", "max", "--overwrite"]) == 0
    assert read_table(store, "cells_stats").uns["rasteragg"]["stats"] == ["max"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "nope", "--labels", "cells"], r"--image must name one of the images elements"),
        (["--image", "img", "--labels", "cells", "--stats", "mean,mode"], r"unknown statistic\(s\)"),
    ],
)
def test_user_errors_are_one_line_and_change_nothing(store: Path, args: list[str], message: str) -> None:
    before = tree_hash(store)
    result = rasteragg("aggregate", str(store), *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rasteragg: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert result.stdout == ""
    assert tree_hash(store) == before


def test_usage_errors_exit_2(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["aggregate", str(store), "--image", "img"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --labels" in capsys.readouterr().err


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_aggregation_leaves_the_store_as_it_was(store: Path, existing: bool) -> None:
    if existing:  # a table that --overwrite would replace
        assert main(["aggregate", str(store), "--image", "img", "--labels", "cells", "--no-progress"]) == 0
    before = tree_hash(store)
    args = [
        "aggregate",
        str(store),
        "--image",
        "img",
        "--labels",
        "cells",
        "--stats",
        "mean,kurtosis",
        "--overwrite",
    ]
    result = rasteragg(*args, patch="engine.kernel_for = failing_kernel_for")
    assert result.returncode != 0
    assert "RuntimeError: injected" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"rasteragg: failed; {store} is as it was"
    assert tree_hash(store) == before
    assert [p.name for p in store.parent.iterdir()] == ["data.zarr"]


@pytest.mark.parametrize("error", ["ValueError('injected')", "TypeError('injected')", "KeyError('injected')"])
def test_errors_inside_the_pass_show_their_traceback(store: Path, error: str) -> None:
    """Only mistakes found before the pass are one-liners: an error inside it is a failure (a bug)."""
    before = tree_hash(store)
    args = ["aggregate", str(store), "--image", "img", "--labels", "cells", "--no-progress"]
    result = rasteragg(*args, patch="engine.kernel_for = failing_kernel_for", error=error)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert f"{error.split('(')[0]}: " in result.stderr
    assert "rasteragg: error:" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"rasteragg: failed; {store} is as it was"
    assert tree_hash(store) == before


def test_warnings_are_shown(store: Path) -> None:
    patch = (
        "import warnings\n"
        "real_compute_table = adapter.compute_table\n"
        "def noisy(plan, **options):\n"
        "    warnings.warn('something odd in the pass', UserWarning)\n"
        "    return real_compute_table(plan, **options)\n"
        "adapter.compute_table = noisy"
    )
    result = rasteragg(
        "aggregate", str(store), "--image", "img", "--labels", "cells", "--no-progress", patch=patch
    )
    assert result.returncode == 0, result.stderr
    assert "UserWarning: something odd in the pass" in result.stderr
    assert "autosharding" not in result.stderr  # zarr's notice on every write stays quiet


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"rasteragg {importlib.metadata.version('xr_rasteragg')}"


def test_demo_size_too_small_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--size", "10"]) == 1
    assert capsys.readouterr().err.strip() == (
        "rasteragg: error: --size must be at least 64 pixels for a useful demo; got 10"
    )
    assert not (tmp_path / "demo").exists()


def test_interrupt_mid_aggregation_leaves_the_store_as_it_was(store: Path) -> None:
    before = tree_hash(store)
    result = rasteragg(
        "aggregate", str(store), "--image", "img", "--labels", "cells",
        patch="engine.kernel_for = failing_kernel_for", error="KeyboardInterrupt()",
    )  # fmt: skip
    assert result.returncode == 130
    assert "interrupted; nothing was written" in result.stderr
    assert tree_hash(store) == before


def test_failure_while_moving_the_table_in_leaves_the_store_as_it_was(store: Path) -> None:
    """Injected after the new table replaced the old one (a new table: in test_spatialdata.py)."""
    assert main(["aggregate", str(store), "--image", "img", "--labels", "cells", "--no-progress"]) == 0
    before = tree_hash(store)
    args = ["aggregate", str(store), "--image", "img", "--labels", "cells", "--stats", "max", "--overwrite"]
    result = rasteragg(*args, patch="adapter._consolidate = failing_consolidate")
    assert result.returncode == 1
    assert "OSError: disk full" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"rasteragg: failed; {store} is as it was"
    assert tree_hash(store) == before
    assert [p.name for p in store.parent.iterdir()] == ["data.zarr"]


def test_distributed_scheduler(store: Path) -> None:
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=None
    ) as cluster:
        result = rasteragg(
            "aggregate",
            str(store),
            "--image",
            "img",
            "--labels",
            "cells",
            "--scheduler",
            cluster.scheduler_address,
        )
    assert result.returncode == 0, result.stderr
    # distributed.progress for each computation on the cluster: the pass, the areas and
    # centroids, the write
    bars = [line for line in result.stderr.replace("\r", "\n").splitlines() if "100% Completed" in line]
    assert len(bars) >= 3, result.stderr
    assert read_table(store, "cells_stats").n_obs == 4


def test_demo(tmp_path: Path) -> None:
    result = rasteragg("demo", "--out", str(tmp_path / "demo"), "--size", "96")
    assert result.returncode == 0, result.stderr
    assert "table 'cells_stats'" in result.stdout
    assert "median of the per-cell mean intensities, by the true cell type" in result.stdout
    # loading (on a first run: compiling) the kernels is timed apart from the pass
    timing = [line for line in result.stdout.splitlines() if "kernels" in line or "one pass" in line]
    assert timing[0].startswith("  compiled kernels ready in ")
    assert timing[1].startswith("  one pass over ")
    assert "kernels" not in timing[1]
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = read_table(tmp_path / "demo" / "demo.zarr", "cells_stats")
    TableModel().validate(table)
    assert list(table.var_names)[:2] == ["DAPI", "NaKATPase"]
    assert table.n_obs > 10


def test_missing_extra_is_one_line(store: Path) -> None:
    code = (
        "import sys; sys.modules['spatialdata'] = None; from xr_rasteragg.cli import main; "
        f"sys.exit(main(['aggregate', {str(store)!r}, '--image', 'img', '--labels', 'cells']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "rasteragg: error: 'rasteragg aggregate' needs 'spatialdata', which is not installed; install the "
        "extra: pip install 'xr_rasteragg[spatialdata]'"
    )


def test_progress_is_dasks_own(store: Path) -> None:
    """On the local threads, dask.diagnostics.ProgressBar draws the pass and the table's write."""
    args = ["aggregate", str(store), "--image", "img", "--labels", "cells", "--stats", "mean,max"]
    result = rasteragg(*args)
    assert result.returncode == 0, result.stderr
    # One bar per computation (the pass, the areas and centroids, the write), each drawn to the end
    # (text mode reads the bar's carriage returns as line ends).
    finished = [
        line for line in result.stderr.splitlines() if line.startswith(f"[{'#' * 40}] | 100% Completed")
    ]
    assert len(finished) >= 3, result.stderr
    quiet = rasteragg(*args, "--table", "t2", "--no-progress")
    assert quiet.returncode == 0, quiet.stderr
    assert "Completed" not in quiet.stderr


def test_progress_module_is_gone() -> None:
    """The polling bar of our own was replaced by dask's (distributed.progress on a cluster)."""
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("xr_rasteragg.progress")


def test_aggregate_writes_shape_features(store: Path) -> None:
    both = ["aggregate", str(store), "--image", "img", "--labels", "cells", "--no-progress"]
    assert main([*both, "--stats", "mean,eccentricity,centroid", "--table", "shape"]) == 0
    table = read_table(store, "shape")
    assert "eccentricity" in table.obs
    assert table.obsm["centroid"].shape == (table.n_obs, 2)


def test_aggregate_mean_and_median(store: Path) -> None:
    args = ["aggregate", str(store), "--image", "img", "--labels", "cells", "--stats", "mean,median"]
    assert main([*args, "--no-progress"]) == 0
    table = read_table(store, "cells_stats")
    sdata = spatialdata.read_zarr(store)
    labels = sdata.labels["cells"].values
    image = sdata.images["img"].values
    ids = np.unique(labels)[1:]
    np.testing.assert_array_equal(table.obs["instance_id"], ids)
    expected = [[np.median(plane[labels == i].astype(np.float64)) for plane in image] for i in ids]
    np.testing.assert_array_equal(np.asarray(table.layers["median"]), expected)
    assert list(table.uns["rasteragg"]["stats"]) == ["mean", "median"]
