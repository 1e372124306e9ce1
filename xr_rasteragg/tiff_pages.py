"""The pages of a TIFF series as an array read by slices, tile by tile (or strip by strip).

tifffile's zarr interface (:meth:`tifffile.TiffPageSeries.aszarr`) reads every TIFF layout, but
each tile goes through zarr's asynchronous chunk pipeline, a thread hop and two copies; on the
8-channel 4096² OME-TIFF of ``benchmarks/quantify.py`` (512 px tiles, read in 2048 px blocks)
that costs two to three times the CPU of reading the same tiles into one buffer and decoding
them with tifffile's decoder of single segments (``TiffPage.decode``, as in tifffile's
documented example of decoding single tiles), and importing zarr costs 0.1-0.3 s more.
:func:`tiff_pages` wraps a series in :class:`TiffPages` where its layout is the common one --
pages of one sample per pixel, all in the series' file -- and returns None otherwise, for the
caller to use the zarr interface.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .tiff_files import TiffSource

__all__ = ["TiffPages", "tiff_pages"]

#: TIFF compressions whose segments need the page's JPEG tables to decode.
_JPEG = {6, 7, 33007, 34892}


def tiff_pages(source: TiffSource) -> TiffPages | None:
    """A level of a TIFF series as a :class:`TiffPages`, or None.

    Parameters
    ----------
    source
        The level of the series (of an open file).

    Returns
    -------
    TiffPages or None
        None where the level is not pages of ``(y, x)`` planes of one sample per pixel, each a
        plane of the series, all in the series' own file (RGB and other multi-sample pages, 3-D
        tiles, files of a multi-file OME series, missing pages): tifffile's zarr interface reads
        those (:class:`xr_rasteragg.tiff_files.TiffZarr`).
    """
    level = source.open()
    pages = list(level.pages)
    keyframe = level.keyframe
    shape = tuple(int(n) for n in level.shape)
    if (
        keyframe is None
        or keyframe.dtype is None
        or keyframe.samplesperpixel != 1
        or keyframe.imagedepth != 1
        or level.dtype != keyframe.dtype
        or len(shape) < 2
        or shape[-2:] != (keyframe.imagelength, keyframe.imagewidth)
        or math.prod(shape[:-2]) != len(pages)
        or any(page is None or page.parent is not level.parent for page in pages)
    ):
        return None
    return TiffPages(source)


class TiffPages:
    """Planes of a TIFF file, stacked, read by slices through tifffile's segment decoder.

    Indexing with integers and slices (as dask's ``from_array`` does) reads the tiles or strips
    that the slice touches, each once, and copies their parts in the slice into the result.
    Pickled, it is its :class:`~xr_rasteragg.tiff_files.TiffSource` and layout; a copy opens the
    file on its first read and reads through that handle from then on.

    Parameters
    ----------
    source
        A level of a series of pages of ``(y, x)`` planes of one sample per pixel, all in one
        file (see :func:`tiff_pages`); its shape is the leading axes (the pages, in C order),
        then ``(imagelength, imagewidth)``.
    """

    def __init__(self, source: TiffSource) -> None:
        self.source = source
        self._opened: tuple[list[Any], Any] | None = None
        level = source.open()
        keyframe = level.keyframe
        self.shape: tuple[int, ...] = tuple(int(n) for n in level.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(keyframe.dtype)
        leading = (1,) * (self.ndim - 2)
        if keyframe.is_tiled:
            self.segment = (int(keyframe.tilelength), int(keyframe.tilewidth))
        else:
            self.segment = (int(min(keyframe.rowsperstrip, keyframe.imagelength)), int(keyframe.imagewidth))
        self.chunks = (*leading, *self.segment)
        self.across = -(-int(keyframe.imagewidth) // self.segment[1])  # segments per row of segments

    def _pages(self) -> tuple[list[Any], Any]:
        """The pages and their keyframe, from the file as this copy opened it."""
        if self._opened is None:
            level = self.source.open()
            pages = list(level.pages)  # their file handle locks each read (see tiff_files._OpenFile)
            self._opened = (pages, level.keyframe)
        return self._opened

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_opened": None}

    def __dask_tokenize__(self) -> Any:
        return ("tiff-pages", self.source.__dask_tokenize__())

    def __getitem__(self, key: Any) -> NDArray[Any]:
        self.source.check()
        pages, keyframe = self._pages()
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > self.ndim or not all(isinstance(k, slice | int | np.integer) for k in key):
            raise IndexError(f"TiffPages takes integers and slices, at most {self.ndim}; got {key!r}")
        key = key + (slice(None),) * (self.ndim - len(key))
        ranges = []
        for k, n in zip(key, self.shape, strict=True):
            if isinstance(k, slice):
                ranges.append(range(*k.indices(n)))
            else:
                i = int(k) + n if k < 0 else int(k)
                if not 0 <= i < n:
                    raise IndexError(f"index {int(k)} is out of bounds for an axis of size {n}")
                ranges.append(range(i, i + 1))
        # The bounding box of the selection, read whole, then stepped (a copy, only for steps
        # other than 1, which dask does not take) and without the axes of the integers.
        box = [range(min(r[0], r[-1]), max(r[0], r[-1]) + 1) if len(r) else range(0) for r in ranges]
        out = np.empty(tuple(len(b) for b in box), self.dtype)
        if out.size:
            (y0, y1), (x0, x1) = ((b.start, b.stop) for b in box[-2:])
            for position in np.ndindex(*out.shape[:-2]):
                plane = tuple(b.start + p for b, p in zip(box, position, strict=False))
                page = pages[int(np.ravel_multi_index(plane, self.shape[:-2])) if plane else 0]
                self._read(page, keyframe, y0, y1, x0, x1, out[position])
        if any(len(r) > 1 and r.step != 1 for r in ranges):
            out = out[np.ix_(*(np.asarray(r) - b.start for r, b in zip(ranges, box, strict=True)))]
        return out[tuple(slice(None) if isinstance(k, slice) else 0 for k in key)]

    def _read(self, page: Any, keyframe: Any, y0: int, y1: int, x0: int, x1: int, out: NDArray[Any]) -> None:
        """Rows ``y0:y1`` and columns ``x0:x1`` of ``page`` (of tags as ``keyframe``'s) into ``out``."""
        rows, columns = self.segment
        indices = [
            down * self.across + across
            for down in range(y0 // rows, (y1 - 1) // rows + 1)
            for across in range(x0 // columns, (x1 - 1) // columns + 1)
        ]
        segments = sorted(
            ((page.dataoffsets[i], page.databytecounts[i], i) for i in indices), key=lambda s: s[0]
        )
        extra = {}
        if keyframe.compression in _JPEG:
            extra = {"jpegtables": page.jpegtables, "jpegheader": keyframe.jpegheader}
        # One buffer for the segments, each read into it and decoded (uncompressed segments as a
        # view of it) and copied out before the next: new memory for every segment costs more
        # in page faults than the reading.
        buffer = memoryview(bytearray(max(count for _, count, _ in segments)))
        handle = page.parent.filehandle
        for offset, count, index in segments:
            data = None  # an empty segment (no bytes written)
            if count > 0 and offset > 0:
                with handle.lock:
                    handle.seek(offset)
                    data = buffer[: handle.readinto(buffer[:count])]
            segment, (_, _, top, left, _), shape = page.decode(data, index, **extra)
            if segment is None:  # an empty segment: the page's fill value
                segment = np.full((shape[1], shape[2]), keyframe.nodata, self.dtype)
            else:
                segment = segment.reshape(segment.shape[-3], segment.shape[-2])
            ys, ye = max(top, y0), min(top + segment.shape[0], y1)
            xs, xe = max(left, x0), min(left + segment.shape[1], x1)
            if ys < ye and xs < xe:
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = segment[
                    ys - top : ye - top, xs - left : xe - left
                ]
