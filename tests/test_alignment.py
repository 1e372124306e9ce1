"""The accessor on SpatialData elements: alignment on their transformations (DESIGN.md §4).

SpatialData elements carry their placement in ``attrs["transform"]`` while their coordinates
restart at 0.5 in every element. Each test compares the accessor with ``scipy.ndimage`` on the
pixels the transformations say the labels cover, and centres of mass with
``spatialdata.get_centroids``.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
import xarray as xr
from numpy.typing import NDArray

spatialdata = pytest.importorskip("spatialdata")
from spatialdata.models import Image2DModel, Image3DModel, Labels2DModel, Labels3DModel  # noqa: E402
from spatialdata.transformations import (  # noqa: E402
    Affine,
    Identity,
    Scale,
    Sequence,
    Translation,
    set_transformation,
)

import xr_rasteragg  # noqa: E402, F401  (registers the accessor)

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning",
    "ignore::FutureWarning",
    "ignore::DeprecationWarning",
    "ignore:invalid value encountered in divide:RuntimeWarning",  # scipy.ndimage, for ids not in a window
)

HEIGHT, WIDTH = 60, 80


def blob_labels(shape: tuple[int, ...], seed: int = 0) -> NDArray[np.int32]:
    """Blocks of 3 px with ids 0 (background), 1..9."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 10, size=tuple(-(-n // 3) for n in shape))
    for axis in range(len(shape)):
        coarse = coarse.repeat(3, axis=axis)
    return np.ascontiguousarray(coarse[tuple(slice(0, n) for n in shape)]).astype(np.int32)


def unit_image(shape: tuple[int, ...], nchan: int = 2, seed: int = 1) -> NDArray[np.float64]:
    """Values in [0, 1) with a gradient, so that a shifted window changes every mean."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 0.5, shape[-1])
    return 0.5 * rng.random((nchan, *shape)) + ramp


def image_element(data: NDArray[Any], transform: Any = None, **parse: Any) -> Any:
    model = Image2DModel if data.ndim == 3 else Image3DModel
    dims = ("c", "y", "x") if data.ndim == 3 else ("c", "z", "y", "x")
    return model.parse(data, dims=dims, transformations={"global": transform or Identity()}, **parse)


def labels_element(data: NDArray[Any], transform: Any = None, **parse: Any) -> Any:
    model = Labels2DModel if data.ndim == 2 else Labels3DModel
    dims = ("y", "x") if data.ndim == 2 else ("z", "y", "x")
    return model.parse(data, dims=dims, transformations={"global": transform or Identity()}, **parse)


def expected(
    image: NDArray[Any], labels: NDArray[np.integer], window: tuple[slice, ...], ids: NDArray[Any]
) -> dict[str, NDArray[np.float64]]:
    """scipy.ndimage's mean, var and max of ``image[:, window]`` over ``labels``, per id and channel."""
    pixels = image[(slice(None), *window)]
    assert pixels.shape[1:] == labels.shape
    return {
        name: np.stack([np.asarray(func(plane, labels, ids)) for plane in pixels], axis=1)
        for name, func in (("mean", ndi.mean), ("var", ndi.variance), ("max", ndi.maximum))
    }


def check(
    result: xr.Dataset, image: NDArray[Any], labels: NDArray[np.integer], window: tuple[slice, ...]
) -> None:
    ids = result["label"].values
    np.testing.assert_array_equal(ids, np.setdiff1d(np.unique(labels), [0]))
    for name, values in expected(image, labels, window, ids).items():
        np.testing.assert_allclose(result[name].values, values, rtol=1e-12, atol=1e-15, err_msg=name)


def centroids(labels: Any, cs: str = "global") -> NDArray[np.float64]:
    """spatialdata's centroids of a labels element, sorted by id, in the accessor's ([z,] y, x) order."""
    points = spatialdata.get_centroids(labels, coordinate_system=cs).compute().sort_index()
    return points[[c for c in ("z", "y", "x") if c in points.columns]].to_numpy()


def crop_box(element: Any, x: tuple[float, float], y: tuple[float, float]) -> Any:
    return spatialdata.bounding_box_query(
        element,
        axes=("x", "y"),
        min_coordinate=[x[0], y[0]],
        max_coordinate=[x[1], y[1]],
        target_coordinate_system="global",
    )


STATS = ["mean", "var", "max", "center_of_mass"]


# -- the pixels the transformations say ------------------------------------------------------


@pytest.mark.parametrize("chunks", [None, 16])
def test_bounding_box_crop_of_labels(chunks: int | None) -> None:
    image = unit_image((HEIGHT, WIDTH))
    labels = blob_labels((HEIGHT, WIDTH))
    parse = {"chunks": chunks} if chunks else {}
    crop = crop_box(labels_element(labels, **parse), x=(20, 50), y=(10, 40))
    assert crop.shape == (30, 30)
    assert crop["x"].values[0] == 0.5  # its coordinates restart; its place is in its transformation

    result = image_element(image, **parse).rasteragg.aggregate(crop, STATS)

    window = (slice(10, 40), slice(20, 50))
    check(result, image, labels[window], window)
    com = result["center_of_mass"]
    assert list(com["axis"].values) == ["y", "x"]
    ids = result["label"].values
    pixels = np.array(ndi.center_of_mass(labels[window] > 0, labels[window], ids))
    np.testing.assert_allclose(com.values, pixels + np.array([10, 20]) + 0.5, rtol=1e-12)
    np.testing.assert_allclose(com.values, centroids(crop), rtol=1e-12)


def test_bounding_box_crop_of_the_image() -> None:
    image = unit_image((HEIGHT, WIDTH))
    labels = blob_labels((HEIGHT, WIDTH))
    crop = crop_box(image_element(image), x=(20, 50), y=(10, 40))

    result = crop.rasteragg.aggregate(labels_element(labels), STATS)

    window = (slice(10, 40), slice(20, 50))
    check(result, image, labels[window], window)
    full = centroids(labels_element(labels[window], Translation([20, 10], axes=("x", "y"))))
    np.testing.assert_allclose(result["center_of_mass"].values, full, rtol=1e-12)


def test_labels_with_a_translation_in_microns_lazily() -> None:
    image = unit_image((HEIGHT, WIDTH))
    labels = blob_labels((12, 15), seed=5)
    to_microns = Sequence(
        [Scale([0.65, 0.65], axes=("x", "y")), Translation([100.0, -20.0], axes=("x", "y"))]
    )
    crop_at = Translation([7, 11], axes=("x", "y"))  # in image pixels
    image_el = image_element(image, to_microns, chunks=(1, 16, 16))
    labels_el = labels_element(labels, Sequence([crop_at, to_microns]), chunks=(5, 5))
    ids = np.setdiff1d(np.unique(labels), [0])

    result = image_el.rasteragg.aggregate(labels_el, STATS, index=ids)

    assert isinstance(result["mean"].data, da.Array)
    assert isinstance(result["center_of_mass"].data, da.Array)
    window = (slice(11, 23), slice(7, 22))
    check(result.compute(), image, labels, window)
    np.testing.assert_allclose(result["center_of_mass"].values, centroids(labels_el), rtol=1e-12)


def test_3d_labels_on_a_crop() -> None:
    image = unit_image((6, 14, 16))
    labels = blob_labels((3, 8, 9), seed=7)
    to_world = Scale([0.2, 0.2, 1.5], axes=("x", "y", "z"))
    crop_at = Translation([4, 5, 2], axes=("x", "y", "z"))
    labels_el = labels_element(labels, Sequence([crop_at, to_world]))

    result = image_element(image, to_world).rasteragg.aggregate(labels_el, STATS)

    check(result, image, labels, (slice(2, 5), slice(5, 13), slice(4, 13)))
    assert list(result["center_of_mass"]["axis"].values) == ["z", "y", "x"]
    np.testing.assert_allclose(result["center_of_mass"].values, centroids(labels_el), rtol=1e-12)


def test_sliced_elements_keep_their_place() -> None:
    """``.isel`` keeps the transformation and moves the coordinates: the coordinates place the slice."""
    image = unit_image((HEIGHT, WIDTH))
    labels = blob_labels((HEIGHT, WIDTH))
    image_el, labels_el = image_element(image), labels_element(labels)
    window = (slice(10, 40), slice(20, 50))

    by_isel = image_el.isel(y=slice(5, 50)).rasteragg.aggregate(
        labels_el.isel(y=window[0], x=window[1]), STATS
    )
    by_query = image_el.rasteragg.aggregate(crop_box(labels_el, x=(20, 50), y=(10, 40)), STATS)

    check(by_isel, image, labels[window], window)
    xr.testing.assert_allclose(by_isel, by_query)


# -- coordinate systems ------------------------------------------------------------------------


def two_systems(image_systems: dict[str, Any], labels_systems: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    image = unit_image((HEIGHT, WIDTH))
    labels = blob_labels((12, 15), seed=3)
    image_el, labels_el = image_element(image), labels_element(labels)
    for element, systems in ((image_el, image_systems), (labels_el, labels_systems)):
        for name, transform in systems.items():
            set_transformation(element, transform, to_coordinate_system=name)
    return image, labels, image_el, labels_el


def test_coordinate_system_chooses_the_placement() -> None:
    at = {"slide": Translation([2, 3], axes=("x", "y")), "global": Translation([7, 11], axes=("x", "y"))}
    image, labels, image_el, labels_el = two_systems({"slide": Identity()}, at)

    default = image_el.rasteragg.aggregate(labels_el, STATS)  # both share 'global' and 'slide'
    slide = image_el.rasteragg.aggregate(labels_el, STATS, coordinate_system="slide")
    mean = image_el.rasteragg.mean(labels_el, coordinate_system="slide")

    check(default, image, labels, (slice(11, 23), slice(7, 22)))
    check(slide, image, labels, (slice(3, 15), slice(2, 17)))
    xr.testing.assert_identical(mean, slide["mean"])
    np.testing.assert_allclose(slide["center_of_mass"].values, centroids(labels_el, "slide"), rtol=1e-12)
    np.testing.assert_allclose(default["center_of_mass"].values, centroids(labels_el), rtol=1e-12)
    com = labels_el.rasteragg.center_of_mass(coordinate_system="slide")
    np.testing.assert_allclose(com.values, centroids(labels_el, "slide"), rtol=1e-12)
    np.testing.assert_allclose(labels_el.rasteragg.center_of_mass().values, centroids(labels_el), rtol=1e-12)


def test_coordinate_system_errors_name_the_choices() -> None:
    _, _, image_el, labels_el = two_systems(
        {"a": Identity(), "b": Identity()}, {"a": Identity(), "b": Identity()}
    )
    with pytest.raises(
        ValueError,
        match=r"'coordinate_system' 'c' is not one of the image's coordinate systems \['a', 'b', 'global'\]",
    ):
        image_el.rasteragg.mean(labels_el, coordinate_system="c")
    del image_el.attrs["transform"]["global"], labels_el.attrs["transform"]["global"]
    with pytest.raises(
        ValueError, match=r"share several coordinate systems \['a', 'b'\], none of them 'global'; choose one"
    ):
        image_el.rasteragg.mean(labels_el)
    with pytest.raises(ValueError, match=r"'labels''s coordinate systems \['a', 'b'\]"):
        labels_el.rasteragg.center_of_mass(coordinate_system="global")
    del labels_el.attrs["transform"]["a"], image_el.attrs["transform"]["b"]
    with pytest.raises(
        ValueError, match=r"share no coordinate system \(the image \['a'\], 'labels' \['b'\]\)"
    ):
        image_el.rasteragg.mean(labels_el)


# -- not one pixel grid: errors that name the transformations ----------------------------------


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (
            Scale([2.0, 2.0], axes=("x", "y")),
            r"not on the same pixel grid in coordinate system 'global': their pixel sizes \(x, y\) differ: "
            r"image \(1, 1\), labels \(2, 2\) \(transformations: image Identity, labels Scale\(x=2, y=2\)\)",
        ),
        (
            Translation([3.5, 2.0], axes=("x", "y")),
            r"the labels start at image pixel \(x=3.5, y=2\), not a whole-pixel offset "
            r"\(transformations: image Identity, labels Translation\(x=3.5, y=2\)\)",
        ),
        (
            Affine(
                np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y")
            ),
            r"their pixel axes point in different directions .*labels Affine",
        ),
        (
            Translation([200.0, 0.0], axes=("x", "y")),
            r"the image and 'labels' do not overlap in coordinate system 'global': along 'x' the labels "
            r"cover image pixels 200..214, the image has 0..79",
        ),
    ],
    ids=["scale", "half-pixel", "transposed", "outside"],
)
def test_not_one_pixel_grid(transform: Any, message: str) -> None:
    image_el = image_element(unit_image((HEIGHT, WIDTH)))
    labels_el = labels_element(blob_labels((12, 15)), transform)
    with pytest.raises(ValueError, match=message):
        image_el.rasteragg.mean(labels_el)


def test_only_one_element_with_a_transformation() -> None:
    image = unit_image((HEIGHT, WIDTH))
    labels = blob_labels((HEIGHT, WIDTH))
    plain_image = xr.DataArray(image, dims=("c", "y", "x"))
    plain_labels = xr.DataArray(labels, dims=("y", "x"))
    window = (slice(None), slice(None))

    # an identity places both readings of the other array at the same pixels
    check(
        plain_image.rasteragg.aggregate(labels_element(labels), ["mean", "var", "max"]), image, labels, window
    )
    check(
        image_element(image).rasteragg.aggregate(plain_labels, ["mean", "var", "max"]), image, labels, window
    )

    crop = crop_box(labels_element(labels), x=(20, 50), y=(10, 40))
    with pytest.raises(
        ValueError,
        match=r"'labels' carries a SpatialData transformation to 'global' \(Sequence\(Translation\(y=10, "
        r"x=20\), Identity\)\) but the image carries none, so where the image's pixels lie there is unknown",
    ):
        plain_image.rasteragg.mean(crop)
    with pytest.raises(
        ValueError, match=r"the image carries a SpatialData transformation .*Scale\(x=0.5, y=0.5\)"
    ):
        image_element(image, Scale([0.5, 0.5], axes=("x", "y"))).rasteragg.mean(plain_labels)


# -- multiscale elements ---------------------------------------------------------------------------


def test_multiscale_labels_stand_for_scale0() -> None:
    image = unit_image((HEIGHT, WIDTH))
    labels = blob_labels((HEIGHT, WIDTH))
    multiscale = labels_element(labels, Translation([4, 2], axes=("x", "y")), scale_factors=[2])
    assert isinstance(multiscale, xr.DataTree)
    image_el = image_element(image)

    result = image_el.rasteragg.aggregate(multiscale, STATS)

    check(result, image, labels[:58, :76], (slice(2, 60), slice(4, 80)))
    # the labels reach past the image: statistics, centres of mass too, are over the shared pixels
    shared = labels_element(labels[:58, :76], Translation([4, 2], axes=("x", "y")))
    np.testing.assert_allclose(result["center_of_mass"].values, centroids(shared), rtol=1e-12)


def test_one_level_of_multiscale_elements() -> None:
    image = unit_image((HEIGHT, WIDTH))
    labels = blob_labels((HEIGHT, WIDTH))
    image_pyramid = image_element(image, scale_factors=[2])
    labels_pyramid = labels_element(labels, scale_factors=[2])
    image1 = image_pyramid["scale1"]["image"]
    labels1 = labels_pyramid["scale1"]["image"].isel(y=slice(3, 12), x=slice(5, 20))
    assert labels1["x"].values[0] == 11.0  # a level's coordinates are in full-resolution pixels

    result = image1.rasteragg.aggregate(labels1, STATS)

    check(result, image1.values, labels1.values, (slice(3, 12), slice(5, 20)))
    # In 'global' (a scale by 2), the level's pixel centres are its coordinates.
    yy, xx = np.meshgrid(labels1["y"].values, labels1["x"].values, indexing="ij")
    inside = [labels1.values == i for i in result["label"].values]
    np.testing.assert_allclose(
        result["center_of_mass"].values, [[yy[m].mean(), xx[m].mean()] for m in inside], rtol=1e-12
    )
    with pytest.raises(ValueError, match=r"pixel sizes \(x, y\) differ: image \(2, 2\), labels \(1, 1\)"):
        image1.rasteragg.mean(labels_pyramid)


def test_a_datatree_that_is_not_multiscale() -> None:
    image_el = image_element(unit_image((HEIGHT, WIDTH)))
    tree = xr.DataTree.from_dict({"level0": xr.Dataset({"a": (("y", "x"), blob_labels((HEIGHT, WIDTH)))})})
    with pytest.raises(
        ValueError,
        match=r"'labels' is a DataTree but not a multiscale element with one array in 'scale0'; got levels "
        r"\['level0'\]; pass one level as a DataArray",
    ):
        image_el.rasteragg.mean(tree)


# -- the painted image lies where its labels lie -----------------------------------------------


def test_paint_keeps_the_transformation() -> None:
    image = unit_image((HEIGHT, WIDTH))
    crop = crop_box(labels_element(blob_labels((HEIGHT, WIDTH))), x=(20, 50), y=(10, 40))
    mean = image_element(image).rasteragg.mean(crop)
    painted = crop.rasteragg.paint(mean)
    assert painted.attrs["transform"] == crop.attrs["transform"]
    # painted as an image, it lies on the crop's pixels: each label's mean comes back
    xr.testing.assert_allclose(painted.rasteragg.mean(crop), mean)
