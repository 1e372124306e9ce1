"""Whole-label statistics (median, quantiles, user functions) against NumPy and scikit-image on the
whole in-memory image, for labels inside one block, across many blocks, in far-apart pieces, and
covering half the image."""

from __future__ import annotations

import warnings
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import xr_rasteragg
from xr_rasteragg import RasterAggregator, aggregate
from xr_rasteragg.gather import crossing_labels
from xr_rasteragg.whole_label import QUANTILE_METHODS, LabelFunctionError

SHAPE = (2, 24, 30)


def _geometries(seed: int = 0) -> np.ndarray:
    """Labels of every kind: half the image, small cells, far-apart pieces, one-pixel labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[:, :, :15] = 1  # half the image
    labels[:, 2:5, 18:21] = 2  # a small square
    labels[0, 0, 29] = labels[1, 23, 16] = labels[0, 12, 0] = 3  # three far-apart pixels
    labels[:, 8:20, 22:28] = rng.integers(4, 12, (2, 12, 6))  # speckles
    labels[1, 20, 20] = 12  # a single pixel
    labels[:, 10:14, 2:6] = 0  # a hole of background in label 1
    return labels


def _image(dtype: Any, seed: int = 1, nan: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        image = (rng.normal(100, 30, (3, *SHAPE))).astype(dtype)
        image[:, :, 5] = np.round(image[:, :, 5])  # ties
        if nan:
            image[0, 0, 3, 3] = np.nan  # in label 1
            image[1][_geometries() == 2] = np.nan  # all of label 2 in channel 1
        return image
    info = np.iinfo(dtype)
    high = min(int(info.max), 2**40)
    return rng.integers(max(int(info.min), -(2**40)), high, (3, *SHAPE), endpoint=True).astype(dtype)


def _expected(
    labels: np.ndarray,
    image: np.ndarray,
    ids: np.ndarray,
    q: Any,
    method: str = "linear",
    skipna: bool = False,
) -> np.ndarray:
    """``numpy.quantile`` (``nanquantile`` with skipna) per label and channel: (k, C, *q.shape)."""
    reduce = np.nanquantile if skipna else np.quantile
    shape = np.shape(q)
    out = np.full((len(ids), image.shape[0], *shape), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN labels
        for i, label in enumerate(ids):
            where = labels == label
            if where.any():
                for c in range(image.shape[0]):
                    out[i, c] = reduce(image[c][where].astype(np.float64), q, method=method)
    return out


CHUNKINGS = [(2, 24, 30), (1, 12, 15), (1, 5, 7), (2, 24, 4)]


@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.int64, np.float32, np.float64])
def test_median_equals_numpy(chunks: tuple[int, int, int], dtype: Any) -> None:
    labels, image = _geometries(), _image(dtype)
    result = aggregate(
        da.from_array(labels, chunks=chunks),
        da.from_array(image, chunks=(1, *chunks)),
        ["median"],
        background=0,
    )
    ids = np.unique(labels)[1:]
    np.testing.assert_array_equal(result.labels, ids)
    assert isinstance(result.values["median"], da.Array)
    np.testing.assert_array_equal(result.values["median"].compute(), _expected(labels, image, ids, 0.5))


@pytest.mark.parametrize("method", QUANTILE_METHODS)
@pytest.mark.parametrize(
    "q", [[0.0, 0.3, 0.5, 1.0], [0.01, 0.1, 0.2, 0.25, 0.33, 0.5, 0.66, 0.75, 0.9, 0.99]]
)
def test_quantiles_every_method(method: str, q: list[float]) -> None:
    labels, image = _geometries(), _image(np.uint16)
    wanted = np.unique(labels)
    spec = xr_rasteragg.whole_label.Quantiles(tuple(q), method)
    result = aggregate(labels, image, (), wholes={"q": spec}, index=wanted)
    np.testing.assert_array_equal(result.values["q"], _expected(labels, image, wanted, q, method))


@pytest.mark.parametrize("skipna", [False, True])
@pytest.mark.parametrize("chunks", CHUNKINGS[:3])
def test_nan_handling(skipna: bool, chunks: tuple[int, int, int]) -> None:
    labels, image = _geometries(), _image(np.float32, nan=True)
    result = aggregate(
        da.from_array(labels, chunks=chunks),
        da.from_array(image, chunks=(1, *chunks)),
        ["median", "mean"],
        skipna=skipna,
        eager=True,
    )
    expected = _expected(labels, image, result.labels, 0.5, skipna=skipna)
    np.testing.assert_array_equal(result.values["median"], expected)
    assert np.isnan(expected[1, 0]) != skipna  # label 1 holds a NaN in channel 0
    assert np.isnan(expected[2, 1])  # label 2 is all NaN in channel 1


@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_index_with_absent_ids_and_background(backing: str) -> None:
    labels, image = _geometries(), _image(np.float64)
    index = np.array([3, 99, 0, 1, 3, -5])
    if backing == "dask":
        labels_in, image_in = (
            da.from_array(labels, chunks=(1, 7, 9)),
            da.from_array(image, chunks=(1, 1, 7, 9)),
        )
    else:
        labels_in, image_in = labels, image
    result = aggregate(labels_in, image_in, ["count", "median"], index=index, background=0)
    median = result.values["median"]
    assert isinstance(median, da.Array if backing == "dask" else np.ndarray)
    (median, count) = dask.compute(median, result.values["count"])
    np.testing.assert_array_equal(median, _expected(labels, image, index, 0.5))
    np.testing.assert_array_equal(count, [(labels == i).sum() for i in index])


def test_crossing_labels_survey() -> None:
    labels = _geometries()
    ids, crossing = crossing_labels(da.from_array(labels, chunks=(2, 12, 15)), 0)
    np.testing.assert_array_equal(ids, np.unique(labels)[1:])
    # 1: half the image (two blocks), 2: one block, 3: far apart, 4-11: speckles across y=12.
    assert {1, 3} <= set(crossing.tolist())
    assert not {2, 12} & set(crossing.tolist())


def test_huge_sparse_label_ids() -> None:
    labels = _geometries().astype(np.uint64) + np.uint64(2**63)
    image = _image(np.uint16)
    result = aggregate(
        da.from_array(labels, chunks=(1, 12, 15)),
        da.from_array(image, chunks=(3, 1, 12, 15)),
        ["median"],
        eager=True,
    )
    np.testing.assert_array_equal(result.labels, np.unique(labels))
    np.testing.assert_array_equal(result.values["median"], _expected(labels, image, result.labels, 0.5))


# -- the accessor ------------------------------------------------------------------------------


def _xr(chunks: dict[str, int] | None, dtype: Any = np.uint16) -> tuple[xr.DataArray, xr.DataArray]:
    labels = xr.DataArray(_geometries(), dims=("z", "y", "x"))
    image = xr.DataArray(_image(dtype), dims=("c", "z", "y", "x"), coords={"c": ["a", "b", "c"]})
    if chunks:
        labels, image = labels.chunk(chunks), image.chunk({"c": 1, **chunks})
    return labels, image


@pytest.mark.parametrize("chunks", [None, {"z": 1, "y": 7, "x": 8}])
def test_accessor_quantile_layout_matches_xarray(chunks: dict[str, int] | None) -> None:
    labels, image = _xr(chunks)
    q = [0.1, 0.5, 0.9]
    got = image.rasteragg.quantile(labels, q)
    assert got.dims == ("quantile", "label", "c")
    assert isinstance(got.data, da.Array) == (chunks is not None)
    got = got.compute()
    np.testing.assert_array_equal(got["quantile"], q)
    np.testing.assert_array_equal(got["c"], ["a", "b", "c"])
    ids = got["label"].values
    labels, image = labels.compute(), image.compute()
    expected = _expected(labels.values, image.values, ids, q)
    np.testing.assert_array_equal(got.values, np.moveaxis(expected, -1, 0))
    # the same layout as xarray's own quantile, for one label
    where = xr.DataArray(labels.values == ids[0], dims=("z", "y", "x"))
    one = image.where(where).quantile(q, dim=("z", "y", "x"))
    np.testing.assert_array_equal(one.values, got.sel(label=ids[0]).values)
    scalar = image.rasteragg.quantile(labels, 0.25, method="lower")
    assert scalar.dims == ("label", "c")
    assert float(scalar["quantile"]) == 0.25


def test_accessor_2d_median_method_and_aggregate() -> None:
    labels, image = _xr({"z": 1, "y": 6, "x": 10})
    labels2, image2 = labels.isel(z=0), image.isel(z=0)
    median = image2.rasteragg.median(labels2).compute()
    ds = image2.rasteragg.aggregate(labels2, ["mean", "median", "var"]).compute()
    labels2, image2 = labels2.compute(), image2.compute()
    assert median.dims == ("label", "c")
    assert median.name == "median"
    expected = _expected(labels2.values, image2.values, median["label"].values, 0.5)
    np.testing.assert_array_equal(median.values, expected)
    np.testing.assert_array_equal(ds["median"].values, expected)
    np.testing.assert_allclose(ds["mean"].values, image2.rasteragg.mean(labels2).values, rtol=1e-12)
    assert ds["median"].dims == ("label", "c")


@pytest.mark.parametrize("chunks", [None, {"z": 1, "y": 5, "x": 7}])
def test_apply_on_values(chunks: dict[str, int] | None) -> None:
    labels, image = _xr(chunks, np.float64)
    got = image.rasteragg.apply(labels, lambda v: [v.min(), np.percentile(v, 40), v.size], output_size=3)
    assert got.dims == ("label", "c", "output")
    got, labels, image = got.compute(), labels.compute(), image.compute()
    for i, label in enumerate(got["label"].values):
        for c in range(3):
            v = image.values[c][labels.values == label]
            np.testing.assert_array_equal(got.values[i, c], [v.min(), np.percentile(v, 40), v.size])


def _extent(mask: np.ndarray, intensity: np.ndarray) -> float:
    return float(mask.mean())


def _weighted_row(mask: np.ndarray, intensity: np.ndarray) -> float:
    rows = np.indices(mask.shape)[0]
    return float((rows * intensity).sum() / intensity.sum())


@pytest.mark.parametrize("chunks", [None, {"y": 5, "x": 7}])
def test_apply_on_crops_matches_skimage_extra_properties(chunks: dict[str, int] | None) -> None:
    measure = pytest.importorskip("skimage.measure")
    labels, image = _xr(None, np.float64)
    labels2, image2 = labels.isel(z=1), image.isel(z=1) + 1.0
    table = measure.regionprops_table(
        labels2.values,
        np.moveaxis(image2.values, 0, -1),
        properties=("label",),
        extra_properties=(_extent, _weighted_row),
    )
    if chunks:
        labels2, image2 = labels2.chunk(chunks), image2.chunk({"c": 1, **chunks})
    for func in (_extent, _weighted_row):
        got = image2.rasteragg.apply(labels2, func, on="crops", name=func.__name__).compute()
        np.testing.assert_array_equal(got["label"], table["label"])
        for c in range(3):
            np.testing.assert_allclose(got.values[:, c], table[f"{func.__name__}-{c}"], rtol=1e-12)


def _crop_reference(labels: np.ndarray, image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``_weighted_row`` of each label's 3-D bounding-box crops, per channel: (k, C)."""
    out = np.full((len(ids), image.shape[0]), np.nan)
    for i, label in enumerate(ids):
        where = np.argwhere(labels == label)
        if where.shape[0]:
            box = tuple(slice(lo, hi + 1) for lo, hi in zip(where.min(0), where.max(0), strict=True))
            mask = labels[box] == label
            for c in range(image.shape[0]):
                out[i, c] = _weighted_row(mask, np.where(mask, image[c][box].astype(np.float64), 0.0))
    return out


@pytest.mark.parametrize("index", [None, [12, 1, 7, 3, 99, 5, 2], [2, 3, 5, 7, 9, 11]])
def test_pieces_of_few_labels_with_positions(index: list[int] | None, monkeypatch: Any) -> None:
    """Median and a crop function over pieces of three ids: each piece takes its rows of every
    block's pixels (per channel chunk) and of its places (once per block)."""
    monkeypatch.setattr(xr_rasteragg.engine, "PIECE_LABELS", 3)
    labels, image = _geometries(), _image(np.float64) + 300.0
    spec = xr_rasteragg.whole_label.LabelFunction(_weighted_row, on="crops")
    result = aggregate(
        da.from_array(labels, chunks=(1, 5, 7)),
        da.from_array(image, chunks=(1, 1, 5, 7)),
        ["median", "mean"],
        wholes={"row": spec},
        index=index,
        background=0,
        eager=True,
    )
    ids = np.unique(labels)[1:] if index is None else np.asarray(index)
    np.testing.assert_array_equal(result.labels, ids)
    np.testing.assert_array_equal(result.values["median"], _expected(labels, image, ids, 0.5))
    np.testing.assert_allclose(result.values["row"], _crop_reference(labels, image, ids), rtol=1e-12)


def test_whole_label_and_moment_statistics_are_chunked_alike() -> None:
    """One piece size for every statistic of a call (pieces within dask's ``array.chunk-size``),
    so that the results make a Dataset with one chunking."""
    labels, image = _geometries(), _image(np.float64) + 300.0
    stats = ["median", "mean", "count"]
    # The partials of mean and count (pixel count, index sums, shift and shifted sum per
    # channel: more than their values), and the median per channel.
    row = 8 + 3 * 8 + 2 * 8 * image.shape[0] + 8 * image.shape[0]
    with dask.config.set({"array.chunk-size": f"{4 * row}B"}):
        result = aggregate(
            da.from_array(labels, chunks=(1, 5, 7)),
            da.from_array(image, chunks=(1, 1, 5, 7)),
            stats,
            background=0,
        )
    k = result.labels.shape[0]
    assert k > 4
    for name in stats:
        assert result.values[name].chunks[0] == (*(4,) * (k // 4), *((k % 4,) if k % 4 else ())), name
    whole = aggregate(labels, image, stats, background=0)
    for name in stats:
        np.testing.assert_allclose(
            result.values[name].compute(), whole.values[name], rtol=1e-12, err_msg=name
        )


def test_apply_errors_name_the_label() -> None:
    labels, image = _xr({"z": 1, "y": 6, "x": 10}, np.float64)

    def fails(v: np.ndarray) -> float:
        if v.size == 1:
            raise ZeroDivisionError("too small")
        return 0.0

    with pytest.raises(
        LabelFunctionError, match=r"'func' raised ZeroDivisionError on label 12 \(channel 0\)"
    ):
        image.rasteragg.apply(labels, fails).compute()
    with pytest.raises(
        LabelFunctionError, match=r"must return 2 value.*on label \d+ \(channel \d\) it returned shape \(\)"
    ):
        image.rasteragg.apply(labels, np.median, output_size=2).compute()


# -- other entry points, laziness, planners, schedulers ----------------------------------------------


def test_raster_aggregator_median() -> None:
    labels, image = _geometries(), _image(np.uint16)
    aggregator = RasterAggregator(
        da.from_array(labels, chunks=(1, 8, 8)), da.from_array(image, chunks=(1, 1, 8, 8)), run_on_gpu=False
    )
    median = aggregator.aggregate_median()
    mean, med = aggregator.aggregate_stats(("mean", "median"), index=[1, 3, 50])
    np.testing.assert_array_equal(mean["cell_ID"], [1, 3, 50])
    ids = np.unique(labels)
    np.testing.assert_array_equal(median["cell_ID"], ids)
    np.testing.assert_array_equal(median[[0, 1, 2]].values, _expected(labels, image, ids, 0.5))
    np.testing.assert_array_equal(med[[0, 1, 2]].values, _expected(labels, image, [1, 3, 50], 0.5))


def test_lazy_with_index_reads_nothing_until_computed() -> None:
    labels, image = _geometries(), _image(np.float32)
    calls = []

    def count(block: np.ndarray) -> np.ndarray:
        calls.append(block.shape)
        return block

    pixels = da.from_array(image, chunks=(1, 1, 12, 15)).map_blocks(
        count, dtype=image.dtype, meta=np.empty((0, 0, 0, 0), image.dtype)
    )
    result = aggregate(da.from_array(labels, chunks=(1, 12, 15)), pixels, ["median", "var"], index=[1, 2])
    assert calls == []
    (values,) = dask.compute(result.values)
    assert len(calls) == 3 * 2 * 2 * 2  # every image chunk once, for both statistics
    np.testing.assert_array_equal(values["median"], _expected(labels, image, [1, 2], 0.5))


def test_distributed_local_cluster() -> None:
    distributed = pytest.importorskip("distributed")
    labels, image = _geometries(), _image(np.uint16)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None):
        result = aggregate(
            da.from_array(labels, chunks=(1, 12, 15)), da.from_array(image, chunks=(1, 1, 12, 15)), ["median"]
        )
        median = result.values["median"].compute()
    np.testing.assert_array_equal(median, _expected(labels, image, result.labels, 0.5))


# -- the counting path (integer images) and the runs --------------------------------------------


def _ranged_image(dtype: Any, low: int, high: int, seed: int = 2) -> np.ndarray:
    """Values over ``[low, high]``, both ends present in every label, with ties."""
    rng = np.random.default_rng(seed)
    image = rng.integers(low, high, (2, *SHAPE), endpoint=True, dtype=dtype)
    image[:, :, ::3] = image[:, :, 1::3][:, :, : image[:, :, ::3].shape[2]]  # ties
    labels = _geometries()
    for label in np.unique(labels):
        where = np.flatnonzero((labels == label).ravel())
        if where.size >= 2:
            image[0].reshape(-1)[where[:2]] = [low, high]  # the whole range: the widest span
    return image


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        (np.uint8, 0, 255),  # one histogram
        (np.int8, -128, 127),  # negative values
        (np.uint16, 0, 65535),  # two levels
        (np.int16, -32768, 32767),
        (np.uint16, 1000, 1040),  # a narrow span
        (np.int32, -(2**23), 2**23),  # two levels, beyond 16 bits
        (np.int64, -(2**40), 2**40),  # beyond two levels: selection
        (np.uint64, 2**64 - 2**20, 2**64 - 1),  # near the top of uint64
    ],
)
@pytest.mark.parametrize("method", QUANTILE_METHODS)
def test_counting_path_every_method_and_range(dtype: Any, low: int, high: int, method: str) -> None:
    labels, image = _geometries(), _ranged_image(dtype, low, high)
    q = (0.0, 0.13, 0.5, 0.77, 1.0)
    spec = xr_rasteragg.whole_label.Quantiles(q, method)
    result = aggregate(
        da.from_array(labels, chunks=(1, 12, 15)),
        da.from_array(image, chunks=(1, 1, 12, 15)),
        (),
        wholes={"q": spec},
        eager=True,
    )
    expected = _expected(labels, image, result.labels, q, method)
    np.testing.assert_array_equal(result.values["q"], expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_counting_kernel_many_ranks_whole_range(dtype: Any) -> None:
    from xr_rasteragg.kernels.selection import order_statistics

    rng = np.random.default_rng(3)
    high = int(np.iinfo(dtype).max)
    sizes = np.array([1, 2, 3, 7, 100, 5000, 40000])
    values = np.concatenate([rng.integers(0, high, n, endpoint=True, dtype=dtype) for n in sizes])
    values[-2:] = [0, high]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = np.arange(sizes.shape[0], dtype=np.int64)
    wanted = np.stack([rng.integers(0, n, 20) for n in sizes])[:, None, :]  # 20 ranks, unsorted, repeats
    got = order_statistics(values[None], starts, rows, wanted, False, True)
    for i in range(sizes.shape[0]):
        ordered = np.sort(values[starts[i] : starts[i + 1]])
        np.testing.assert_array_equal(got[i, 0], ordered[wanted[i, 0]].astype(np.float64))


def test_label_blocks_encoded_once_with_moment_statistics() -> None:
    labels, image = _geometries(), _image(np.uint16)
    reads = []

    def count(block: np.ndarray) -> np.ndarray:
        reads.append(block.shape)
        return block

    mask = da.from_array(labels, chunks=(1, 12, 15)).map_blocks(
        count, dtype=labels.dtype, meta=np.empty((0, 0, 0), labels.dtype)
    )
    result = aggregate(mask, da.from_array(image, chunks=(1, 1, 12, 15)), ["median", "var"], background=0)
    assert len(reads) == 8  # the survey, computed in the call
    reads.clear()
    (values,) = dask.compute(result.values)
    assert len(reads) == 8  # one label stage per block, shared by the gather and the moments
    np.testing.assert_array_equal(values["median"], _expected(labels, image, result.labels, 0.5))


@pytest.mark.parametrize("stats", [["median"], ["median", "var", "max"]])
def test_each_image_chunk_has_one_reader(stats: list[str]) -> None:
    """One task reads each image chunk (the moment statistics' partials and the gather's shares
    alike), so that dask frees the chunk at once rather than holding it between two readers."""
    labels, image = _geometries(), _image(np.float64)
    pixels = da.from_array(image, chunks=(1, 1, 12, 15))
    result = aggregate(da.from_array(labels, chunks=(1, 12, 15)), pixels, stats, background=0)
    graph = {
        key: task for value in result.values.values() for key, task in dict(value.__dask_graph__()).items()
    }
    dependents = dask.core.reverse_dict({key: dask.core.get_dependencies(graph, key) for key in graph})
    chunks = [key for key in graph if isinstance(key, tuple) and key[0] == pixels.name]
    assert len(chunks) == 3 * 8
    assert {key: len(dependents[key]) for key in chunks} == dict.fromkeys(chunks, 1)
    (values,) = dask.compute(result.values)
    np.testing.assert_array_equal(values["median"], _expected(labels, image, result.labels, 0.5))
