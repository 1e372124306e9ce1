"""A level of a TIFF series, opened by path in each process that reads it.

A ``tifffile.TiffFile`` holds an open file handle, which cannot be pickled, so dask's distributed
scheduler cannot send a reader that holds one to its workers. :class:`TiffSource` pickles as the
file's path, the series and level read, and the version (modification time and size) of every file
of the series as it was when the array was planned. A copy opens the file the first time it reads;
the copies in one process share one open file per path and version (a worker gets a new copy of a
reader each time it fetches it again), which stays open while a copy uses it and while it is one of
the :data:`KEPT_OPEN` files that copies opened last. Every read checks that the files are still
that version: tiles are read at offsets taken from the planned version, so a file rewritten since
would give other pixels, silently (:class:`FileChangedError` instead).

:class:`TiffZarr` reads a level through tifffile's zarr interface (the layouts that
:mod:`xr_rasteragg.tiff_pages` leaves out: RGB and other multi-sample pages, 3-D tiles, multi-file
OME series) and pickles the same way.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import weakref
from typing import Any

__all__ = ["KEPT_OPEN", "FileChangedError", "TiffSource", "TiffZarr"]

#: How many of the files that copies of readers opened last a process keeps open when no copy
#: uses them any more (for the next copy of the same reader, the next task's).
KEPT_OPEN = 8

#: A file's version: its path, modification time (ns) and size (bytes).
Version = tuple[str, int, int]


class FileChangedError(RuntimeError):
    """A file that an array reads changed after the array was planned from it."""


class _OpenFile:
    """An open ``tifffile.TiffFile``, closed when this is garbage; its file handle locks each seek
    and read (dask's threads share it), the lock set here, before any reader can see the file."""

    def __init__(self, tif: Any) -> None:
        tif.filehandle.set_lock(True)
        self.tif = tif
        weakref.finalize(self, tif.close)


#: The open files of this process, by path and version of the series' files.
_OPEN: weakref.WeakValueDictionary[tuple[str, tuple[Version, ...]], _OpenFile] = weakref.WeakValueDictionary()
#: The files that copies opened last, kept open.
_RECENT: collections.deque[_OpenFile] = collections.deque(maxlen=KEPT_OPEN)
_OPENING = threading.Lock()


class TiffSource:
    """A level of a series of a TIFF file, opened again by path where it is unpickled.

    Parameters
    ----------
    tif
        The open file; the source owns it from then on: it is closed when no source (or copy of
        one) in this process reads it.
    series
        Which of the file's series (tifffile's ``TiffFile.series``).
    level
        Which level of the series' pyramid (0: the full resolution).
    """

    def __init__(self, tif: Any, series: int = 0, level: int = 0) -> None:
        self.path = os.path.abspath(tif.filehandle.path)
        self.series = series
        self.level = level
        self._file: _OpenFile | None = _OpenFile(tif)
        self.versions = _versions(self.open())
        with _OPENING:
            _OPEN.setdefault((self.path, self.versions), self._file)

    def open(self) -> Any:
        """The ``tifffile.TiffPageSeries`` of the level, from the file as this process opened it.

        Raises
        ------
        FileChangedError
            If the file is not the version planned.
        FileNotFoundError
            If it is not there.
        """
        if self._file is None:
            with _OPENING:
                key = (self.path, self.versions)
                opened = _OPEN.get(key)
                if opened is None:
                    opened = _OpenFile(_open(self.path))
                    if _versions(self._level(opened.tif)) != self.versions:
                        self.check()  # raises, naming the file that changed
                        raise FileChangedError(
                            f"TIFF file {self.path!r} changed since it was opened: its series is in "
                            "other files now"
                        )
                    _OPEN[key] = opened
                if opened in _RECENT:
                    _RECENT.remove(opened)
                _RECENT.append(opened)
                self._file = opened
        return self._level(self._file.tif)

    def _level(self, tif: Any) -> Any:
        return tif.series[self.series].levels[self.level]

    def check(self) -> None:
        """Raise :class:`FileChangedError` if a file of the series changed since it was planned.

        Raises
        ------
        FileChangedError
            If a file's modification time or size is not what it was when the array was planned.
        FileNotFoundError
            If a file is gone (or not at the same path on this machine).
        """
        for path, mtime, size in self.versions:
            try:
                stat = os.stat(path)
            except FileNotFoundError as error:
                raise _not_there(path) from error
            if (stat.st_mtime_ns, stat.st_size) != (mtime, size):
                raise FileChangedError(
                    f"TIFF file {path!r} changed since it was opened (size {size} -> {stat.st_size} "
                    f"bytes, modified {mtime} -> {stat.st_mtime_ns} ns): its tiles would be read at the "
                    "old offsets; read it again"
                )

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "series": self.series, "level": self.level, "versions": self.versions}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._file = None

    def __dask_tokenize__(self) -> Any:
        return ("tiff", self.series, self.level, self.versions)


class TiffZarr:
    """A level of a TIFF series read by slices through tifffile's zarr interface.

    Parameters
    ----------
    source
        The level to read.
    """

    def __init__(self, source: TiffSource) -> None:
        self.source = source
        self._array: Any = None
        array = self.array()
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = array.dtype
        self.ndim = len(self.shape)
        self.chunks: tuple[int, ...] = tuple(array.chunks)

    def array(self) -> Any:
        """The zarr array over the level (opened once per copy)."""
        if self._array is None:
            import zarr

            self._array = zarr.open(self.source.open().aszarr(), mode="r")
        return self._array

    def __getitem__(self, key: Any) -> Any:
        self.source.check()
        return self.array()[key]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __dask_tokenize__(self) -> Any:
        return ("tiff-zarr", self.source.__dask_tokenize__())


def _open(path: str) -> Any:
    """``path`` as a ``tifffile.TiffFile``."""
    import tifffile

    try:
        return tifffile.TiffFile(path)
    except FileNotFoundError as error:
        raise _not_there(path) from error


def _not_there(path: str) -> FileNotFoundError:
    """The error for a file of a series that is not at its path (here)."""
    return FileNotFoundError(
        f"TIFF file {path!r} is not there on {socket.gethostname()}: it was moved or deleted since it "
        "was opened, or (on a cluster) the workers do not see it at the same path"
    )


def _versions(level: Any) -> tuple[Version, ...]:
    """The version of each file that holds pages of ``level`` (one, but for multi-file OME series)."""
    paths = {os.path.abspath(page.parent.filehandle.path) for page in level.pages if page is not None}
    versions = []
    for path in sorted(paths):
        stat = os.stat(path)
        versions.append((path, stat.st_mtime_ns, stat.st_size))
    return tuple(versions)
