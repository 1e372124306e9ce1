"""Every public entry point reads the data once per call, with or without an index, lazy or eager.

The ``kernel_calls`` fixture (``conftest.py``) records each read of a label block by the engine's
kernels: one call is one read of each spatial block, whatever it asks for. Lazy results are
computed the way their docs say (``.compute()`` on the Dataset, ``dask.compute`` on the engine's
values), and that must be one read too.
"""

from __future__ import annotations

import dataclasses
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import xr_rasteragg
from xr_rasteragg import RasterAggregator

ALL_STATS = ("sum", "mean", "count", "var", "skew", "kurtosis", "min", "max", "center_of_mass")
SHAPE, CHUNKS = (1, 12, 16), (1, 6, 8)  # four spatial blocks
BLOCKS = 4


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 9, size=SHAPE).astype(np.int32)
    image = rng.random((3, *SHAPE))
    return labels, image


def _index(labels: np.ndarray, with_index: bool) -> np.ndarray | None:
    return np.unique(labels) if with_index else None


# -- RasterAggregator -----------------------------------------------------------------------------

CLASS_CALLS: dict[str, Callable[[RasterAggregator, Any], Any]] = {
    "aggregate_stats (default)": lambda a, index: a.aggregate_stats(index=index),
    "aggregate_stats (all nine)": lambda a, index: a.aggregate_stats(ALL_STATS, index=index),
    "aggregate_mean": lambda a, index: a.aggregate_mean(index=index),
    "aggregate_skew": lambda a, index: a.aggregate_skew(index=index),
    "aggregate_area": lambda a, index: a.aggregate_area(index=index),
    "center_of_mass": lambda a, index: a.center_of_mass(index=index),
}


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("backing", ["dask", "numpy"])
@pytest.mark.parametrize("call", sorted(CLASS_CALLS))
def test_raster_aggregator_reads_once_per_call(
    data: tuple[np.ndarray, np.ndarray],
    kernel_calls: list[tuple[int, int, int]],
    call: str,
    backing: str,
    with_index: bool,
) -> None:
    labels, image = data
    mask, pixels = da.from_array(labels, chunks=CHUNKS), da.from_array(image, chunks=(1, *CHUNKS))
    if backing == "numpy":  # the class splits in-memory arrays into blocks of its own choosing
        mask, pixels = labels, image
    aggregator = RasterAggregator(mask, pixels, run_on_gpu=False)
    result = CLASS_CALLS[call](aggregator, _index(labels, with_index))
    blocks = BLOCKS if backing == "dask" else 1
    assert len(kernel_calls) == blocks
    frames = result if isinstance(result, list) else [result]
    assert all(len(frame) == len(np.unique(labels)) for frame in frames)


def _harpy_script(aggregator: RasterAggregator, index: Any) -> list[pd.DataFrame]:
    """harpy's four calls, each with the index."""
    return [
        *aggregator.aggregate_stats(("sum", "mean", "count", "var", "kurtosis", "skew"), index=index),
        aggregator.aggregate_min(index=index),
        aggregator.aggregate_max(index=index),
        aggregator.center_of_mass(index=index),
    ]


@pytest.mark.parametrize("with_index", [False, True])
def test_harpy_style_script_reads_the_data_once(
    data: tuple[np.ndarray, np.ndarray], kernel_calls: list[tuple[int, int, int]], with_index: bool
) -> None:
    """The first call's pass keeps its partials (the moments and the extrema), which serve the
    other three calls; each call's values are those of a RasterAggregator of its own."""
    labels, image = data

    def fresh() -> RasterAggregator:
        lazy_image = da.from_array(image, chunks=(1, *CHUNKS))
        return RasterAggregator(da.from_array(labels, chunks=CHUNKS), lazy_image, run_on_gpu=False)

    index = _index(labels, with_index)
    frames = _harpy_script(fresh(), index)
    assert len(kernel_calls) == BLOCKS
    expected = [
        *fresh().aggregate_stats(("sum", "mean", "count", "var", "kurtosis", "skew"), index=index),
        fresh().aggregate_min(index=index),
        fresh().aggregate_max(index=index),
        fresh().center_of_mass(index=index),
    ]
    for frame, alone in zip(frames, expected, strict=True):
        pd.testing.assert_frame_equal(frame, alone)


def test_a_pass_keeps_what_earlier_passes_had(
    data: tuple[np.ndarray, np.ndarray], kernel_calls: list[tuple[int, int, int]]
) -> None:
    """A call that needs more than the kept partials hold runs a pass for both: later calls of
    either read nothing. Labels-only statistics first read the labels alone."""
    labels, image = data
    aggregator, counted = _counted_aggregator(labels, image)
    aggregator.center_of_mass()
    assert (len(kernel_calls), counted.reads) == (BLOCKS, 0)
    reads = image.shape[0] * BLOCKS  # of the image, by one pass
    aggregator.aggregate_mean()
    assert (len(kernel_calls), counted.reads) == (2 * BLOCKS, reads)
    aggregator.aggregate_max()  # the extrema: a pass for them and the mean
    aggregator.aggregate_sum()
    assert (len(kernel_calls), counted.reads) == (3 * BLOCKS, 2 * reads)
    aggregator.aggregate_kurtosis()  # the moments up to the fourth, and the extrema kept
    aggregator.aggregate_stats(("mean", "min", "center_of_mass", "count", "std", "skew"))
    assert (len(kernel_calls), counted.reads) == (4 * BLOCKS, 3 * reads)


def test_partials_past_the_limit_are_not_kept(
    data: tuple[np.ndarray, np.ndarray],
    kernel_calls: list[tuple[int, int, int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(xr_rasteragg.aggregator, "KEEP_BYTES", 0)
    labels, image = data
    aggregator = RasterAggregator(
        da.from_array(labels, chunks=CHUNKS), da.from_array(image, chunks=(1, *CHUNKS)), run_on_gpu=False
    )
    _harpy_script(aggregator, None)
    assert len(kernel_calls) == 4 * BLOCKS


# -- the accessor and the engine ------------------------------------------------------------------


def _arrays(data: tuple[np.ndarray, np.ndarray], backing: str) -> tuple[xr.DataArray, xr.DataArray]:
    labels, image = data[0][0], data[1][:, 0]
    if backing == "dask":
        labels = da.from_array(labels, chunks=CHUNKS[1:])
        image = da.from_array(image, chunks=(1, *CHUNKS[1:]))
    coords = {"y": np.arange(SHAPE[1]) * 0.5, "x": np.arange(SHAPE[2]) * 0.5}
    return (
        xr.DataArray(labels, dims=("y", "x"), coords=coords),
        xr.DataArray(image, dims=("c", "y", "x"), coords=coords),
    )


ACCESSOR_CALLS: dict[str, Callable[[xr.DataArray, xr.DataArray, Any], Any]] = {
    "aggregate": lambda image, labels, index: image.rasteragg.aggregate(labels, ALL_STATS, index=index),
    "mean": lambda image, labels, index: image.rasteragg.mean(labels, index=index),
    "kurtosis": lambda image, labels, index: image.rasteragg.kurtosis(labels, index=index),
    "area": lambda image, labels, index: labels.rasteragg.area(index=index),
    "center_of_mass": lambda image, labels, index: labels.rasteragg.center_of_mass(index=index),
    "shape features": lambda image, labels, index: image.rasteragg.aggregate(
        labels, ("mean", "perimeter", "solidity", "eccentricity", "centroid_weighted"), index=index
    ),
    "labels-only shape features": lambda image, labels, index: labels.rasteragg.aggregate(
        ("perimeter", "solidity", "area"), index=index
    ),
}


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("backing", ["dask", "numpy"])
@pytest.mark.parametrize("call", sorted(ACCESSOR_CALLS))
def test_accessor_reads_once_per_call(
    data: tuple[np.ndarray, np.ndarray],
    kernel_calls: list[tuple[int, int, int]],
    call: str,
    backing: str,
    with_index: bool,
) -> None:
    labels, image = _arrays(data, backing)
    result = ACCESSOR_CALLS[call](image, labels, _index(data[0], with_index))
    result.compute()  # a lazy result (dask inputs with an index) is computed as a whole
    assert len(kernel_calls) == (BLOCKS if backing == "dask" else 1)


def test_lazy_engine_values_computed_together_read_once(
    data: tuple[np.ndarray, np.ndarray], kernel_calls: list[tuple[int, int, int]]
) -> None:
    labels, image = data
    result = xr_rasteragg.aggregate(
        da.from_array(labels, chunks=CHUNKS),
        da.from_array(image, chunks=(1, *CHUNKS)),
        ALL_STATS,
        index=np.unique(labels),
    )
    assert all(isinstance(value, da.Array) for value in result.values.values())
    assert kernel_calls == []  # lazy: nothing read yet
    (values,) = dask.compute(result.values)
    assert len(kernel_calls) == BLOCKS
    assert set(values) == set(ALL_STATS)


# -- SpatialData and the command line --------------------------------------------------------------


@pytest.fixture
def sdata(data: tuple[np.ndarray, np.ndarray]) -> Any:
    spatialdata = pytest.importorskip("spatialdata")
    if da.array_expr_enabled():
        # spatialdata's models make legacy dask arrays (and spatial_image turns array-expr ones
        # into NumPy), then reject them as not dask.array.Array: it cannot build an element here
        pytest.skip("spatialdata does not support dask's array query planning")
    from spatialdata.models import Image2DModel, Labels2DModel

    labels, image = data[0][0], (data[1][:, 0] * 1000).astype(np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata.SpatialData(
            images={"img": Image2DModel.parse(image, dims=("c", "y", "x"), chunks=(1, *CHUNKS[1:]))},
            labels={"cells": Labels2DModel.parse(labels, dims=("y", "x"), chunks=CHUNKS[1:])},
        )


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_spatialdata_adapter_reads_once(sdata: Any, kernel_calls: list[tuple[int, int, int]]) -> None:
    from xr_rasteragg.spatialdata import aggregate

    table = aggregate(sdata, "img", "cells", ("mean", "var", "skew", "max"))
    assert len(kernel_calls) == BLOCKS
    assert table.n_obs == len(np.unique(sdata["cells"].values)) - 1  # background left out


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_command_line_reads_once(
    sdata: Any, tmp_path: Path, kernel_calls: list[tuple[int, int, int]], capsys: pytest.CaptureFixture[str]
) -> None:
    from xr_rasteragg.cli import main

    store = tmp_path / "data.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(store)
    code = main(
        ["aggregate", str(store), "--image", "img", "--labels", "cells", "--stats", "mean,var,kurtosis"]
    )
    assert code == 0, capsys.readouterr().err
    assert len(kernel_calls) == BLOCKS


# -- whole-label statistics with the moment statistics ---------------------------------------------


def _counted_aggregator(labels: np.ndarray, image: np.ndarray) -> tuple[RasterAggregator, _CountedImage]:
    """A RasterAggregator over dask arrays of ``labels`` and of ``image``, whose chunk reads count."""
    counted = _CountedImage(image)
    lazy_image = da.from_array(counted, chunks=(1, *CHUNKS), asarray=False)
    return RasterAggregator(da.from_array(labels, chunks=CHUNKS), lazy_image, run_on_gpu=False), counted


class _CountedImage:
    """An in-memory image that counts the chunks read from it (through ``da.from_array``); empty
    reads (dask's look at the array type) are not counted. Each one has a token of its own: equal
    images would otherwise share dask's name, and array-expr's cache of expressions by name would
    hand a later test an earlier test's wrapper to read from."""

    def __init__(self, image: np.ndarray) -> None:
        self.image, self.shape, self.dtype, self.ndim = image, image.shape, image.dtype, image.ndim
        self.reads = 0
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        return self.token

    def __getitem__(self, key: Any) -> np.ndarray:
        chunk = self.image[key]
        self.reads += chunk.size > 0
        return chunk


WHOLE_CALLS: dict[str, Callable[[xr.DataArray, xr.DataArray, Any], Any]] = {
    "aggregate mean, median, var": lambda image, labels, index: image.rasteragg.aggregate(
        labels, ["mean", "median", "var"], index=index
    ),
    "aggregate all nine and median": lambda image, labels, index: image.rasteragg.aggregate(
        labels, (*ALL_STATS, "median"), index=index
    ),
    "median": lambda image, labels, index: image.rasteragg.median(labels, index=index),
    "quantile": lambda image, labels, index: image.rasteragg.quantile(labels, [0.25, 0.75], index=index),
    "apply": lambda image, labels, index: image.rasteragg.apply(labels, np.ptp, index=index),
    "aggregate median, mean and shape features": lambda image, labels, index: image.rasteragg.aggregate(
        labels, ["median", "mean", "perimeter", "solidity", "eccentricity", "centroid_weighted"], index=index
    ),
    "aggregate median and shape features of the labels alone": lambda image, labels, index: (
        image.rasteragg.aggregate(labels, ["median", "area", "perimeter", "bbox"], index=index)
    ),
}


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("call", sorted(WHOLE_CALLS))
def test_whole_label_statistics_read_the_image_once(
    data: tuple[np.ndarray, np.ndarray], kernel_calls: list[tuple[int, int, int]], call: str, with_index: bool
) -> None:
    labels, image = data[0][0], data[1][:, 0]
    counted = _CountedImage(image)
    pixels = xr.DataArray(
        da.from_array(counted, chunks=(1, *CHUNKS[1:]), asarray=False), dims=("c", "y", "x")
    )
    mask = xr.DataArray(da.from_array(labels, chunks=CHUNKS[1:]), dims=("y", "x"))
    result = WHOLE_CALLS[call](pixels, mask, _index(data[0], with_index))
    result.compute()
    assert counted.reads == image.shape[0] * BLOCKS
    assert len(kernel_calls) <= BLOCKS  # the moments' kernel, when moments are asked for


@pytest.mark.parametrize(
    "stats", [("mean", "median", "var", "kurtosis"), ("median", "perimeter", "solidity", "mean")]
)
def test_raster_aggregator_median_with_other_statistics_reads_the_image_once(
    data: tuple[np.ndarray, np.ndarray], stats: tuple[str, ...]
) -> None:
    """The median with moment statistics, or with shape features, through the class."""
    labels, image = data
    aggregator, counted = _counted_aggregator(labels, image)
    frames = aggregator.aggregate_stats(stats)
    assert counted.reads == image.shape[0] * BLOCKS
    assert [len(frame) for frame in frames] == [len(np.unique(labels))] * 4


def test_quantify_median_with_mask_properties_reads_the_image_once(
    data: tuple[np.ndarray, np.ndarray], tmp_path: Path, kernel_calls: list[tuple[int, int, int]]
) -> None:
    """``rasteragg quantify --intensity_props intensity_median``: the median, the other intensity
    properties and MCQuant's mask properties (shape features) from one read of the image, and
    one label stage per block of each mask (no second pass over the masks)."""
    tifffile = pytest.importorskip("tifffile")
    from xr_rasteragg import quantify

    labels, image = data[0][0], (data[1][:, 0] * 1000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "img.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "cells.tif", labels)
    tifffile.imwrite(tmp_path / "nuclei.tif", np.where(labels % 2 == 0, labels, 0))
    resolved = quantify.plan(
        [tmp_path / "cells.tif", tmp_path / "nuclei.tif"],
        tmp_path / "img.tif",
        tmp_path / "out",
        channel_names=_markers(tmp_path, image.shape[0]),
        intensity_props=["intensity_median", "intensity_max"],
        mask_props=["perimeter"],
    )
    counted = _CountedImage(image)
    pixels = resolved.image.copy(data=da.from_array(counted, chunks=(1, *CHUNKS[1:]), asarray=False))
    masks = {
        name: mask.chunk(dict(zip(mask.dims, CHUNKS[1:], strict=True)))
        for name, mask in resolved.masks.items()
    }
    assert [mask.dims for mask in masks.values()] == [("y", "x")] * 2
    tables = quantify.compute(dataclasses.replace(resolved, image=pixels, masks=masks))
    assert counted.reads == image.shape[0] * BLOCKS
    assert len(kernel_calls) == 2 * BLOCKS
    assert {"ch0_intensity_median", "Solidity", "perimeter"} <= set(tables["cells"].columns)


def _markers(folder: Path, nchan: int) -> Path:
    path = folder / "markers.csv"
    path.write_text("marker_name\n" + "".join(f"ch{c}\n" for c in range(nchan)))
    return path
