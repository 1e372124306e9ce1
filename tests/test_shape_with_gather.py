"""Shape features with whole-label statistics (median, quantiles, functions of a label's pixels)
and moment statistics, in one call: equal to the separate calls, through every entry point.

The separate calls are tested against scikit-image's ``regionprops_table`` (``test_shape.py``)
and ``numpy.quantile`` (``test_gather.py``); here the one call must give exactly their values,
for 2-D and 3-D labels, every chunking, with and without an ``index``, lazy dask and NumPy
inputs. That the image is read once is counted in ``test_one_pass.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import test_shape
import xarray as xr
from numpy.typing import NDArray
from skimage.measure import regionprops_table

import xr_rasteragg  # noqa: F401  (registers the accessor)
from xr_rasteragg import RasterAggregator
from xr_rasteragg.engine import aggregate
from xr_rasteragg.stats import Space
from xr_rasteragg.whole_label import LabelFunction, Quantiles

SHAPE_2D = (*test_shape.SHAPE_2D, "centroid_weighted")
SHAPE_3D = (
    *(name for name in SHAPE_2D if name not in ("eccentricity", "orientation", "perimeter")),
    "radii",
    "principal_axes",
)
MOMENTS = ("mean", "var", "kurtosis", "max", "count", "center_of_mass")


def _irregular(shape: tuple[int, ...], labels: int, seed: int) -> NDArray[np.int32]:
    """Smoothed random labels 0..labels-1: irregular cells, several of them in pieces."""
    rng = np.random.default_rng(seed)
    return ndi.median_filter(rng.integers(0, labels, size=shape).astype(np.int32), 5)


def _inputs(
    ndim: int, chunks: tuple[int, ...] | None, backing: str, spacing: float = 1.0
) -> tuple[xr.DataArray, xr.DataArray]:
    """Labels and a 3-channel uint16 image as DataArrays (dask-backed in ``chunks``, or NumPy)."""
    shape = (24, 30) if ndim == 2 else (5, 14, 17)
    dims = ("y", "x") if ndim == 2 else ("z", "y", "x")
    labels = _irregular(shape, 9, seed=ndim)
    image = np.random.default_rng(7).integers(0, 2**16, (3, *shape)).astype(np.uint16)
    if backing == "dask":
        assert chunks is not None
        labels, image = da.from_array(labels, chunks=chunks), da.from_array(image, chunks=(1, *chunks))
    coords = {d: np.arange(n) * spacing for d, n in zip(dims, shape, strict=True)}
    return (
        xr.DataArray(labels, dims=dims, coords=coords),
        xr.DataArray(image, dims=("c", *dims), coords={"c": ["a", "b", "c"], **coords}),
    )


def _assert_same(combined: xr.Dataset, *separate: xr.Dataset) -> None:
    """Every variable of the separate calls is in the combined one, with exactly its values."""
    expected = xr.merge(separate)
    assert set(combined.data_vars) == set(expected.data_vars)
    for name in expected.data_vars:
        assert combined[name].dims == expected[name].dims, name
        np.testing.assert_array_equal(combined[name].values, expected[name].values, err_msg=name)
    np.testing.assert_array_equal(combined["label"], expected["label"])


CASES = [
    (2, (24, 30)),
    (2, (7, 9)),
    (2, (1, 30)),
    (2, (24, 4)),
    (3, (5, 14, 17)),
    (3, (2, 6, 5)),
    (3, (5, 3, 17)),
]


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("backing", ["dask", "numpy"])
@pytest.mark.parametrize(("ndim", "chunks"), CASES)
def test_shape_median_and_moments_in_one_call(
    ndim: int, chunks: tuple[int, ...], backing: str, with_index: bool
) -> None:
    labels, image = _inputs(ndim, chunks, backing)
    shape = SHAPE_2D if ndim == 2 else SHAPE_3D
    # Unsorted, with an absent id (99) and the background (0), which an index keeps.
    index = [5, 99, 1, 3, 0, 2] if with_index else None
    combined = image.rasteragg.aggregate(labels, ["median", *shape, *MOMENTS], index=index)
    if backing == "dask":
        assert all(isinstance(v.data, da.Array) for v in combined.data_vars.values())
    else:
        assert not any(isinstance(v.data, da.Array) for v in combined.data_vars.values())
    _assert_same(
        combined.compute(),
        image.rasteragg.aggregate(labels, ["median"], index=index).compute(),
        image.rasteragg.aggregate(labels, [*shape, *MOMENTS], index=index).compute(),
    )


@pytest.mark.parametrize("ndim", [2, 3])
def test_labels_only_shape_features_with_median(ndim: int) -> None:
    """Shape features of the labels alone (and the perimeter's frames) next to a median only,
    in units of the labels' coordinate spacing."""
    labels, image = _inputs(ndim, (2, 7, 9)[-ndim:], "dask", spacing=0.5)
    shape = ("area", "bbox", "centroid", "solidity", "extent", *(("perimeter",) if ndim == 2 else ()))
    combined = image.rasteragg.aggregate(labels, ["median", *shape]).compute()
    _assert_same(
        combined,
        image.rasteragg.aggregate(labels, ["median"]).compute(),
        labels.rasteragg.aggregate(list(shape)).compute(),
    )
    if ndim == 2:  # and what the separate calls are tested against
        table = regionprops_table(
            labels.compute().values, properties=("perimeter", "solidity"), spacing=(0.5, 0.5)
        )
        np.testing.assert_allclose(combined["perimeter"], table["perimeter"], rtol=1e-9)
        np.testing.assert_allclose(combined["solidity"], table["solidity"], rtol=1e-9)


@pytest.mark.parametrize("with_index", [False, True])
@pytest.mark.parametrize("backing", ["dask", "numpy"])
def test_engine_quantiles_and_functions_with_shape(backing: str, with_index: bool) -> None:
    """The engine's ``wholes`` (quantiles, a function of the crops) with shape features."""
    labels, image = _inputs(2, (7, 9), backing)
    mask, pixels = labels.data[None], image.data[:, None]
    space = Space((1, 2), (1.0, 1.0))
    wholes: dict[str, Any] = {
        "quantile": Quantiles((0.1, 0.9)),
        "extent": LabelFunction(lambda m, i: m.mean(), on="crops", spatial_ndim=2),
    }
    index = [4, 1, 99, 2] if with_index else None
    stats = ("perimeter", "eccentricity", "solidity", "mean", "centroid_weighted")
    combined = aggregate(
        mask, pixels, stats, wholes=wholes, index=index, background=0, space=space, eager=True
    )
    whole = aggregate(mask, pixels, (), wholes=wholes, index=index, background=0, eager=True)
    moments = aggregate(mask, pixels, stats, index=index, background=0, space=space, eager=True)
    np.testing.assert_array_equal(combined.labels, moments.labels)
    assert list(combined.values) == [*stats, *wholes]
    for name in stats:
        np.testing.assert_array_equal(combined.values[name], moments.values[name], err_msg=name)
    for name in wholes:
        np.testing.assert_array_equal(combined.values[name], whole.values[name], err_msg=name)


@pytest.mark.parametrize("flat", [True, False])
def test_raster_aggregator_median_with_shape(flat: bool) -> None:
    labels, image = _inputs(2 if flat else 3, (7, 9) if flat else (2, 6, 5), "dask")
    mask, pixels = (labels.data[None], image.data[:, None]) if flat else (labels.data, image.data)
    aggregator = RasterAggregator(mask, pixels, run_on_gpu=False)
    shape = ("perimeter", "solidity", "area") if flat else ("solidity", "radii", "axis_major_length")
    combined = aggregator.aggregate_stats(("median", *shape, "mean"))
    separate = [*aggregator.aggregate_stats("median"), *aggregator.aggregate_stats((*shape, "mean"))]
    assert len(combined) == len(separate)
    for got, expected in zip(combined, separate, strict=True):
        pd.testing.assert_frame_equal(got, expected)


# -- SpatialData and the command line --------------------------------------------------------------


@pytest.fixture
def sdata() -> Any:
    spatialdata = pytest.importorskip("spatialdata")
    if da.array_expr_enabled():
        pytest.skip("spatialdata does not support dask's array query planning")
    from spatialdata.models import Image2DModel, Labels2DModel

    labels, image = _inputs(2, None, "numpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return spatialdata.SpatialData(
            images={"img": Image2DModel.parse(image.values, dims=("c", "y", "x"), chunks=(1, 7, 9))},
            labels={"cells": Labels2DModel.parse(labels.values, dims=("y", "x"), chunks=(7, 9))},
        )


STATS = ("mean", "median", "perimeter", "solidity", "bbox")


def _assert_same_tables(combined: Any, *separate: Any) -> None:
    for one in separate:
        np.testing.assert_array_equal(combined.obs.index, one.obs.index)
        for name in one.layers:
            np.testing.assert_array_equal(combined.layers[name], one.layers[name], err_msg=name)
        for name in one.obs.columns:
            pd.testing.assert_series_equal(combined.obs[name], one.obs[name])
        for name in one.obsm:
            np.testing.assert_array_equal(combined.obsm[name], one.obsm[name], err_msg=name)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_spatialdata_adapter_median_with_shape(sdata: Any) -> None:
    from xr_rasteragg.spatialdata import aggregate as sd_aggregate

    combined = sd_aggregate(sdata, "img", "cells", STATS)
    moments = sd_aggregate(sdata, "img", "cells", ("mean", "perimeter", "solidity", "bbox"))
    median = sd_aggregate(sdata, "img", "cells", ("median",))
    np.testing.assert_array_equal(combined.X, moments.X)
    _assert_same_tables(combined, moments, median)
    np.testing.assert_array_equal(combined.layers["median"], median.X)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_command_line_median_with_shape(
    sdata: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import spatialdata

    from xr_rasteragg.cli import main

    store = tmp_path / "data.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(store)
    for name, stats in [("both", STATS), ("moments", STATS[:1] + STATS[2:]), ("median", ("median",))]:
        argv = ["aggregate", str(store), "--image", "img", "--labels", "cells", "--stats", ",".join(stats)]
        code = main([*argv, "--table", name, "--no-progress"])
        assert code == 0, capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tables = spatialdata.read_zarr(store).tables
    _assert_same_tables(tables["both"], tables["moments"], tables["median"])
    np.testing.assert_array_equal(tables["both"].layers["median"], tables["median"].X)
