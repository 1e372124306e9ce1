"""The GPU kernel's logic, run on NumPy: the same code as on CuPy, with NumPy's ``ufunc.at``.

Every statistic against SciPy, partials against the compiled CPU kernel, label ids of every
integer dtype (uint64 ids of 2**63 and more, negative ids), 2-D and 3-D blocks, empty and
all-background blocks, and the exactness of the integer sums and of the extrema.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from conftest import ALL_STATS, KERNELS, assert_all_stats, assert_partials_close, reference

from xr_rasteragg.kernels import cupy as gpu_kernel
from xr_rasteragg.kernels.xp import ArrayReductions, partials_with
from xr_rasteragg.partials import Needs
from xr_rasteragg.stats import finalize

EVERYTHING = Needs(order=4, extrema=True)

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


def gpu_logic(labels: np.ndarray, image: np.ndarray | None, needs: Needs, skip: int | None = None) -> Any:
    return gpu_kernel.block_partials(labels, None if image is None else [image], (0, 0, 0), needs, skip)


@pytest.mark.parametrize("label_dtype", list(IDS))
@pytest.mark.parametrize("shape", [(1, 17, 23), (3, 9, 14)], ids=["2d", "3d"])
def test_every_statistic_against_scipy(label_dtype: str, shape: tuple[int, int, int]) -> None:
    labels = blobs(shape, label_dtype, seed=1)
    image = values(2, shape, "float64", seed=2)
    ids = np.unique(labels)
    parts = gpu_logic(labels, image, EVERYTHING)
    np.testing.assert_array_equal(parts.labels, ids)
    stats = finalize(parts, ALL_STATS, np.arange(parts.size), np.ones(parts.size, bool))
    assert_all_stats(stats, reference(labels, image, [int(i) for i in ids]), ALL_STATS)


@pytest.mark.parametrize("image_dtype", IMAGE_DTYPES)
@pytest.mark.parametrize("label_dtype", ["int64", "uint64"])
@pytest.mark.parametrize("skip", [None, 0])
def test_partials_agree_with_the_cpu_kernel(label_dtype: str, image_dtype: str, skip: int | None) -> None:
    labels = blobs((2, 13, 19), label_dtype, seed=3)
    image = values(3, labels.shape, image_dtype, seed=4)
    got = gpu_logic(labels, image, EVERYTHING, skip)
    expected = KERNELS["numba"](labels, [image], (0, 0, 0), EVERYTHING, skip)
    assert_partials_close(got, expected)
    assert got.min is not None
    assert got.min.dtype == image.dtype
    if skip is not None:
        assert skip not in got.labels.tolist()


@pytest.mark.parametrize("skipna", [False, True])
def test_nan_pixels_as_the_cpu_kernel(skipna: bool) -> None:
    labels = blobs((1, 12, 16), "int32", seed=5)
    image = values(2, labels.shape, "float32", seed=6)
    image[0, 0, :2, :] = np.nan  # some labels partly NaN
    image[1][labels == labels[0, 5, 5]] = np.nan  # one label all NaN in channel 1
    needs = Needs(order=4, extrema=True, skipna=skipna)
    got = gpu_logic(labels, image, needs)
    expected = KERNELS["numba"](labels, [image], (0, 0, 0), needs)
    assert_partials_close(got, expected)


def test_offset_and_several_channel_chunks() -> None:
    labels = blobs((2, 8, 9), "uint16", seed=7)
    image = values(5, labels.shape, "uint16", seed=8)
    chunks = [image[:2], image[2:3], image[3:]]
    got = gpu_kernel.block_partials(labels, chunks, (4, 100, 2**20), EVERYTHING, 0)
    expected = KERNELS["numba"](labels, chunks, (4, 100, 2**20), EVERYTHING, 0)
    assert_partials_close(got, expected)


@pytest.mark.parametrize("image", [True, False])
def test_empty_and_all_background_blocks(image: bool) -> None:
    for labels in (np.zeros((0, 4, 4), np.uint64), np.full((2, 3, 4), 7, np.int16)):
        pixels = values(3, labels.shape, "uint16", seed=9) if image else None
        for needs in (Needs(0), EVERYTHING, Needs(order=2, skipna=True)):
            got = gpu_logic(labels, pixels, needs, skip=7)
            expected = KERNELS["numba"](labels, None if pixels is None else [pixels], (0, 0, 0), needs, 7)
            assert got.size == 0
            assert_partials_close(got, expected)
            for name, value in expected.channel_arrays().items():
                assert getattr(got, name).shape == value.shape, name


def test_no_allocation_by_the_largest_id() -> None:
    """Ids at the ends of uint64 and int64 in one block: relabelled, never used as offsets."""
    for dtype, ids in (("uint64", [2**64 - 1, 2**63, 1]), ("int64", [-(2**63), 2**63 - 1, -1])):
        labels = np.array(ids * 4, dtype=dtype).reshape(1, 3, 4)
        image = np.arange(12.0).reshape(1, 1, 3, 4)
        parts = gpu_logic(labels, image, EVERYTHING)
        np.testing.assert_array_equal(parts.labels, np.sort(np.array(ids, dtype=dtype)))
        np.testing.assert_array_equal(parts.count, [4, 4, 4])


def test_integer_sums_are_exact_where_float64_accumulation_is_not() -> None:
    """2**23 pixels: the first (the shift) -2**31, most 2**31 - 1, so that the differences from the
    shift, 2**32 - 1 each, pass 2**53 in a float64 running sum and round there."""
    labels = np.zeros((1, 2048, 4096), np.uint8)
    image = np.full((1, *labels.shape), 2**31 - 1, np.int32)
    image[0, 0, ::7] = -(2**31)
    shifted = int(image.astype(np.int64).sum()) - labels.size * -(2**31)
    got = gpu_logic(labels, image, Needs(1))
    assert got.shift is not None
    assert got.shifted is not None
    assert got.shift[0, 0] == -(2**31)
    assert got.shifted[0, 0] == float(shifted)
    rounded = partials_with(ArrayReductions(np), labels, [image], (0, 0, 0), Needs(1))
    assert rounded.shifted is not None
    assert rounded.shifted[0, 0] != float(shifted)  # the plain float64 bincount does round here


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
    keys = gpu_kernel.order_keys(np, data)
    assert keys.dtype in (np.uint32, np.uint64)
    order = np.argsort(keys, kind="stable")
    assert np.all(np.diff(data[order].astype(np.float64)) >= 0)
    back = gpu_kernel.from_order_keys(np, keys, data.dtype)
    assert back.dtype == data.dtype
    np.testing.assert_array_equal(back.view(f"u{data.dtype.itemsize}"), data.view(f"u{data.dtype.itemsize}"))


def test_float64_extrema_keep_full_precision() -> None:
    """Values that single precision cannot tell apart (CuPy's float64 atomicMin/Max compare in
    float32; the kernel's unsigned keys do not)."""
    labels = np.zeros((1, 1, 4), np.int32)
    image = np.array([1.0 + 2e-12, 1.0 + 1e-12, 1.0 + 3e-12, 1.0 + 2e-12]).reshape(1, 1, 1, 4)
    parts = gpu_logic(labels, image, Needs(0, extrema=True))
    assert parts.min is not None
    assert parts.max is not None
    assert parts.min[0, 0] == 1.0 + 1e-12
    assert parts.max[0, 0] == 1.0 + 3e-12


def test_cupy_blocks_get_the_gpu_kernel_and_cupy_is_imported_lazily() -> None:
    """The package, its GPU kernel module and a NumPy run never import CuPy (CuPy is made
    unimportable in a fresh interpreter, so any import of it would fail)."""
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import numpy as np, xr_rasteragg, xr_rasteragg.kernels.cupy\n"
        "from xr_rasteragg.kernels import _KERNELS\n"
        "assert _KERNELS['cupy'] == 'xr_rasteragg.kernels.cupy', _KERNELS\n"
        "r = xr_rasteragg.aggregate(np.ones((1, 2, 2), int), np.ones((1, 1, 2, 2)), ['mean', 'max'])\n"
        "assert r.values['mean'].tolist() == [[1.0]]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


#: The dtypes CuPy's scatter functions accept (cupyx.scatter_add / scatter_min / scatter_max).
CUPY_SCATTER_DTYPES = {
    "add": {"int32", "float16", "float32", "float64", "uint32", "uint64"},
    "min": {"int32", "float32", "float64", "uint32", "uint64"},
    "max": {"int32", "float32", "float64", "uint32", "uint64"},
}


@pytest.mark.parametrize("image_dtype", IMAGE_DTYPES)
@pytest.mark.parametrize("skipna", [False, True])
def test_scatter_calls_use_dtypes_cupy_supports(image_dtype: str, skipna: bool) -> None:
    """Every scatter the kernel makes has a dtype CuPy supports and values of the output's dtype
    (CuPy would silently cast them), and the CuPy float64 min/max (single-precision compare) is
    never used."""
    calls: list[tuple[str, str, str]] = []

    def checked(name: str, function: Any) -> Any:
        def scatter(out: np.ndarray, indices: np.ndarray, values: np.ndarray) -> None:
            calls.append((name, str(out.dtype), str(values.dtype)))
            function(out, indices, values)

        return scatter

    reductions = gpu_kernel.ScatterReductions(
        np, checked("add", np.add.at), checked("min", np.minimum.at), checked("max", np.maximum.at)
    )
    labels = blobs((1, 9, 11), "int64", seed=11)
    image = values(2, labels.shape, image_dtype, seed=12)
    if image.dtype.kind == "f":
        image[0, 0, :3] = np.nan
    partials_with(reductions, labels, [image], (0, 0, 0), Needs(4, extrema=True, skipna=skipna), 0)
    assert {name for name, _, _ in calls} >= {"min", "max"}
    for name, out_dtype, value_dtype in calls:
        assert out_dtype == value_dtype, (name, out_dtype, value_dtype)
        assert out_dtype in CUPY_SCATTER_DTYPES[name], (name, out_dtype)
        assert not (name in ("min", "max") and out_dtype.startswith("float")), (name, out_dtype)
