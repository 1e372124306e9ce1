"""The fused CUDA kernel (``xr_rasteragg.kernels.cuda``), on every machine.

Without a usable GPU, ``conftest.py`` switches Numba's CUDA simulator on before ``numba.cuda`` is
first imported, so the kernels run here on NumPy arrays, thread by thread; on a machine with a
GPU the same tests run on the device with CuPy arrays. The simulator is slow: the blocks are
tiny, and a small segment (4 pixels per thread) splits runs at segment ends as large blocks do.

Partials against the compiled CPU kernel for every image dtype and label dtype (uint64 ids of
2**63 and more, the id whose key marks an empty slot, negative ids), every statistic against
SciPy through the engine, NaN pixels with and without ``skipna``, empty and all-background
blocks, channel chunks that view one array or not, random cases (hypothesis) against the CPU
kernel, adversarial precision against exact moments, and the order keys of the extrema.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import dask
import dask.array as da
import numpy as np
import pytest
import test_properties as props
import test_shape as shape
from conftest import ALL_STATS, KERNELS, assert_all_stats, assert_partials_close, counted_updates, reference
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import xr_rasteragg.engine
from xr_rasteragg.engine import aggregate
from xr_rasteragg.families import Family, Geometry, Weighted
from xr_rasteragg.gpu import probe_cupy
from xr_rasteragg.kernels import StagedKernel
from xr_rasteragg.kernels import cuda as cuda_kernel
from xr_rasteragg.partials import Needs, Partials
from xr_rasteragg.stats import Space

# Under the simulator the device code runs on NumPy scalars, which warn where the device silently
# wraps integers (atomics) or makes NaN (inf - inf) as IEEE 754 says.
pytestmark = [
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning:numba"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:xr_rasteragg.kernels.cuda_runs"),
]

EVERYTHING = Needs(order=4, extrema=True)
#: Small segments, so that the tiny blocks still have runs split at segment ends; small hash
#: tables, so that labels collide in them (and the simulator runs few threads per table).
KERNEL = cuda_kernel.CudaRunKernel(segment=4, slots=8)
CUPY, _ = probe_cupy()
#: The simulator runs one launch at a time (it swaps the module that kernels see while one runs).
SCHEDULER = "threads" if CUPY is not None else "synchronous"

#: Label ids per dtype: extremes, negatives, ids of 2**63 and more, huge sparse values.
IDS: dict[str, list[int]] = {
    "int8": [-128, -3, 0, 5, 127],
    "uint16": [0, 2, 999, 65535],
    "int32": [-(2**31), -1, 0, 11, 2**31 - 1],
    "int64": [-(2**63), -(2**40) - 1, 0, 2**40 + 7, 2**63 - 1],
    "uint64": [0, 3, 2**40 + 1, 2**63, 2**63 + 9, 2**64 - 1],
}
IMAGE_DTYPES = ["uint8", "uint16", "int16", "int32", "uint32", "int64", "uint64", "float32", "float64"]


def blobs(shape: tuple[int, int, int], dtype: str, seed: int) -> np.ndarray:
    """Blocky labels of the dtype's ids with 10% noise."""
    rng = np.random.default_rng(seed)
    ids = np.array(IDS[dtype], dtype=dtype)
    coarse = rng.choice(ids, size=(shape[0], -(-shape[1] // 3), -(-shape[2] // 4)))
    labels = coarse.repeat(3, axis=1).repeat(4, axis=2)[:, : shape[1], : shape[2]].copy()
    noise = rng.random(shape) < 0.1
    labels[noise] = rng.choice(ids, size=int(noise.sum()))
    return labels


def values(nchan: int, shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    """Random values over the dtype's whole range (integers) or around 100 (floats)."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=(nchan, *shape), endpoint=True, dtype=dtype)
    return rng.normal(100.0, 10.0, size=(nchan, *shape)).astype(dtype)


def device(array: np.ndarray) -> Any:
    """The array where the kernel runs: on the GPU when there is one, else as it is (simulator)."""
    return array if CUPY is None else CUPY.asarray(array)


def run(
    labels: np.ndarray,
    chunks: list[np.ndarray] | None,
    needs: Needs,
    skip: int | None = None,
    offset: tuple[int, int, int] = (0, 0, 0),
) -> Partials:
    """The CUDA kernel's partials of one block."""
    image = None if chunks is None else [device(chunk) for chunk in chunks]
    return KERNEL(device(labels), image, offset, needs, skip)


def test_the_kernel_runs_in_two_stages_and_is_registered_for_cupy() -> None:
    assert isinstance(cuda_kernel.block_partials, StagedKernel)
    assert xr_rasteragg.kernels._KERNELS["cupy"] == "xr_rasteragg.kernels.cuda"
    if CUPY is None:  # CI: the simulator, switched on by conftest.py
        from numba import cuda

        assert type(cuda.device_array(1, np.int8)).__module__.startswith("numba.cuda.simulator")


@pytest.mark.parametrize(
    ("label_dtype", "image_dtype"),
    [
        ("int8", "uint8"),
        ("uint64", "uint16"),
        ("int64", "int16"),
        ("int32", "int32"),
        ("uint16", "uint32"),
        ("uint64", "int64"),
        ("int64", "uint64"),
        ("int8", "float32"),
        ("uint64", "float64"),
    ],
)
def test_partials_agree_with_the_cpu_kernel(label_dtype: str, image_dtype: str) -> None:
    """Values over each integer dtype's whole range: the power sums pass 2**64 (and the CPU
    kernel's exactness bound, which sends it to its fallback); the 128-bit sums do not need one."""
    labels = blobs((2, 5, 9), label_dtype, seed=1)
    image = values(2, labels.shape, image_dtype, seed=2)
    offset = (4, 100, 2**20)
    got = run(labels, [image], EVERYTHING, 0, offset)
    assert got.labels.dtype == labels.dtype
    assert_partials_close(got, KERNELS["numba"](labels, [image], offset, EVERYTHING, 0))


def test_every_statistic_against_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the engine: two spatial blocks, three channel chunks that view one array."""
    labels = blobs((1, 7, 12), "int32", seed=3)
    image = values(3, labels.shape, "float64", seed=4)
    monkeypatch.setattr(xr_rasteragg.engine, "kernel_for", lambda array: KERNEL)
    dlabels = da.from_array(device(labels), chunks=(1, 7, 6), asarray=False)
    dimage = da.from_array(device(image), chunks=(1, 1, 7, 6), asarray=False)
    with dask.config.set(scheduler=SCHEDULER):
        result = aggregate(dlabels, dimage, ALL_STATS, eager=True)
    assert_all_stats(result.values, reference(labels, image, [int(i) for i in result.labels]), ALL_STATS)


def test_channel_chunks_of_separate_arrays() -> None:
    labels = blobs((1, 5, 9), "uint16", seed=5)
    image = values(3, labels.shape, "uint16", seed=6)
    chunks = [image[:1], image[1:2], image[2:].copy()]
    got = run(labels, chunks, EVERYTHING, 0)
    assert_partials_close(got, KERNELS["numba"](labels, chunks, (0, 0, 0), EVERYTHING, 0))


@pytest.mark.parametrize("skipna", [False, True])
def test_nan_pixels(skipna: bool) -> None:
    labels = blobs((1, 6, 10), "int64", seed=5)
    image = values(2, labels.shape, "float32", seed=6)
    image[0, 0, :3] = np.nan
    image[1][labels == labels[0, 3, 5]] = np.nan  # a label without any valid pixel in a channel
    needs = Needs(order=4, extrema=True, skipna=skipna)
    assert_partials_close(run(labels, [image], needs), KERNELS["numba"](labels, [image], (0, 0, 0), needs))


def test_empty_and_all_background_blocks() -> None:
    for labels in (np.zeros((0, 4, 4), np.uint64), np.full((1, 3, 4), 7, np.int16)):
        for image, needs in ((None, Needs(0)), (values(2, labels.shape, "float64", 7), EVERYTHING)):
            chunks = None if image is None else [image]
            got = run(labels, chunks, needs, skip=7)
            expected = KERNELS["numba"](labels, chunks, (0, 0, 0), needs, 7)
            assert got.size == 0
            assert_partials_close(got, expected)
            for name, value in expected.channel_arrays().items():
                assert getattr(got, name).shape == value.shape, name


def test_ids_at_the_ends_of_64_bit_dtypes() -> None:
    """2**64 - 1 is the key that marks an empty slot of the hash table: it has a slot of its own."""
    for dtype, ids in (("uint64", [2**64 - 1, 2**63, 1]), ("int64", [-(2**63), 2**63 - 1, -1])):
        labels = np.array(ids * 4, dtype=dtype).reshape(1, 3, 4)
        image = np.arange(12.0).reshape(1, 1, 3, 4)
        parts = run(labels, [image], Needs(2, extrema=True))
        np.testing.assert_array_equal(parts.labels, np.sort(np.array(ids, dtype=dtype)))
        np.testing.assert_array_equal(parts.count, [4, 4, 4])
        assert_partials_close(parts, KERNELS["numba"](labels, [image], (0, 0, 0), Needs(2, extrema=True)))


def test_float64_extrema_keep_full_precision() -> None:
    labels = np.zeros((1, 1, 4), np.int32)
    image = np.array([1.0 + 2e-12, 1.0 + 1e-12, 1.0 + 3e-12, 1.0 + 2e-12]).reshape(1, 1, 1, 4)
    parts = run(labels, [image], Needs(0, extrema=True))
    assert parts.min is not None
    assert parts.max is not None
    assert parts.min[0, 0] == 1.0 + 1e-12
    assert parts.max[0, 0] == 1.0 + 3e-12


@pytest.mark.parametrize("order", [0, 2])
def test_valid_counts_with_extrema_alone(order: int) -> None:
    """Valid pixels are counted when NaN pixels are skipped, with or without a sum pass (found by
    hypothesis: with extrema alone, the counts stayed 0)."""
    labels = np.array([2, 0], np.uint16).reshape(1, 2, 1)
    image = np.array([1000.0, np.nan]).reshape(1, 1, 2, 1)
    needs = Needs(order, extrema=True, skipna=True)
    got = run(labels, [image], needs, 65535)
    np.testing.assert_array_equal(got.nvalid, [[0], [1]])
    assert_partials_close(got, KERNELS["numba"](labels, [image], (0, 0, 0), needs, 65535))


#: Few examples and no shrinking: the simulator runs a kernel in about a second.
SIMULATED = settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


@SIMULATED
@given(data=st.data(), case=props.cases(), needs=props.needs())
def test_random_cases_agree_with_the_cpu_kernel(data: st.DataObject, case: Any, needs: Needs) -> None:
    labels, image, ids = case
    skip = data.draw(st.sampled_from([None, *ids]), label="skip")
    chunks = props.channel_chunks(data.draw, image)
    got = run(labels, chunks, needs, skip, (1, 2, 3))
    assert_partials_close(got, KERNELS["numba"](labels, chunks, (1, 2, 3), needs, skip))


@SIMULATED
@given(case=props.adversarial())
def test_adversarial_precision(case: Any) -> None:
    """Values where float arithmetic loses the answer: within the contract of the exact moments."""
    labels, image = case
    with (
        mock.patch.object(xr_rasteragg.engine, "kernel_for", return_value=KERNEL),
        dask.config.set(scheduler=SCHEDULER),
    ):
        result = aggregate(device(labels), device(image), props.MOMENTS)
    for row, label in enumerate(result.labels):
        for channel in range(image.shape[0]):
            x = image[channel][labels == label]
            got = {name: float(result.values[name][row, channel]) for name in props.MOMENTS}
            props.assert_contract(got, x, (label, channel))


@pytest.mark.parametrize("dtype", IMAGE_DTYPES)
def test_order_keys_sort_as_the_values_and_map_back(dtype: str) -> None:
    if np.dtype(dtype).kind == "f":
        info = np.finfo(dtype)
        special = [-np.inf, -info.max, -1.5, -info.tiny, -info.smallest_subnormal, 0.0]
        special += [info.smallest_subnormal, info.tiny, 1.0, 1.0 + info.eps, info.max, np.inf]
        data = np.concatenate([np.array(special, dtype), values(1, (200,), dtype, seed=10)[0]])
    else:
        limits = np.iinfo(dtype)
        ends = np.array([limits.min, limits.min + 1, 0, limits.max - 1, limits.max], dtype)
        data = np.concatenate([ends, values(1, (200,), dtype, seed=10)[0]])
    keys = cuda_kernel.order_keys(data)
    assert keys.dtype == np.uint64
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(data[order].astype(np.float64)) >= 0)
    back = cuda_kernel.from_order_keys(keys, data.dtype)
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back.view(f"u{data.dtype.itemsize}"), data.view(f"u{data.dtype.itemsize}"))
    if np.dtype(dtype).kind == "f":  # the keys that the kernel gives a NaN pixel map back to NaN
        full = np.uint64(2 ** (8 * data.dtype.itemsize) - 1)
        assert np.isnan(cuda_kernel.from_order_keys(np.array([0, full], np.uint64), data.dtype)).all()


def test_families_beyond_the_moments_dispatch_on_their_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new family adds its update to FAMILY_UPDATES; one without an update is an error."""

    class Extra(Family):
        name = "extra"
        channel = False
        all_fields = ()

        def fields(self) -> tuple[()]:
            return ()

        def fold(self, merged: Any, part: Any, rows: Any, first: Any) -> None:
            return None

    labels = np.array([[[1, 1, 2]]], np.int32)
    with pytest.raises(TypeError, match="no update for the family 'extra'"):
        run(labels, None, Needs(0, more=(Extra(),)))
    seen: list[int] = []
    update = lambda parts, image, runs, family: lambda: seen.append(parts.size)  # noqa: E731
    monkeypatch.setitem(cuda_kernel.FAMILY_UPDATES, Extra, update)
    run(labels, None, Needs(0, more=(Extra(),)))
    assert seen == [2]


GEOMETRY_FIELDS = ("origin", "offsets", "products", "low", "high")
WEIGHTED_FIELDS = ("weight", "weighted_z", "weighted_y", "weighted_x")


@pytest.mark.parametrize(
    ("label_dtype", "image_dtype", "shape", "skip"),
    [
        ("int8", "uint16", (2, 5, 9), 0),
        ("uint64", "float32", (1, 7, 10), None),
        ("int64", "int64", (3, 4, 6), 0),
    ],
)
def test_shape_partials_equal_the_cpu_kernel(
    label_dtype: str, image_dtype: str, shape: tuple[int, int, int], skip: int | None
) -> None:
    """Geometry exactly (the same integers, about the same origins), the weighted sums to rounding;
    runs split at 4-pixel segments, a block far from the image origin."""
    labels = blobs(shape, label_dtype, seed=11)
    image = values(2, labels.shape, image_dtype, seed=12)
    needs = Needs(0, more=(Geometry(), Weighted()))
    offset = (5, 3000, 2**31 + 7)
    got = run(labels, [image[:1], image[1:]], needs, skip, offset)
    expected = KERNELS["numba"](labels, [image[:1], image[1:]], offset, needs, skip)
    np.testing.assert_array_equal(got.labels, expected.labels)
    for name in GEOMETRY_FIELDS:
        a, b = getattr(got, name), getattr(expected, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name in WEIGHTED_FIELDS:
        np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-12, err_msg=name)


SHAPE_2D = tuple(name for name in shape.SHAPE_2D if name not in ("perimeter", "solidity"))
SHAPE_3D = tuple(name for name in SHAPE_2D if name not in ("eccentricity", "orientation"))


@pytest.mark.parametrize(
    ("grid", "chunks"), [((1, 14, 17), (1, 8, 9)), ((4, 6, 7), (2, 6, 4))], ids=["2d", "3d"]
)
def test_shape_features_through_the_engine_equal_regionprops(
    grid: tuple[int, int, int], chunks: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The moment-based shape features and centroid_weighted, from blocks that labels span."""
    labels = shape.irregular(grid, 5, seed=13, size=3)
    image = values(2, grid, "uint16", seed=14)
    flat = grid[0] == 1
    props = (*(SHAPE_2D if flat else SHAPE_3D), "centroid_weighted")
    monkeypatch.setattr(xr_rasteragg.engine, "kernel_for", lambda array: KERNEL)
    dlabels = da.from_array(device(labels), chunks=chunks, asarray=False)
    dimage = da.from_array(device(image), chunks=(1, *chunks), asarray=False)
    space = Space((1, 2), (1.0, 1.0)) if flat else Space()
    with dask.config.set(scheduler=SCHEDULER):
        result = aggregate(dlabels, dimage, props, background=0, space=space, eager=True)
    plain = labels[0] if flat else labels
    expected = shape.reference(
        plain, props, intensity_image=np.moveaxis(image[:, 0] if flat else image, 0, -1)
    )
    np.testing.assert_array_equal(result.labels, expected["label"])
    expected["centroid_weighted"] = np.swapaxes(expected["centroid_weighted"], 1, 2)
    shape.check({k: np.asarray(v) for k, v in result.values.items()}, expected, props)
    assert result.values["bbox"].dtype == np.int64


def _engine(
    kernel: Any, labels: np.ndarray, image: np.ndarray | None, chunks: Any, stats: Any, **kw: Any
) -> Any:
    """The engine's eager result with every block through ``kernel`` (blocks on the device when
    there is one and ``kernel`` is the CUDA kernel)."""
    on = device if kernel is KERNEL else (lambda array: array)
    with mock.patch.object(xr_rasteragg.engine, "kernel_for", return_value=kernel):
        dlabels = da.from_array(on(labels), chunks=chunks, asarray=False)
        dimage = None if image is None else da.from_array(on(image), chunks=(1, *chunks), asarray=False)
        with dask.config.set(scheduler=SCHEDULER):
            return aggregate(dlabels, dimage, stats, eager=True, **kw)


@pytest.mark.parametrize(
    ("grid", "chunks"),
    [
        ((1, 14, 17), (1, 8, 9)),
        ((1, 14, 17), (1, 3, 17)),
        ((1, 8, 9), (1, 8, 2)),
        ((2, 9, 8), (1, 5, 4)),
        ((2, 9, 8), (2, 9, 3)),
    ],
    ids=["2d-quarters", "2d-thin-rows", "2d-thin-columns", "3d", "3d-columns"],
)
def test_perimeter_and_solidity_equal_the_cpu_kernel_and_regionprops(
    grid: tuple[int, int, int], chunks: tuple[int, int, int]
) -> None:
    """The families without a GPU update (the perimeter's border counts, the convex hulls) run on
    a host copy of each block: bit for bit the CPU kernel's results, and regionprops', for labels
    that cross block borders (irregular, some in several pieces); with the moment-based features
    and the per-channel statistics, which stay on the device."""
    labels = shape.irregular(grid, 5, seed=21, size=3)
    image = values(1, grid, "uint16", seed=22)
    flat = grid[0] == 1
    props = ("perimeter", "solidity", "area", "centroid") if flat else ("solidity", "area", "centroid")
    stats = (*props, "mean", "max")
    space = Space((1, 2), (1.0, 1.0)) if flat else Space()
    got = _engine(KERNEL, labels, image, chunks, stats, background=0, space=space)
    cpu = _engine(KERNELS["numba"], labels, image, chunks, stats, background=0, space=space)
    np.testing.assert_array_equal(got.labels, cpu.labels)
    for name in stats:
        value = got.values[name]
        assert type(value) is np.ndarray, name
        np.testing.assert_array_equal(value, cpu.values[name], err_msg=name)
    expected = shape.reference(labels[0] if flat else labels, props)
    np.testing.assert_array_equal(got.labels, expected["label"])
    shape.check(got.values, expected, props)


def test_label_families_once_per_block_whatever_the_channel_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """With each channel chunk in its own group, the updates of the families of the labels alone
    run once per label block, in its label stage (as on the CPU), with the CPU kernel's values."""
    from xr_rasteragg.families import Border, Hull

    monkeypatch.setattr(xr_rasteragg.engine, "GROUP_BYTES", 1)
    calls = counted_updates(monkeypatch, cuda_kernel.FAMILY_UPDATES, (Geometry, Border, Hull))
    grid, chunks = (1, 8, 9), (1, 4, 9)
    labels = shape.irregular(grid, 4, seed=31, size=3)
    image = values(3, grid, "uint16", seed=32)
    stats = ("mean", "area", "bbox", "perimeter", "solidity")
    space = Space((1, 2), (1.0, 1.0))
    got = _engine(KERNEL, labels, image, chunks, stats, background=0, space=space)
    assert calls == {"geometry": 2, "border": 2, "hull": 2}  # 2 label blocks, 3 channel groups each
    cpu = _engine(KERNELS["numba"], labels, image, chunks, stats, background=0, space=space)
    np.testing.assert_array_equal(got.labels, cpu.labels)
    for name in stats:
        np.testing.assert_array_equal(got.values[name], cpu.values[name], err_msg=name)


def test_the_perimeter_needs_the_frame() -> None:
    """The perimeter's family from a label stage without a frame is an error, as on the CPU."""
    from xr_rasteragg.families import Border

    labels = np.array([[[1, 1, 2], [1, 2, 2]]], np.int32)
    with pytest.raises(ValueError, match="needs the label block's frame"):
        run(labels, None, Needs(0, more=(Border(),)))


def test_host_encodings_must_hold_the_device_labels() -> None:
    """The host fallback fills the GPU kernel's rows with the CPU kernel's: a block whose two
    encodings differ (which the kernels' shared order rules out) is an error, not a misalignment."""
    labels = np.array([[[1, 1, 2], [1, 2, 3]]], np.int32)
    runs = KERNEL.encode(device(labels), (0, 0, 0), 3)
    assert list(runs.host_runs().parts.labels) == [1, 2]
    other = KERNELS["numba"].encode(labels, (0, 0, 0), None)
    with pytest.raises(RuntimeError, match="different labels"):
        cuda_kernel._checked(other, runs.parts)


def _crop_sum(mask: np.ndarray, intensity: np.ndarray) -> list[float]:
    """A crop function (as skimage's extra properties): the crop's shape and the weighted row."""
    rows = np.arange(mask.shape[-2], dtype=np.float64)[:, None]
    return [float(mask.sum()), float((intensity * rows).sum()), float(mask.shape[-1])]


@pytest.mark.parametrize(
    ("grid", "chunks", "stats"),
    [
        ((2, 9, 12), (1, 5, 7), ("median",)),
        ((2, 9, 12), (2, 9, 3), ("median", "mean", "solidity")),
        ((1, 9, 12), (1, 4, 12), ("median", "mean", "area", "perimeter", "solidity")),
    ],
    ids=["alone", "with-moments-3d", "with-shape-2d"],
)
def test_whole_label_statistics_from_the_cuda_label_stage(
    grid: tuple[int, int, int], chunks: tuple[int, int, int], stats: tuple[str, ...]
) -> None:
    """Median, quantiles and user functions (of the values, of the crops) gather a host copy of
    the CUDA label stage's blocks (with the perimeter, the framed stage's): exactly the NumPy
    path's results, for labels that cross blocks; with the moment statistics and shape features
    of the same call on the device."""
    from xr_rasteragg.whole_label import LabelFunction, Quantiles

    labels = shape.irregular(grid, 6, seed=23, size=3)
    image = values(2, labels.shape, "float32", seed=24)
    wholes = {
        "quartiles": Quantiles((0.25, 0.75), "linear"),
        "spread": LabelFunction(lambda v: [v.max() - v.min(), v.size], output_size=2),
        "crop": LabelFunction(_crop_sum, output_size=3, on="crops"),
    }
    space = Space((1, 2), (1.0, 1.0)) if grid[0] == 1 else Space()
    ask = {"background": 0, "wholes": wholes, "index": [4, 1, 9, 2], "space": space}
    got = _engine(KERNEL, labels, image, chunks, stats, **ask)
    cpu = _engine(KERNELS["numba"], labels, image, chunks, stats, **ask)
    np.testing.assert_array_equal(got.labels, [4, 1, 9, 2])
    assert set(got.values) == {*stats, *wholes}
    for name, value in got.values.items():
        assert type(value) is np.ndarray, name
        np.testing.assert_array_equal(value, cpu.values[name], err_msg=name)
    pixels = image[:, labels == 4].astype(np.float64)
    np.testing.assert_array_equal(got.values["median"][0], np.median(pixels, axis=1))
    np.testing.assert_array_equal(got.values["quartiles"][0], np.quantile(pixels, [0.25, 0.75], axis=1).T)
    assert np.isnan(got.values["median"][2]).all()  # 9: absent


def test_every_kernel_compiles_for_a_hopper_gpu() -> None:
    """The simulator runs the kernels as Python; Numba's CUDA compiler (NVVM, without a GPU) types
    and compiles them for every image dtype in a process without the simulator."""
    script = Path(__file__).parent / "cuda_ptx.py"
    env = {name: value for name, value in os.environ.items() if name != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip(f"NVIDIA's NVVM and NVRTC libraries are not installed ({done.stdout.strip()})")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_segment_must_hold_a_pixel_and_tables_a_power_of_two_slots() -> None:
    with pytest.raises(ValueError, match="'segment' must be at least 1 pixel; got 0"):
        cuda_kernel.CudaRunKernel(segment=0)
    for slots in (0, 12):
        with pytest.raises(ValueError, match=f"'slots' must be a power of two; got {slots}"):
            cuda_kernel.CudaRunKernel(slots=slots)


def test_cupy_is_imported_lazily() -> None:
    """The package, the CUDA kernel module and a NumPy run never import CuPy (CuPy is made
    unimportable in a fresh interpreter, so any import of it would fail)."""
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import numpy as np, xr_rasteragg, xr_rasteragg.kernels.cuda\n"
        "r = xr_rasteragg.aggregate(np.ones((1, 2, 2), int), np.ones((1, 1, 2, 2)), ['mean', 'max'])\n"
        "assert r.values['mean'].tolist() == [[1.0]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
