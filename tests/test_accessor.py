"""The ``.rasteragg`` accessor on ``xarray.DataArray`` against SciPy references.

Covers the contract of the accessor (DESIGN.md §4): every statistic, dims found by name in any order,
2-D and 3-D, images without ``c``, channel names, alignment on coordinates (crops) and its errors,
chunk alignment, laziness, index and background, NaN pixels, center of mass in coordinate units,
``paint``, and the backend dispatch (NumPy, dask, CuPy).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import xarray as xr
from conftest import (
    ALL_STATS,
    PER_CHANNEL,
    assert_stat,
    nan_reference,
    reference,
    requires_cupy,
)
from numpy.typing import NDArray

import xr_rasteragg  # registers the accessor
import xr_rasteragg.engine
from xr_rasteragg.kernels import array_backend

#: Label ids of the test masks; 0 is background, ``CONSTANT`` has one value per channel.
IDS = np.array([0, 1, 2, 3, 5, 8])
CONSTANT = 8
CHANNELS = ["DAPI", "CD3", "CD8"]
SINGLE_STATS = ("count", *PER_CHANNEL)

# --- data -------------------------------------------------------------------------------------


def make_labels(shape: tuple[int, ...], seed: int = 0) -> NDArray[np.int32]:
    """Blocky labels with some noise; every id of ``IDS`` present."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(IDS, size=(*shape[:-2], -(-shape[-2] // 3), -(-shape[-1] // 4)))
    labels = coarse.repeat(3, axis=-2).repeat(4, axis=-1)[..., : shape[-2], : shape[-1]].copy()
    noise = rng.random(shape) < 0.1
    labels[noise] = rng.choice(IDS[:-1], size=int(noise.sum()))
    labels.reshape(-1)[: IDS.size] = IDS
    return labels.astype(np.int32)


def make_image(labels: NDArray[np.integer], nchan: int = 3, seed: int = 1) -> NDArray[np.float64]:
    """Random values ``(c, *labels.shape)``; label ``CONSTANT`` holds one value per channel."""
    image = np.random.default_rng(seed).normal(100.0, 10.0, size=(nchan, *labels.shape))
    for c in range(nchan):
        image[c][labels == CONSTANT] = 7.0 + c
    return image


def spatial(ndim: int) -> tuple[str, ...]:
    return ("z", "y", "x")[3 - ndim :]


def image_array(
    image: NDArray[Any],
    coords: Mapping[Hashable, Any] | None = None,
    chunks: Mapping[str, int] | None = None,
) -> xr.DataArray:
    """A ``(c, [z,] y, x)`` image DataArray with channel names, optionally with coords and chunks."""
    array = xr.DataArray(
        image,
        dims=("c", *spatial(image.ndim - 1)),
        coords={"c": CHANNELS[: image.shape[0]], **(coords or {})},
        name="image",
    )
    return array.chunk(chunks) if chunks else array


def labels_array(
    labels: NDArray[Any],
    coords: Mapping[Hashable, Any] | None = None,
    chunks: Mapping[str, int] | None = None,
) -> xr.DataArray:
    array = xr.DataArray(labels, dims=spatial(labels.ndim), coords=coords, name="labels")
    return array.chunk(chunks) if chunks else array


def expected(
    labels: NDArray[np.integer], image: NDArray[Any] | None, ids: Sequence[int] | NDArray[Any]
) -> dict[str, NDArray[Any]]:
    """``conftest.reference`` for 2-D or 3-D labels and a ``(c, *spatial)`` image.

    ``center_of_mass`` keeps only the spatial axes of the labels (in pixel indices).
    """
    ndim = labels.ndim
    if ndim == 2:
        labels = labels[None]
        image = None if image is None else image[:, None]
    out = reference(labels, image, [int(i) for i in ids])
    out["center_of_mass"] = out["center_of_mass"][:, 3 - ndim :]
    return out


def present(labels: NDArray[np.integer], background: int | None = 0) -> NDArray[np.integer]:
    ids = np.unique(labels)
    return ids if background is None else ids[ids != background]


def assert_result(
    result: xr.DataArray | xr.Dataset, ref: Mapping[str, NDArray[Any]], stats: Sequence[str]
) -> None:
    """Each statistic of ``result`` against the reference, with the contract's tolerances."""
    for name in stats:
        value = result[name] if isinstance(result, xr.Dataset) else result
        assert_stat(name, value, ref[name])


def raising_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
    raise AssertionError("the graph was computed")


def is_lazy(result: xr.DataArray | xr.Dataset) -> bool:
    variables = result.data_vars.values() if isinstance(result, xr.Dataset) else [result]
    return all(isinstance(v.data, da.Array) for v in variables)


# --- every statistic ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "dask"])
@pytest.mark.parametrize("stat", SINGLE_STATS)
def test_each_statistic_matches_scipy(stat: str, backend: str) -> None:
    labels = make_labels((14, 19))
    image = make_image(labels)
    chunks = {"y": 5, "x": 8} if backend == "dask" else None
    result = getattr(image_array(image, chunks=chunks).rasteragg, stat)(labels_array(labels, chunks=chunks))
    ids = present(labels)
    assert isinstance(result, xr.DataArray)
    assert result.name == stat
    assert result.dims == (("label",) if stat == "count" else ("label", "c"))
    np.testing.assert_array_equal(result["label"].values, ids)
    if stat != "count":
        assert result["c"].values.tolist() == CHANNELS
    assert_result(result, expected(labels, image, ids), [stat])


def test_aggregate_equals_individual_calls() -> None:
    labels = make_labels((3, 10, 13))
    image = image_array(make_image(labels), chunks={"z": 2, "y": 6, "x": 7})
    dlabels = labels_array(labels, chunks={"z": 2, "y": 6, "x": 7})
    dataset = image.rasteragg.aggregate(dlabels, ALL_STATS)
    assert isinstance(dataset, xr.Dataset)
    assert list(dataset.data_vars) == list(ALL_STATS)
    assert_result(dataset, expected(labels, make_image(labels), present(labels)), ALL_STATS)
    for name in SINGLE_STATS:
        single = getattr(image.rasteragg, name)(dlabels)
        xr.testing.assert_allclose(dataset[name].compute(), single.compute(), rtol=1e-12)
    xr.testing.assert_allclose(dataset["count"].compute(), dlabels.rasteragg.area().compute(), rtol=0)
    centers = dlabels.rasteragg.center_of_mass().compute()
    xr.testing.assert_allclose(dataset["center_of_mass"].compute(), centers, rtol=1e-12)


def test_aggregate_reads_each_block_once(kernel_calls: list[tuple[int, int, int]]) -> None:
    labels = make_labels((12, 16))
    image = image_array(make_image(labels), chunks={"c": 1, "y": 6, "x": 8})
    image.rasteragg.aggregate(labels_array(labels), ALL_STATS)
    assert sorted(kernel_calls) == [(0, y, x) for y in (0, 6) for x in (0, 8)]


def test_single_stat_string_and_unknown_stat() -> None:
    labels = make_labels((8, 9))
    image = image_array(make_image(labels))
    dataset = image.rasteragg.aggregate(labels_array(labels), "var")
    assert list(dataset.data_vars) == ["var"]
    with pytest.raises(ValueError, match="mode"):
        image.rasteragg.aggregate(labels_array(labels), ["mean", "mode"])


# --- dims: order, 2-D / 3-D, no channel ---------------------------------------------------------


@pytest.mark.parametrize(
    ("image_dims", "labels_dims"),
    [
        (("x", "c", "y"), ("y", "x")),
        (("y", "x", "c"), ("x", "y")),
        (("c", "z", "y", "x"), ("z", "y", "x")),
        (("y", "z", "c", "x"), ("x", "z", "y")),
        (("x", "y"), ("x", "y")),
        (("z", "x", "y"), ("y", "z", "x")),
    ],
)
def test_dims_found_by_name_in_any_order(image_dims: tuple[str, ...], labels_dims: tuple[str, ...]) -> None:
    ndim = len(labels_dims)
    labels = make_labels((3, 9, 11)[3 - ndim :], seed=2)
    image = make_image(labels, seed=3)
    has_c = "c" in image_dims
    canonical = image_array(image) if has_c else xr.DataArray(image[0], dims=spatial(ndim))
    result = canonical.transpose(*image_dims).rasteragg.aggregate(
        labels_array(labels).transpose(*labels_dims), ALL_STATS
    )
    ref = expected(labels, image if has_c else image[:1], present(labels))
    if not has_c:
        ref = {k: v[:, 0] if k in PER_CHANNEL else v for k, v in ref.items()}
    assert_result(result, ref, ALL_STATS)
    for name in PER_CHANNEL:
        assert result[name].dims == (("label", "c") if has_c else ("label",)), name
    assert result["count"].dims == ("label",)
    assert result["center_of_mass"].dims == ("label", "axis")
    assert result["axis"].values.tolist() == list(spatial(ndim))
    assert ("c" in result.coords) == has_c


def test_accessor_equals_engine_on_canonical_arrays() -> None:
    labels = make_labels((3, 9, 11), seed=35)
    image = make_image(labels, seed=36)
    dimage = da.from_array(image, chunks=(2, 2, 4, 5))
    dlabels = da.from_array(labels, chunks=(1, 3, 6))
    engine = xr_rasteragg.engine.aggregate(dlabels, dimage, ALL_STATS, background=0)
    ximage = xr.DataArray(dimage, dims=("c", "z", "y", "x")).transpose("y", "x", "c", "z")
    xlabels = xr.DataArray(dlabels, dims=("z", "y", "x")).transpose("x", "z", "y")
    result = ximage.rasteragg.aggregate(xlabels, ALL_STATS)
    np.testing.assert_array_equal(result["label"].values, engine.labels)
    (values,) = dask.compute(engine.values)
    for name in ALL_STATS:
        np.testing.assert_allclose(result[name].to_numpy(), values[name], rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("stat", ["mean", "count", "kurtosis"])
def test_image_without_c(stat: str) -> None:
    labels = make_labels((3, 8, 10))
    image = make_image(labels, nchan=1)
    result = getattr(xr.DataArray(image[0], dims=("z", "y", "x")).rasteragg, stat)(labels_array(labels))
    assert result.dims == ("label",)
    assert "c" not in result.coords
    ref = expected(labels, image, present(labels))[stat]
    assert_stat(stat, result.values, ref if stat == "count" else ref[:, 0])


def test_channel_coordinate_without_values_and_with_other_names() -> None:
    labels = make_labels((8, 9))
    image = make_image(labels, nchan=2)
    unnamed = xr.DataArray(image, dims=("c", "y", "x"))
    result = unnamed.rasteragg.mean(labels_array(labels))
    assert result.dims == ("label", "c")
    assert "c" not in result.coords
    named = unnamed.assign_coords(c=np.array(["a/b", "CD45RO"], dtype=object))
    assert named.rasteragg.max(labels_array(labels))["c"].values.tolist() == ["a/b", "CD45RO"]


# --- alignment on coordinates -------------------------------------------------------------------

#: Pixel centres of the full grid: non-dyadic spacing and offsets, as physical units would be.
FULL_SHAPE = (20, 24)
SPACING = {"y": 0.325, "x": 2.0}
ORIGIN = {"y": 10.1625, "x": -3.0}


def grid_coords(shape: Sequence[int] = FULL_SHAPE) -> dict[str, NDArray[np.float64]]:
    return {d: ORIGIN[d] + SPACING[d] * np.arange(n) for d, n in zip(("y", "x"), shape, strict=True)}


CROPS: dict[str, tuple[dict[str, slice], dict[str, slice], dict[str, slice]]] = {
    # name: (image region, labels region, their overlap) in pixels of the full grid
    "labels_crop_of_image": (
        {"y": slice(0, 20), "x": slice(0, 24)},
        {"y": slice(4, 15), "x": slice(3, 20)},
        {"y": slice(4, 15), "x": slice(3, 20)},
    ),
    "image_crop_of_labels": (
        {"y": slice(5, 17), "x": slice(2, 11)},
        {"y": slice(0, 20), "x": slice(0, 24)},
        {"y": slice(5, 17), "x": slice(2, 11)},
    ),
    "partial_overlap": (
        {"y": slice(0, 12), "x": slice(5, 24)},
        {"y": slice(6, 20), "x": slice(0, 15)},
        {"y": slice(6, 12), "x": slice(5, 15)},
    ),
}


@pytest.mark.parametrize("backend", ["numpy", "dask"])
@pytest.mark.parametrize("case", sorted(CROPS))
def test_crop_alignment_equals_overlap(case: str, backend: str) -> None:
    labels = make_labels(FULL_SHAPE, seed=4)
    image = make_image(labels, seed=5)
    image_region, labels_region, overlap = CROPS[case]
    chunks = {"y": 5, "x": 7} if backend == "dask" else None
    ximage = image_array(image, coords=grid_coords(), chunks=chunks).isel(image_region)
    xlabels = labels_array(labels, coords=grid_coords(), chunks=chunks).isel(labels_region)
    result = ximage.rasteragg.aggregate(xlabels, ALL_STATS)

    window = (overlap["y"], overlap["x"])
    ids = present(labels[window])
    np.testing.assert_array_equal(result["label"].values, ids)
    ref = expected(labels[window], image[(slice(None), *window)], ids)
    starts = np.array([overlap["y"].start, overlap["x"].start])
    ref["center_of_mass"] = np.array([ORIGIN["y"], ORIGIN["x"]]) + np.array([SPACING["y"], SPACING["x"]]) * (
        ref["center_of_mass"] + starts
    )
    assert_result(result, ref, ALL_STATS)
    # the same as cutting both to the overlap by hand
    by_hand = image_array(image[(slice(None), *window)]).rasteragg.aggregate(
        labels_array(labels[window]), PER_CHANNEL
    )
    xr.testing.assert_allclose(result[list(PER_CHANNEL)].compute(), by_hand, rtol=1e-12)


def test_crop_alignment_in_3d_with_index() -> None:
    labels = make_labels((5, 9, 12), seed=6)
    image = make_image(labels, seed=7)
    coords = {"z": 2.0 * np.arange(5), "y": 0.5 * np.arange(9), "x": 1.5 + 0.5 * np.arange(12)}
    ximage = image_array(image, coords=coords, chunks={"z": 2, "y": 4, "x": 5})
    xlabels = labels_array(labels, coords=coords, chunks={"z": 3, "y": 3, "x": 3}).isel(
        z=slice(1, 4), y=slice(2, 9), x=slice(0, 7)
    )
    index = [8, 1, 2, 77]
    with dask.config.set(scheduler=raising_get):
        result = ximage.rasteragg.aggregate(xlabels, ["mean", "skew", "count"], index=index)
    assert is_lazy(result)
    window = (slice(1, 4), slice(2, 9), slice(0, 7))
    ref = expected(labels[window], image[(slice(None), *window)], index)
    assert_result(result.compute(), ref, ["mean", "skew", "count"])


def test_coordinates_on_one_side_only_need_equal_shapes() -> None:
    labels = make_labels((8, 9))
    image = make_image(labels)
    result = image_array(image, coords=grid_coords((8, 9))).rasteragg.mean(labels_array(labels))
    assert_result(result, expected(labels, image, present(labels)), ["mean"])
    with pytest.raises(ValueError, match="same shape"):
        image_array(image, coords=grid_coords((8, 9))).rasteragg.mean(labels_array(labels[:, :8]))


def shifted(coords: Mapping[str, NDArray[np.float64]], dim: str, shift: float) -> dict[str, Any]:
    return {**coords, dim: coords[dim] + shift}


@pytest.mark.parametrize(
    ("labels_coords", "message"),
    [
        (shifted(grid_coords(), "x", 30 * SPACING["x"]), "do not overlap along 'x'"),
        (shifted(grid_coords(), "y", -25 * SPACING["y"]), "do not overlap along 'y'"),
        ({**grid_coords(), "x": ORIGIN["x"] + 1.0 * np.arange(24)}, "different pixel spacing along 'x'"),
        (shifted(grid_coords(), "x", SPACING["x"] / 2), "different pixel grids along 'x'"),
        (shifted(grid_coords(), "y", 0.3 * SPACING["y"]), "different pixel grids along 'y'"),
    ],
    ids=["no_overlap_x", "no_overlap_y", "spacing", "half_pixel", "fraction_of_pixel"],
)
def test_alignment_errors(labels_coords: dict[str, Any], message: str) -> None:
    labels = make_labels(FULL_SHAPE)
    image = image_array(make_image(labels), coords=grid_coords())
    with pytest.raises(ValueError, match=message):
        image.rasteragg.mean(labels_array(labels, coords=labels_coords))


def test_plain_arrays_align_on_coordinates_without_spatialdata() -> None:
    """A ``transform`` attribute that is not SpatialData's is left alone, spatialdata unimported.

    (A raster reader's GDAL tuple, say.) ``coordinate_system`` needs SpatialData elements.
    """
    code = """
import sys, numpy as np, xarray as xr, xr_rasteragg
labels = xr.DataArray(np.array([[0, 1, 1, 2]]), dims=("y", "x"), coords={"x": [2.0, 3.0, 4.0, 5.0]})
image = xr.DataArray(np.arange(6.0)[None], dims=("y", "x"), coords={"x": np.arange(6.0)})
for array in (labels, image):
    array.attrs["transform"] = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
assert image.rasteragg.mean(labels).values.tolist() == [3.5, 5.0]
try:
    image.rasteragg.mean(labels, coordinate_system="global")
except ValueError as error:
    assert "'coordinate_system' 'global' needs SpatialData elements" in str(error), error
else:
    raise AssertionError("no error")
assert "spatialdata" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shape_mismatch_without_coords_shows_both_shapes() -> None:
    labels = labels_array(make_labels((10, 12)))
    image = xr.DataArray(np.ones((3, 10, 13)), dims=("c", "y", "x"))
    with pytest.raises(ValueError, match="same shape") as error:
        image.rasteragg.mean(labels)
    message = str(error.value)
    assert str({"y": 10, "x": 12}) in message
    assert str({"c": 3, "y": 10, "x": 13}) in message


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_dims", "labels_dims", "offending"),
    [
        (("t", "y", "x"), ("y", "x"), "'t'"),
        (("c", "y", "x"), ("t", "y", "x"), "'t'"),
        (("c", "y", "x"), ("c", "y", "x"), "'c'"),
        (("c", "y", "band"), ("y", "band"), "'band'"),
    ],
)
def test_unknown_dim_is_named(
    image_dims: tuple[str, ...], labels_dims: tuple[str, ...], offending: str
) -> None:
    image = xr.DataArray(np.ones((2, 4, 5)), dims=image_dims)
    labels = xr.DataArray(np.ones((2, 4, 5)[3 - len(labels_dims) :], np.int32), dims=labels_dims)
    with pytest.raises(ValueError, match=offending):
        image.rasteragg.mean(labels)


def test_labels_unknown_dim_in_label_methods() -> None:
    labels = xr.DataArray(np.ones((2, 4, 5), np.int32), dims=("t", "y", "x"))
    for call in (lambda: labels.rasteragg.area(), lambda: labels.rasteragg.center_of_mass()):
        with pytest.raises(ValueError, match="'t'"):
            call()


def test_spatial_dims_must_match() -> None:
    image = xr.DataArray(np.ones((2, 3, 4, 5)), dims=("c", "z", "y", "x"))
    labels = xr.DataArray(np.ones((4, 5), np.int32), dims=("y", "x"))
    with pytest.raises(ValueError, match="same spatial dims"):
        image.rasteragg.mean(labels)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bool"])
@pytest.mark.parametrize("call", ["mean", "aggregate", "area", "center_of_mass", "paint"])
def test_labels_must_be_integer(call: str, dtype: str) -> None:
    labels = xr.DataArray(np.ones((4, 5), dtype), dims=("y", "x"))
    image = xr.DataArray(np.ones((2, 4, 5)), dims=("c", "y", "x"))
    values = xr.DataArray([1.0], dims="label", coords={"label": [1]})
    calls: dict[str, Callable[[], Any]] = {
        "mean": lambda: image.rasteragg.mean(labels),
        "aggregate": lambda: image.rasteragg.aggregate(labels, ["sum"]),
        "area": lambda: labels.rasteragg.area(),
        "center_of_mass": lambda: labels.rasteragg.center_of_mass(),
        "paint": lambda: labels.rasteragg.paint(values),
    }
    with pytest.raises(TypeError, match="integer dtype"):
        calls[call]()


def test_labels_must_be_a_dataarray() -> None:
    image = xr.DataArray(np.ones((2, 4, 5)), dims=("c", "y", "x"))
    with pytest.raises(TypeError, match="DataArray"):
        image.rasteragg.mean(np.ones((4, 5), np.int32))  # type: ignore[arg-type]


# --- chunks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_chunks", "labels_chunks"),
    [
        ({"c": 1, "z": 2, "y": 7, "x": 5}, {"z": 3, "y": 4, "x": 9}),
        ({"c": 2, "z": 1, "y": 3, "x": 13}, None),  # NumPy labels, dask image
        (None, {"z": 1, "y": 5, "x": 5}),  # dask labels, NumPy image
    ],
)
def test_mismatched_chunks(image_chunks: dict[str, int] | None, labels_chunks: dict[str, int] | None) -> None:
    labels = make_labels((4, 13, 17), seed=8)
    image = make_image(labels, seed=9)
    ximage = image_array(image, chunks=image_chunks)
    xlabels = labels_array(labels, chunks=labels_chunks)
    result = ximage.rasteragg.aggregate(xlabels, ALL_STATS)
    assert_result(result, expected(labels, image, present(labels)), ALL_STATS)
    index = [5, 1, 42]
    assert_result(
        ximage.rasteragg.aggregate(xlabels, ALL_STATS, index=index).compute(),
        expected(labels, image, index),
        ALL_STATS,
    )


# --- laziness -----------------------------------------------------------------------------------

LAZY_CALLS: dict[str, Callable[[xr.DataArray, xr.DataArray, Sequence[int]], Any]] = {
    "aggregate": lambda image, labels, index: image.rasteragg.aggregate(labels, ALL_STATS, index=index),
    "mean": lambda image, labels, index: image.rasteragg.mean(labels, index=index),
    "kurtosis": lambda image, labels, index: image.rasteragg.kurtosis(labels, index=index),
    "area": lambda image, labels, index: labels.rasteragg.area(index=index),
    "center_of_mass": lambda image, labels, index: labels.rasteragg.center_of_mass(index=index),
}


@pytest.mark.parametrize("call", sorted(LAZY_CALLS))
def test_lazy_with_index_computes_nothing(call: str) -> None:
    labels = make_labels((3, 12, 14), seed=10)
    image = make_image(labels, seed=11)
    coords = {"z": 4.0 + 3.0 * np.arange(3), "y": 0.5 * np.arange(12), "x": -2.0 + 0.25 * np.arange(14)}
    ximage = image_array(image, coords=coords, chunks={"c": 2, "z": 1, "y": 5, "x": 6})
    xlabels = labels_array(labels, coords=coords, chunks={"z": 2, "y": 4, "x": 7})
    index = [8, 3, 0, 99, 1]
    with dask.config.set(scheduler=raising_get):
        result = LAZY_CALLS[call](ximage, xlabels, index)
        assert is_lazy(result)
        with pytest.raises(AssertionError, match="computed"):
            result.compute()  # the raising scheduler is really in force
    np.testing.assert_array_equal(result["label"].values, index)
    ref = expected(labels, image, index)
    ref["center_of_mass"] = np.array([4.0, 0.0, -2.0]) + np.array([3.0, 0.5, 0.25]) * ref["center_of_mass"]
    computed = result.compute()
    if isinstance(computed, xr.Dataset):
        assert_result(computed, ref, ALL_STATS)
    else:
        assert_result(computed, ref, ["count" if call == "area" else call])


def test_without_index_the_pass_runs_at_the_call_and_results_stay_lazy(
    kernel_calls: list[tuple[int, int, int]],
) -> None:
    """Dask inputs without an index: the pass runs at the call (its partials kept, only the label ids
    brought back), the results are dask arrays, and computing them finalizes without a second read."""
    labels = make_labels((12, 14))
    image = make_image(labels)
    runs: list[int] = []

    def counting_get(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        runs.append(1)
        return dask.local.get_sync(dsk, keys, **kwargs)

    with dask.config.set(scheduler=counting_get):
        result = image_array(image, chunks={"y": 5, "x": 5}).rasteragg.aggregate(
            labels_array(labels, chunks={"y": 6}), ALL_STATS
        )
        at_the_call = len(runs)
        assert at_the_call >= 1
        assert len(kernel_calls) == 9  # the 3 x 3 blocks, each read once
        assert all(isinstance(v.data, da.Array) for v in result.data_vars.values())
        assert_result(result.compute(), expected(labels, image, present(labels)), ALL_STATS)
        assert len(runs) == at_the_call + 1
        assert len(kernel_calls) == 9


# --- index and background -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "dask"])
def test_index_with_absent_ids(backend: str) -> None:
    labels = make_labels((10, 13), seed=12)
    image = make_image(labels, seed=13)
    chunks = {"y": 4, "x": 6} if backend == "dask" else None
    xlabels = labels_array(labels, coords={"x": 1.0 + 0.5 * np.arange(13)}, chunks=chunks)
    index = [5, 99, -4, 1, 2]
    result = image_array(image, chunks=chunks).rasteragg.aggregate(xlabels, ALL_STATS, index=index)
    assert is_lazy(result) == (backend == "dask")
    result = result.compute()
    np.testing.assert_array_equal(result["label"].values, index)
    absent = result.sel(label=[99, -4])
    np.testing.assert_array_equal(absent["count"].values, [0, 0])
    np.testing.assert_array_equal(absent["sum"].values, np.zeros((2, 3)))
    for name in ("mean", "var", "std", "skew", "kurtosis", "min", "max", "center_of_mass"):
        assert np.isnan(absent[name].values).all(), name
    ref = expected(labels, image, index)
    ref["center_of_mass"][:, 1] = 1.0 + 0.5 * ref["center_of_mass"][:, 1]
    assert_result(result, ref, ALL_STATS)


@pytest.mark.parametrize("backend", ["numpy", "dask"])
def test_background(backend: str) -> None:
    labels = make_labels((3, 10, 12), seed=14)
    image = make_image(labels, seed=15)
    chunks = {"y": 4} if backend == "dask" else None
    ximage, xlabels = image_array(image, chunks=chunks), labels_array(labels, chunks=chunks)
    for background, ids in ((0, IDS[1:]), (None, IDS), (3, IDS[IDS != 3])):
        result = ximage.rasteragg.aggregate(xlabels, ALL_STATS, background=background)
        np.testing.assert_array_equal(result["label"].values, ids, err_msg=str(background))
        assert_result(result, expected(labels, image, ids), ALL_STATS)
        np.testing.assert_array_equal(xlabels.rasteragg.area(background=background)["label"].values, ids)
        com = xlabels.rasteragg.center_of_mass(background=background)
        np.testing.assert_array_equal(com["label"].values, ids)
    # the default is 0
    np.testing.assert_array_equal(ximage.rasteragg.mean(xlabels)["label"].values, IDS[1:])
    np.testing.assert_array_equal(xlabels.rasteragg.area()["label"].values, IDS[1:])


def test_background_kept_when_index_names_it() -> None:
    labels = make_labels((10, 12), seed=16)
    image = make_image(labels, seed=17)
    result = image_array(image).rasteragg.aggregate(labels_array(labels), ALL_STATS, index=[0, 2])
    assert_result(result, expected(labels, image, [0, 2]), ALL_STATS)


# --- NaN pixels and constant labels ---------------------------------------------------------------


def nan_image(labels: NDArray[np.integer]) -> NDArray[np.float64]:
    """Label 2, channel 0: one NaN pixel; label 3, channel 1: all NaN."""
    image = make_image(labels, seed=18)
    image[(0, *np.argwhere(labels == 2)[1])] = np.nan
    image[1][labels == 3] = np.nan
    return image


@pytest.mark.parametrize("backend", ["numpy", "dask"])
@pytest.mark.parametrize("skipna", [False, True])
def test_nan_pixels(skipna: bool, backend: str) -> None:
    labels = make_labels((3, 11, 13), seed=19)
    image = nan_image(labels)
    chunks = {"c": 1, "z": 2, "y": 5, "x": 6} if backend == "dask" else None
    result = image_array(image, chunks=chunks).rasteragg.aggregate(
        labels_array(labels), PER_CHANNEL, skipna=skipna
    )
    ids = present(labels)
    assert_result(result, nan_reference(labels, image, [int(i) for i in ids], skipna), PER_CHANNEL)
    # NaN only where a label and channel has a NaN pixel (skipna: only where no valid pixel is left)
    nan_cells = {(3, "CD3")} if skipna else {(2, "DAPI"), (3, "CD3")}
    is_nan = result["mean"].isnull().compute().to_series()
    assert set(is_nan[is_nan].index) == nan_cells


def test_single_statistic_skipna() -> None:
    labels = make_labels((11, 13), seed=20)
    image = nan_image(labels)
    ids = [int(i) for i in present(labels)]
    for skipna in (False, True):
        got = image_array(image).rasteragg.max(labels_array(labels), skipna=skipna)
        assert_stat("max", got.values, nan_reference(labels, image, ids, skipna)["max"])


@pytest.mark.parametrize("backend", ["numpy", "dask"])
def test_constant_label_skew_and_kurtosis_are_nan(backend: str) -> None:
    labels = make_labels((12, 15), seed=21)
    image = make_image(labels, seed=22)
    image[1][labels == CONSTANT] = 1000.1  # not exactly representable
    chunks = {"y": 5, "x": 4} if backend == "dask" else None
    result = image_array(image, chunks=chunks).rasteragg.aggregate(
        labels_array(labels, chunks=chunks), ["var", "skew", "kurtosis"]
    )
    result = result.compute()  # selecting labels from a lazy result is fancy indexing (not in array-expr)
    constant = result.sel(label=CONSTANT)
    others = result.drop_sel(label=CONSTANT)
    # var is 0 up to rounding of the chunk means (1000.1 is not exact): ~1e-26, i.e. ~1e-32 of mean²
    np.testing.assert_allclose(constant["var"].values, 0.0, atol=1e-20)
    for name in ("skew", "kurtosis"):
        assert np.isnan(constant[name].values).all(), name
        assert np.isfinite(others[name].values).all(), name
    assert_result(others, expected(labels, image, others["label"].values), ["var", "skew", "kurtosis"])


# --- center of mass -----------------------------------------------------------------------------


def scipy_centers(labels: NDArray[np.integer], ids: Sequence[int]) -> NDArray[np.float64]:
    return np.array([ndi.center_of_mass((labels == i).astype(float)) for i in ids])


@pytest.mark.parametrize("backend", ["numpy", "dask"])
@pytest.mark.parametrize("shape", [(11, 14), (4, 9, 10)])
def test_center_of_mass_in_coordinate_units(shape: tuple[int, ...], backend: str) -> None:
    labels = make_labels(shape, seed=23)
    dims = spatial(len(shape))
    origin = np.array([-7.0, 5.0, -1.0])[3 - len(shape) :]
    step = np.array([3.0, 2.0, 0.25])[3 - len(shape) :]
    coords = {d: o + s * np.arange(n) for d, o, s, n in zip(dims, origin, step, shape, strict=True)}
    chunks = dict(zip(dims, (2, 4, 3), strict=False)) if backend == "dask" else None
    ids = present(labels)
    pixels = scipy_centers(labels, ids)

    in_pixels = labels_array(labels, chunks=chunks).rasteragg.center_of_mass()
    assert in_pixels.dims == ("label", "axis")
    assert in_pixels["axis"].values.tolist() == list(dims)
    np.testing.assert_array_equal(in_pixels["label"].values, ids)
    np.testing.assert_allclose(in_pixels.to_numpy(), pixels, rtol=1e-12)

    in_units = labels_array(labels, coords=coords, chunks=chunks).rasteragg.center_of_mass()
    np.testing.assert_allclose(in_units.to_numpy(), origin + step * pixels, rtol=1e-12)

    # coordinates on the last dim only: that axis in units, the others in pixels
    last = labels_array(labels, coords={dims[-1]: coords[dims[-1]]}, chunks=chunks)
    expected_last = pixels.copy()
    expected_last[:, -1] = origin[-1] + step[-1] * pixels[:, -1]
    np.testing.assert_allclose(last.rasteragg.center_of_mass().to_numpy(), expected_last, rtol=1e-12)


def test_area_matches_bincount() -> None:
    labels = make_labels((4, 9, 11), seed=24)
    area = labels_array(labels, chunks={"y": 4}).rasteragg.area()
    assert area.name == "count"
    assert area.dims == ("label",)
    counts = np.bincount(labels.ravel())
    np.testing.assert_array_equal(area.to_numpy(), counts[IDS[1:]])


# --- paint --------------------------------------------------------------------------------------


def painted_by_hand(labels: NDArray[np.integer], table: Mapping[int, Any], nchan: int | None) -> NDArray[Any]:
    """Value of each pixel's label from ``table``; NaN for labels not in it; channels first."""
    out = np.full((*labels.shape, nchan or 1), np.nan)
    for label, value in table.items():
        out[labels == label] = value
    return np.moveaxis(out, -1, 0) if nchan else out[..., 0]


@pytest.mark.parametrize("backend", ["numpy", "dask"])
@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("shape", [(10, 13), (3, 8, 9)])
def test_paint(shape: tuple[int, ...], with_c: bool, backend: str) -> None:
    labels = make_labels(shape, seed=25)
    image = make_image(labels, seed=26)
    dims = spatial(len(shape))
    coords = {dims[-1]: 0.5 * np.arange(shape[-1])}
    chunks = dict.fromkeys(dims, 4) if backend == "dask" else None
    xlabels = labels_array(labels, coords=coords, chunks=chunks)
    ximage = image_array(image, coords=coords) if with_c else xr.DataArray(image[0], dims=dims, coords=coords)
    values = ximage.rasteragg.mean(xlabels.compute()).sel(label=[5, 1, CONSTANT])  # 2 and 3 unlisted
    with dask.config.set(scheduler=raising_get):
        painted = xlabels.rasteragg.paint(values)
    assert isinstance(painted.data, da.Array) == (backend == "dask")
    assert painted.dims == (("c", *dims) if with_c else dims)
    assert painted.name == "mean"
    assert painted.dtype == np.float64
    np.testing.assert_array_equal(painted[dims[-1]].values, coords[dims[-1]])
    if with_c:
        assert painted["c"].values.tolist() == CHANNELS
    table = {int(label): values.sel(label=label).values for label in values["label"].values}
    painted_values = painted.to_numpy()
    np.testing.assert_array_equal(painted_values, painted_by_hand(labels, table, 3 if with_c else None))
    assert np.isnan(painted_values[..., labels == 2]).all()
    assert np.isnan(painted_values[..., labels == 0]).all()


def test_paint_values_with_c_first_and_integer_values() -> None:
    labels = make_labels((8, 10), seed=27)
    values = xr.DataArray(
        np.array([[1, 2], [10, 20], [100, 200]]),
        dims=("c", "label"),
        coords={"c": ["a", "b", "c"], "label": [3, 1]},
        name="n",
    )
    painted = labels_array(labels).rasteragg.paint(values)
    assert painted.dims == ("c", "y", "x")
    expected_values = painted_by_hand(labels, {3: [1, 10, 100], 1: [2, 20, 200]}, 3)
    np.testing.assert_array_equal(painted.values, expected_values)


def test_paint_count_result() -> None:
    labels = make_labels((9, 11), seed=28)
    area = labels_array(labels).rasteragg.area()
    painted = labels_array(labels, chunks={"y": 3}).rasteragg.paint(area).compute()
    counts = np.bincount(labels.ravel()).astype(float)
    np.testing.assert_array_equal(painted.values, np.where(labels == 0, np.nan, counts[labels]))


@pytest.mark.parametrize("with_c", [False, True])
def test_paint_empty_values(with_c: bool) -> None:
    labels = make_labels((6, 7))
    dims = ("label", "c") if with_c else ("label",)
    values = xr.DataArray(
        np.zeros((0, 2) if with_c else (0,)), dims=dims, coords={"label": np.array([], int)}
    )
    painted = labels_array(labels).rasteragg.paint(values)
    assert painted.shape == ((2, 6, 7) if with_c else (6, 7))
    assert np.isnan(painted.values).all()


def test_paint_of_a_lazy_result_stays_lazy() -> None:
    labels = make_labels((10, 12), seed=37)
    image = make_image(labels, seed=38)
    xlabels = labels_array(labels, chunks={"y": 4})
    index = [1, 2, 5]
    with dask.config.set(scheduler=raising_get):
        values = image_array(image, chunks={"y": 4}).rasteragg.mean(xlabels, index=index)
        painted = xlabels.rasteragg.paint(values)  # neither the statistic nor the paint computes
    assert isinstance(painted.data, da.Array)
    table = dict(zip(index, expected(labels, image, index)["mean"], strict=True))
    np.testing.assert_allclose(painted.to_numpy(), painted_by_hand(labels, table, 3), rtol=1e-12)


def test_paint_errors() -> None:
    labels = labels_array(make_labels((6, 7)))
    with pytest.raises(ValueError, match="'label' dim"):
        labels.rasteragg.paint(xr.DataArray([1.0, 2.0], dims="cell"))
    with pytest.raises(ValueError, match="extra dims"):
        labels.rasteragg.paint(xr.DataArray(np.ones((2, 2)), dims=("label", "t")))


# --- backends -----------------------------------------------------------------------------------


def test_numpy_and_dask_go_through_the_engine_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_kernel_for = xr_rasteragg.engine.kernel_for

    def recording_kernel_for(array: Any) -> Callable[..., Any]:
        seen.append(array_backend(array))
        return real_kernel_for(array)

    monkeypatch.setattr(xr_rasteragg.engine, "kernel_for", recording_kernel_for)
    labels = make_labels((3, 10, 12), seed=29)
    image = make_image(labels, seed=30)
    eager = image_array(image).rasteragg.aggregate(labels_array(labels), ALL_STATS)
    assert set(seen) == {"numpy"}
    seen.clear()
    lazy = image_array(image, chunks={"y": 4}).rasteragg.aggregate(
        labels_array(labels, chunks={"x": 5}), ALL_STATS
    )
    assert set(seen) == {"numpy"}
    xr.testing.assert_allclose(eager, lazy.compute(), rtol=1e-12)


def test_both_kernels_through_the_accessor(engine_kernel: Callable[..., Any]) -> None:
    """The compiled CPU kernel and the array-API kernel (the CuPy path's logic) agree with scipy."""
    labels = make_labels((3, 10, 12), seed=31)
    image = make_image(labels, seed=32)
    result = image_array(image, chunks={"z": 2, "y": 4, "x": 5}).transpose("x", "c", "z", "y").rasteragg
    dataset = result.aggregate(labels_array(labels, chunks={"y": 3}), ALL_STATS)
    assert_result(dataset, expected(labels, image, present(labels)), ALL_STATS)


@requires_cupy
@pytest.mark.parametrize("backend", ["cupy", "dask-cupy"])
def test_cupy_backed_dataarrays(backend: str) -> None:
    import cupy

    labels = make_labels((3, 10, 12), seed=33)
    image = make_image(labels, seed=34)
    glabels, gimage = cupy.asarray(labels), cupy.asarray(image)
    if backend == "dask-cupy":
        glabels = da.from_array(glabels, chunks=(2, 4, 5), asarray=False)
        gimage = da.from_array(gimage, chunks=(1, 1, 6, 6), asarray=False)
    ximage = xr.DataArray(gimage, dims=("c", "z", "y", "x"), coords={"c": CHANNELS})
    xlabels = xr.DataArray(glabels, dims=("z", "y", "x"))
    result = ximage.rasteragg.aggregate(xlabels, ALL_STATS).compute().as_numpy()
    assert_result(result, expected(labels, image, present(labels)), ALL_STATS)
    index = [5, 1, 42]
    lazy = ximage.rasteragg.aggregate(xlabels, ALL_STATS, index=index)
    assert is_lazy(lazy) == (backend == "dask-cupy")
    assert_result(lazy.compute().as_numpy(), expected(labels, image, index), ALL_STATS)
