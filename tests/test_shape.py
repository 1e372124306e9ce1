"""Shape features against :func:`skimage.measure.regionprops_table` on the whole label image.

Labels are irregular (smoothed random fields: cells of any shape, many of them in several pieces,
so non-contiguous), span blocks, and are cut into every chunking below, including blocks of one
pixel and uneven tails. Radii and principal axes are checked against a PCA of the pixel indices
(an SVD, as scikit-learn's PCA that harpy calls).
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import xarray as xr
from conftest import counted_updates
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from skimage.measure import regionprops_table

import xr_rasteragg  # noqa: F401  (registers the accessor)
from xr_rasteragg.engine import aggregate
from xr_rasteragg.stats import Space

SHAPE_2D = (
    "area",
    "bbox",
    "centroid",
    "axis_major_length",
    "axis_minor_length",
    "eccentricity",
    "orientation",
    "inertia_tensor",
    "inertia_tensor_eigvals",
    "extent",
    "equivalent_diameter_area",
    "perimeter",
    "solidity",
)
SHAPE_3D = tuple(name for name in SHAPE_2D if name not in ("eccentricity", "orientation", "perimeter"))
RTOL = ATOL = 1e-9


def irregular(shape: tuple[int, ...], labels: int, seed: int, size: int = 5) -> NDArray[np.int32]:
    """Smoothed random labels 0..labels-1: irregular cells, several of them in pieces."""
    rng = np.random.default_rng(seed)
    return ndi.median_filter(rng.integers(0, labels, size=shape).astype(np.int32), size)


def reference(labels: NDArray[Any], props: tuple[str, ...], **kwargs: Any) -> dict[str, NDArray[Any]]:
    """regionprops_table's columns of each property, stacked into ``(k, ...)`` arrays."""
    table = regionprops_table(labels, properties=("label", *props), **kwargs)
    out = {"label": table["label"]}
    for name in props:
        columns = [key for key in table if key == name or key.startswith(name + "-")]
        if columns == [name]:
            out[name] = np.asarray(table[name])
            continue
        index = [tuple(int(i) for i in key[len(name) + 1 :].split("-")) for key in columns]
        shape = tuple(max(i[d] for i in index) + 1 for d in range(len(index[0])))
        value = np.empty((len(out["label"]), *shape))
        for key, i in zip(columns, index, strict=True):
            value[(slice(None), *i)] = table[key]
        out[name] = value
    return out


def check(
    result: xr.Dataset | dict[str, Any], expected: dict[str, NDArray[Any]], props: tuple[str, ...]
) -> None:
    for name in props:
        value = np.asarray(result[name])
        if name == "orientation":  # an axis: +π/2 and -π/2 are the same one
            value = _same_axis(value, expected[name])
        np.testing.assert_allclose(value, expected[name], rtol=RTOL, atol=ATOL, err_msg=name)


def _same_axis(ours: NDArray[Any], theirs: NDArray[Any]) -> NDArray[Any]:
    """``ours`` with +π/2 read as -π/2 where skimage says -π/2 (and vice versa).

    A label whose major axis lies along x has a cross moment of exactly 0 (ours, from integer
    sums: orientation +π/2, as skimage's for labels whose moments it also gets exactly); skimage's
    floating-point moments can leave it at -0.0 or a rounding error below 0, and then say -π/2.
    """
    flipped = np.isclose(np.abs(ours), np.pi / 2, rtol=0, atol=1e-12) & np.isclose(
        ours, -theirs, rtol=0, atol=1e-9
    )
    return np.where(flipped, -ours, ours)


CHUNKS_2D = [(40, 50), (13, 17), (7, 50), (40, 9), (1, 50), (40, 1), (3, 2), ((10, 1, 29), (2, 45, 3))]


@pytest.mark.parametrize("chunks", CHUNKS_2D, ids=str)
def test_2d_features_equal_regionprops(chunks: Any) -> None:
    labels = irregular((40, 50), 7, 0)
    labels[labels == 3] = 0  # background around some cells
    expected = reference(labels, SHAPE_2D)
    xlabels = xr.DataArray(da.from_array(labels, chunks=chunks), dims=("y", "x"))
    result = xlabels.rasteragg.aggregate(SHAPE_2D).compute()
    np.testing.assert_array_equal(result["label"], expected["label"])
    check(result, expected, SHAPE_2D)
    assert result["bbox"].dtype == np.int64
    assert result["inertia_tensor"].dims == ("label", "axis", "axis_j")
    assert list(result["bound"].values) == ["min_y", "min_x", "max_y", "max_x"]


CHUNKS_3D = [(6, 20, 22), (2, 7, 9), (1, 20, 5), (4, 3, 22), ((1, 5), (19, 1), (11, 11))]


@pytest.mark.parametrize("chunks", CHUNKS_3D, ids=str)
def test_3d_features_equal_regionprops(chunks: Any) -> None:
    labels = irregular((6, 20, 22), 6, 1, size=3)
    expected = reference(labels, SHAPE_3D)
    xlabels = xr.DataArray(da.from_array(labels, chunks=chunks), dims=("z", "y", "x"))
    result = xlabels.rasteragg.aggregate(SHAPE_3D).compute()
    np.testing.assert_array_equal(result["label"], expected["label"])
    check(result, expected, SHAPE_3D)
    assert result["centroid"].shape == (len(expected["label"]), 3)
    assert result["bbox"].shape == (len(expected["label"]), 6)


def test_solidity_of_blocks_wider_than_int16_columns() -> None:
    """The hull kernel keeps block rows and columns in int16 tables where they fit, int32 in
    wider blocks: both equal regionprops."""
    labels = irregular((6, 33000), 9, 2, size=3)
    expected = reference(labels, ("solidity", "perimeter"))
    for chunks in ((6, 33000), (6, 16500)):
        xlabels = xr.DataArray(da.from_array(labels, chunks=chunks), dims=("y", "x"))
        result = xlabels.rasteragg.aggregate(["solidity", "perimeter"]).compute()
        check(result, expected, ("solidity", "perimeter"))


def test_solidity_after_the_tree_merge_of_many_blocks() -> None:
    """More blocks than the tree merge leaves (``split_every``² = 64): labels merged within one
    branch of the tree reach the last merge from one part, their pixels not counted yet; that
    merge (lean for 2-D labels: only the vertices of such labels are kept) re-counts them, and
    solidity equals regionprops."""
    labels = irregular((12, 120), 30, 3, size=3)  # labels everywhere, in many of the tree's parts
    labels[:, :48] = 0
    for row in range(2, 6):  # within one branch (blocks of 1 x 2 merged 8 at a time along x)
        labels[row, 3 : 4 + row] = 31  # a triangle
    labels[7:10, 20:24] = 32
    labels[9, 24:28] = 32  # an L
    labels[1:5, 40:44] = np.array([[33, 0, 0, 0], [33, 33, 0, 33], [0, 33, 33, 33], [0, 0, 33, 0]])
    expected = reference(labels, ("solidity", "area"))
    xlabels = xr.DataArray(da.from_array(labels, chunks=(1, 2)), dims=("y", "x"))
    check(xlabels.rasteragg.aggregate(["solidity", "area"]).compute(), expected, ("solidity", "area"))
    numpy_backed = xr.DataArray(labels, dims=("y", "x"))
    check(numpy_backed.rasteragg.aggregate(["solidity"]), expected, ("solidity",))


def test_flat_3d_label_has_no_convex_hull_as_in_skimage() -> None:
    """A 3-D label in one plane: skimage's hull fails and its solidity is inf; so is ours."""
    labels = np.zeros((3, 6, 6), np.int32)
    labels[1, 1:4, 2:5] = 1
    labels[0:3, 3:6, 0:2] = 2
    expected = reference(labels, ("solidity",))
    result = xr.DataArray(labels, dims=("z", "y", "x")).rasteragg.aggregate("solidity")
    np.testing.assert_array_equal(result["solidity"], expected["solidity"])
    assert np.isinf(result["solidity"][0])


def test_features_with_the_image_in_one_pass_and_centroid_weighted() -> None:
    labels = irregular((30, 36), 5, 2)
    rng = np.random.default_rng(3)
    image = rng.integers(0, 4000, size=(3, 30, 36)).astype(np.uint16)
    xlabels = xr.DataArray(labels, dims=("y", "x"))
    ximage = xr.DataArray(da.from_array(image, chunks=(1, 11, 13)), dims=("c", "y", "x"))
    props = (*SHAPE_2D, "centroid_weighted")
    result = ximage.rasteragg.aggregate(xlabels, ("mean", *props)).compute()
    expected = reference(labels, props, intensity_image=np.moveaxis(image, 0, -1))
    keep = expected["label"] != 0
    np.testing.assert_array_equal(result["label"], expected["label"][keep])
    assert result["centroid_weighted"].dims == ("label", "c", "axis")
    expected["centroid_weighted"] = np.swapaxes(expected["centroid_weighted"], 1, 2)
    check(result, {k: v[keep] for k, v in expected.items()}, props)
    means = [[image[c][labels == i].mean() for c in range(3)] for i in result["label"].values]
    np.testing.assert_allclose(result["mean"], means, rtol=1e-12)


def test_label_families_once_per_block_whatever_the_channel_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """With each channel chunk in its own group, the kernel code of the families of the labels
    alone (bounding box and moments, hull, perimeter classes) runs once per label block, in its
    label stage, not once per group; the values still equal regionprops'."""
    import xr_rasteragg.engine
    from xr_rasteragg.families import Border, Geometry, Hull
    from xr_rasteragg.kernels import numba as kernel

    monkeypatch.setattr(xr_rasteragg.engine, "GROUP_BYTES", 1)
    calls = counted_updates(monkeypatch, kernel.FAMILY_UPDATES, (Geometry, Border, Hull))
    labels = irregular((30, 36), 5, 4)
    image = np.random.default_rng(5).integers(0, 4000, size=(4, 30, 36)).astype(np.uint16)
    xlabels = xr.DataArray(da.from_array(labels, chunks=(16, 20)), dims=("y", "x"))
    ximage = xr.DataArray(da.from_array(image, chunks=(1, 16, 20)), dims=("c", "y", "x"))
    result = ximage.rasteragg.aggregate(xlabels, ("mean", *SHAPE_2D)).compute()
    assert calls == {"geometry": 4, "border": 4, "hull": 4}  # 2 x 2 label blocks, 4 channel groups each
    expected = reference(labels, SHAPE_2D)
    keep = expected["label"] != 0
    np.testing.assert_array_equal(result["label"], expected["label"][keep])
    check(result, {k: v[keep] for k, v in expected.items()}, SHAPE_2D)


def test_coordinates_give_the_spacing() -> None:
    """Labels with coordinates: features in coordinate units, as regionprops' ``spacing=``."""
    labels = irregular((30, 40), 5, 4)
    xlabels = xr.DataArray(
        labels, dims=("y", "x"), coords={"y": np.arange(30) * 0.25, "x": np.arange(40) * 0.25}
    )
    result = xlabels.rasteragg.aggregate(SHAPE_2D, background=None)
    check(result, reference(labels, SHAPE_2D, spacing=(0.25, 0.25)), SHAPE_2D)
    anisotropic = xlabels.assign_coords(x=np.arange(40) * 0.5)
    props = tuple(name for name in SHAPE_2D if name != "perimeter")
    result = anisotropic.rasteragg.aggregate(props, background=None)
    check(result, reference(labels, props, spacing=(0.25, 0.5)), props)
    with pytest.raises(ValueError, match="'perimeter' needs the same pixel spacing"):
        anisotropic.rasteragg.aggregate("perimeter")
    # Far from 0 the coordinates' steps differ from 0.3 in their last bits (0.29999999999995453
    # here), and from those of the other axis: the same spacing to rounding.
    far = xlabels.assign_coords(y=1000.25 + np.arange(30) * 0.3, x=np.arange(40) * 0.3)
    assert np.diff(far["y"].values)[0] != np.diff(far["x"].values)[0]
    perimeter = far.rasteragg.aggregate("perimeter", background=None)["perimeter"]
    expected = reference(labels, ("perimeter",), spacing=(0.3, 0.3))["perimeter"]
    np.testing.assert_allclose(perimeter, expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="'perimeter' needs the same pixel spacing"):
        far.assign_coords(x=np.arange(40) * 0.3 * (1 + 1e-8)).rasteragg.aggregate("perimeter")
    with pytest.raises(ValueError, match="evenly spaced coordinates"):
        xlabels.assign_coords(x=np.arange(40) ** 2.0).rasteragg.aggregate("area")


def test_a_square_grid_up_to_rounding_is_square() -> None:
    """Coordinates far from 0 step by 0.3 up to their last bits, differently on each axis: the
    grid is square, and labels whose second moments tie (squares, discs) have regionprops'
    orientation (-π/4) and eccentricity (0) with ``spacing=(0.3, 0.3)``, not those of a grid a
    hair wider (0 and 5.5e-7)."""
    labels = np.zeros((12, 14), np.int32)
    labels[1:3, 1:3] = 1
    labels[5:10, 4:9] = 2
    labels[8:11, 10:13] = 3
    coords = {"y": 10.0 + np.arange(12) * 0.3, "x": 1000.25 + np.arange(14) * 0.3}
    assert np.diff(coords["y"])[0] != np.diff(coords["x"])[0]
    result = xr.DataArray(labels, dims=("y", "x"), coords=coords).rasteragg.aggregate(SHAPE_2D)
    expected = reference(labels, SHAPE_2D, spacing=(0.3, 0.3))
    np.testing.assert_allclose(result["orientation"], -np.pi / 4, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(result["eccentricity"], 0.0)
    check(result, expected, tuple(name for name in SHAPE_2D if name != "centroid"))
    # positions are coordinate values: skimage's centroid (from index 0, in units) plus the origin
    np.testing.assert_allclose(result["centroid"], expected["centroid"] + [10.0, 1000.25], rtol=1e-12)
    # The engine's own callers, whose Space holds the coordinates' steps as they come, alike.
    steps = (float(np.diff(coords["y"])[0]), float(np.diff(coords["x"])[0]))
    space = Space((1, 2), steps)
    assert space.spacing[0] == space.spacing[1]
    blocks = da.from_array(labels[None], chunks=(1, 5, 6))
    engine = aggregate(blocks, None, SHAPE_2D, background=0, space=space)
    values = dask.compute(engine.values)[0]
    np.testing.assert_allclose(values["orientation"], -np.pi / 4, rtol=0, atol=1e-12)
    check(values, expected, tuple(name for name in SHAPE_2D if name != "centroid"))


def test_a_dim_of_one_pixel_counts_with_spacing_1() -> None:
    """A dim of one pixel has a coordinate but no step: it counts with spacing 1, so that the
    volumes of a stack of one plane are the areas of its plane (regionprops' ``spacing=(1, sy,
    sx)``)."""
    labels = irregular((1, 9, 11), 4, 13, size=3)
    # (The minor axis of a flat label is the root of an eigenvalue 0 up to rounding: 1e-8 either way.)
    props = tuple(name for name in SHAPE_3D if name not in ("centroid", "solidity", "axis_minor_length"))
    coords = {"z": [4.0], "y": 0.5 * np.arange(9), "x": 2.0 + 0.25 * np.arange(11)}
    stack = xr.DataArray(labels, dims=("z", "y", "x"), coords=coords).rasteragg.aggregate(props)
    check(stack, reference(labels, props, spacing=(1.0, 0.5, 0.25)), props)
    plane = xr.DataArray(labels[0], dims=("y", "x"), coords={"y": coords["y"], "x": coords["x"]})
    np.testing.assert_array_equal(stack["area"], plane.rasteragg.aggregate("area")["area"])


def test_far_from_the_origin_and_huge_ids() -> None:
    """Cells far from the image origin: central moments from exact integer sums, no cancellation."""
    labels = np.zeros((3, 5000), np.uint64)
    labels[:, 4990:4997] = 2**40 + 1
    labels[1:, 4980:4989] = 2**40 + 2
    props = ("centroid", "inertia_tensor", "axis_major_length", "axis_minor_length", "eccentricity")
    result = aggregate(
        da.from_array(labels[None], chunks=(1, 2, 1000)),
        None,
        props,
        background=0,
        space=Space((1, 2), (1.0, 1.0)),
    )
    np.testing.assert_array_equal(result.labels, [2**40 + 1, 2**40 + 2])
    relabelled = np.searchsorted(
        np.array([0, 2**40 + 1, 2**40 + 2], np.uint64), labels
    )  # skimage allocates by id
    check(dask.compute(result.values)[0], reference(relabelled, props), props)


def test_absent_labels_in_an_index_get_fill_values() -> None:
    labels = irregular((20, 20), 4, 5)
    xlabels = xr.DataArray(labels, dims=("y", "x"))
    result = xlabels.rasteragg.aggregate(["area", "bbox", "eccentricity"], index=[1, 99])
    assert np.isnan(result["area"][1])
    assert np.isnan(result["eccentricity"][1])
    np.testing.assert_array_equal(result["bbox"][1], [0, 0, 0, 0])
    np.testing.assert_allclose(result["area"][0], np.sum(labels == 1))


def pca(coords: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """scikit-learn's PCA of the coordinates: radii √(S²/(n-1)) and the rows of Vt, each with its
    largest component positive (svd_flip)."""
    d = coords.shape[1]
    if coords.shape[0] < d:
        return np.zeros(d), np.eye(d)
    centred = coords - coords.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt *= np.sign(vt[np.arange(d), np.argmax(np.abs(vt), axis=1)])[:, None]
    return np.sqrt(s**2 / (coords.shape[0] - 1)), vt


def test_radii_and_principal_axes_as_a_pca() -> None:
    labels = irregular((5, 16, 18), 5, 6, size=3)
    result = (
        xr.DataArray(da.from_array(labels, chunks=(2, 5, 7)), dims=("z", "y", "x"))
        .rasteragg.aggregate(["radii", "principal_axes"])
        .compute()
    )
    assert result["principal_axes"].dims == ("label", "eig", "axis")
    for row, label in enumerate(result["label"].values):
        radii, axes = pca(np.argwhere(labels == label).astype(np.float64))
        np.testing.assert_allclose(result["radii"][row], radii, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(result["principal_axes"][row], axes, rtol=1e-7, atol=1e-7)


def test_bad_input_names_what_is_available() -> None:
    labels3d = xr.DataArray(irregular((3, 8, 8), 3, 7, size=3), dims=("z", "y", "x"))
    with pytest.raises(
        ValueError, match=r"\['eccentricity'\] that are not defined for labels of 3 spatial dim"
    ):
        labels3d.rasteragg.aggregate(["area", "eccentricity"])
    with pytest.raises(ValueError, match=r"unknown statistic\(s\) \['roundness'\].*'solidity'"):
        labels3d.rasteragg.aggregate(["roundness"])
    with pytest.raises(ValueError, match="need an image"):
        labels3d.rasteragg.aggregate(["centroid_weighted"])
    with pytest.raises(ValueError, match="'perimeter' needs labels with dims"):
        xr.DataArray(irregular((8, 8), 3, 7), dims=("z", "x")).rasteragg.aggregate("perimeter")
    with pytest.raises(TypeError, match="on labels, 'aggregate' takes the statistics"):
        labels3d.rasteragg.aggregate("area", "bbox")


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    ny=st.integers(2, 24),
    nx=st.integers(2, 24),
    cy=st.integers(1, 24),
    cx=st.integers(1, 24),
    nlabels=st.integers(2, 6),
)
def test_2d_features_on_random_labels_and_chunks(
    seed: int, ny: int, nx: int, cy: int, cx: int, nlabels: int
) -> None:
    labels = irregular((ny, nx), nlabels, seed, size=3)
    if not labels.any():
        return
    expected = reference(labels, SHAPE_2D)
    xlabels = xr.DataArray(da.from_array(labels, chunks=(cy, cx)), dims=("y", "x"))
    check(xlabels.rasteragg.aggregate(SHAPE_2D).compute(), expected, SHAPE_2D)


def test_raster_aggregator_radii_axes_and_shape_stats() -> None:
    from xr_rasteragg import RasterAggregator

    labels = irregular((4, 14, 15), 4, 8, size=3)
    mask = da.from_array(labels, chunks=(2, 7, 8))
    aggregator = RasterAggregator(mask, run_on_gpu=False)
    frame = aggregator.aggregate_radii_and_axes()
    ids = np.unique(labels)
    ids = ids[ids != 0]
    assert list(frame.columns) == [*range(12), "cell_ID"]
    np.testing.assert_array_equal(frame["cell_ID"], ids)
    for row, label in enumerate(ids):
        radii, axes = pca(np.argwhere(labels == label).astype(np.float64))
        np.testing.assert_allclose(frame.iloc[row, :3], radii, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(frame.iloc[row, 3:12], axes.ravel(), rtol=1e-7, atol=1e-7)
    assert list(aggregator.aggregate_radii_and_axes(calculate_axes=False).columns) == [0, 1, 2, "cell_ID"]
    flat = RasterAggregator(da.from_array(labels[:1], chunks=(1, 7, 8)), run_on_gpu=False)
    eccentricity, tensor = flat.aggregate_stats(("eccentricity", "inertia_tensor"), index=ids)
    expected = reference(labels[0], ("eccentricity", "inertia_tensor"))
    np.testing.assert_array_equal(eccentricity["cell_ID"], expected["label"])
    np.testing.assert_allclose(eccentricity[0], expected["eccentricity"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(
        tensor[[0, 1, 2, 3]], expected["inertia_tensor"].reshape(-1, 4), rtol=RTOL, atol=ATOL
    )


def test_raster_aggregator_finalizes_shape_features_in_the_finalizer_thread(
    finalizer_work: list[str],
) -> None:
    """``RasterAggregator`` finalizes as NumPy-backed accessor results do: the shape features in
    the engine's finalizer thread beside the per-channel statistics, to the frames that dask's
    synchronous scheduler makes in the calling thread alone, and equal to regionprops."""
    from xr_rasteragg import RasterAggregator

    labels = irregular((1, 26, 31), 5, 9)
    labels[0, :3] = 0  # background
    image = np.random.default_rng(3).integers(0, 900, size=(2, 1, 26, 31)).astype(np.uint16)
    aggregator = RasterAggregator(
        da.from_array(labels, chunks=(1, 13, 16)),
        da.from_array(image, chunks=(1, 1, 13, 16)),
        run_on_gpu=False,
    )
    names = ("mean", "eccentricity", "solidity", "perimeter")
    ids = np.unique(labels)[1:]  # regionprops' labels
    threaded = aggregator.aggregate_stats(names, index=ids)
    assert finalizer_work == ["_finalize_parts"]
    with dask.config.set(scheduler="sync"):
        alone = aggregator.aggregate_stats(names, index=ids)
    assert finalizer_work == ["_finalize_parts"]
    for one, other in zip(threaded, alone, strict=True):
        pd.testing.assert_frame_equal(one, other)
    expected = reference(labels[0], ("eccentricity", "solidity", "perimeter"))
    for frame, name in zip(threaded[1:], names[1:], strict=True):
        np.testing.assert_array_equal(frame["cell_ID"], expected["label"])
        np.testing.assert_allclose(frame[0], expected[name], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.float32, np.int32])
@pytest.mark.parametrize("with_moments", [False, True])
def test_centroid_weighted_every_sweep(dtype: Any, with_moments: bool) -> None:
    """Small integer images fill the weighted sums in the power sweep (with or without moments),
    others in a sweep of their own: the same values as regionprops either way."""
    labels = irregular((26, 31), 5, 9)
    rng = np.random.default_rng(10)
    low = -300 if np.issubdtype(dtype, np.signedinteger) else 0
    image = rng.integers(low, 250, size=(2, 26, 31)).astype(dtype)
    ximage = xr.DataArray(da.from_array(image, chunks=(1, 9, 13)), dims=("c", "y", "x"))
    stats = ("mean", "centroid_weighted") if with_moments else ("centroid_weighted",)
    result = ximage.rasteragg.aggregate(xr.DataArray(labels, dims=("y", "x")), stats).compute()
    expected = reference(labels, ("centroid_weighted",), intensity_image=np.moveaxis(image, 0, -1))
    keep = expected["label"] != 0
    expected_values = np.swapaxes(expected["centroid_weighted"], 1, 2)[keep]
    np.testing.assert_allclose(result["centroid_weighted"], expected_values, rtol=RTOL, atol=1e-8)


@pytest.mark.parametrize("backend", ["numpy", "dask"])
def test_centroid_weighted_outside_the_label_in_coordinates(backend: str) -> None:
    """Pixels of both signs (a background-subtracted image) put a label's intensity-weighted
    centroid anywhere on the lines through its pixels, before the image's first pixel and after
    its last too: in coordinates (evenly spaced, increasing or decreasing), it is the position in
    pixels mapped by the same steps, as regionprops' ``spacing=`` gives it, not clamped to the
    image."""
    labels = np.zeros((6, 9), np.int32)
    image = np.zeros((1, 6, 9), np.float64)
    labels[0, 0:2], image[0, 0, 0:2] = 1, (-1.0, 2.0)  # x = 2: past the label, inside the image
    labels[3, 0:2], image[0, 3, 0:2] = 2, (3.0, -1.0)  # x = -0.5: before the first column
    labels[4:6, 7:9], image[0, 4:6, 7:9] = 3, ((-1.0, -1.0), (2.0, 2.0))  # y = 6: after the last row
    expected = reference(labels, ("centroid_weighted",), intensity_image=image[0])["centroid_weighted"]
    np.testing.assert_array_equal(expected, [[0.0, 2.0], [3.0, -0.5], [6.0, 7.5]])
    coords = {"y": 100.0 - 0.5 * np.arange(6), "x": -3.0 + 0.25 * np.arange(9)}
    ximage = xr.DataArray(image, dims=("c", "y", "x"), coords=coords)
    xlabels = xr.DataArray(labels, dims=("y", "x"), coords=coords)
    if backend == "dask":
        ximage, xlabels = ximage.chunk({"y": 2, "x": 4}), xlabels.chunk({"y": 2, "x": 4})
    # (computed first: NumPy reads a lazy array of dask's query planning element by element)
    result = ximage.rasteragg.aggregate(xlabels, "centroid_weighted").compute()["centroid_weighted"].values
    in_units = np.stack([100.0 - 0.5 * expected[:, 0], -3.0 + 0.25 * expected[:, 1]], axis=1)
    np.testing.assert_allclose(result[:, 0], in_units, rtol=RTOL, atol=ATOL)


def test_2d_labels_on_other_axes() -> None:
    """2-D labels with dims (z, x): their planes are rows of the engine's (z, y, x) blocks, so
    solidity is counted from the merged hull, not per block."""
    labels = irregular((30, 24), 6, 11)
    props = tuple(name for name in SHAPE_2D if name != "perimeter")
    result = xr.DataArray(da.from_array(labels, chunks=(7, 9)), dims=("z", "x")).rasteragg.aggregate(props)
    check(result.compute(), reference(labels, props), props)


def test_descending_coordinates_give_regionprops_of_the_flipped_labels() -> None:
    """Coordinates that decrease along an axis: the features that depend on its direction are
    those of regionprops on the labels laid out with increasing coordinates."""
    labels = irregular((30, 40), 5, 12)
    xlabels = xr.DataArray(
        labels, dims=("y", "x"), coords={"y": 20 - np.arange(30) * 0.5, "x": np.arange(40) * 0.25}
    )
    props = ("orientation", "inertia_tensor", "eccentricity", "axis_major_length", "solidity")
    result = xlabels.rasteragg.aggregate((*props, "centroid"), background=None)
    check(result, reference(labels[::-1], props, spacing=(0.5, 0.25)), props)
    unflipped = reference(labels, ("orientation",), spacing=(0.5, 0.25))["orientation"]
    assert np.any(np.abs(result["orientation"].values - unflipped) > 0.1)  # the direction matters
    rows = [20 - 0.5 * np.argwhere(labels == i)[:, 0].mean() for i in result["label"].values]
    np.testing.assert_allclose(result["centroid"][:, 0], rows)  # positions: in the coordinates


@pytest.mark.parametrize("chunks", [(40, 50), (7, 9), (1, 50)], ids=str)
def test_moment_features_with_every_kernel(engine_kernel: Any, chunks: Any) -> None:
    """The moment-based features (the Geometry family) from each block kernel, the array-API
    reference included, equal regionprops; blocks of background only included."""
    labels = irregular((40, 50), 7, 13)
    labels[:8] = 0
    props = ("area", "bbox", "centroid", "inertia_tensor", "eccentricity", "orientation", "extent")
    result = xr.DataArray(da.from_array(labels, chunks=chunks), dims=("y", "x")).rasteragg.aggregate(props)
    check(result.compute(), reference(labels, props), props)


@pytest.mark.parametrize("offset", [(0, 0, 0), (3, 40, 500)])
def test_geometry_of_the_compiled_kernel_equals_the_array_kernel(offset: tuple[int, int, int]) -> None:
    from xr_rasteragg.families import Geometry
    from xr_rasteragg.kernels import numba as compiled
    from xr_rasteragg.kernels import xp
    from xr_rasteragg.partials import Needs

    labels = np.stack([irregular((23, 31), 6, seed) for seed in (14, 15, 16)])
    needs = Needs(more=(Geometry(),))
    got = compiled.block_partials(labels, None, offset, needs, 0)
    expected = xp.block_partials(labels, None, offset, needs, 0)
    np.testing.assert_array_equal(got.labels, expected.labels)
    for name in Geometry().names():
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)


def test_perimeter_of_runs_longer_than_the_packed_counts() -> None:
    """Runs of more than 2**21 - 1 pixels (the width of a packed class count in the compiled
    border kernel) in one block: their counts are taken in pieces, and equal skimage's."""
    from skimage.measure import perimeter

    width = 2**21 + 40
    labels = np.zeros((4, width), np.int32)
    labels[1] = 1
    labels[2, 3:-7] = 1
    labels[2, -5:] = 2
    labels[0, 100:200] = 2
    result = (
        xr.DataArray(da.from_array(labels, chunks=labels.shape), dims=("y", "x"))
        .rasteragg.aggregate(("perimeter",))
        .compute()
    )  # (under query planning, dask's own np.asarray gives an array of dask arrays)
    expected = [perimeter(labels == label) for label in (1, 2)]
    np.testing.assert_allclose(result["perimeter"].values, expected, rtol=RTOL, atol=ATOL)


def thin_chunks(rng: np.random.Generator, n: int) -> tuple[int, ...]:
    """Random chunk sizes along an axis of ``n`` pixels, most of them 1 to 3 pixels wide."""
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(int(rng.choice([1, 2, 3, int(rng.integers(4, n + 1))], p=[0.3, 0.25, 0.25, 0.2])))
    sizes[-1] -= sum(sizes) - n
    return tuple(size for size in sizes if size)


def edge_cases(rng: np.random.Generator) -> NDArray[np.int32]:
    """Labels that meet the perimeter's edge cases: rows of background only between labelled
    rows, one-pixel labels, labels on the image's edges and corners, diagonal chains (the √2
    weights), runs the width of the image, and smoothed random cells."""
    labels = irregular((30, 37), 6, int(rng.integers(2**16)), size=3)
    labels[rng.integers(0, 30, size=4)] = 0
    labels[:, 0] = 7
    labels[-1, :] = 8
    labels[0, 0] = labels[29, 36] = labels[15, 18] = 9
    diagonal = np.arange(12)
    labels[3 + diagonal, 5 + diagonal] = 10
    labels[20, :] = 11
    return labels


def perimeters(labels: NDArray[np.integer], ids: NDArray[np.integer]) -> NDArray[np.float64]:
    """:func:`skimage.measure.perimeter` of each label's mask."""
    from skimage.measure import perimeter

    return np.array([perimeter(labels == label) for label in ids])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("background", [0, None])
def test_perimeter_of_edge_cases_in_thin_random_blocks(seed: int, background: int | None) -> None:
    """The perimeter of every label (the background's too, when it is kept) equals skimage's,
    with the labels cut into random blocks mostly one to three pixels wide (a frame reaches
    two pixels, so across several blocks)."""
    rng = np.random.default_rng(seed)
    labels = edge_cases(rng)
    chunks = (thin_chunks(rng, labels.shape[0]), thin_chunks(rng, labels.shape[1]))
    result = (
        xr.DataArray(da.from_array(labels, chunks=chunks), dims=("y", "x"))
        .rasteragg.aggregate(("perimeter",), background=background)
        .compute()
    )
    ids = np.unique(labels if background is None else labels[labels != background])
    np.testing.assert_array_equal(result["label"].values, ids)
    np.testing.assert_allclose(result["perimeter"].values, perimeters(labels, ids), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "dtype", [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
)
def test_perimeter_of_every_label_dtype_across_words(dtype: Any) -> None:
    """The compiled border kernel compares 64 labels at once into a word of bits, reading the
    words inside a block's rows in place: labels of every integer dtype, with ids at the ends of
    its range (that differ only in their high bits), in blocks narrower and wider than a few
    words, whose frames straddle words, and in one block, give skimage's perimeters."""
    rng = np.random.default_rng(21)
    small = np.concatenate([edge_cases(rng), edge_cases(rng)], axis=1)[:, :70]
    small = np.concatenate([small, small[:, ::-1] + 12 * (small[:, ::-1] > 0), small], axis=1)
    info = np.iinfo(dtype)
    ids = np.unique(small[small > 0])
    ends = [int(info.max) - int(i) if i % 2 or info.min == 0 else int(info.min) + int(i) for i in ids]
    values = np.zeros(int(small.max()) + 1, dtype=np.int64 if info.min < 0 else np.uint64)
    values[ids] = ends
    labels = values[small].astype(dtype)
    expected_ids = np.unique(labels[labels != 0])
    expected = perimeters(labels, expected_ids)
    for chunks in ((17, 67), (17, 150), labels.shape):
        result = (
            xr.DataArray(da.from_array(labels, chunks=chunks), dims=("y", "x"))
            .rasteragg.aggregate(("perimeter",))
            .compute()
        )
        np.testing.assert_array_equal(result["label"].values, expected_ids)
        np.testing.assert_allclose(
            result["perimeter"].values, expected, rtol=RTOL, atol=ATOL, err_msg=str(chunks)
        )


def test_perimeter_classes_of_a_block_of_several_planes() -> None:
    """The compiled kernel's class counts of a block of several planes (a frame of pixels
    beyond the image) are each plane's own, summed: the pixels of each weight class that
    skimage's perimeter weighs, by its own method (border pixels of the 4-connected erosion,
    convolved with its weights)."""
    from xr_rasteragg.families import Border
    from xr_rasteragg.frames import Frame, Ring
    from xr_rasteragg.kernels.numba import block_partials

    rng = np.random.default_rng(5)
    block = np.stack([edge_cases(rng) for _ in range(3)])
    block[1, 4:9] = 0  # a plane with rows of background only where the others have labels
    frame = Frame.around(block, (0, 0, 0), [Ring.of(block, (0, 0, 0), 2)], block.shape, Border())
    runs = block_partials.encode_framed(block, (0, 0, 0), 0, frame)
    assert runs.around is not None
    kernel = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]])
    classes = ([5, 7, 15, 17, 25, 27], [21, 33], [13, 23])
    for row, label in enumerate(runs.parts.labels):
        expected = np.zeros(3, np.int64)
        for plane in block:
            mask = plane == label
            border = mask & ~ndi.binary_erosion(mask, border_value=0)
            codes = ndi.convolve(border.astype(np.int64), kernel, mode="constant")
            expected += [np.isin(codes[border], c).sum() for c in classes]
        np.testing.assert_array_equal(runs.around[runs.local[row]], expected, err_msg=str(label))


def test_perimeter_of_3d_labels_is_refused() -> None:
    labels = xr.DataArray(irregular((3, 8, 8), 3, 7, size=3), dims=("z", "y", "x"))
    with pytest.raises(ValueError, match=r"\['perimeter'\] that are not defined for labels of 3 spatial dim"):
        labels.rasteragg.aggregate(["perimeter"])
