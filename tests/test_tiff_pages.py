"""TIFF pages read by slices through tifffile's segment decoder, against ``tifffile.imread``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")

import xr_rasteragg.io  # noqa: E402
from xr_rasteragg.tiff_files import TiffSource  # noqa: E402
from xr_rasteragg.tiff_pages import TiffPages, tiff_pages  # noqa: E402

SHAPE = (3, 70, 90)  # not a multiple of the tiles or the strips: edge segments are partial

LAYOUTS: dict[str, dict[str, Any]] = {
    "tiled": {"tile": (32, 48)},
    "tiled zlib predictor": {"tile": (16, 16), "compression": "zlib", "predictor": 2},  # horizontal
    "striped": {"rowsperstrip": 11},
    "one strip": {},
    "striped zlib": {"rowsperstrip": 8, "compression": "zlib"},
    "bigtiff": {"tile": (32, 32), "bigtiff": True},
}


def _write(path: Path, image: np.ndarray, options: dict[str, Any]) -> None:
    options = dict(options)
    bigtiff = options.pop("bigtiff", False)
    if image.dtype.kind == "f":
        options.pop("predictor", None)  # the floating-point predictor needs imagecodecs
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        tif.write(image, photometric="minisblack", **options)


@pytest.fixture(params=["uint16", "int32", "float32", "uint8"])
def image(request: pytest.FixtureRequest) -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random(SHAPE) * 1000).astype(request.param)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slices_as_tifffile_reads_them(tmp_path: Path, image: np.ndarray, layout: str) -> None:
    path = tmp_path / "image.tif"
    _write(path, image, LAYOUTS[layout])
    with tifffile.TiffFile(path) as tif:
        pages = tiff_pages(TiffSource(tif))
        assert isinstance(pages, TiffPages)
        assert pages.shape == image.shape
        assert pages.dtype == image.dtype
        keys = [
            (slice(None),),
            (1,),
            (slice(0, 2), slice(5, 69), slice(17, 90)),
            (2, slice(31, 33), slice(47, 49)),  # the corners of four tiles
            (slice(None), slice(60, 70), 89),
            (0, 3, 4),
            (slice(None, None, 2), slice(3, 60, 7), slice(None, None, -5)),
            (slice(1, 1), slice(None), slice(None)),  # empty
            (-1, slice(-20, None), slice(-3, -1)),
        ]
        for key in keys:
            np.testing.assert_array_equal(pages[key], image[key], err_msg=f"{layout} {key}")


def test_pages_of_a_stack_and_a_plane(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 2**16, (2, 3, 40, 50), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.ome.tif", stack, tile=(16, 16), metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "plane.tif", stack[0, 0])
    with tifffile.TiffFile(tmp_path / "stack.ome.tif") as tif:
        pages = tiff_pages(TiffSource(tif))
        assert pages is not None
        np.testing.assert_array_equal(pages[1, 2, 5:30, 10:45], stack[1, 2, 5:30, 10:45])
        np.testing.assert_array_equal(pages[:, :, :, :], stack)
    with tifffile.TiffFile(tmp_path / "plane.tif") as tif:
        pages = tiff_pages(TiffSource(tif))
        assert pages is not None
        np.testing.assert_array_equal(pages[3:9, :], stack[0, 0, 3:9])


def test_empty_tiles_read_as_the_fill_value(tmp_path: Path) -> None:
    path = tmp_path / "sparse.tif"
    # Tiles given as None are not written (no bytes, offset 0): they read as the fill value, 0.
    tiles = [None if i % 3 else np.full((16, 16), i + 1, np.uint16) for i in range(16)]
    tifffile.imwrite(path, iter(tiles), shape=(64, 64), dtype=np.uint16, tile=(16, 16))
    expected = tifffile.imread(path)
    with tifffile.TiffFile(path) as tif:
        assert 0 in tif.pages[0].databytecounts
        pages = tiff_pages(TiffSource(tif))
        assert pages is not None
        np.testing.assert_array_equal(pages[:, :], expected)
        np.testing.assert_array_equal(pages[10:40, 5:63], expected[10:40, 5:63])
    assert expected[0, 0] == 1
    assert expected[0, 16] == 0


def test_other_layouts_are_left_to_zarr(tmp_path: Path) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    tifffile.imwrite(
        tmp_path / "planes.tif", rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate"
    )
    tifffile.imwrite(
        tmp_path / "volume.tif",
        np.zeros((4, 32, 32), np.uint8),
        photometric="minisblack",
        tile=(2, 16, 16),
        volumetric=True,
    )
    for name in ("rgb.tif", "planes.tif", "volume.tif"):
        with tifffile.TiffFile(tmp_path / name) as tif:
            assert tiff_pages(TiffSource(tif)) is None, name


def test_reader_uses_segments_and_blocks_of_whole_tiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(xr_rasteragg.io, "BLOCK_SIDE", 64)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 2**16, (2, 150, 130), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "image.ome.tif", image, tile=(32, 32), metadata={"axes": "CYX"})
    pixels = xr_rasteragg.io.read_image(tmp_path / "image.ome.tif")
    assert pixels.data.chunks == ((1, 1), (64, 64, 22), (64, 64, 2))
    assert any(isinstance(v, TiffPages) for v in dict(pixels.data.dask).values())
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(pixels.values, image)
    # the token follows the file: a rewritten file is another array
    again = xr_rasteragg.io.read_image(tmp_path / "image.ome.tif")
    assert again.data.name == pixels.data.name
    tifffile.imwrite(tmp_path / "image.ome.tif", image[:, ::-1], tile=(32, 32), metadata={"axes": "CYX"})
    assert xr_rasteragg.io.read_image(tmp_path / "image.ome.tif").data.name != pixels.data.name


def test_bad_keys(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "plane.tif", np.zeros((8, 8), np.uint8))
    with tifffile.TiffFile(tmp_path / "plane.tif") as tif:
        pages = tiff_pages(TiffSource(tif))
        assert pages is not None
        with pytest.raises(IndexError, match="out of bounds"):
            pages[8, 0]
        with pytest.raises(IndexError, match="integers and slices"):
            pages[..., 0]
        with pytest.raises(IndexError, match="integers and slices"):
            pages[0, 0, 0]
