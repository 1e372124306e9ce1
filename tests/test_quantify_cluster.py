"""The readers of images on disk in other processes: ``rasteragg quantify --scheduler``.

- every reader that :mod:`xr_rasteragg.io` builds (tifffile's segment decoder, tifffile's zarr
  interface, zarr arrays) pickles, and a copy reads what the original reads, from a file it opens
  again by path;
- dask's graph holds the reader once (not one copy per task), and a worker opens a file once for
  all the tiles it reads;
- a file that changed between planning and reading is an error naming the file, not other pixels;
- ``rasteragg quantify --scheduler`` on a cluster of worker processes writes the tables that it
  writes without one, byte for byte, for TIFF and zarr inputs.

The cluster (2 worker processes × 1 thread) is shared by the module's tests.
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import dask
import numpy as np
import pytest
import tifffile
import zarr

import xr_rasteragg.io
import xr_rasteragg.tiff_files
from xr_rasteragg.cli import main
from xr_rasteragg.synthetic import make_cells
from xr_rasteragg.tiff_files import FileChangedError, TiffZarr
from xr_rasteragg.tiff_pages import TiffPages

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# The workers are separate processes: send this module's functions by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPE = (150, 130)
MARKERS = ["DNA", "CD3", "CD8"]
#: Readers of each layout: (how it is written, the class that reads it).
LAYOUTS: dict[str, tuple[dict[str, Any], type]] = {
    "tiled": ({"tile": (32, 32)}, TiffPages),
    "striped": ({"rowsperstrip": 24, "compression": "zlib"}, TiffPages),
    "rgb": ({"photometric": "rgb"}, TiffZarr),  # samples of a pixel together: tifffile's zarr
    "volume tiles": ({"tile": (1, 32, 32), "volumetric": True}, TiffZarr),
}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    cells, image = make_cells(SHAPE, n_channels=len(MARKERS), cell_diameter=20, seed=5)
    return cells, image.astype(np.uint8)  # uint8: RGB pages


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=40
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def _write(path: Path, image: np.ndarray, layout: str) -> None:
    options = dict(LAYOUTS[layout][0])
    if options.get("photometric") == "rgb":
        tifffile.imwrite(path, np.moveaxis(image, 0, -1), **options)
    else:
        tifffile.imwrite(path, image, photometric="minisblack", **options)


def _reader(array: Any) -> Any:
    """The one thing in ``array``'s graph that reads the file."""
    readers = (TiffPages, TiffZarr, xr_rasteragg.io._Stored)
    (reader,) = [v for v in dict(array.data.dask).values() if isinstance(v, readers)]
    return reader


def _touch(path: Path) -> None:
    """Make ``path`` a second newer than it is."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


# -- readers pickle ------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiff_readers_pickle(tmp_path: Path, data: tuple[np.ndarray, ...], layout: str) -> None:
    image = data[1]
    _write(tmp_path / "image.tif", image, layout)
    pixels = xr_rasteragg.io.read_image(tmp_path / "image.tif")
    reader = _reader(pixels)
    assert type(reader) is LAYOUTS[layout][1]
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.source._file is None  # opened on its first read, not when unpickled
    assert copy.__dask_tokenize__() == reader.__dask_tokenize__()
    key = (slice(None),) * (reader.ndim - 2) + (slice(5, 120), slice(7, 101))
    np.testing.assert_array_equal(copy[key], reader[key])
    assert copy.source._file is reader.source._file  # the file this process has open
    # the whole array, pickled as the distributed scheduler sends it
    again = cloudpickle.loads(cloudpickle.dumps(pixels.data))
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(again.compute(), image.reshape(pixels.shape))  # (c, z, y, x): 3-D


def test_ome_tiff_stack_pickles(tmp_path: Path) -> None:
    stack = np.random.default_rng(2).integers(0, 2**16, (2, 3, 40, 50), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "stack.ome.tif", stack, tile=(16, 16), metadata={"axes": "ZCYX"})
    pixels = xr_rasteragg.io.read_image(tmp_path / "stack.ome.tif")
    assert pixels.dims == ("c", "z", "y", "x")
    assert isinstance(_reader(pixels), TiffPages)
    again = cloudpickle.loads(cloudpickle.dumps(pixels.data))
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(again.compute(), stack.transpose(1, 0, 2, 3))


def _multi_file_ome(folder: Path, image: np.ndarray) -> list[Path]:
    """A multi-file OME-TIFF: one channel per file, the OME-XML in each naming all the files."""
    names = [f"channel{c}.ome.tif" for c in range(len(image))]
    uuids = [uuid.uuid4().urn for _ in names]
    planes = "".join(
        f'<TiffData FirstC="{c}" IFD="0" PlaneCount="1"><UUID FileName="{name}">{uuids[c]}</UUID></TiffData>'
        for c, name in enumerate(names)
    )
    channels = "".join(
        f'<Channel ID="Channel:0:{c}" Name="{m}" SamplesPerPixel="1"/>' for c, m in enumerate(MARKERS)
    )
    for c, name in enumerate(names):
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            f'<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" UUID="{uuids[c]}">'
            '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
            f'Type="{image.dtype}" SizeX="{image.shape[2]}" SizeY="{image.shape[1]}" SizeC="{len(image)}" '
            f'SizeZ="1" SizeT="1">{channels}{planes}</Pixels></Image></OME>'
        )
        tifffile.imwrite(folder / name, image[c], description=xml, tile=(32, 32), metadata=None)
    return [folder / name for name in names]


def test_multi_file_ome_tiff_pickles(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    image = data[1]
    paths = _multi_file_ome(tmp_path, image)
    pixels = xr_rasteragg.io.read_image(paths[0])
    assert list(pixels.c.values) == MARKERS
    reader = _reader(pixels)
    assert isinstance(reader, TiffZarr)  # pages in other files: tifffile's zarr interface
    assert [version[0] for version in reader.source.versions] == [str(p) for p in paths]
    again = cloudpickle.loads(cloudpickle.dumps(pixels.data))
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(again.compute(), image)
        _touch(paths[2])  # another file of the series than the one opened
        with pytest.raises(FileChangedError, match=f"TIFF file '{paths[2]}' changed"):
            again.compute()


def test_series_in_other_files_is_an_error(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    paths = _multi_file_ome(tmp_path, data[1])
    pickled = cloudpickle.dumps(xr_rasteragg.io.read_image(paths[0]).data)
    gc.collect()  # the file closed: a copy opens it again
    # The OME-XML of the first file names another file for a channel; its size and time as before.
    stat = paths[0].stat()
    content = paths[0].read_bytes()
    paths[0].write_bytes(content.replace(b'FileName="channel1', b'FileName="channel7'))
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(FileChangedError, match="its series is in other files now"):
        cloudpickle.loads(pickled).compute(scheduler="threads")


def _ome_zarr(path: Path, image: np.ndarray) -> None:
    """``image`` (c, y, x) as an OME-Zarr image (t, c, z, y, x, with channel labels)."""
    group = zarr.open_group(path, mode="w")
    group.create_array("0", data=image[None, :, None], chunks=(1, 1, 1, 64, 64))
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{"axes": [{"name": n} for n in "tczyx"], "datasets": [{"path": "0"}]}],
        "omero": {"channels": [{"label": m} for m in MARKERS]},
    }


def test_zarr_readers_pickle(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    cells, image = data
    zarr.create_array(tmp_path / "image.zarr", data=image, chunks=(1, 64, 64))
    _ome_zarr(tmp_path / "image.ome.zarr", image)
    zarr.create_array(tmp_path / "cells.zarr", data=cells, chunks=(64, 64))
    for array, expected in (
        (xr_rasteragg.io.read_image(tmp_path / "image.zarr"), image),
        (xr_rasteragg.io.read_image(tmp_path / "image.ome.zarr"), image),
        (xr_rasteragg.io.read_labels(tmp_path / "cells.zarr"), cells),
    ):
        copy = pickle.loads(pickle.dumps(_reader(array)))
        np.testing.assert_array_equal(copy[(slice(None),) * copy.ndim].reshape(expected.shape), expected)
        with dask.config.set(scheduler="threads"):
            np.testing.assert_array_equal(
                cloudpickle.loads(cloudpickle.dumps(array.data)).compute(), expected
            )


def test_graph_holds_the_reader_once(tmp_path: Path, data: tuple[np.ndarray, ...]) -> None:
    _write(tmp_path / "image.tif", data[1], "tiled")
    pixels = xr_rasteragg.io.read_image(tmp_path / "image.tif")
    graph = dict(pixels.data.dask)
    assert len(graph) > 3  # one task per block, and the reader
    holding = [key for key, value in graph.items() if b"TiffPages" in cloudpickle.dumps(value)]
    assert len(holding) == 1


def test_copies_in_a_process_open_the_file_once(
    tmp_path: Path, data: tuple[np.ndarray, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "image.tif", data[1], "tiled")
    reader = _reader(xr_rasteragg.io.read_image(tmp_path / "image.tif"))
    pickled = pickle.dumps(reader)
    handle = reader.source.open().parent.filehandle
    del reader
    gc.collect()
    assert handle.closed  # closed with the array
    opened: list[str] = []
    real_open = xr_rasteragg.tiff_files._open
    monkeypatch.setattr(xr_rasteragg.tiff_files, "_open", lambda path: opened.append(path) or real_open(path))
    copies = [pickle.loads(pickled) for _ in range(2)]
    for copy in copies:
        for y in range(0, SHAPE[0], 32):
            np.testing.assert_array_equal(copy[:, y : y + 32, 10:50], data[1][:, y : y + 32, 10:50])
    assert opened == [str(tmp_path / "image.tif")]  # once for both copies and all their reads
    handle = copies[0].source.open().parent.filehandle
    del copies, copy
    gc.collect()
    assert not handle.closed  # kept for the next copy (a worker's next task)
    np.testing.assert_array_equal(pickle.loads(pickled)[1], data[1][1])
    assert len(opened) == 1
    xr_rasteragg.tiff_files._RECENT.clear()  # as when KEPT_OPEN other files were opened since
    gc.collect()
    assert handle.closed


# -- a changed file is an error ------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tiled", "rgb"])
def test_changed_file_is_an_error(tmp_path: Path, data: tuple[np.ndarray, ...], layout: str) -> None:
    image = data[1]
    path = tmp_path / "image.tif"
    _write(path, image, layout)
    pixels = xr_rasteragg.io.read_image(path)
    copy = cloudpickle.loads(cloudpickle.dumps(pixels.data))
    _write(path, image[:, ::-1], layout)  # the same size
    _touch(path)  # a coarse clock notwithstanding
    with dask.config.set(scheduler="threads"):
        for array in (pixels.data, copy):
            with pytest.raises(FileChangedError, match=f"TIFF file '{path}' changed since it was opened"):
                array.compute()
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"TIFF file '{path}' is not there"):
        cloudpickle.loads(cloudpickle.dumps(pixels.data)).compute(scheduler="threads")


# -- on a cluster --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, data: tuple[np.ndarray, ...]) -> dict[str, Path]:
    """Folders of inputs to ``rasteragg quantify``: an image and two masks, as TIFF and zarr."""
    cells, image = data
    nuclei = np.where(np.random.default_rng(1).random(SHAPE) < 0.6, cells, 0)
    folders = {}
    for kind in ("tiff", "rgb", "multi-file", "zarr"):
        folder = tmp_path_factory.mktemp(kind)
        (folder / "markers.csv").write_text("marker_name\n" + "\n".join(MARKERS) + "\n")
        if kind == "zarr":
            _ome_zarr(folder / "image.zarr", image)
            zarr.create_array(folder / "cells.zarr", data=cells, chunks=(64, 64))
            zarr.create_array(folder / "nuclei.zarr", data=nuclei, chunks=(32, 64))
        else:
            if kind == "multi-file":
                # a link to the first file, so that the tables are named as the others
                (folder / "image.tif").symlink_to(_multi_file_ome(folder, image)[0])
            else:
                _write(folder / "image.tif", image, "tiled" if kind == "tiff" else "rgb")
            tifffile.imwrite(folder / "cells.tif", cells, tile=(32, 32))
            tifffile.imwrite(folder / "nuclei.tif", nuclei, rowsperstrip=16)
        folders[kind] = folder
    return folders


def _quantify(folder: Path, output: str, *extra: str) -> list[Path]:
    suffix = ".zarr" if (folder / "image.zarr").exists() else ".tif"
    code = main(
        [
            "quantify",
            "--masks",
            str(folder / f"cells{suffix}"),
            str(folder / f"nuclei{suffix}"),
            "--image",
            str(folder / f"image{suffix}"),
            "--channel_names",
            str(folder / "markers.csv"),
            "--intensity_props",
            "intensity_median",
            "--output",
            str(folder / output),
            "--no-progress",
            *extra,
        ]
    )
    assert code == 0
    return sorted((folder / output).iterdir())


def _count_opens() -> None:
    """On a worker: record every TIFF file that the readers open."""
    import xr_rasteragg.tiff_files as files

    opened: list[str] = []
    original = files._open

    def counting(path: str) -> Any:
        opened.append(path)
        return original(path)

    files._open = counting  # type: ignore[assignment]
    files.opened = opened  # type: ignore[attr-defined]


def _opens() -> list[str]:
    import xr_rasteragg.tiff_files as files

    return list(files.opened)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["tiff", "rgb", "multi-file", "zarr"])
def test_quantify_on_a_cluster(
    client: Any, inputs: dict[str, Path], kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(xr_rasteragg.io, "BLOCK_SIDE", 64)  # several blocks a side
    folder = inputs[kind]
    with dask.config.set(scheduler="threads"):  # not the module's client
        alone = _quantify(folder, "threads")
    client.run(_count_opens)
    opened: list[str] = []
    monkeypatch.setattr(xr_rasteragg.tiff_files, "_open", lambda path: opened.append(path))
    together = _quantify(folder, "cluster", "--scheduler", client.cluster.scheduler_address)
    assert opened == []  # this process read nothing
    assert [p.name for p in together] == [p.name for p in alone]
    assert [p.name for p in alone] == ["image_cells.csv", "image_nuclei.csv"]
    for ours, theirs in zip(together, alone, strict=True):
        assert ours.read_bytes() == theirs.read_bytes()
    # every worker opened each file at most once, and the workers read every TIFF
    per_worker = client.run(_opens)
    for paths in per_worker.values():
        assert len(paths) == len(set(paths))
    files = {os.path.realpath(p) for p in folder.glob("*.tif") if "channel" not in p.name}
    assert {p for paths in per_worker.values() for p in paths} == files
