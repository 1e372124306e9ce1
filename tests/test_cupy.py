"""CuPy on a real GPU. Skipped, as a whole module, where CuPy or a working device is missing.

The same checks as on the CPU, with the data on the device: the fused CUDA kernel against the
compiled CPU kernel and against the array-API kernel run on CuPy (an independent reference that
shares no code with it), the engine, accessor and ``RasterAggregator`` against SciPy, NumPy-backed
results, and the mixed-input error. ``test_gpu_kernel.py`` runs the CUDA kernel's own tests on
the device here too (and under Numba's CUDA simulator where there is no GPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest

cupy = pytest.importorskip("cupy")

import xarray as xr  # noqa: E402
from conftest import ALL_STATS, KERNELS, assert_all_stats, assert_partials_close, reference  # noqa: E402
from test_gpu_kernel import EVERYTHING, IDS, blobs, values  # noqa: E402
from test_shape import irregular  # noqa: E402

from xr_rasteragg import RasterAggregator  # noqa: E402
from xr_rasteragg.engine import aggregate  # noqa: E402
from xr_rasteragg.gpu import probe_cupy  # noqa: E402
from xr_rasteragg.kernels import array_backend  # noqa: E402
from xr_rasteragg.kernels import cuda as gpu_kernel  # noqa: E402
from xr_rasteragg.kernels import xp as array_kernel  # noqa: E402
from xr_rasteragg.partials import Needs  # noqa: E402

_, REASON = probe_cupy()
if REASON:
    pytest.skip(f"CuPy cannot use a GPU here ({REASON})", allow_module_level=True)


@pytest.mark.parametrize("label_dtype", list(IDS))
@pytest.mark.parametrize("image_dtype", ["uint8", "uint16", "int32", "uint64", "float32", "float64"])
def test_kernel_on_the_device_agrees_with_the_cpu_kernel(label_dtype: str, image_dtype: str) -> None:
    labels = blobs((2, 33, 41), label_dtype, seed=1)
    image = values(3, labels.shape, image_dtype, seed=2)
    offset = (3, 70, 5)
    got = gpu_kernel.block_partials(cupy.asarray(labels), [cupy.asarray(image)], offset, EVERYTHING, 0)
    expected = KERNELS["numba"](labels, [image], offset, EVERYTHING, 0)
    assert all(type(v) is np.ndarray for v in (got.labels, got.count, got.coords, got.shifted, got.min))
    assert_partials_close(got, expected)
    generic = array_kernel.block_partials(cupy.asarray(labels), [cupy.asarray(image)], offset, EVERYTHING, 0)
    assert_partials_close(got, generic)


@pytest.mark.parametrize("skipna", [False, True])
def test_nan_pixels_on_the_device(skipna: bool) -> None:
    labels = blobs((1, 40, 50), "int64", seed=3)
    image = values(2, labels.shape, "float64", seed=4)
    image[0, 0, :3] = np.nan
    image[1][labels == labels[0, 20, 20]] = np.nan
    needs = Needs(order=4, extrema=True, skipna=skipna)
    got = gpu_kernel.block_partials(cupy.asarray(labels), [cupy.asarray(image)], (0, 0, 0), needs)
    assert_partials_close(got, KERNELS["numba"](labels, [image], (0, 0, 0), needs))


def test_empty_and_all_background_blocks_on_the_device() -> None:
    for labels in (np.zeros((0, 4, 4), np.uint64), np.full((2, 3, 4), 7, np.int16)):
        image = values(2, labels.shape, "uint16", seed=5)
        got = gpu_kernel.block_partials(cupy.asarray(labels), [cupy.asarray(image)], (0, 0, 0), EVERYTHING, 7)
        assert_partials_close(got, KERNELS["numba"](labels, [image], (0, 0, 0), EVERYTHING, 7))


def test_exact_integer_sums_and_float64_extrema_on_the_device() -> None:
    labels = cupy.zeros((1, 2048, 4096), cupy.uint8)
    image = np.full((1, 1, 2048, 4096), 2**31 - 1, np.int32)
    image[0, 0, 0, ::7] = -(2**31)
    parts = gpu_kernel.block_partials(labels, [cupy.asarray(image)], (0, 0, 0), Needs(1))
    assert parts.shifted is not None
    assert parts.shift is not None
    shifted = int(image.astype(np.int64).sum()) - labels.size * int(parts.shift[0, 0])  # exact, rounded once
    assert parts.shifted[0, 0] == float(shifted)
    close = np.array([1.0 + 2e-12, 1.0 + 1e-12, 1.0 + 3e-12]).reshape(1, 1, 1, 3)
    parts = gpu_kernel.block_partials(
        cupy.zeros((1, 1, 3), cupy.int32), [cupy.asarray(close)], (0, 0, 0), Needs(0, extrema=True)
    )
    assert parts.min is not None
    assert parts.max is not None
    assert parts.min[0, 0] == 1.0 + 1e-12
    assert parts.max[0, 0] == 1.0 + 3e-12


@pytest.mark.parametrize("layout", ["cupy", "dask-cupy"])
def test_engine_on_the_device_against_scipy(layout: str) -> None:
    labels = blobs((3, 30, 37), "uint64", seed=6)
    image = values(3, labels.shape, "float32", seed=7)
    glabels, gimage = cupy.asarray(labels), cupy.asarray(image)
    if layout == "dask-cupy":
        glabels = da.from_array(glabels, chunks=(1, 16, 20), asarray=False)
        gimage = da.from_array(gimage, chunks=(2, 2, 11, 13), asarray=False)
    result = aggregate(glabels, gimage, ALL_STATS)
    assert all(type(value) is np.ndarray for value in result.values.values())
    assert_all_stats(result.values, reference(labels, image, [int(i) for i in result.labels]), ALL_STATS)


@pytest.mark.parametrize("layout", ["cupy", "dask-cupy"])
def test_accessor_on_the_device_returns_numpy(layout: str) -> None:
    labels = blobs((2, 20, 24), "int32", seed=8)
    image = values(2, labels.shape, "uint16", seed=9)
    glabels, gimage = cupy.asarray(labels), cupy.asarray(image)
    if layout == "dask-cupy":
        glabels = da.from_array(glabels, chunks=(1, 8, 12), asarray=False)
        gimage = da.from_array(gimage, chunks=(1, 1, 8, 12), asarray=False)
    ximage = xr.DataArray(gimage, dims=("c", "z", "y", "x"), coords={"c": ["a", "b"]})
    xlabels = xr.DataArray(glabels, dims=("z", "y", "x"))
    result = ximage.rasteragg.aggregate(xlabels, ALL_STATS)
    assert all(type(result[name].data) is np.ndarray for name in ALL_STATS)
    ids = [int(i) for i in result["label"].values]
    expected = reference(labels, image, ids)
    for name in ALL_STATS:
        value = result[name].values
        assert_all_stats({name: value}, expected, [name])
    lazy = ximage.rasteragg.aggregate(xlabels, ["mean", "max"], index=[ids[0], 10**6])
    assert isinstance(lazy["mean"].data, da.Array) == (layout == "dask-cupy")
    computed = lazy.compute()
    assert type(computed["mean"].data) is np.ndarray
    assert np.isnan(computed["mean"].values[1]).all()


@pytest.mark.parametrize("layout", ["cupy", "dask-cupy"])
def test_paint_stays_on_the_device(layout: str) -> None:
    labels = blobs((1, 20, 24), "int64", seed=14)
    glabels = cupy.asarray(labels)
    if layout == "dask-cupy":
        glabels = da.from_array(glabels, chunks=(1, 8, 12), asarray=False)
    ids = np.unique(labels)[1:]
    table = xr.DataArray(
        np.arange(2.0 * ids.size).reshape(-1, 2), dims=("label", "c"), coords={"label": ids, "c": ["a", "b"]}
    )
    painted = xr.DataArray(glabels, dims=("z", "y", "x")).rasteragg.paint(table)
    expected = xr.DataArray(labels, dims=("z", "y", "x")).rasteragg.paint(table)
    data = painted.data.compute() if layout == "dask-cupy" else painted.data
    assert type(data) is cupy.ndarray
    np.testing.assert_array_equal(cupy.asnumpy(data), expected.values)


def test_raster_aggregator_runs_on_the_gpu() -> None:
    labels = blobs((2, 30, 40), "int32", seed=10)
    image = values(3, labels.shape, "uint16", seed=11)
    mask = da.from_array(labels, chunks=(1, 15, 20))
    pixels = da.from_array(image, chunks=(1, 1, 15, 20))
    stats = ("sum", "mean", "count", "var", "kurtosis", "skew", "min", "max")
    on_gpu = RasterAggregator(mask, pixels, run_on_gpu=True)
    assert on_gpu._run_on_gpu is True
    assert array_backend(on_gpu._mask) == array_backend(on_gpu._image) == "cupy"
    on_cpu = RasterAggregator(mask, pixels, run_on_gpu=False)
    for got, expected in zip(on_gpu.aggregate_stats(stats), on_cpu.aggregate_stats(stats), strict=True):
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-9, atol=1e-6)


def _crop_row(mask: np.ndarray, intensity: np.ndarray) -> list[float]:
    """A crop function (as skimage's extra properties): pixels, the row-weighted sum, width."""
    rows = np.arange(mask.shape[-2], dtype=np.float64)[:, None]
    return [float(mask.sum()), float((intensity * rows).sum()), float(mask.shape[-1])]


@pytest.mark.parametrize("layout", ["cupy", "dask-cupy"])
@pytest.mark.parametrize("dims", ["yx", "zyx"])
def test_host_statistics_on_the_device_equal_the_numpy_path(layout: str, dims: str) -> None:
    """Median, quantiles, a crop function, perimeter (2-D) and solidity on CuPy data through the
    accessor: NumPy arrays, equal to the NumPy path's (exactly; the mean to rounding, as its
    float64 sums come from atomic adds)."""
    shape = (40, 52) if dims == "yx" else (3, 20, 26)
    labels = irregular(shape, 9, seed=15, size=5 if dims == "yx" else 3)
    image = values(2, labels.shape, "uint16", seed=16)
    chunks = (16, 20) if dims == "yx" else (2, 8, 11)
    on_gpu, on_cpu = [], []
    for device in (True, False):
        data, pixels = (cupy.asarray(labels), cupy.asarray(image)) if device else (labels, image)
        if layout == "dask-cupy":
            data = da.from_array(data, chunks=chunks, asarray=False)
            pixels = da.from_array(pixels, chunks=(1, *chunks), asarray=False)
        (on_gpu if device else on_cpu).append(
            (xr.DataArray(data, dims=tuple(dims)), xr.DataArray(pixels, dims=("c", *dims)))
        )
    shape_stats = ["perimeter", "solidity"] if dims == "yx" else ["solidity"]
    stats = ["median", "mean", "area", *shape_stats]
    results = []
    for xlabels, ximage in (on_gpu[0], on_cpu[0]):
        table = ximage.rasteragg.aggregate(xlabels, stats).compute()
        quartiles = ximage.rasteragg.quantile(xlabels, [0.25, 0.75]).compute()
        crops = ximage.rasteragg.apply(xlabels, _crop_row, output_size=3, on="crops").compute()
        shapes = xlabels.rasteragg.aggregate(shape_stats).compute()
        results.append((table, quartiles, crops, shapes))
    (table, quartiles, crops, shapes), expected = results
    for name in stats:
        assert type(table[name].data) is np.ndarray, name
        if name == "mean":
            np.testing.assert_allclose(table[name].values, expected[0][name].values, rtol=1e-12)
        else:
            np.testing.assert_array_equal(table[name].values, expected[0][name].values, err_msg=name)
    for got, want in ((quartiles, expected[1]), (crops, expected[2])):
        assert type(got.data) is np.ndarray
        np.testing.assert_array_equal(got.values, want.values)
    for name in shape_stats:
        np.testing.assert_array_equal(shapes[name].values, expected[3][name].values, err_msg=name)


def test_raster_aggregator_median_perimeter_and_solidity_on_the_gpu() -> None:
    labels = irregular((1, 30, 40), 7, seed=17, size=5)
    image = values(2, labels.shape, "uint16", seed=18)
    mask = da.from_array(labels, chunks=(1, 15, 20))
    pixels = da.from_array(image, chunks=(1, 1, 15, 20))
    on_gpu = RasterAggregator(mask, pixels, run_on_gpu=True)
    assert array_backend(on_gpu._mask) == "cupy"
    on_cpu = RasterAggregator(mask, pixels, run_on_gpu=False)
    stats = ("median", "perimeter", "solidity", "area")
    for got, expected in zip(on_gpu.aggregate_stats(stats), on_cpu.aggregate_stats(stats), strict=True):
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
    pd.testing.assert_frame_equal(on_gpu.aggregate_median(), on_cpu.aggregate_median(), check_exact=True)


def test_mixed_numpy_and_cupy_inputs_are_an_error() -> None:
    labels = blobs((1, 6, 8), "int32", seed=12)
    image = values(1, labels.shape, "float64", seed=13)
    with pytest.raises(TypeError, match="same device"):
        aggregate(cupy.asarray(labels), image, ["mean"])
    ximage = xr.DataArray(cupy.asarray(image), dims=("c", "z", "y", "x"))
    with pytest.raises(TypeError, match="same device"):
        ximage.rasteragg.mean(xr.DataArray(labels, dims=("z", "y", "x")))


def test_gpu_benchmark_quick_run() -> None:
    script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    run = subprocess.run(
        [sys.executable, str(script), "--quick", "--repeat", "1"], capture_output=True, text=True, check=True
    )
    assert "copy bandwidth" in run.stdout


def test_cupy_inputs_are_split_into_gpu_sized_blocks() -> None:
    from xr_rasteragg.engine import GPU_BLOCK_PIXELS, as_dask

    blocks = as_dask(cupy.zeros((2, 9000, 9000), cupy.uint8), "labels")
    assert blocks.chunks == ((1, 1), (8192, 808), (8192, 808))
    assert GPU_BLOCK_PIXELS == 8192**2
