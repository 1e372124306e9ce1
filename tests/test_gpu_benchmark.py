"""The GPU benchmark script's host-side parts, on any machine (its timings need a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import scipy.ndimage as ndi

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exits_with_a_message_without_a_gpu(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "probe_cupy", lambda: (None, "CUDARuntimeError: no device"))
    with pytest.raises(SystemExit, match=r"no usable GPU here \(CUDARuntimeError: no device\)"):
        bench.main(["--quick"])


def test_tiled_labels_keep_cells_apart(bench: ModuleType) -> None:
    labels = np.array([[[0, 1], [2, 2]]], np.int32)
    tiled = bench.tiled_labels(labels, 2)
    assert tiled.shape == (1, 4, 4)
    assert tiled.dtype == labels.dtype
    np.testing.assert_array_equal(tiled[0, :2, 2:], [[0, 4], [5, 5]])
    np.testing.assert_array_equal(tiled[0, 2:, 2:], [[0, 10], [11, 11]])
    assert np.unique(tiled).size == 1 + 4 * 2


def test_ndimage_baseline_computes_what_we_compute(bench: ModuleType) -> None:
    """The baseline does the same work as ours (here with scipy.ndimage on NumPy, as
    cupyx.scipy.ndimage on the GPU), and the check the benchmark runs before timing passes."""
    labels, image = bench.reference_dataset(128)
    assert labels.shape == (1, 128, 128)
    assert image.shape == (8, 1, 128, 128)
    assert image.dtype == np.uint16
    result = bench.ours(labels, image, bench.ALL_STATS, (64, 1))
    ids = result["labels"]
    assert ids.size > 5
    assert 0 not in ids
    theirs = bench.ndimage_stats(ndi, np, labels[0], image[:, 0], ids)
    bench.assert_agree(result, theirs, bench.FIVE)
    theirs["max"][0, 0] += 1
    with pytest.raises(AssertionError):
        bench.assert_agree(result, theirs, bench.FIVE)


def test_report_line(bench: ModuleType) -> None:
    line = bench.bandwidth_line("ours GPU: mean", 0.002, 10**9, 2e12)
    assert "2.0 ms" in line
    assert "500.0 GB/s" in line
    assert "25.0% of copy bandwidth" in line


def test_aggregator_baseline_runs_harpys_six_statistics(bench: ModuleType) -> None:
    labels, image = bench.reference_dataset(64)
    frames = bench.through_aggregator(labels, image, (32, 8), run_on_gpu=False)
    assert len(frames) == 6
    ours = bench.ours(labels, image, ("mean",), (32, 8))
    np.testing.assert_allclose(frames[1].iloc[:, :8].to_numpy(float)[1:], ours["mean"], rtol=1e-12)
