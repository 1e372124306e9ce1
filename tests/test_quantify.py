"""``rasteragg quantify``, the MCQuant drop-in: tables, inputs, errors, writes, one read of the image.

The reference is MCQuant's own computation, reimplemented here as its code does it: scikit-image
``regionprops_table`` once per channel per mask on the whole image in memory, the mask properties
from one more call per mask, the columns renamed and ordered as MCQuant orders them.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
import xarray as xr
import zarr

import xr_rasteragg.io
from xr_rasteragg import quantify as mcquant
from xr_rasteragg.cli import main
from xr_rasteragg.engine import aggregate_masks
from xr_rasteragg.synthetic import make_cells

measure = pytest.importorskip("skimage.measure")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

MARKERS = ["DNA", "CD3", "CD8", "DNA"]
UNIQUE = ["DNA_1", "CD3", "CD8", "DNA_2"]  # MCQuant suffixes every occurrence of a repeated name
SHAPE = (150, 130)
#: MCQuant's default mask columns, from regionprops' names.
MASK_NAMES = {
    "X_centroid": "centroid-1",
    "Y_centroid": "centroid-0",
    "Area": "area",
    "MajorAxisLength": "major_axis_length",
    "MinorAxisLength": "minor_axis_length",
    "Eccentricity": "eccentricity",
    "Solidity": "solidity",
    "Extent": "extent",
    "Orientation": "orientation",
}
#: MCQuant's own extra intensity properties, as its module defines them.
EXTRAS = {
    "intensity_median": lambda mask, intensity: np.median(intensity[mask]),
    "intensity_sum": lambda mask, intensity: np.sum(intensity[mask]),
}


def mcquant_table(mask: np.ndarray, image: np.ndarray, markers: list[str], props: list[str]) -> pd.DataFrame:
    """MCQuant's table: regionprops per channel per mask, then its column names and order (the
    further properties in the order given, where MCQuant iterates a set)."""
    builtin = [p for p in ["intensity_mean", *props] if p not in EXTRAS]
    extras = [p for p in props if p in EXTRAS]
    per_channel = []
    for c in range(image.shape[0]):
        functions = []
        for name in extras:
            function = EXTRAS[name]
            function.__name__ = name  # type: ignore[attr-defined]
            functions.append(function)
        per_channel.append(
            measure.regionprops_table(mask, image[c], properties=builtin, extra_properties=functions)
        )
    columns: dict[str, Any] = {}
    ids = measure.regionprops_table(
        mask, properties=("label", "centroid", *(p for p in MASK_NAMES.values() if "-" not in p))
    )
    columns["CellID"] = ids["label"]
    columns.update(zip(markers, [t["intensity_mean"] for t in per_channel], strict=True))
    for prop in props:
        columns.update(zip([f"{m}_{prop}" for m in markers], [t[prop] for t in per_channel], strict=True))
    columns.update({new: ids[old] for new, old in MASK_NAMES.items()})
    return pd.DataFrame(columns)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cells, image = make_cells(SHAPE, n_channels=len(MARKERS), cell_diameter=20, seed=4)
    rng = np.random.default_rng(1)
    nuclei = np.where(rng.random(SHAPE) < 0.6, cells, 0)  # scattered pixels: labels split in pieces
    return cells, nuclei, image


@pytest.fixture
def files(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A tiled OME-TIFF, two masks and a markers file in ``tmp_path``, read in blocks of 64 px."""
    monkeypatch.setattr(xr_rasteragg.io, "BLOCK_SIDE", 64)
    cells, nuclei, image = data
    tifffile.imwrite(
        tmp_path / "exemplar.ome.tif",
        image,
        tile=(32, 32),
        metadata={"axes": "CYX", "Channel": {"Name": MARKERS}},
    )
    tifffile.imwrite(tmp_path / "cellMask.tif", cells, tile=(32, 32))
    tifffile.imwrite(tmp_path / "nucleiMask.ome.tif", nuclei)
    (tmp_path / "markers.csv").write_text(
        "cycle,marker_name,exposure\n" + "".join(f"1,{m},100\n" for m in MARKERS)
    )
    return tmp_path


def _run(folder: Path, *extra: str, masks: tuple[str, ...] = ("cellMask.tif", "nucleiMask.ome.tif")) -> int:
    return main(
        [
            "quantify",
            "--masks",
            *(str(folder / m) for m in masks),
            "--image",
            str(folder / "exemplar.ome.tif"),
            "--output",
            str(folder / "out"),
            "--no-progress",
            *extra,
        ]
    )


def _check_table(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Our table is MCQuant's, column for column."""
    assert list(got.columns) == list(expected.columns)
    np.testing.assert_array_equal(got["CellID"], expected["CellID"])
    for column in got.columns[1:]:
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-9, atol=1e-12, err_msg=column)


# -- tables --------------------------------------------------------------------------------------


def test_tables_match_mcquant(
    files: Path, data: tuple[np.ndarray, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    cells, nuclei, image = data
    props = ["intensity_max", "intensity_min", "intensity_sum", "intensity_std", "intensity_median"]
    assert _run(files, "--channel_names", str(files / "markers.csv"), "--intensity_props", *props) == 0
    assert "wrote" in capsys.readouterr().out
    out = files / "out"
    assert sorted(p.name for p in out.iterdir()) == ["exemplar_cellMask.csv", "exemplar_nucleiMask.csv"]
    _check_table(pd.read_csv(out / "exemplar_cellMask.csv"), mcquant_table(cells, image, UNIQUE, props))
    _check_table(pd.read_csv(out / "exemplar_nucleiMask.csv"), mcquant_table(nuclei, image, UNIQUE, props))


def test_channel_names_from_ome_metadata(files: Path, data: tuple[np.ndarray, ...]) -> None:
    cells, _, image = data
    assert _run(files, masks=("cellMask.tif",)) == 0
    table = pd.read_csv(files / "out" / "exemplar_cellMask.csv")
    _check_table(table, mcquant_table(cells, image, UNIQUE, []))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("marker_name\nDNA\nCD3\nCD8\nCD20\n", ["DNA", "CD3", "CD8", "CD20"]),
        ("DNA\nCD3\nCD8\nCD20\n", ["DNA", "CD3", "CD8", "CD20"]),  # one name a line, no header
        (
            "channel_number,cycle_number,marker_name\n1,1,DNA\n2,1,CD3\n3,2,DNA\n4,2,DNA\n",
            ["DNA_1", "CD3", "DNA_2", "DNA_3"],
        ),
        ("DNA\nDNA\nCD3\nCD3\n", ["DNA_1", "DNA_2", "CD3_1", "CD3_2"]),
    ],
)
def test_markers_files(tmp_path: Path, content: str, expected: list[str]) -> None:
    path = tmp_path / "markers.csv"
    path.write_text(content)
    assert mcquant.read_markers(path) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("cycle,name\n1,DNA\n", "must have a 'marker_name' column"),
        ("", "is not a markers file"),
        ("marker_name,cycle\nDNA,1\n,2\n", "empty marker names"),
        ("DNA\nDNA\nDNA_2\n", "twice once repeated names are suffixed"),
    ],
)
def test_bad_markers_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "markers.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        mcquant.read_markers(path)


def test_names_as_mcquant_takes_them(tmp_path: Path) -> None:
    assert mcquant.mask_name("seg/cellMask.ome.tif") == "cellMask"
    image = tmp_path / "a.b.ome.tif"
    tifffile.imwrite(image, np.zeros((2, 8, 8), np.uint16))
    assert xr_rasteragg.io.read_image(image).name == "a.b"


# -- inputs --------------------------------------------------------------------------------------


def _zarr_inputs(folder: Path, data: tuple[np.ndarray, ...]) -> tuple[Path, Path, Path]:
    """The image as an OME-Zarr (t, c, z, y, x, with channel labels), the masks as zarr arrays."""
    cells, nuclei, image = data
    group = zarr.open_group(folder / "exemplar.ome.zarr", mode="w")
    group.create_array("0", data=image[None, :, None], chunks=(1, 1, 1, 64, 64))
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": [{"name": n} for n in "tczyx"], "datasets": [{"path": "0"}]}],
        "omero": {"channels": [{"label": m} for m in MARKERS]},
    }
    zarr.create_array(folder / "cells.zarr", data=cells, chunks=(50, 50))
    zarr.create_array(folder / "nuclei.zarr", data=nuclei, chunks=(64, 64))
    return folder / "exemplar.ome.zarr", folder / "cells.zarr", folder / "nuclei.zarr"


def test_zarr_inputs(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    cells, nuclei, image = data
    image_path, cells_path, nuclei_path = _zarr_inputs(tmp_path, data)
    written = mcquant.quantify([cells_path, nuclei_path], image_path, tmp_path / "out")
    assert [p.name for p in written] == ["exemplar_cells.csv", "exemplar_nuclei.csv"]
    _check_table(pd.read_csv(written[0]), mcquant_table(cells, image, UNIQUE, []))
    _check_table(pd.read_csv(written[1]), mcquant_table(nuclei, image, UNIQUE, []))


def test_pyramidal_bigtiff_and_plain_stack(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    cells, _, image = data
    with tifffile.TiffWriter(tmp_path / "pyramid.ome.tif", bigtiff=True) as tif:
        tif.write(image, subifds=1, tile=(32, 32), metadata={"axes": "CYX", "Channel": {"Name": UNIQUE}})
        tif.write(image[:, ::2, ::2], subfiletype=1, tile=(32, 32))
    # No OME metadata: plain (c, y, x) stacks, as planes of one page and as pages.
    tifffile.imwrite(tmp_path / "planes.tif", image, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "pages.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "cells.tif", cells)
    (tmp_path / "markers.txt").write_text("\n".join(MARKERS))
    expected = mcquant_table(cells, image, UNIQUE, [])
    for name, markers in (
        ("pyramid.ome.tif", None),
        ("planes.tif", tmp_path / "markers.txt"),
        ("pages.tif", tmp_path / "markers.txt"),
    ):
        (written,) = mcquant.quantify(
            [tmp_path / "cells.tif"], tmp_path / name, tmp_path / f"out-{name}", channel_names=markers
        )
        _check_table(pd.read_csv(written), expected)
    pixels = xr_rasteragg.io.read_image(tmp_path / "pyramid.ome.tif")
    assert pixels.shape == image.shape  # the full-resolution level


# -- one read of the image ------------------------------------------------------------------------


class CountingArray:
    """An array that records every read of its blocks (dask's getter reads through it)."""

    def __init__(self, array: Any) -> None:
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, len(array.shape)
        self.reads: list[tuple[slice, ...]] = []

    def __getitem__(self, key: tuple[slice, ...]) -> Any:
        if all(s.stop > s.start for s in key):  # not dask's empty read of the dtype
            self.reads.append(key)
        return self.array[key]

    def __dask_tokenize__(self) -> Any:  # dask's array query planning tokenizes what it reads
        return ("counting-array", id(self))


@pytest.mark.parametrize("stats", [("mean", "count"), ("mean", "count", "median")])
def test_engine_reads_image_once_for_all_masks(data: tuple[np.ndarray, ...], stats: tuple[str, ...]) -> None:
    cells, nuclei, image = data
    source = CountingArray(image[:, None])
    pixels = da.from_array(source, chunks=(1, 1, 64, 64))
    masks = {
        "cell": (da.from_array(cells[None], chunks=(1, 64, 64)), pixels),
        "nucleus": (da.from_array(nuclei[None], chunks=(1, 50, 50)), pixels),  # rechunked to the image's
    }
    results = aggregate_masks(masks, stats, background=0)
    (values,) = dask.compute({name: result.values for name, result in results.items()})
    blocks = int(np.prod(pixels.numblocks))
    assert len(source.reads) == blocks
    assert len(set(map(str, source.reads))) == blocks
    for name, mask in (("cell", cells), ("nucleus", nuclei)):
        ids = np.unique(mask[mask > 0])
        np.testing.assert_array_equal(results[name].labels, ids)
        np.testing.assert_array_equal(values[name]["count"], [np.count_nonzero(mask == i) for i in ids])
        if "median" in stats:  # the whole-label gather, also one read of the image for all masks
            expected = [[np.median(image[c][mask == i]) for c in range(image.shape[0])] for i in ids]
            np.testing.assert_array_equal(values[name]["median"], expected)


def test_accessor_reads_image_once_for_all_masks(data: tuple[np.ndarray, ...]) -> None:
    cells, nuclei, image = data
    source = CountingArray(image)
    pixels = xr.DataArray(da.from_array(source, chunks=(1, 64, 64)), dims=("c", "y", "x"))
    masks = {"cell": xr.DataArray(cells, dims=("y", "x")), "nucleus": xr.DataArray(nuclei, dims=("y", "x"))}
    tables = pixels.rasteragg.aggregate_masks(masks, ["mean", "max"])
    (tables,) = dask.compute(tables)
    assert len(source.reads) == int(np.prod(pixels.data.numblocks))
    for name, mask in masks.items():
        alone = xr.DataArray(image, dims=("c", "y", "x")).rasteragg.aggregate(mask, ["mean", "max"])
        xr.testing.assert_allclose(tables[name], alone, rtol=1e-12)


def test_command_reads_image_once(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[CountingArray] = []
    real_lazy = xr_rasteragg.io._lazy

    def counting_lazy(array: Any, dims: Any) -> da.Array:
        chunks = real_lazy(array, dims).chunks
        reads.append(CountingArray(array))
        return da.from_array(reads[-1], chunks=chunks)

    monkeypatch.setattr(xr_rasteragg.io, "_lazy", counting_lazy)
    assert _run(files) == 0
    image_reads = reads[0].reads  # the image is opened first
    assert len(image_reads) == len(MARKERS) * 3 * 3  # 150 x 130 px in blocks of 64 px, one read each
    assert len(set(map(str, image_reads))) == len(image_reads)


# -- errors before any pixel is read ------------------------------------------------------------


class NoCompute(dask.callbacks.Callback):
    """Fails the test if dask computes anything."""

    def _start(self, dsk: Any) -> None:
        raise AssertionError("dask computed something before the error")


def _bad_inputs(files: Path, data: tuple[np.ndarray, ...]) -> dict[str, tuple[list[str], str]]:
    cells = data[0]
    tifffile.imwrite(files / "small.tif", cells[:-1])
    tifffile.imwrite(files / "float.tif", cells.astype(np.float32))
    zarr.create_array(files / "stack.zarr", data=np.stack([cells, cells]))
    (files / "notes.tif").write_text("not an image")
    (files / "three.csv").write_text("marker_name\nA\nB\nC\n")
    (files / "out").mkdir()
    (files / "out" / "exemplar_cellMask.csv").write_text("an earlier table")
    return {
        "shape mismatch": (["--masks", str(files / "small.tif")], "--masks .*small.tif' has shape"),
        "3-D mask, 2-D image": (["--masks", str(files / "stack.zarr")], "--masks .*is 3-D .* but --image"),
        "float mask": (["--masks", str(files / "float.tif")], "--masks .*must hold integer label ids"),
        "marker count": (
            ["--channel_names", str(files / "three.csv")],
            "names 3 markers but --image .* has 4",
        ),
        "not an image": (["--image", str(files / "notes.tif")], "--image .*notes.tif' is not a TIFF image"),
        "missing mask": (["--masks", str(files / "gone.tif")], "--masks .*gone.tif' does not exist"),
        "missing markers": (["--channel_names", str(files / "gone.csv")], "--channel_names .*does not exist"),
        "output exists": (["--masks", str(files / "cellMask.tif")], "--output already holds"),
        "unknown property": (["--intensity_props", "intensity_mode"], "--intensity_props holds unknown"),
        "unavailable property": (["--intensity_props", "gini_index"], "not available yet"),
        "repeated mask names": (
            ["--masks", str(files / "nucleiMask.ome.tif"), str(files / "out" / "nucleiMask.tif")],
            "--masks must have distinct names",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "shape mismatch",
        "3-D mask, 2-D image",
        "float mask",
        "marker count",
        "not an image",
        "missing mask",
        "missing markers",
        "output exists",
        "unknown property",
        "unavailable property",
        "repeated mask names",
    ],
)
def test_errors_before_any_pixel_is_read(
    files: Path, data: tuple[np.ndarray, ...], case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments, message = _bad_inputs(files, data)[case]
    defaults = {
        "--masks": [str(files / "nucleiMask.ome.tif")],
        "--image": [str(files / "exemplar.ome.tif")],
        "--channel_names": [str(files / "markers.csv")],
        "--output": [str(files / "out")],
    }
    given = {arguments[0]: arguments[1:]}
    command = ["quantify", "--no-progress"]
    for option, values in {**defaults, **given}.items():
        command += [option, *values]
    before = sorted((files / "out").iterdir())
    with NoCompute():
        assert main(command) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert sorted((files / "out").iterdir()) == before
    assert (files / "out" / "exemplar_cellMask.csv").read_text() == "an earlier table"


def test_three_d_image_and_two_d_mask(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    cells, _, image = data
    zarr.create_array(tmp_path / "volume.zarr", data=np.stack([image, image], axis=1))  # (c, z, y, x)
    tifffile.imwrite(tmp_path / "cells.tif", cells)
    with (
        NoCompute(),
        pytest.raises(ValueError, match=r"'masks' .* is 2-D \('y', 'x'\) but 'image' .* is 3-D"),
    ):
        mcquant.quantify(
            [tmp_path / "cells.tif"], tmp_path / "volume.zarr", tmp_path / "out", channel_names=None
        )


def test_image_without_channel_names_needs_markers(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    cells, _, image = data
    tifffile.imwrite(tmp_path / "stack.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "cells.tif", cells)
    with pytest.raises(ValueError, match="'channel_names' is needed"):
        mcquant.plan([tmp_path / "cells.tif"], tmp_path / "stack.tif", tmp_path / "out")


# -- writes ---------------------------------------------------------------------------------------


def test_overwrite(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(files) == 0
    first = (files / "out" / "exemplar_cellMask.csv").read_text()
    assert _run(files) == 1
    assert "--output already holds" in capsys.readouterr().err
    assert _run(files, "--overwrite", "--intensity_props", "intensity_max") == 0
    assert (files / "out" / "exemplar_cellMask.csv").read_text() != first


@pytest.mark.parametrize("failing", ["pass", "second table"])
def test_failure_writes_nothing(files: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    assert _run(files) == 0
    out = files / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    if failing == "pass":
        monkeypatch.setattr(xr_rasteragg.engine, "kernel_for", lambda block: _fail)
    else:
        real = pd.DataFrame.to_csv
        calls: list[None] = []

        def to_csv(self: pd.DataFrame, *args: Any, **kwargs: Any) -> Any:
            calls.append(None)
            if len(calls) == 2:
                raise OSError("disk full")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _run(files, "--overwrite", "--intensity_props", "intensity_max") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left either


def _fail(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a kernel failed")


def test_h5ad_format(files: Path, data: tuple[np.ndarray, ...]) -> None:
    anndata = pytest.importorskip("anndata")
    cells, _, image = data
    assert _run(files, "--format", "h5ad", "--intensity_props", "intensity_max") == 0
    table = anndata.read_h5ad(files / "out" / "exemplar_cellMask.h5ad")
    expected = mcquant_table(cells, image, UNIQUE, ["intensity_max"])
    assert list(table.var_names) == UNIQUE
    np.testing.assert_allclose(table.X, expected[UNIQUE].to_numpy(), rtol=1e-9)
    np.testing.assert_allclose(
        table.layers["intensity_max"], expected[[f"{m}_intensity_max" for m in UNIQUE]].to_numpy()
    )
    np.testing.assert_array_equal(table.obs["CellID"], expected["CellID"])
    np.testing.assert_allclose(table.obs["Area"], expected["Area"])
    np.testing.assert_allclose(table.obsm["spatial"], expected[["X_centroid", "Y_centroid"]].to_numpy())
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("cellMask", "region", "CellID")


def test_spatialdata_format(files: Path, data: tuple[np.ndarray, ...]) -> None:
    spatialdata = pytest.importorskip("spatialdata")
    _, nuclei, image = data
    assert _run(files, "--format", "spatialdata") == 0
    sdata = spatialdata.read_zarr(files / "out" / "exemplar.zarr")
    assert set(sdata.labels) == {"cellMask", "nucleiMask"}
    np.testing.assert_array_equal(sdata["nucleiMask"].values, nuclei)
    table = sdata["nucleiMask_table"]
    expected = mcquant_table(nuclei, image, UNIQUE, [])
    np.testing.assert_allclose(table.X, expected[UNIQUE].to_numpy(), rtol=1e-9)
    assert set(table.obs["region"]) == {"nucleiMask"}


def test_spatialdata_adapter_reads_image_once(data: tuple[np.ndarray, ...]) -> None:
    spatialdata = pytest.importorskip("spatialdata")
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import Translation

    from xr_rasteragg.spatialdata import aggregate, aggregate_labels

    cells, nuclei, image = data
    source = CountingArray(image)
    crop = Translation([10, 20], axes=("x", "y"))  # the nuclei cover a crop of the image
    sdata = spatialdata.SpatialData(
        images={"img": Image2DModel.parse(da.from_array(source, chunks=(1, 64, 64)), dims=("c", "y", "x"))},
        labels={
            "cells": Labels2DModel.parse(cells, dims=("y", "x"), chunks=64),
            "nuclei": Labels2DModel.parse(
                nuclei[20:, 10:], dims=("y", "x"), chunks=64, transformations={"global": crop}
            ),
        },
    )
    tables = aggregate_labels(sdata, "img", ["cells", "nuclei"], ["mean", "max"])
    assert len(source.reads) == 4 * 3 * 3  # 150 x 130 px in blocks of 64 px, one read each
    for name in ("cells", "nuclei"):
        alone = aggregate(sdata, "img", name, ["mean", "max"])
        np.testing.assert_allclose(tables[name].X, alone.X, rtol=1e-12)
        np.testing.assert_allclose(tables[name].layers["max"], alone.layers["max"])
        np.testing.assert_allclose(tables[name].obsm["spatial"], alone.obsm["spatial"])
        assert tables[name].obs.equals(alone.obs)


def test_further_mask_props(files: Path, data: tuple[np.ndarray, ...]) -> None:
    cells = data[0]
    props = ["perimeter", "bbox", "equivalent_diameter", "area"]  # area: a default column, adds none
    assert _run(files, "--mask_props", *props, masks=("cellMask.tif",)) == 0
    table = pd.read_csv(files / "out" / "exemplar_cellMask.csv")
    extra = ["perimeter", "bbox-0", "bbox-1", "bbox-2", "bbox-3", "equivalent_diameter"]
    assert list(table.columns[-len(MASK_NAMES) - len(extra) : -len(MASK_NAMES)]) == extra
    expected = measure.regionprops_table(cells, properties=("perimeter", "bbox", "equivalent_diameter"))
    for column in extra:
        np.testing.assert_allclose(table[column], expected[column], rtol=1e-9, err_msg=column)
