"""The SpatialData adapter with real SpatialData objects and zarr stores (DESIGN.md §5).

Values are checked against NumPy, label by label, on the pixels the transformations say the labels
cover; centroids against ``spatialdata.get_centroids``; tables against ``TableModel`` and after a
round trip through a zarr store.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tree_hash
from numpy.typing import NDArray
from scipy import ndimage

spatialdata = pytest.importorskip("spatialdata")
from spatialdata.models import (  # noqa: E402
    Image2DModel,
    Image3DModel,
    Labels2DModel,
    Labels3DModel,
    TableModel,
)
from spatialdata.transformations import (  # noqa: E402
    Affine,
    Identity,
    Scale,
    Translation,
)

import xr_rasteragg.spatialdata as adapter  # noqa: E402
from xr_rasteragg.spatialdata import aggregate  # noqa: E402

CHANNELS = ["DAPI", "CD3", "CD20"]

pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"
)


# -- data -----------------------------------------------------------------------------------


def blob_labels(shape: tuple[int, ...], seed: int = 0) -> NDArray[np.int32]:
    """Blocky labels with background and unsorted, non-contiguous ids."""
    rng = np.random.default_rng(seed)
    ids = np.array([0, 0, 3, 7, 12, 40, 41])
    coarse = rng.choice(ids, size=tuple(-(-n // 3) for n in shape))
    labels = coarse
    for axis in range(len(shape)):
        labels = labels.repeat(3, axis=axis)
    return np.ascontiguousarray(labels[tuple(slice(0, n) for n in shape)]).astype(np.int32)


def image_of(shape: tuple[int, ...], nchan: int = 3, seed: int = 1) -> NDArray[np.uint16]:
    return np.random.default_rng(seed).integers(0, 5000, size=(nchan, *shape)).astype(np.uint16)


def reference(
    image: NDArray[Any], labels: NDArray[np.integer], stat: str
) -> tuple[NDArray[Any], NDArray[Any]]:
    """Ids (background left out) and ``stat`` per id and channel, with NumPy."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    func = {"mean": np.mean, "var": np.var, "max": np.max, "sum": np.sum, "std": np.std}[stat]
    values = np.array([[func(plane[labels == i].astype(np.float64)) for plane in image] for i in ids])
    return ids, values.reshape(ids.shape[0], image.shape[0])


def sdata_2d(
    labels: NDArray[np.integer] | None = None,
    image: NDArray[Any] | None = None,
    image_transform: Any = None,
    labels_transform: Any = None,
    **parse: Any,
) -> Any:
    labels = blob_labels((20, 27)) if labels is None else labels
    image = image_of(labels.shape) if image is None else image
    return spatialdata.SpatialData(
        images={
            "img": Image2DModel.parse(
                image,
                dims=("c", "y", "x"),
                c_coords=CHANNELS[: image.shape[0]],
                transformations={"global": image_transform or Identity()},
                **parse,
            )
        },
        labels={
            "cells": Labels2DModel.parse(
                labels, dims=("y", "x"), transformations={"global": labels_transform or Identity()}, **parse
            )
        },
    )


def centroids_of(sdata: Any, labels: str, cs: str = "global") -> NDArray[np.float64]:
    """spatialdata's own centroids (x, y[, z]) of a labels element, sorted by id."""
    points = spatialdata.get_centroids(sdata.labels[labels], coordinate_system=cs).compute()
    return points.sort_index()[[c for c in ("x", "y", "z") if c in points.columns]].to_numpy()


# -- the table ------------------------------------------------------------------------------


def test_table_layout_and_values_2d() -> None:
    labels = blob_labels((20, 27))
    image = image_of(labels.shape)
    sdata = sdata_2d(labels, image)
    table = aggregate(sdata, "img", "cells", ["mean", "var", "max"])

    TableModel().validate(table)
    ids, mean = reference(image, labels, "mean")
    assert list(table.var_names) == CHANNELS
    assert list(table.obs_names) == [str(i) for i in ids]
    np.testing.assert_array_equal(table.obs["instance_id"], ids)
    assert table.obs["region"].dtype == "category"
    assert list(table.obs["region"].cat.categories) == ["cells"]
    np.testing.assert_array_equal(table.obs["area"], [(labels == i).sum() for i in ids])
    np.testing.assert_allclose(table.X, mean, rtol=1e-12)
    np.testing.assert_allclose(table.layers["var"], reference(image, labels, "var")[1], rtol=1e-9)
    np.testing.assert_array_equal(table.layers["max"], reference(image, labels, "max")[1])
    assert set(table.layers) == {"var", "max"}
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("cells", "region", "instance_id")
    np.testing.assert_allclose(table.obsm["spatial"], centroids_of(sdata, "cells"), rtol=1e-12)
    assert table.uns["rasteragg"]["stats"] == ["mean", "var", "max"]


def test_custom_keys_and_table_in_sdata() -> None:
    sdata = sdata_2d()
    table = aggregate(
        sdata, "img", "cells", "sum", table_name="t", region_key="where", instance_key="cell_id"
    )
    assert sdata.tables["t"] is table
    TableModel().validate(table)
    assert {"where", "cell_id", "area"} <= set(table.obs.columns)
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        aggregate(sdata, "img", "cells", "sum", table_name="t")
    again = aggregate(sdata, "img", "cells", "mean", table_name="t", overwrite=True)
    assert sdata.tables["t"] is again


def test_3d_czyx_over_zyx() -> None:
    labels = blob_labels((5, 12, 14), seed=3)
    image = image_of(labels.shape, nchan=2)
    transform = Scale([0.5, 0.25, 2.0], axes=("x", "y", "z"))
    sdata = spatialdata.SpatialData(
        images={
            "vol": Image3DModel.parse(image, dims=("c", "z", "y", "x"), transformations={"global": transform})
        },
        labels={
            "nuclei": Labels3DModel.parse(labels, dims=("z", "y", "x"), transformations={"global": transform})
        },
    )
    table = aggregate(sdata, "vol", "nuclei", ["mean", "std"])
    TableModel().validate(table)
    ids, mean = reference(image, labels, "mean")
    np.testing.assert_allclose(table.X, mean, rtol=1e-12)
    np.testing.assert_allclose(table.layers["std"], reference(image, labels, "std")[1], rtol=1e-9)
    assert list(table.var_names) == ["0", "1"]  # integer channel coordinates, as strings
    assert table.obsm["spatial"].shape == (ids.shape[0], 3)
    np.testing.assert_allclose(table.obsm["spatial"], centroids_of(sdata, "nuclei"), rtol=1e-12)


def test_multiscale_elements_use_scale0() -> None:
    labels = blob_labels((32, 24))
    image = image_of(labels.shape)
    single = aggregate(sdata_2d(labels, image), "img", "cells", ["mean", "max"])
    multi_sdata = sdata_2d(labels, image, scale_factors=[2, 2], chunks=(1, 16, 16))
    assert type(multi_sdata.images["img"]).__name__ == "DataTree"
    multi = aggregate(multi_sdata, "img", "cells", ["mean", "max"])
    np.testing.assert_array_equal(multi.X, single.X)
    np.testing.assert_array_equal(multi.layers["max"], single.layers["max"])
    np.testing.assert_array_equal(multi.obsm["spatial"], single.obsm["spatial"])
    np.testing.assert_allclose(multi.obsm["spatial"], centroids_of(multi_sdata, "cells"), rtol=1e-12)


def test_scale_and_translation_with_labels_on_a_crop() -> None:
    image = image_of((30, 40))
    labels = blob_labels((12, 15), seed=5)
    to_microns = spatialdata.transformations.Sequence(
        [Scale([0.65, 0.65], axes=("x", "y")), Translation([100.0, -20.0], axes=("x", "y"))]
    )
    crop_at = Translation([7, 11], axes=("x", "y"))  # 7 px right, 11 px down, in image pixels
    sdata = sdata_2d(labels, image, to_microns, spatialdata.transformations.Sequence([crop_at, to_microns]))
    table = aggregate(sdata, "img", "cells", ["mean", "max"])
    ids, mean = reference(image[:, 11:23, 7:22], labels, "mean")
    np.testing.assert_array_equal(table.obs["instance_id"], ids)
    np.testing.assert_allclose(table.X, mean, rtol=1e-12)
    spatial = table.obsm["spatial"]
    np.testing.assert_allclose(spatial, centroids_of(sdata, "cells"), rtol=1e-12)
    rows, cols = np.nonzero(labels == ids[0])
    expected = [100.0 + 0.65 * (7 + cols.mean() + 0.5), -20.0 + 0.65 * (11 + rows.mean() + 0.5)]
    np.testing.assert_allclose(spatial[0], expected, rtol=1e-12)


def test_3d_labels_on_a_crop_with_other_chunks() -> None:
    image = image_of((6, 14, 16), nchan=2)
    labels = blob_labels((3, 8, 9), seed=7)
    to_world = Scale([0.2, 0.2, 1.5], axes=("x", "y", "z"))
    crop_at = Translation([4, 5, 2], axes=("x", "y", "z"))
    sdata = spatialdata.SpatialData(
        images={
            "vol": Image3DModel.parse(
                image, dims=("c", "z", "y", "x"), chunks=(1, 2, 7, 8), transformations={"global": to_world}
            )
        },
        labels={
            "nuclei": Labels3DModel.parse(
                labels,
                dims=("z", "y", "x"),
                chunks=(3, 5, 5),
                transformations={"global": spatialdata.transformations.Sequence([crop_at, to_world])},
            )
        },
    )
    table = aggregate(sdata, "vol", "nuclei", ["mean", "max"])
    crop = image[:, 2:5, 5:13, 4:13]
    np.testing.assert_allclose(table.X, reference(crop, labels, "mean")[1], rtol=1e-12)
    np.testing.assert_array_equal(table.layers["max"], reference(crop, labels, "max")[1])
    np.testing.assert_allclose(table.obsm["spatial"], centroids_of(sdata, "nuclei"), rtol=1e-12)


def test_other_coordinate_system() -> None:
    labels = blob_labels((20, 27))
    image = image_of(labels.shape)
    sdata = sdata_2d(labels, image)
    flipped = Affine(
        np.array([[-1.0, 0, 50], [0, 2.0, 3], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y")
    )
    for name in ("img", "cells"):
        spatialdata.transformations.set_transformation(sdata[name], flipped, to_coordinate_system="slide")
    table = aggregate(sdata, "img", "cells", "mean", coordinate_system="slide")
    np.testing.assert_allclose(table.X, reference(image, labels, "mean")[1], rtol=1e-12)
    np.testing.assert_allclose(table.obsm["spatial"], centroids_of(sdata, "cells", "slide"), rtol=1e-12)


def test_channel_selection_keeps_names_and_order() -> None:
    labels = blob_labels((20, 27))
    image = image_of(labels.shape)
    table = aggregate(sdata_2d(labels, image), "img", "cells", "mean", channels=["CD20", "DAPI"])
    assert list(table.var_names) == ["CD20", "DAPI"]
    np.testing.assert_allclose(table.X, reference(image[[2, 0]], labels, "mean")[1], rtol=1e-12)


# -- errors, all raised before any pixel is read ------------------------------------------------


def test_more_errors_name_the_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    sdata = sdata_2d()

    def no_reading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pixels were read before the arguments were checked")

    monkeypatch.setattr(adapter, "compute_table", no_reading)
    cases = [  # more in tests/test_bad_input.py
        ({"stats": ["count"]}, r"'count' is always in obs\['area'\]"),
        ({"stats": ["mean", "center_of_mass"]}, r"'center_of_mass' is always in obsm\['spatial'\]"),
        ({"table_name": "bad/name"}, "'table_name' 'bad/name' is not a valid element name"),
        ({"table_name": "img"}, "already the name of one of the images"),
        ({"write": True}, "'write=True' needs a 'table_name'"),
        ({"write": True, "table_name": "t"}, "needs 'sdata' backed by a zarr store"),
        ({"region_key": "id", "instance_key": "id"}, "'region_key' and 'instance_key' must differ"),
        (
            {"instance_key": "area"},
            r"and from 'area' \(the column of pixel counts\); got 'region' and 'area'",
        ),
    ]
    for overrides, message in cases:
        kwargs: dict[str, Any] = {"image": "img", "labels": "cells", "stats": ("mean",), **overrides}
        with pytest.raises(ValueError, match=message):
            adapter.aggregate(sdata, **kwargs)


# -- zarr stores ----------------------------------------------------------------------------


def test_zarr_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "data.zarr"
    sdata_2d(scale_factors=[2], chunks=(1, 8, 8)).write(path)
    sdata = spatialdata.read_zarr(path)
    table = aggregate(sdata, "img", "cells", ["mean", "var"], table_name="stats", write=True)
    assert sdata.tables["stats"] is table

    back = spatialdata.read_zarr(path)
    stored = back.tables["stats"]
    TableModel().validate(stored)
    np.testing.assert_array_equal(stored.X, table.X)
    np.testing.assert_array_equal(stored.layers["var"], table.layers["var"])
    np.testing.assert_array_equal(stored.obsm["spatial"], table.obsm["spatial"])
    np.testing.assert_array_equal(stored.obs["instance_id"], table.obs["instance_id"])
    assert list(stored.var_names) == CHANNELS
    assert stored.uns["spatialdata_attrs"]["region"] == "cells"
    assert not [p for p in tmp_path.iterdir() if p.name != "data.zarr"], "staging left beside the store"

    before = tree_hash(path)
    with pytest.raises(ValueError, match="table 'stats' already exists"):
        aggregate(spatialdata.read_zarr(path), "img", "cells", "max", table_name="stats", write=True)
    assert tree_hash(path) == before

    aggregate(back, "img", "cells", "max", table_name="stats", write=True, overwrite=True)
    replaced = spatialdata.read_zarr(path).tables["stats"]
    assert replaced.uns["rasteragg"]["stats"] == ["max"]
    assert "var" not in replaced.layers


def test_dask_elements_give_dask_x_and_layers_written_in_one_computation(tmp_path: Path) -> None:
    """X and layers stay dask arrays (computed where the partials are); writing computes them
    together, once, on dask's active scheduler (not on anndata's own threads, one array at a time)."""
    import dask
    import dask.array as da
    from dask.callbacks import Callback

    labels = blob_labels((20, 27))
    image = image_of(labels.shape)
    path = tmp_path / "data.zarr"
    sdata_2d(labels, image).write(path)
    sdata = spatialdata.read_zarr(path)
    table = aggregate(sdata, "img", "cells", ["mean", "var", "max"])
    assert isinstance(table.X, da.Array)
    assert all(isinstance(table.layers[name], da.Array) for name in ("var", "max"))
    assert isinstance(table.obsm["spatial"], np.ndarray)
    np.testing.assert_allclose(dask.compute(table.X)[0], reference(image, labels, "mean")[1], rtol=1e-12)

    computations: list[None] = []
    with Callback(start=lambda dsk: computations.append(None)):
        adapter.store_table(sdata, "t", table)
    assert len(computations) == 1
    stored = spatialdata.read_zarr(path).tables["t"]
    np.testing.assert_allclose(stored.layers["var"], reference(image, labels, "var")[1], rtol=1e-9)
    np.testing.assert_array_equal(stored.layers["max"], reference(image, labels, "max")[1])


@pytest.mark.parametrize("weighted", [False, True])
def test_each_piece_of_per_channel_statistics_is_finalized_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weighted: bool
) -> None:
    """The table's obs and obsm (areas, centroids) come from pieces of their own, so the
    intensity statistics are finalized once, when the table is written, and the
    intensity-weighted centroids with them (a dask array in obsm until then)."""
    import dask.array as da

    import xr_rasteragg.engine as engine

    finalized: list[tuple[str, ...]] = []
    finalize_piece = engine._finalize_piece

    def counting(block: Any, ids: Any, stats: tuple[str, ...], **kwargs: Any) -> Any:
        finalized.append(stats)
        return finalize_piece(block, ids, stats, **kwargs)

    monkeypatch.setattr(engine, "_finalize_piece", counting)
    monkeypatch.setattr(engine, "PIECE_LABELS", 4)
    labels = blob_labels((20, 27))
    image = image_of(labels.shape)
    path = tmp_path / "data.zarr"
    sdata_2d(labels, image).write(path)
    sdata = spatialdata.read_zarr(path)
    table = aggregate(sdata, "img", "cells", ["mean", "var", *(["centroid_weighted"] if weighted else [])])
    pieces = -(-table.n_obs // 4)
    obs = [("count", "center_of_mass")] * pieces
    assert sorted(finalized) == sorted(obs)
    if weighted:
        assert isinstance(table.obsm["centroid_weighted"], da.Array)
    adapter.store_table(sdata, "t", table)
    per_channel = ("mean", "var", *(["centroid_weighted"] if weighted else []))
    assert sorted(finalized) == sorted([*obs, *[per_channel] * pieces])
    stored = spatialdata.read_zarr(path).tables["t"]
    np.testing.assert_allclose(stored.layers["var"], reference(image, labels, "var")[1], rtol=1e-9)
    if weighted:  # per cell, each channel's (y, x), with scipy.ndimage
        ids = reference(image, labels, "mean")[0]
        expected = [[ndimage.center_of_mass(plane, labels, i) for plane in image] for i in ids]
        got = stored.obsm["centroid_weighted"]
        np.testing.assert_allclose(got, np.reshape(expected, got.shape), rtol=1e-12)


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_the_store_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    path = tmp_path / "data.zarr"
    sdata_2d().write(path)
    sdata = spatialdata.read_zarr(path)
    if existing:
        aggregate(sdata, "img", "cells", "mean", table_name="stats", write=True)
    before = tree_hash(path)

    def fail(store: Path) -> None:  # after the table was moved into place
        assert (store / "tables" / "stats").exists()
        raise OSError("disk full")

    monkeypatch.setattr(adapter, "_consolidate", fail)
    with pytest.raises(OSError, match="disk full"):
        aggregate(sdata, "img", "cells", ["max", "var"], table_name="stats", write=True, overwrite=True)
    assert tree_hash(path) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data.zarr"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ("stats" in spatialdata.read_zarr(path).tables) == existing


def test_importing_the_package_does_not_import_spatialdata() -> None:
    code = (
        "import sys, xr_rasteragg; assert 'spatialdata' not in sys.modules and 'anndata' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shape_features_go_to_obs_and_obsm() -> None:
    from skimage.measure import regionprops_table

    labels = blob_labels((20, 27))
    sdata = sdata_2d(labels, image_of(labels.shape))
    table = aggregate(sdata, "img", "cells", ["mean", "eccentricity", "area", "bbox", "solidity"])
    TableModel().validate(table)
    expected = regionprops_table(labels, properties=("label", "eccentricity", "bbox", "solidity"))
    np.testing.assert_array_equal(table.obs["instance_id"], expected["label"])
    np.testing.assert_allclose(table.obs["eccentricity"], expected["eccentricity"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(table.obs["solidity"], expected["solidity"], rtol=1e-9)
    np.testing.assert_array_equal(
        table.obsm["bbox"], np.stack([expected[f"bbox-{i}"] for i in range(4)], axis=1)
    )
    assert table.uns["rasteragg"]["shape"] == ["eccentricity", "bbox", "solidity"]
    with pytest.raises(ValueError, match="at least one per-channel statistic"):
        aggregate(sdata, "img", "cells", ["eccentricity"])


def test_median_through_the_adapter_with_dask_elements() -> None:
    labels = blob_labels((20, 27))
    image = image_of(labels.shape)
    sdata = spatialdata.SpatialData(  # blocks of 7 x 9: labels cross the blocks' borders
        images={"img": Image2DModel.parse(image, dims=("c", "y", "x"), c_coords=CHANNELS, chunks=(1, 7, 9))},
        labels={"cells": Labels2DModel.parse(labels, dims=("y", "x"), chunks=(7, 9))},
    )
    table = aggregate(sdata, "img", "cells", ["mean", "median"])
    TableModel().validate(table)
    ids = np.unique(labels)[1:]
    np.testing.assert_array_equal(table.obs["instance_id"], ids)
    expected = [[np.median(plane[labels == i].astype(np.float64)) for plane in image] for i in ids]
    np.testing.assert_array_equal(np.asarray(table.layers["median"]), expected)
    np.testing.assert_allclose(np.asarray(table.X), reference(image, labels, "mean")[1], rtol=1e-12)


def test_negative_scale_gives_regionprops_of_the_flipped_labels() -> None:
    """SpatialData elements whose transformation flips x, through the accessor: shape features in
    the coordinate system's units, the direction-dependent ones those of regionprops on the labels
    as the coordinate system shows them (x reversed)."""
    from skimage.measure import regionprops_table

    labels = blob_labels((20, 27))
    sdata = sdata_2d(labels, image_of(labels.shape))
    flipped = Affine(
        np.array([[-1.0, 0, 50], [0, 2.0, 3], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y")
    )
    for name in ("img", "cells"):
        spatialdata.transformations.set_transformation(sdata[name], flipped, to_coordinate_system="slide")
    props = ("orientation", "inertia_tensor", "eccentricity", "area")
    result = sdata["img"].rasteragg.aggregate(sdata["cells"], ["mean", *props], coordinate_system="slide")
    expected = regionprops_table(labels[:, ::-1], properties=("label", *props), spacing=(2.0, 1.0))
    keep = np.isin(expected["label"], result["label"].values)
    np.testing.assert_allclose(result["orientation"], expected["orientation"][keep], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(result["area"], expected["area"][keep], rtol=1e-9)
    np.testing.assert_allclose(
        result["inertia_tensor"][:, 0, 1], expected["inertia_tensor-0-1"][keep], atol=1e-9
    )
    rotated = Affine(
        np.array([[0.0, 1, 0], [1.0, 0, 0], [0, 0, 1]]), input_axes=("x", "y"), output_axes=("x", "y")
    )
    for name in ("img", "cells"):
        spatialdata.transformations.set_transformation(sdata[name], rotated, to_coordinate_system="swapped")
    with pytest.raises(ValueError, match="rotation, shear or swap of axes"):
        sdata["img"].rasteragg.aggregate(sdata["cells"], ["orientation"], coordinate_system="swapped")
