"""Where the blocks run, without a GPU: the device probe, the CPU fallback, and dispatch by block type.

A "device" array type (a NumPy subclass from a module named ``fakegpu``) stands in for CuPy, so
that moving blocks, dispatching the GPU kernel, NumPy-backed results and the mixed-input error
are all checked on any machine.
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import xr_rasteragg
import xr_rasteragg.aggregator
import xr_rasteragg.kernels
from xr_rasteragg import RasterAggregator
from xr_rasteragg.engine import aggregate
from xr_rasteragg.gpu import probe_cupy, to_device, to_host
from xr_rasteragg.kernels import array_backend


class DeviceArray(np.ndarray):
    """NumPy data that claims to live elsewhere: its backend is ``fakegpu``."""

    __module__ = "fakegpu"


fake_device = types.SimpleNamespace(
    asarray=lambda block: np.asarray(block).view(DeviceArray),
    empty=lambda shape, dtype: np.empty(shape, dtype).view(DeviceArray),
)


@pytest.fixture
def fakegpu_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Blocks of the ``fakegpu`` backend are computed by the array-API kernel (which runs on CuPy too)."""
    monkeypatch.setitem(xr_rasteragg.kernels._KERNELS, "fakegpu", "xr_rasteragg.kernels.xp")
    yield
    xr_rasteragg.kernels._LOADED.pop("fakegpu", None)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(2, 12, 10)).astype(np.uint32)
    image = rng.integers(0, 2**16, size=(3, 2, 12, 10)).astype(np.uint16)
    return labels, image


def make(labels: np.ndarray, image: np.ndarray, **kwargs: Any) -> RasterAggregator:
    mask = da.from_array(labels, chunks=(1, 6, 5))
    pixels = da.from_array(image, chunks=(1, 1, 6, 5))
    return RasterAggregator(mask, pixels, **kwargs)


STATS = ("sum", "mean", "count", "var", "kurtosis", "skew", "min", "max")


def cpu_frames(labels: np.ndarray, image: np.ndarray) -> list[pd.DataFrame]:
    return make(labels, image, run_on_gpu=False).aggregate_stats(STATS)


# -- the probe and the fallback ------------------------------------------------------------------


class CUDARuntimeError(RuntimeError):
    """What CuPy raises when the CUDA runtime fails."""


def broken_cupy(message: str) -> types.ModuleType:
    """A CuPy module whose first allocation fails as it does without a driver or a device."""
    module = types.ModuleType("cupy")

    def arange(*args: Any, **kwargs: Any) -> Any:
        raise CUDARuntimeError(message)

    module.arange = arange  # type: ignore[attr-defined]
    module.int64 = np.int64  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (None, "ModuleNotFoundError"),
        (broken_cupy("cudaErrorInsufficientDriver: CUDA driver version is insufficient"), "Driver"),
        (broken_cupy("cudaErrorNoDevice: no CUDA-capable device is detected"), "NoDevice"),
    ],
    ids=["no-cupy", "no-driver", "no-device"],
)
def test_run_on_gpu_falls_back_to_cpu_with_a_warning(
    data: tuple[np.ndarray, np.ndarray],
    module: types.ModuleType | None,
    reason: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", module)
    labels, image = data
    with caplog.at_level(logging.WARNING, logger="xr_rasteragg"):
        aggregator = make(labels, image, run_on_gpu=True)
    assert "Falling back to CPU" in caplog.text
    assert reason in caplog.text
    assert aggregator._run_on_gpu is False
    assert array_backend(aggregator._mask) == array_backend(aggregator._image) == "numpy"
    for got, expected in zip(aggregator.aggregate_stats(STATS), cpu_frames(labels, image), strict=True):
        pd.testing.assert_frame_equal(got, expected)


def test_installed_cupy_without_a_gpu_falls_back(data: tuple[np.ndarray, np.ndarray]) -> None:
    """The real CuPy, where it is installed but has no usable device (CI machines, laptops)."""
    pytest.importorskip("cupy")
    cupy, reason = probe_cupy()
    if cupy is not None:
        pytest.skip("a GPU is usable here")
    assert reason
    labels, image = data
    aggregator = make(labels, image, run_on_gpu=True)
    assert aggregator._run_on_gpu is False
    pd.testing.assert_frame_equal(aggregator.aggregate_mean(), cpu_frames(labels, image)[1])


def test_probe_runs_a_kernel_and_checks_its_result(monkeypatch: pytest.MonkeyPatch) -> None:
    working = types.ModuleType("cupy")
    working.arange = np.arange  # type: ignore[attr-defined]
    working.int64 = np.int64  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cupy", working)
    assert probe_cupy() == (working, "")
    working.arange = lambda n, dtype: np.zeros(n, dtype)  # type: ignore[attr-defined]
    cupy, reason = probe_cupy()
    assert cupy is None
    assert "wrong result" in reason


# -- moving blocks, and dispatch by block type ----------------------------------------------------


def test_run_on_gpu_moves_blocks_to_the_device(
    data: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fakegpu_kernel: None,
) -> None:
    monkeypatch.setattr(xr_rasteragg.aggregator, "probe_cupy", lambda: (fake_device, ""))
    labels, image = data
    with caplog.at_level(logging.WARNING, logger="xr_rasteragg"):
        aggregator = make(labels, image, run_on_gpu=True)
    assert not caplog.text
    assert aggregator._run_on_gpu is True
    assert array_backend(aggregator._mask) == array_backend(aggregator._image) == "fakegpu"
    with dask.config.set(scheduler="sync"):
        frames = aggregator.aggregate_stats(STATS)
    assert "fakegpu" in xr_rasteragg.kernels._LOADED  # the blocks went to the GPU kernel
    for got, expected in zip(frames, cpu_frames(labels, image), strict=True):
        assert all(dtype.kind in "fiu" for dtype in got.dtypes)  # no object columns of device scalars
        pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-12)


def test_run_on_gpu_false_moves_device_blocks_to_the_host(data: tuple[np.ndarray, np.ndarray]) -> None:
    labels, image = data
    mask = to_device(da.from_array(labels, chunks=(1, 6, 5)), fake_device)
    pixels = to_device(da.from_array(image, chunks=(1, 1, 6, 5)), fake_device)
    assert array_backend(mask) == "fakegpu"
    aggregator = RasterAggregator(mask, pixels, run_on_gpu=False)
    assert array_backend(aggregator._mask) == array_backend(aggregator._image) == "numpy"
    assert type(aggregator._mask.blocks[0, 0, 0].compute()) is np.ndarray
    pd.testing.assert_frame_equal(aggregator.aggregate_mean(), cpu_frames(labels, image)[1])
    assert to_host(aggregator._mask) is aggregator._mask


def test_accessor_follows_the_data_and_returns_numpy(
    data: tuple[np.ndarray, np.ndarray], fakegpu_kernel: None
) -> None:
    labels, image = data
    device_labels = to_device(da.from_array(labels, chunks=(1, 6, 5)), fake_device)
    device_image = to_device(da.from_array(image, chunks=(1, 1, 6, 5)), fake_device)
    ximage = xr.DataArray(device_image, dims=("c", "z", "y", "x"), coords={"c": ["a", "b", "c"]})
    xlabels = xr.DataArray(device_labels, dims=("z", "y", "x"))
    with dask.config.set(scheduler="sync"):
        lazy = ximage.rasteragg.aggregate(xlabels, ["mean", "max", "count"])
        assert all(isinstance(lazy[name].data, da.Array) for name in ("mean", "max", "count"))
        result = lazy.compute()
    assert "fakegpu" in xr_rasteragg.kernels._LOADED
    expected = xr.DataArray(image, dims=("c", "z", "y", "x"), coords={"c": ["a", "b", "c"]}).rasteragg
    expected_result = expected.aggregate(xr.DataArray(labels, dims=("z", "y", "x")), ["mean", "max", "count"])
    for name in ("mean", "max", "count"):
        assert type(result[name].data) is np.ndarray
    xr.testing.assert_allclose(result, expected_result, rtol=1e-12)


@pytest.mark.parametrize("device_side", ["labels", "image"])
def test_mixed_host_and_device_inputs_are_an_error(
    data: tuple[np.ndarray, np.ndarray], device_side: str
) -> None:
    labels, image = data
    dlabels: Any = da.from_array(labels, chunks=(1, 6, 5))
    dimage: Any = da.from_array(image, chunks=(1, 1, 6, 5))
    if device_side == "labels":
        dlabels = to_device(dlabels, fake_device)
    else:
        dimage = to_device(dimage, fake_device)
    ximage = xr.DataArray(dimage, dims=("c", "z", "y", "x"))
    xlabels = xr.DataArray(dlabels, dims=("z", "y", "x"))
    mixed = r"same device; got (numpy|fakegpu) labels and a (fakegpu|numpy) image"
    with pytest.raises(TypeError, match=mixed):
        ximage.rasteragg.mean(xlabels)
    with pytest.raises(TypeError, match=r"cupy\.asarray"):
        aggregate(dlabels, dimage, ["mean"])


@pytest.mark.parametrize("device_side", ["labels", "image"])
def test_blocks_that_mix_host_and_device_are_an_error(
    data: tuple[np.ndarray, np.ndarray], device_side: str, fakegpu_kernel: None
) -> None:
    """Inputs whose metadata say NumPy but whose blocks live elsewhere fail in the task that meets both."""
    labels, image = data
    dlabels: Any = da.from_array(labels, chunks=(1, 6, 5))
    dimage: Any = da.from_array(image, chunks=(1, 1, 6, 5))
    if device_side == "labels":
        dlabels = dlabels.map_blocks(fake_device.asarray, meta=np.empty((0, 0, 0), labels.dtype))
    else:
        dimage = dimage.map_blocks(fake_device.asarray, meta=np.empty((0, 0, 0, 0), image.dtype))
    with pytest.raises(TypeError, match=r"a block mixes arrays from \['fakegpu', 'numpy'\]"):
        aggregate(dlabels, dimage, ["mean"])


def test_in_memory_arrays_are_not_read_to_name_the_graph(
    data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch, fakegpu_kernel: None
) -> None:
    """Device and NumPy arrays get graph names without a content token (which reads them whole)."""
    tokenized: list[type] = []
    tokenize = dask.base.tokenize

    def spy(*args: Any, **kwargs: Any) -> str:
        # Empty arrays (the ``meta`` of dask's blockwise) cost nothing to hash.
        tokenized.extend(type(arg) for arg in [*args, *kwargs.values()] if getattr(arg, "size", 1))
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(dask.base, "tokenize", spy)
    labels, image = data
    result = aggregate(fake_device.asarray(labels), fake_device.asarray(image), ["mean"])
    assert DeviceArray not in tokenized
    expected = aggregate(labels, image, ["mean"])
    assert np.ndarray not in tokenized
    np.testing.assert_allclose(result.values["mean"], expected.values["mean"], rtol=1e-12)
