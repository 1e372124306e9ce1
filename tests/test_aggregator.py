"""RasterAggregator: harpy's interface, layouts and errors, checked against scipy."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import scipy.stats as st

from xr_rasteragg import RasterAggregator

PER_CHANNEL = ("sum", "mean", "var", "skew", "kurtosis", "min", "max")


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 12, size=(2, 30, 41)).astype(np.int32)
    labels[:, :5] = 0
    image = rng.normal(100.0, 15.0, size=(3, 2, 30, 41))
    return labels, image


def make(labels: np.ndarray, image: np.ndarray | None = None, **kwargs: Any) -> RasterAggregator:
    mask = da.from_array(labels, chunks=(1, 16, 20))
    pixels = None if image is None else da.from_array(image, chunks=(2, 1, 16, 20))
    return RasterAggregator(mask, pixels, run_on_gpu=False, **kwargs)


def scipy_reference(name: str, labels: np.ndarray, channel: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if name == "sum":
        return ndi.sum_labels(channel, labels, ids)
    if name == "mean":
        return ndi.mean(channel, labels, ids)
    if name == "var":
        return ndi.variance(channel, labels, ids)
    if name == "min":
        return ndi.minimum(channel, labels, ids)
    if name == "max":
        return ndi.maximum(channel, labels, ids)
    if name == "skew":
        return np.array([st.skew(channel[labels == i]) for i in ids])
    return np.array([st.kurtosis(channel[labels == i]) for i in ids])


@pytest.mark.parametrize("name", PER_CHANNEL)
def test_per_channel_layout_and_values(name: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, image = data
    frame = getattr(make(labels, image), f"aggregate_{name}")()
    ids = np.unique(labels)
    assert list(frame.columns) == [0, 1, 2, "cell_ID"]
    np.testing.assert_array_equal(frame["cell_ID"], ids)  # background 0 included, sorted
    for c in range(image.shape[0]):
        expected = scipy_reference(name, labels, image[c], ids)
        np.testing.assert_allclose(frame[c], expected, rtol=1e-9, atol=1e-9)


def test_area_layout(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, _ = data
    frame = make(labels, instance_key="id", instance_size_key="area").aggregate_area()
    assert list(frame.columns) == ["id", "area"]
    np.testing.assert_array_equal(frame["id"], np.unique(labels))
    np.testing.assert_array_equal(frame["area"], np.bincount(labels.ravel()))


def test_center_of_mass_layout(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, _ = data
    frame = make(labels).center_of_mass()
    ids = np.unique(labels)
    assert list(frame.columns) == [0, 1, 2, "cell_ID"]
    expected = np.array(ndi.center_of_mass(np.ones_like(labels), labels, ids))
    np.testing.assert_allclose(frame[[0, 1, 2]].to_numpy(), expected, rtol=1e-12)


def test_aggregate_stats_order_and_count_layout(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, image = data
    aggregator = make(labels, image)
    frames = aggregator.aggregate_stats(("count", "mean", "var"))
    assert [list(f.columns) for f in frames] == [[0, "cell_ID"], [0, 1, 2, "cell_ID"], [0, 1, 2, "cell_ID"]]
    np.testing.assert_array_equal(frames[0][0], np.bincount(labels.ravel()))
    pd.testing.assert_frame_equal(frames[1], aggregator.aggregate_mean())
    defaults = aggregator.aggregate_stats()
    assert len(defaults) == 6  # sum, mean, count, var, kurtosis, skew
    single = aggregator.aggregate_stats("sum")
    pd.testing.assert_frame_equal(single[0], aggregator.aggregate_sum())
    (std,) = aggregator.aggregate_stats(("std",))
    ids = np.unique(labels)
    np.testing.assert_allclose(std[1], ndi.standard_deviation(image[1], labels, ids), rtol=1e-9)


def test_index_subset_with_absent_labels(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, image = data
    index = np.array([7, 1000, 3])
    mean, count, var = make(labels, image).aggregate_stats(("mean", "count", "var"), index=index)
    np.testing.assert_array_equal(mean["cell_ID"], index)
    np.testing.assert_array_equal(count[0], [np.sum(labels == 7), 0, np.sum(labels == 3)])
    assert mean.loc[1, [0, 1, 2]].isna().all()
    assert var.loc[1, [0, 1, 2]].isna().all()
    np.testing.assert_allclose(mean.loc[0, 0], image[0][labels == 7].mean(), rtol=1e-12)


def test_constant_labels_give_zero_skew_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    labels = np.array([[[1, 1, 1, 2, 2, 2]]])
    image = np.array([[[[5.0, 5.0, 5.0, 1.0, 2.0, 4.0]]]])
    with caplog.at_level(logging.WARNING, logger="xr_rasteragg"):
        skew, kurtosis = make(labels, image).aggregate_stats(("skew", "kurtosis"), index=[1, 2, 3])
    assert skew.loc[0, 0] == 0.0
    assert kurtosis.loc[0, 0] == 0.0
    assert np.isnan(skew.loc[2, 0])  # absent label stays NaN
    np.testing.assert_allclose(skew.loc[1, 0], st.skew([1.0, 2.0, 4.0]), atol=1e-12)
    assert "constant" in caplog.text


def test_one_pass_for_all_statistics(
    data: tuple[np.ndarray, np.ndarray], kernel_calls: list[tuple[int, int, int]]
) -> None:
    labels, image = data
    aggregator = make(labels, image)
    with dask.config.set(scheduler="sync"):
        aggregator.aggregate_stats(("sum", "mean", "count", "var", "kurtosis", "skew", "min", "max", "std"))
    assert len(kernel_calls) == math.prod(aggregator._mask.numblocks)  # one kernel call per spatial block


def test_run_on_gpu_falls_back_with_warning(
    data: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is usable here: there is no fallback to test")
    except Exception:
        pass
    labels, image = data
    with caplog.at_level(logging.WARNING, logger="xr_rasteragg"):
        aggregator = RasterAggregator(da.from_array(labels), da.from_array(image))
    assert "Falling back to CPU" in caplog.text
    np.testing.assert_allclose(aggregator.aggregate_mean()[0], ndi.mean(image[0], labels, np.unique(labels)))


def test_errors(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, image = data
    mask = da.from_array(labels, chunks=(1, 16, 20))
    pixels = da.from_array(image, chunks=(1, 1, 16, 20))
    with pytest.raises(ValueError, match="mask_dask_array"):
        RasterAggregator(mask.astype(float), pixels, run_on_gpu=False)
    with pytest.raises(AssertionError, match="3D"):
        RasterAggregator(mask[0], run_on_gpu=False)
    with pytest.raises(AssertionError, match="4D"):
        RasterAggregator(mask, pixels[0], run_on_gpu=False)
    with pytest.raises(AssertionError, match="spatial dimensions"):
        RasterAggregator(mask[:, :10], pixels, run_on_gpu=False)
    with pytest.raises(AssertionError, match="chunk size"):
        RasterAggregator(mask, pixels.rechunk((1, 1, 10, 10)), run_on_gpu=False)
    aggregator = RasterAggregator(mask, pixels, run_on_gpu=False)
    with pytest.raises(ValueError, match=r"^Invalid statistic function\(s\): \['mode'\]"):
        aggregator.aggregate_stats(("mean", "mode"))
    with pytest.raises(ValueError, match="need an image"):
        RasterAggregator(mask, run_on_gpu=False).aggregate_mean()


@pytest.mark.parametrize("stats_funcs", [("sum", "wrong_stat"), "wrong_stat", ["mean", "mode", "std"]])
def test_unknown_statistic_is_harpys_assertion_and_a_value_error(
    data: tuple[np.ndarray, np.ndarray], stats_funcs: Any
) -> None:
    """harpy's own test expects ``AssertionError`` matching ``^Invalid statistic function``."""
    aggregator = make(*data)
    with pytest.raises(AssertionError, match=r"^Invalid statistic function") as caught:
        aggregator.aggregate_stats(stats_funcs=stats_funcs)
    assert isinstance(caught.value, ValueError)
    assert "'stats_funcs'" in str(caught.value)


def test_whole_float_index_is_taken_as_ids(data: tuple[np.ndarray, np.ndarray]) -> None:
    aggregator = make(*data)
    ids = np.array([7, 0, 3, 99])
    expected = aggregator.aggregate_stats(("mean", "count"), index=ids)
    got = aggregator.aggregate_stats(("mean", "count"), index=ids.astype(np.float64))
    for frame, reference in zip(got, expected, strict=True):
        pd.testing.assert_frame_equal(frame, reference)


def test_python_int_index_at_the_ends_of_uint64_stays_exact() -> None:
    """Python ints 0 and 2**64 - 1 (which NumPy turns into floats) are ids, not rounded floats."""
    mask = np.array([[[0, 0, 2**64 - 1, 5]]], dtype=np.uint64)
    image = np.arange(4.0).reshape(1, 1, 1, 4)
    (frame,) = RasterAggregator(mask, image, run_on_gpu=False).aggregate_stats("sum", index=[2**64 - 1, 0, 7])
    assert frame["cell_ID"].tolist() == [2**64 - 1, 0, 7]
    assert frame[0].tolist() == [2.0, 1.0, 0.0]


def test_validation_holds_under_python_optimize(tmp_path: Any) -> None:
    """The class's AssertionErrors are raised explicitly: ``python -O`` strips ``assert`` statements."""
    script = tmp_path / "check.py"
    script.write_text(
        "import dask.array as da, numpy as np\n"
        "from xr_rasteragg import RasterAggregator\n"
        "mask = da.zeros((1, 4, 4), dtype=np.int32, chunks=2)\n"
        "for args in [(mask[0],), (mask, da.zeros((1, 4, 4))), (mask, da.zeros((1, 1, 4, 3))),\n"
        "             (mask, da.zeros((1, 1, 4, 4), chunks=4))]:\n"
        "    try:\n"
        "        RasterAggregator(*args, run_on_gpu=False)\n"
        "    except AssertionError as error:\n"
        "        print('raised:', error)\n"
        "    else:\n"
        "        print('accepted', [a.shape for a in args])\n"
        "try:\n"
        "    RasterAggregator(mask, run_on_gpu=False).aggregate_stats(('count', 'mode'))\n"
        "except AssertionError:\n"
        "    print('raised: unknown statistic')\n"
    )
    done = subprocess.run([sys.executable, "-O", str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5
    assert all(line.startswith("raised:") for line in lines), lines
