"""The engine against an independent SciPy/NumPy reference, for every statistic."""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import (
    ALL_STATS,
    assert_all_stats,
    assert_partials_close,
    assert_stat,
    label_mask,
    nan_reference,
    reference,
    requires_cupy,
)
from numpy.typing import NDArray

import xr_rasteragg.engine
import xr_rasteragg.kernels.numba
import xr_rasteragg.kernels.xp
from xr_rasteragg.engine import aggregate
from xr_rasteragg.partials import Needs, concat_channels

#: Label ids per dtype: extremes of the dtype, negatives where signed, huge sparse values.
IDS: dict[str, list[int]] = {
    "int8": [-128, -7, 0, 1, 100, 127],
    "uint16": [0, 1, 3, 1000, 65535],
    "int32": [-(2**31), -1, 0, 5, 2**31 - 1],
    "int64": [-(2**63), -(2**40), 0, 7, 2**40 + 3, 2**63 - 1],
    "uint64": [0, 1, 2**40 + 1, 2**63 + 5, 2**64 - 1],
}
#: An id per dtype that gets exactly one pixel.
SINGLE: dict[str, int] = {"int8": 42, "uint16": 77, "int32": -99, "int64": -3, "uint64": 2**63}

LABEL_DTYPES = list(IDS)
IMAGE_DTYPES = ["uint8", "uint16", "float32", "float64"]


def make_labels(shape: tuple[int, int, int], dtype: str, rng: np.random.Generator) -> NDArray[np.integer]:
    """Blobs of the dtype's ids with some noise, one single-pixel label; the last id is kept present."""
    ids = np.array(IDS[dtype], dtype=dtype)
    coarse = rng.choice(ids, size=(shape[0], -(-shape[1] // 4), -(-shape[2] // 5)))
    labels = coarse.repeat(4, axis=1).repeat(5, axis=2)[:, : shape[1], : shape[2]].copy()
    noise = rng.random(shape) < 0.1
    labels[noise] = rng.choice(ids, size=int(noise.sum()))
    labels[0, 0, :3] = ids[-1]
    labels.flat[labels.size // 2] = np.array(SINGLE[dtype], dtype=dtype)
    return labels


def make_image(
    nchan: int, labels: NDArray[np.integer], dtype: str, rng: np.random.Generator
) -> NDArray[np.number]:
    """Random values; the pixels of the dtype's last id hold one integer value per channel.

    (An integer value keeps the mean exact, so that the variance is exactly 0, not rounding noise.)
    """
    shape = (nchan, *labels.shape)
    if np.dtype(dtype).kind == "u":
        image = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    else:
        image = rng.normal(100.0, 10.0, size=shape).astype(dtype)
    constant = label_mask(labels, IDS[str(labels.dtype)][-1])
    for c in range(nchan):
        image[c][constant] = np.round(image[c][constant][0])
    return image


def split(n: int, sizes: Sequence[int]) -> tuple[int, ...]:
    """Chunk sizes covering ``n``, cycling through ``sizes`` (irregular chunks)."""
    chunks: list[int] = []
    i = 0
    while sum(chunks) < n:
        chunks.append(min(sizes[i % len(sizes)], n - sum(chunks)))
        i += 1
    return tuple(chunks)


def chunked(labels: NDArray[Any], image: NDArray[Any], layout: str) -> tuple[Any, Any]:
    """Labels and image as NumPy arrays or dask arrays with the named chunk layout."""
    nz, ny, nx = labels.shape
    if layout == "numpy":
        return labels, image
    if layout == "aligned":
        return da.from_array(labels, chunks=(2, 5, 7)), da.from_array(image, chunks=(2, 2, 5, 7))
    if layout == "mismatched":
        return da.from_array(labels, chunks=(1, 7, 11)), da.from_array(image, chunks=(2, 1, 13, 9))
    assert layout == "irregular"
    label_chunks = (split(nz, [1, 2]), split(ny, [3, 1, 9]), split(nx, [2, 13, 1]))
    image_chunks = (
        split(image.shape[0], [1, 2]),
        split(nz, [2, 1]),
        split(ny, [5, 1, 8]),
        split(nx, [1, 10]),
    )
    return da.from_array(labels, chunks=label_chunks), da.from_array(image, chunks=image_chunks)


def computed(values: dict[str, Any]) -> dict[str, Any]:
    (values,) = dask.compute(values)
    return values


SHAPES = {"2d": (1, 23, 31), "3d": (4, 13, 17)}


@pytest.mark.parametrize(("dims", "layout"), [("2d", "irregular"), ("3d", "mismatched")])
@pytest.mark.parametrize("image_dtype", IMAGE_DTYPES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
def test_every_stat_matches_reference(
    engine_kernel: Callable[..., Any], label_dtype: str, image_dtype: str, dims: str, layout: str
) -> None:
    rng = np.random.default_rng(0)
    labels = make_labels(SHAPES[dims], label_dtype, rng)
    image = make_image(3, labels, image_dtype, rng)
    result = aggregate(*chunked(labels, image, layout), ALL_STATS)
    ids = np.unique(labels)
    np.testing.assert_array_equal(result.labels, ids)
    assert result.labels.dtype == labels.dtype
    assert_all_stats(result.values, reference(labels, image, [int(i) for i in ids]), ALL_STATS)


@pytest.mark.parametrize("layout", ["numpy", "aligned", "mismatched", "irregular"])
@pytest.mark.parametrize("dims", sorted(SHAPES))
def test_layouts_match_reference(engine_kernel: Callable[..., Any], dims: str, layout: str) -> None:
    rng = np.random.default_rng(1)
    labels = make_labels(SHAPES[dims], "int32", rng)
    image = make_image(3, labels, "float64", rng)
    result = aggregate(*chunked(labels, image, layout), ALL_STATS)
    ids = [int(i) for i in np.unique(labels)]
    np.testing.assert_array_equal(result.labels, ids)
    assert_all_stats(result.values, reference(labels, image, ids), ALL_STATS)


def test_single_pixel_and_constant_labels(engine_kernel: Callable[..., Any]) -> None:
    labels = np.zeros((1, 4, 6), np.int32)
    labels[0, 0, 0] = 1  # one pixel
    labels[0, 2:, :] = 2  # constant values
    image = np.arange(2 * labels.size, dtype=np.float64).reshape(2, *labels.shape)
    image[:, 0, 2:, :] = 7.5
    result = aggregate(
        da.from_array(labels, chunks=(1, 3, 4)), da.from_array(image, chunks=(1, 1, 2, 5)), ALL_STATS
    )
    values = computed(result.values)
    np.testing.assert_array_equal(result.labels, [0, 1, 2])
    for name in ("var", "std"):
        np.testing.assert_array_equal(values[name][1:], 0.0)
    for name in ("skew", "kurtosis"):
        assert np.isnan(values[name][1:]).all(), name
        assert np.isfinite(values[name][0]).all(), name
    np.testing.assert_array_equal(values["mean"][2], [7.5, 7.5])
    np.testing.assert_array_equal(values["count"], [11, 1, 12])


def test_image_none_count_and_center_of_mass(engine_kernel: Callable[..., Any]) -> None:
    labels = make_labels(SHAPES["3d"], "uint64", np.random.default_rng(2))
    result = aggregate(da.from_array(labels, chunks=(3, 4, 5)), None, ["count", "center_of_mass"])
    ids = [int(i) for i in np.unique(labels)]
    assert_all_stats(result.values, reference(labels, None, ids), ["count", "center_of_mass"])


@pytest.mark.parametrize("split_every", [2, 3, 100])
def test_channel_groups_and_merge_fan_in(
    engine_kernel: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, split_every: int
) -> None:
    """Each channel chunk in its own group (tiny group size), merged with any fan-in."""
    monkeypatch.setattr(xr_rasteragg.engine, "GROUP_BYTES", 1)
    rng = np.random.default_rng(16)
    labels = make_labels(SHAPES["3d"], "int64", rng)
    image = make_image(5, labels, "uint16", rng)
    dlabels, dimage = chunked(labels, image, "irregular")
    assert dimage.numblocks[0] > 1
    result = aggregate(dlabels, dimage, ALL_STATS, split_every=split_every, background=0)
    ids = [int(i) for i in np.unique(labels) if i != 0]
    np.testing.assert_array_equal(result.labels, ids)
    assert_all_stats(result.values, reference(labels, image, ids), ALL_STATS)


@pytest.mark.parametrize("layout", ["numpy", "aligned"])
def test_only_background(engine_kernel: Callable[..., Any], layout: str) -> None:
    labels = np.zeros((2, 10, 14), np.uint16)
    image = np.ones((2, *labels.shape), np.float32)
    result = aggregate(*chunked(labels, image, layout), ALL_STATS, background=0)
    assert result.labels.shape == (0,)
    assert result.values["mean"].shape == (0, 2)
    result = aggregate(*chunked(labels, image, layout), ALL_STATS, index=[3], background=0)
    values = computed(result.values)
    np.testing.assert_array_equal(values["count"], [0])
    np.testing.assert_array_equal(values["sum"], [[0.0, 0.0]])
    assert np.isnan(values["mean"]).all()


@pytest.mark.parametrize("dtype", ["bool", "float16", "int16", "uint32", "int64"])
def test_other_image_dtypes(engine_kernel: Callable[..., Any], dtype: str) -> None:
    rng = np.random.default_rng(17)
    labels = make_labels(SHAPES["2d"], "int32", rng)
    image = rng.integers(
        -1000 if np.dtype(dtype).kind == "i" else 0, 2, size=(2, *labels.shape), endpoint=True
    )
    image = image.astype(dtype)
    result = aggregate(*chunked(labels, image, "mismatched"), ALL_STATS)
    ids = [int(i) for i in result.labels]
    assert_all_stats(result.values, reference(labels, image, ids), ALL_STATS)


@pytest.mark.parametrize(("label_dtype", "image_dtype"), [(">u2", "<f4"), ("<i4", ">f8"), (">i8", ">u2")])
def test_non_native_byte_order(engine_kernel: Callable[..., Any], label_dtype: str, image_dtype: str) -> None:
    """Big-endian arrays (as zarr stores may hold) give the same results as native ones."""
    rng = np.random.default_rng(18)
    labels = make_labels(SHAPES["3d"], "uint16", rng)
    image = make_image(2, labels, "uint16", rng)
    result = aggregate(
        *chunked(labels.astype(label_dtype), image.astype(image_dtype), "mismatched"),
        ALL_STATS,
        index=[3, 1, 0],
    )
    assert_all_stats(computed(result.values), reference(labels, image, [3, 1, 0]), ALL_STATS)


@pytest.mark.parametrize("layout", ["numpy", "mismatched"])
def test_many_labels_per_block(engine_kernel: Callable[..., Any], layout: str) -> None:
    """Tens of thousands of sparse huge ids per block (hash table growth), against a vectorized reference."""
    rng = np.random.default_rng(19)
    labels = (rng.integers(0, 40_000, size=(2, 150, 200)).astype(np.uint64) * np.uint64(2**40)) + np.uint64(
        2**63
    )
    image = rng.integers(0, 1000, size=(2, *labels.shape)).astype(np.float32)
    dlabels, dimage = chunked(labels, image, layout)
    if layout != "numpy":
        dlabels, dimage = dlabels.rechunk((1, 75, 100)), dimage.rechunk((2, 1, 150, 50))
    result = aggregate(dlabels, dimage, ["count", "sum", "mean", "min", "max", "center_of_mass"])
    values = computed(result.values)
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.ravel()
    np.testing.assert_array_equal(result.labels, ids)
    count = np.bincount(inverse)
    np.testing.assert_array_equal(values["count"], count)
    for c in range(2):
        x = image[c].ravel().astype(np.float64)
        total = np.bincount(inverse, weights=x)
        np.testing.assert_allclose(values["sum"][:, c], total, rtol=1e-12)
        np.testing.assert_allclose(values["mean"][:, c], total / count, rtol=1e-12)
        low, high = np.full(ids.shape, np.inf), np.full(ids.shape, -np.inf)
        np.minimum.at(low, inverse, x)
        np.maximum.at(high, inverse, x)
        np.testing.assert_array_equal(values["min"][:, c], low)
        np.testing.assert_array_equal(values["max"][:, c], high)
    for axis, position in enumerate(np.indices(labels.shape).reshape(3, -1)):
        expected = np.bincount(inverse, weights=position) / count
        np.testing.assert_allclose(values["center_of_mass"][:, axis], expected, rtol=1e-12)


def test_lazy_results_over_several_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xr_rasteragg.engine, "PIECE_LABELS", 2)
    rng = np.random.default_rng(20)
    labels = make_labels(SHAPES["3d"], "int8", rng)
    image = make_image(2, labels, "uint8", rng)
    index = [127, 1, 55, -128, 0]
    result = aggregate(*chunked(labels, image, "aligned"), ALL_STATS, index=index)
    assert result.values["mean"].numblocks[0] == 3
    assert_all_stats(computed(result.values), reference(labels, image, index), ALL_STATS)


@pytest.mark.parametrize("split_every", [0, 1])
def test_split_every_below_two_is_an_error(split_every: int) -> None:
    """A merge fan-in below 2 cannot reduce the partials; it must raise, not loop forever."""

    def hang(signum: int, frame: Any) -> None:
        raise TimeoutError("aggregate did not return")

    labels, image = small()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(3)
    try:
        with pytest.raises(ValueError, match="split_every"):
            aggregate(
                da.from_array(labels, chunks=2),
                da.from_array(image, chunks=2),
                ["mean"],
                split_every=split_every,
            )
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- index ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["numpy", "mismatched"])
def test_index_subset_order_duplicates_absent(engine_kernel: Callable[..., Any], layout: str) -> None:
    rng = np.random.default_rng(3)
    labels = make_labels(SHAPES["3d"], "int64", rng)
    image = make_image(2, labels, "uint16", rng)
    index = [2**40 + 3, 12345, 0, -(2**40), 2**40 + 3, -17]
    result = aggregate(*chunked(labels, image, layout), ALL_STATS, index=index)
    np.testing.assert_array_equal(result.labels, index)
    values = computed(result.values)
    expected = reference(labels, image, index)
    assert_all_stats(values, expected, ALL_STATS)
    for row in (1, 5):  # absent
        assert values["count"][row] == 0
        np.testing.assert_array_equal(values["sum"][row], 0.0)
        for name in ALL_STATS:
            if name not in ("count", "sum"):
                assert np.isnan(values[name][row]).all(), name
    for name in ALL_STATS:  # duplicates repeat the same row
        np.testing.assert_array_equal(values[name][0], values[name][4])


@pytest.mark.parametrize(
    ("label_dtype", "index"),
    [
        ("uint16", [-1, 1, 65536]),
        ("int8", [2**40, 1, -129, 128]),
        ("int64", np.array([2**64 - 1, 2**63, 7], dtype=np.uint64)),
        ("uint64", [-1, -(2**63), 1]),
    ],
)
@pytest.mark.parametrize("layout", ["numpy", "aligned"])
def test_index_ids_outside_label_dtype_are_absent(label_dtype: str, index: Any, layout: str) -> None:
    rng = np.random.default_rng(4)
    labels = make_labels(SHAPES["2d"], label_dtype, rng)
    image = make_image(2, labels, "float32", rng)
    result = aggregate(*chunked(labels, image, layout), ALL_STATS, index=index)
    values = computed(result.values)
    assert_all_stats(values, reference(labels, image, [int(i) for i in index]), ALL_STATS)
    absent = [row for row, i in enumerate(index) if int(i) not in (1, 7)]
    np.testing.assert_array_equal(values["count"][absent], 0)


def test_index_list_of_uint64_ids() -> None:
    """A plain list of ids that only uint64 can hold, mixed with small ids, is a valid index."""
    rng = np.random.default_rng(5)
    labels = make_labels(SHAPES["2d"], "uint64", rng)
    image = make_image(1, labels, "uint8", rng)
    index = [2**64 - 1, 1]
    result = aggregate(labels, image, ["count", "mean"], index=index)
    assert_all_stats(result.values, reference(labels, image, index), ["count", "mean"])
    with pytest.raises(ValueError, match="index"):  # no integer dtype holds both
        aggregate(labels, image, ["count"], index=[-1, 2**64 - 1])


def test_empty_index(engine_kernel: Callable[..., Any]) -> None:
    labels = make_labels(SHAPES["2d"], "int32", np.random.default_rng(6))
    image = make_image(2, labels, "float64", np.random.default_rng(6))
    for layout in ("numpy", "aligned"):
        result = aggregate(*chunked(labels, image, layout), ALL_STATS, index=[])
        values = computed(result.values)
        assert values["count"].shape == (0,)
        assert values["mean"].shape == (0, 2)
        assert values["center_of_mass"].shape == (0, 3)


# --- background -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["numpy", "mismatched"])
def test_background_excluded_without_index(engine_kernel: Callable[..., Any], layout: str) -> None:
    rng = np.random.default_rng(7)
    labels = make_labels(SHAPES["3d"], "int8", rng)
    image = make_image(2, labels, "float64", rng)
    result = aggregate(*chunked(labels, image, layout), ALL_STATS, background=0)
    ids = [int(i) for i in np.unique(labels) if i != 0]
    np.testing.assert_array_equal(result.labels, ids)
    assert_all_stats(result.values, reference(labels, image, ids), ALL_STATS)


@pytest.mark.parametrize("layout", ["numpy", "mismatched"])
def test_background_kept_when_index_names_it(engine_kernel: Callable[..., Any], layout: str) -> None:
    rng = np.random.default_rng(8)
    labels = make_labels(SHAPES["3d"], "uint16", rng)
    image = make_image(2, labels, "uint8", rng)
    index = [1, 0, 3]
    result = aggregate(*chunked(labels, image, layout), ALL_STATS, index=index, background=0)
    values = computed(result.values)
    assert values["count"][1] == np.count_nonzero(labels == 0) > 0
    assert_all_stats(values, reference(labels, image, index), ALL_STATS)


def test_background_not_in_index_is_skipped(engine_kernel: Callable[..., Any]) -> None:
    rng = np.random.default_rng(9)
    labels = make_labels(SHAPES["2d"], "int32", rng)
    image = make_image(1, labels, "float32", rng)
    index = [5, -1]
    result = aggregate(*chunked(labels, image, "aligned"), ALL_STATS, index=index, background=0)
    assert_all_stats(computed(result.values), reference(labels, image, index), ALL_STATS)


# --- laziness and one pass --------------------------------------------------------------------


def raising_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    raise AssertionError("the graph was computed")


def test_lazy_with_index_computes_nothing() -> None:
    rng = np.random.default_rng(10)
    labels = make_labels(SHAPES["3d"], "uint64", rng)
    image = make_image(3, labels, "uint16", rng)
    index = np.r_[np.unique(labels)[::-1], np.uint64(12)]
    dlabels, dimage = chunked(labels, image, "mismatched")
    with dask.config.set(scheduler=raising_get):
        result = aggregate(dlabels, dimage, ALL_STATS, index=index, skipna=True)
        geometry = aggregate(dlabels, None, ["count", "center_of_mass"], index=index, background=0)
        with pytest.raises(AssertionError, match="computed"):
            dask.compute(result.values)  # the scheduler is really in force
    for name, value in result.values.items():
        assert isinstance(value, da.Array), name
    values = computed(result.values)
    assert_all_stats(computed(geometry.values), values, ["count", "center_of_mass"])
    assert values["mean"].shape == (len(index), 3)
    assert values["count"].dtype == np.int64
    assert_all_stats(values, reference(labels, image, [int(i) for i in index]), ALL_STATS)


def test_numpy_inputs_give_numpy_results() -> None:
    rng = np.random.default_rng(11)
    labels = make_labels(SHAPES["2d"], "int32", rng)
    image = make_image(2, labels, "uint8", rng)
    for index in (None, [1, 5]):
        result = aggregate(labels, image, ALL_STATS, index=index)
        for name, value in result.values.items():
            assert isinstance(value, np.ndarray), name


@pytest.mark.parametrize("groups", ["one group", "a group per chunk"])
@pytest.mark.parametrize("lazy", [False, True])
def test_one_kernel_call_per_spatial_block(
    kernel_calls: list[tuple[int, int, int]], lazy: bool, groups: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each label block is encoded once, however many tasks read its channels."""
    if groups == "a group per chunk":
        monkeypatch.setattr(xr_rasteragg.engine, "GROUP_BYTES", 1)
    rng = np.random.default_rng(12)
    labels = make_labels(SHAPES["3d"], "int32", rng)
    image = make_image(4, labels, "float32", rng)
    dlabels, dimage = chunked(labels, image, "mismatched")
    nblocks = int(np.prod(dimage.numblocks[1:]))
    with dask.config.set(scheduler="synchronous"):
        result = aggregate(dlabels, dimage, ALL_STATS, index=[1, 5] if lazy else None)
        values = computed(result.values)
    assert len(kernel_calls) == nblocks
    assert len(set(kernel_calls)) == nblocks
    assert_all_stats(values, reference(labels, image, [int(i) for i in result.labels]), ALL_STATS)


# --- NaN pixels -------------------------------------------------------------------------------


def nan_case(dtype: str) -> tuple[NDArray[np.integer], NDArray[np.floating]]:
    rng = np.random.default_rng(13)
    labels = make_labels(SHAPES["3d"], "int32", rng)
    image = make_image(3, labels, dtype, rng)
    one_nan = np.argwhere(labels == 5)[3]
    image[(0, *one_nan)] = np.nan  # label 5, channel 0: one NaN pixel
    image[1][labels == -1] = np.nan  # label -1, channel 1: all NaN
    return labels, image


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["numpy", "mismatched"])
def test_nan_propagates_only_to_its_label_and_channel(
    engine_kernel: Callable[..., Any], dtype: str, layout: str
) -> None:
    labels, image = nan_case(dtype)
    result = aggregate(*chunked(labels, image, layout), ALL_STATS)
    values = computed(result.values)
    ids = [int(i) for i in result.labels]
    expected = nan_reference(labels, image, ids, skipna=False)
    assert_all_stats(values, expected, [n for n in ALL_STATS if n in expected])
    nan_cells = np.zeros((len(ids), 3), bool)
    nan_cells[ids.index(5), 0] = nan_cells[ids.index(-1), 1] = True
    for name in ("sum", "mean", "var", "std", "skew", "kurtosis", "min", "max"):
        value = values[name]
        assert np.isnan(value[nan_cells]).all(), name
        if name not in ("skew", "kurtosis"):  # those are NaN for constant labels as well
            assert not np.isnan(value[~nan_cells]).any(), name
    np.testing.assert_array_equal(values["count"], reference(labels, None, ids)["count"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["numpy", "mismatched"])
def test_skipna_ignores_nan_pixels(engine_kernel: Callable[..., Any], dtype: str, layout: str) -> None:
    labels, image = nan_case(dtype)
    result = aggregate(*chunked(labels, image, layout), ALL_STATS, skipna=True)
    values = computed(result.values)
    ids = [int(i) for i in result.labels]
    expected = nan_reference(labels, image, ids, skipna=True)
    assert_all_stats(values, expected, [n for n in ALL_STATS if n in expected])
    row = ids.index(5)
    assert np.isfinite(values["mean"][row, 0])
    assert values["mean"][row, 0] == pytest.approx(np.nanmean(image[0][labels == 5].astype(float)), rel=1e-12)
    row = ids.index(-1)  # all NaN in channel 1
    assert values["count"][row] == np.count_nonzero(labels == -1)
    for name in ("mean", "var", "std", "skew", "kurtosis", "min", "max"):
        assert np.isnan(values[name][row, 1]), name
    assert values["sum"][row, 1] == 0.0  # as np.nansum
    assert np.isfinite(values["mean"][row, [0, 2]]).all()


@pytest.mark.parametrize("skipna", [False, True])
def test_skipna_on_integer_image_changes_nothing(engine_kernel: Callable[..., Any], skipna: bool) -> None:
    rng = np.random.default_rng(14)
    labels = make_labels(SHAPES["2d"], "int32", rng)
    image = make_image(2, labels, "uint16", rng)
    result = aggregate(*chunked(labels, image, "aligned"), ALL_STATS, skipna=skipna)
    ids = [int(i) for i in result.labels]
    assert_all_stats(result.values, reference(labels, image, ids), ALL_STATS)


# --- errors -----------------------------------------------------------------------------------


def small() -> tuple[NDArray[np.int32], NDArray[np.float64]]:
    labels = np.arange(24, dtype=np.int32).reshape(1, 4, 6) % 3
    return labels, np.ones((2, 1, 4, 6))


@pytest.mark.parametrize("as_dask", [False, True])
def test_errors(as_dask: bool) -> None:
    labels, image = small()
    wrap: Callable[[Any], Any] = (lambda a: da.from_array(a, chunks=2)) if as_dask else (lambda a: a)
    with pytest.raises(TypeError, match="labels"):
        aggregate(wrap(labels.astype(float)), wrap(image), ["mean"])
    with pytest.raises(ValueError, match="labels"):
        aggregate(wrap(labels[0]), wrap(image[:, 0]), ["mean"])
    with pytest.raises(ValueError, match="image"):
        aggregate(wrap(labels), wrap(image[0]), ["mean"])
    with pytest.raises(ValueError, match="same pixels"):
        aggregate(wrap(labels), wrap(image[:, :, :3]), ["mean"])
    with pytest.raises(ValueError, match="image"):
        aggregate(wrap(labels), None, ["count", "mean"])
    with pytest.raises(ValueError, match="unknown"):
        aggregate(wrap(labels), wrap(image), ["mean", "mode"])
    with pytest.raises(ValueError, match="stats"):
        aggregate(wrap(labels), wrap(image), [])
    with pytest.raises(TypeError, match="index"):
        aggregate(wrap(labels), wrap(image), ["mean"], index=[1.0, 2.0])
    with pytest.raises(TypeError, match="image"):
        aggregate(wrap(labels), wrap(image.astype(complex)), ["mean"])


def test_single_string_stat_and_repeats() -> None:
    labels, image = small()
    result = aggregate(labels, image, "mean")
    assert list(result.values) == ["mean"]
    result = aggregate(labels, image, ["mean", "count", "mean"])
    assert list(result.values) == ["mean", "count"]


# --- GPU --------------------------------------------------------------------------------------


@requires_cupy
def test_cupy_matches_numpy() -> None:
    import cupy

    rng = np.random.default_rng(15)
    labels = make_labels(SHAPES["3d"], "uint64", rng)
    image = make_image(3, labels, "float32", rng)
    dlabels, dimage = chunked(labels, image, "mismatched")
    result = aggregate(dlabels.map_blocks(cupy.asarray), dimage.map_blocks(cupy.asarray), ALL_STATS)
    expected = reference(labels, image, [int(i) for i in np.unique(labels)])
    for name in ALL_STATS:
        assert_stat(name, cupy.asnumpy(cupy.asarray(result.values[name])), expected[name])


@pytest.mark.parametrize("layout", ["views", "separate", "flipped", "fortran", "one chunk"])
@pytest.mark.parametrize("dtype", ["uint16", "int8"])
def test_numba_kernel_reads_any_channel_layout(layout: str, dtype: str) -> None:
    """The integer sweep reads views of one array in place and copies other layouts; all agree with xp.

    Six channels in separate arrays take two sweeps (four flat arrays each at most), and uint16
    values over the full range send the large labels to the float64 recomputation, which then
    reads both batches too.
    """
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    labels = rng.integers(0, 9, size=(2, 30, 41)).repeat(2, axis=2)[:, :, :70].astype(np.int32)
    whole = rng.integers(info.min, int(info.max) + 1, size=(6, 2, 40, 90)).astype(dtype)
    image = whole[:, :, 5:35, 10:80]  # a strided view, as dask cuts from an in-memory array
    separate = [image[c : c + 1].copy() for c in range(6)]
    for chunk in separate[::2]:
        chunk.flags.writeable = False  # read-only blocks (from zarr, say) beside writable ones
    chunks = {
        "views": [image[c : c + 1] for c in range(6)],
        "separate": separate,
        "flipped": [image[c : c + 1, ::-1, ::-1, ::-1] for c in range(6)],
        "fortran": [np.asfortranarray(image)[c : c + 1] for c in range(6)],
        "one chunk": [image],
    }[layout]
    if layout == "flipped":
        labels = labels[::-1, ::-1, ::-1].copy()
    needs = Needs(4, extrema=True)
    got = xr_rasteragg.kernels.numba.block_partials(labels, chunks, (0, 0, 0), needs, 0)
    expected = xr_rasteragg.kernels.xp.block_partials(labels, [np.concatenate(chunks)], (0, 0, 0), needs, 0)
    assert_partials_close(got, expected)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_numba_kernel_stages(dtype: str) -> None:
    """One encoding of the labels serves any groups of channels, and is not changed by them."""
    rng = np.random.default_rng(8)
    labels = make_labels(SHAPES["3d"], "int64", rng)
    image = make_image(5, labels, dtype, rng)
    kernel, everything = xr_rasteragg.kernels.numba.block_partials, Needs(4, extrema=True)
    offset = (3, 40, 500)
    runs = kernel.encode(labels, offset, 0)
    before = {name: value.copy() for name, value in vars(runs.parts).items() if value is not None}
    groups = [
        kernel.channels(runs, [image[:2], image[2:3]], everything),
        kernel.channels(runs, [image[3:]], everything),
    ]
    assert kernel.channels(runs, None, everything).shifted is None
    for name, value in before.items():
        np.testing.assert_array_equal(getattr(runs.parts, name), value, err_msg=name)
    expected = xr_rasteragg.kernels.xp.block_partials(labels, [image], offset, everything, 0)
    assert_partials_close(concat_channels(groups), expected)
    assert_partials_close(kernel(labels, [image], offset, everything, 0), expected)


def test_numba_kernel_reads_label_blocks_of_any_layout() -> None:
    """Views with contiguous rows are read in place; strided, reversed and Fortran-ordered blocks
    (which are copied) give the same runs and partials as a C-contiguous copy."""
    rng = np.random.default_rng(11)
    whole = rng.integers(0, 6, size=(3, 40, 50)).astype(np.int32)
    image = rng.random((2, 3, 40, 50))
    kernel, everything = xr_rasteragg.kernels.numba.block_partials, Needs(4, extrema=True)
    windows = {
        "view with contiguous rows": (slice(1, None), slice(5, 30), slice(7, 41)),
        "strided along x": (slice(1, None), slice(5, 30), slice(7, 41, 2)),
        "reversed rows": (slice(1, None), slice(30, 5, -1), slice(7, 41)),
    }
    blocks = {name: (whole[window], image[(slice(None), *window)]) for name, window in windows.items()}
    blocks["Fortran order"] = (np.asfortranarray(whole[1:, 5:30, 7:41]), image[:, 1:, 5:30, 7:41])
    offset = (1, 5, 7)
    for name, (labels, pixels) in blocks.items():
        copy = np.ascontiguousarray(labels)
        for a, b in zip(
            kernel.encode(labels, offset, 0).runs, kernel.encode(copy, offset, 0).runs, strict=True
        ):
            np.testing.assert_array_equal(a, b, err_msg=name)
        try:
            assert_partials_close(
                kernel(labels, [pixels], offset, everything, 0),
                kernel(copy, [pixels], offset, everything, 0),
                rtol=0,
            )
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error
