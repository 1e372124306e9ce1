"""Lazy readers of images and label masks on disk: OME-TIFF, TIFF and (OME-)zarr.

Every reader looks at the file's metadata only and returns an ``xarray.DataArray`` backed by a
dask array whose tasks read the file block by block when they run: TIFFs tile by tile (or strip by
strip) through tifffile's segment decoder (:mod:`xr_rasteragg.tiff_pages`) or, for layouts it
leaves out, tifffile's zarr interface (tiled, striped, pyramidal and BigTIFF files alike; the
full-resolution level of a pyramid), zarr arrays and OME-Zarr images directly. Nothing is read
into memory here, so every check (a file that is not an image, a mask of a non-integer dtype, axes
that cannot be placed) is made before any pixel is read.

The arrays compute on a ``dask.distributed`` cluster too: their readers pickle as the file's path
(and, for TIFFs, its version), and each worker opens the file again by that path (a TIFF once, see
:mod:`xr_rasteragg.tiff_files`), so the files must be readable at the same path from the workers.

Images come out with dims ``("c", [ "z",] "y", "x")`` and the channel names as the ``c``
coordinate where the file names them (OME-TIFF ``Channel@Name``, OME-Zarr ``omero`` labels);
masks with dims ``([ "z",] "y", "x")``. ``tifffile`` and ``zarr`` are imported when a reader runs
(``zarr`` only for zarr inputs and the TIFF layouts that :mod:`xr_rasteragg.tiff_pages` leaves to it).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import xarray as xr

from .tiff_files import TiffSource, TiffZarr
from .tiff_pages import tiff_pages

__all__ = ["BLOCK_SIDE", "read_image", "read_labels"]

#: Side, in pixels, of the spatial blocks that the readers aim for (a multiple of the file's own
#: tiles or chunks, so that one task reads whole tiles); one channel per block.
BLOCK_SIDE = 2048

#: Axis letters of tifffile's series that are channels (C; S, the samples of an RGB file) or space.
_TIFF_DIMS = {"C": "c", "S": "c", "Z": "z", "Y": "y", "X": "x"}
#: Axis letters that tifffile gives an unnamed leading axis of a plain TIFF (pages of a stack).
_TIFF_UNNAMED = ("I", "Q")


def read_image(path: str | Path, *, argument: str = "image") -> xr.DataArray:
    """An image on disk as a lazy ``DataArray`` with dims ``("c", ["z",] "y", "x")``.

    Parameters
    ----------
    path
        An OME-TIFF or TIFF file (``.tif``, ``.tiff``, ``.btf``; tiled or not, pyramidal or not,
        BigTIFF), or a zarr array or OME-Zarr image (a directory). A plain TIFF stack or zarr
        array of three dims is read as ``(c, y, x)`` (as MCQuant reads TIFF stacks) and of four
        as ``(c, z, y, x)``; a 2-D one as a single channel.
    argument
        How error messages name the file (an option of the command line, say).

    Returns
    -------
    xarray.DataArray
        Dask-backed, in blocks of whole tiles of about :data:`BLOCK_SIDE` pixels a side and one
        channel. The ``c`` coordinate holds the channel names when the file has them (OME
        metadata), and the channel index otherwise.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a TIFF or zarr image, or its axes are not channels, z, y and x (a time
        series, say).
    TypeError
        If its dtype is not a real number.
    """
    array, dims, names = _open(Path(path), argument, labels=False)
    if "c" not in dims:
        array, dims = array[None], ("c", *dims)
    order = [d for d in ("c", "z", "y", "x") if d in dims]
    array = _in_order(array, dims, order)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"'{argument}' {str(path)!r} must hold real numbers; got dtype {array.dtype}")
    channels: Sequence[Any] = range(array.shape[0])
    if names is not None and len(names) == array.shape[0]:
        channels = names
    return xr.DataArray(array, dims=order, coords={"c": list(channels)}, name=_stem(Path(path)))


def read_labels(path: str | Path, *, argument: str = "labels") -> xr.DataArray:
    """A label mask on disk as a lazy ``DataArray`` with dims ``(["z",] "y", "x")``.

    Parameters
    ----------
    path
        A TIFF file or a zarr array or OME-Zarr labels image, of an integer dtype. Axes of size
        1 other than y and x (a channel axis of one channel, say) are dropped; a plain 3-D stack
        is read as ``(z, y, x)``.
    argument
        How error messages name the file.

    Returns
    -------
    xarray.DataArray
        Dask-backed, in blocks of whole tiles of about :data:`BLOCK_SIDE` pixels a side.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a TIFF or zarr image, or it has channels or axes beyond z, y and x.
    TypeError
        If its dtype is not an integer one.
    """
    array, dims, _ = _open(Path(path), argument, labels=True)
    extra = [d for d in dims if d not in ("z", "y", "x")]
    if extra:
        sizes = dict(zip(dims, array.shape, strict=True))
        raise ValueError(
            f"'{argument}' {str(path)!r} must be a 2-D (y, x) or 3-D (z, y, x) label mask; got dims "
            f"{tuple(dims)} of shape {array.shape} (axes {[f'{d}={sizes[d]}' for d in extra]} are not "
            "spatial)"
        )
    if array.dtype.kind not in "iu":
        hint = " (convert it to an integer type first)" if array.dtype.kind in "fb" else ""
        raise TypeError(
            f"'{argument}' {str(path)!r} must hold integer label ids; got dtype {array.dtype}{hint}"
        )
    order = [d for d in ("z", "y", "x") if d in dims]
    return xr.DataArray(_in_order(array, dims, order), dims=order, name=Path(path).name.split(".")[0])


def _in_order(array: da.Array, dims: Sequence[str], order: Sequence[str]) -> da.Array:
    """``array`` with its axes from ``dims`` put in ``order`` (itself when they are)."""
    if list(dims) == list(order):
        return array
    return array.transpose([list(dims).index(d) for d in order])


# -- opening ---------------------------------------------------------------------------------


def _open(path: Path, argument: str, *, labels: bool) -> tuple[da.Array, tuple[str, ...], list[str] | None]:
    """The dask array of a file, its dims (named where the file says, guessed where not) and its
    channel names (None where the file has none)."""
    if not path.exists():
        raise FileNotFoundError(f"'{argument}' {str(path)!r} does not exist")
    if path.is_dir():
        return _open_zarr(path, argument, labels=labels)
    return _open_tiff(path, argument, labels=labels)


def _open_tiff(
    path: Path, argument: str, *, labels: bool
) -> tuple[da.Array, tuple[str, ...], list[str] | None]:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError) as error:
        raise ValueError(f"'{argument}' {str(path)!r} is not a TIFF image: {error}") from error
    if not tif.series:
        tif.close()
        raise ValueError(f"'{argument}' {str(path)!r} holds no image (a TIFF without image series)")
    series = tif.series[0]
    letters = series.axes
    shape = tuple(series.shape)
    names = _ome_channel_names(tif.ome_metadata) if tif.is_ome else None
    # The tiles or strips are read with tifffile's segment decoder where the layout allows
    # (tiff_pages), through tifffile's zarr interface otherwise; either way the file stays open
    # as long as the array does, and copies of the array sent to other processes open it again.
    source = TiffSource(tif, series=0, level=0)
    stored: Any = tiff_pages(source)
    if stored is None:
        stored = TiffZarr(source)
    dims = _tiff_dims(letters, shape, path, argument, labels=labels)
    array, dims = _squeezed(_lazy(stored, dims), dims, labels=labels)
    return array, dims, names


def _tiff_dims(
    letters: str, shape: tuple[int, ...], path: Path, argument: str, *, labels: bool
) -> tuple[str, ...]:
    """The dims of a TIFF series from tifffile's axis letters; an unnamed leading axis of a
    3-D stack is the channels of an image and the z of a mask."""
    dims = []
    for i, letter in enumerate(letters):
        if letter in _TIFF_DIMS and _TIFF_DIMS[letter] not in dims:
            dims.append(_TIFF_DIMS[letter])
        elif letter in _TIFF_UNNAMED and i == 0 and len(letters) == 3:
            dims.append("z" if labels else "c")
        elif shape[i] == 1:
            dims.append(f"_{letter}")  # dropped below
        else:
            raise ValueError(
                f"'{argument}' {str(path)!r} has axes {letters!r} of shape {shape}; expected channels, z, "
                f"y and x only (axis {letter!r} of size {shape[i]} cannot be placed)"
            )
    return tuple(dims)


def _open_zarr(
    path: Path, argument: str, *, labels: bool
) -> tuple[da.Array, tuple[str, ...], list[str] | None]:
    import zarr

    try:
        node = zarr.open(path, mode="r")
    except Exception as error:  # zarr raises many types for a folder that is not a store
        raise ValueError(
            f"'{argument}' {str(path)!r} is a folder but not a zarr array or group: {error}"
        ) from error
    names = None
    array: Any
    if isinstance(node, zarr.Group):
        attrs: dict[str, Any] = dict(node.attrs)
        ome: dict[str, Any] = attrs.get("ome", attrs)  # OME-Zarr 0.5 nests its metadata under "ome"
        multiscales = ome.get("multiscales")
        if not multiscales:
            if "images" in node or "labels" in node:
                hint = "; for a SpatialData store, use 'rasteragg aggregate'"
            else:
                hint = ""
            raise ValueError(
                f"'{argument}' {str(path)!r} is a zarr group without OME-Zarr 'multiscales' metadata; "
                f"expected a zarr array or an OME-Zarr image{hint}"
            )
        first = multiscales[0]
        key = first["datasets"][0]["path"]
        array = _Stored(node[key], path, key)
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in first.get("axes", [])]
        dims = (
            tuple(axes) if len(axes) == array.ndim else _plain_dims(array.ndim, path, argument, labels=labels)
        )
        channels = ome.get("omero", {}).get("channels")
        if channels:
            names = [str(channel.get("label", i)) for i, channel in enumerate(channels)]
    else:
        array = _Stored(node, path, "")
        dims = _plain_dims(array.ndim, path, argument, labels=labels)
    unknown = [d for d, n in zip(dims, array.shape, strict=True) if d not in ("c", "z", "y", "x") and n != 1]
    if unknown:
        raise ValueError(
            f"'{argument}' {str(path)!r} has axes {list(dims)} of shape {array.shape}; expected channels, z, "
            f"y and x only ({unknown} cannot be placed)"
        )
    dims = tuple(d if d in ("c", "z", "y", "x") else f"_{d}" for d in dims)
    lazy, dims = _squeezed(_lazy(array, dims), dims, labels=labels)
    return lazy, dims, names


def _plain_dims(ndim: int, path: Path, argument: str, *, labels: bool) -> tuple[str, ...]:
    """Dims of an array that does not name them: ``(y, x)``, ``(c|z, y, x)`` or ``(c, z, y, x)``."""
    guesses = {2: ("y", "x"), 3: ("z" if labels else "c", "y", "x"), 4: ("c", "z", "y", "x")}
    if ndim not in guesses or (labels and ndim == 4):
        expected = "2-D (y, x) or 3-D (z, y, x)" if labels else "2-D, 3-D (c, y, x) or 4-D (c, z, y, x)"
        raise ValueError(f"'{argument}' {str(path)!r} must be {expected}; got an array of {ndim} dims")
    return guesses[ndim]


def _lazy(array: Any, dims: Sequence[str]) -> da.Array:
    """A dask array over a zarr array: one channel per block and whole chunks of about
    :data:`BLOCK_SIDE` pixels a side."""
    stored = getattr(array, "chunks", array.shape)
    chunks = []
    for dim, size, chunk in zip(dims, array.shape, stored, strict=True):
        if dim in ("y", "x"):
            chunks.append(min(size, max(chunk, chunk * (BLOCK_SIDE // max(chunk, 1)))) if size else 1)
        elif dim in ("c", "z"):
            chunks.append(1)
        else:
            chunks.append(max(size, 1))
    # from_array rather than from_zarr, which dask's array query planning lacks.
    return da.from_array(
        array, chunks=tuple(max(c, 1) for c in chunks), name=f"read-{dask.base.tokenize(array)}"
    )


class _Stored:
    """A zarr array, read by slices, with a dask token of the store's path, version and array
    (rather than dask's hash of the array's store). Pickled, it is the zarr array (its store's
    path and the array's key), which the process that unpickles it opens again."""

    def __init__(self, array: Any, path: Path, key: str) -> None:
        self.array = array
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = array.dtype
        self.ndim = len(self.shape)
        self.chunks: tuple[int, ...] = tuple(array.chunks)
        self.token = _token(path, key)

    def __getitem__(self, key: Any) -> Any:
        return self.array[key]

    def __dask_tokenize__(self) -> Any:
        return self.token


def _token(path: Path, key: str) -> tuple[Any, ...]:
    """A dask token of an array in a zarr store: the store's path and version and the array's key."""
    stat = path.stat()
    return (str(path.resolve()), key, stat.st_mtime_ns, stat.st_size)


def _squeezed(array: da.Array, dims: tuple[str, ...], *, labels: bool) -> tuple[da.Array, tuple[str, ...]]:
    """``array`` without its placeholder axes (named ``_…``, all of size 1), a z axis of one plane
    (OME-Zarr's 2-D images have one) and, for masks, a channel axis of one channel."""
    single = {"z", "c"} if labels else {"z"}
    drop = [i for i, d in enumerate(dims) if d.startswith("_") or (d in single and array.shape[i] == 1)]
    if drop:
        # Indexing rather than squeeze, which dask's array query planning lacks.
        array = array[tuple(0 if i in drop else slice(None) for i in range(array.ndim))]
        dims = tuple(d for i, d in enumerate(dims) if i not in drop)
    return array, dims


def _ome_channel_names(xml: str | None) -> list[str] | None:
    """The ``Name`` of each ``Channel`` of the first image in OME-XML (None if any is missing)."""
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    pixels = root.find("{*}Image/{*}Pixels")
    if pixels is None:
        return None
    names = [channel.get("Name") for channel in pixels.findall("{*}Channel")]
    if not names or any(name is None for name in names):
        return None
    return [str(name) for name in names]


def _stem(path: Path) -> str:
    """The image's name as MCQuant takes it: the file name without ``.tif`` (and ``.ome``)."""
    parts = path.name.split(".")
    if len(parts) < 2:
        return parts[0]
    if len(parts) > 2 and parts[-2] == "ome":
        return ".".join(parts[:-2])
    return ".".join(parts[:-1])
