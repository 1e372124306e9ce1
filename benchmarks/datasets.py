"""Benchmark data: the reference dataset of DESIGN §6, and lazily generated images of any size.

The reference dataset is :func:`xr_rasteragg.synthetic.make_cells` at 4096 x 4096 px, 8 channels
uint16, ~18.8k Voronoi-like cells with background; it is made once per run and cached as ``.npy``
files so that each measurement process loads it instead of remaking it.

The lazy generators build ``da.map_blocks`` graphs whose blocks are computed from the pixel
coordinates alone, so nothing is stored, any size can be asked for (larger than memory too), and
the values do not depend on the chunking: a grid of rectangular cells with a one-pixel background
border, numbered in a scrambled order, and a hashed uint16 image.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from numpy.typing import NDArray

from xr_rasteragg.synthetic import make_cells

__all__ = ["REFERENCE", "CellGrid", "lazy_image", "lazy_labels", "reference_dataset", "reference_files"]

#: The reference dataset of DESIGN §6: (y, x) size, channels and chunks (spatial, channel).
REFERENCE = {"size": 4096, "channels": 8, "spatial_chunk": 2048, "channel_chunk": 1}
#: Pixels per band of rows that the lazy generators compute at a time (see :func:`_bands`).
BAND_PIXELS = 2**17


def reference_files(size: int, channels: int, cache: Path, cell_diameter: float = 30.0) -> tuple[Path, Path]:
    """The ``.npy`` files of the ``make_cells`` dataset of ``size`` x ``size`` px, made once under ``cache``.

    Returns the paths of ``labels`` ``(y, x)`` int32 and ``image`` ``(c, y, x)`` uint16.
    """
    stem = cache / f"cells_{size}_{channels}_{cell_diameter:g}"
    labels_path, image_path = stem.with_suffix(".labels.npy"), stem.with_suffix(".image.npy")
    if not (labels_path.exists() and image_path.exists()):
        cache.mkdir(parents=True, exist_ok=True)
        labels, image = make_cells((size, size), n_channels=channels, cell_diameter=cell_diameter, seed=0)
        np.save(labels_path, labels)
        np.save(image_path, image)
    return labels_path, image_path


def reference_dataset(
    size: int, channels: int, cache: Path, cell_diameter: float = 30.0
) -> tuple[NDArray[np.int32], NDArray[np.uint16]]:
    """The ``make_cells`` dataset of ``size`` x ``size`` px (see :func:`reference_files`), in memory.

    Returns ``labels`` ``(y, x)`` int32 and ``image`` ``(c, y, x)`` uint16.
    """
    labels_path, image_path = reference_files(size, channels, cache, cell_diameter)
    return np.load(labels_path), np.load(image_path)


class CellGrid:
    """A grid of ``n_labels`` rectangular cells over a ``(height, width)`` image.

    The grid has ``rows x cols >= n_labels`` cells of (almost) equal size; cell ``k`` in row-major
    order has label ``(k * stride) % n_labels + 1`` (a permutation, so neighbouring cells have
    unrelated ids) for ``k < n_labels``, and the cells past ``n_labels`` are background. The
    first row and column of pixels of every cell are background (label 0), so that exactly
    ``n_labels`` labels appear, each with at least one pixel.

    Raises
    ------
    ValueError
        If the cells would be smaller than 2 x 2 px.
    """

    def __init__(self, height: int, width: int, n_labels: int) -> None:
        if n_labels < 1:
            raise ValueError(f"n_labels: expected a positive count, got {n_labels}")
        self.height, self.width, self.n_labels = int(height), int(width), int(n_labels)
        self.rows = max(1, round(math.sqrt(n_labels * height / width)))
        self.cols = math.ceil(n_labels / self.rows)
        if height // self.rows < 2 or width // self.cols < 2:
            raise ValueError(
                f"n_labels: {n_labels} cells do not fit a {height} x {width} image with at least "
                f"2 x 2 px each (grid {self.rows} x {self.cols})"
            )
        stride = max(1, round(n_labels * 0.6180339887))
        while math.gcd(stride, n_labels) != 1:
            stride += 1
        self.stride = stride

    def block(self, y0: int, y1: int, x0: int, x1: int, dtype: Any = np.int64) -> NDArray[Any]:
        """Labels of the pixels ``[y0:y1, x0:x1]`` in ``dtype``.

        The labels of the cells that the block touches go into a small table with an extra
        background row and column first; each pixel then takes its entry by its (row, col) in
        that table, so the cost per pixel is one addition and one lookup.
        """
        ys, xs = np.arange(y0, y1, dtype=np.int64), np.arange(x0, x1, dtype=np.int64)
        row, col = ys * self.rows // self.height, xs * self.cols // self.width
        row_border = row != (ys - 1) * self.rows // self.height
        col_border = col != (xs - 1) * self.cols // self.width
        rows = np.arange(row[0], row[-1] + 1) if len(row) else row
        cols = np.arange(col[0], col[-1] + 1) if len(col) else col
        cell = rows[:, None] * self.cols + cols[None, :]
        table = np.zeros((len(rows) + 1, len(cols) + 1), dtype)
        table[1:, 1:] = np.where(cell < self.n_labels, (cell * self.stride) % self.n_labels + 1, 0)
        width = len(cols) + 1
        at_row = np.where(row_border, 0, row - row[0] + 1 if len(row) else row) * width
        at_col = np.where(col_border, 0, col - col[0] + 1 if len(col) else col)
        out = np.empty((len(ys), len(xs)), dtype)
        for band in _bands(len(ys), len(xs)):
            out[band] = table.ravel().take(at_row[band, None] + at_col[None, :])
        return out


def _bands(height: int, width: int) -> list[slice]:
    """Row bands of about :data:`BAND_PIXELS` pixels.

    The generators work band by band into their output, so that their temporaries stay small:
    large temporaries made the generators' speed depend on the state of the machine's memory
    (NumPy asks for huge pages from 4 MiB on, and the kernel may stall to compact memory for
    them), which swung the baseline of the scale series by up to 1.8x between processes.
    """
    rows = max(1, BAND_PIXELS // max(width, 1))
    return [slice(start, min(start + rows, height)) for start in range(0, height, rows)]


def _chunks(size: int, chunk: int) -> tuple[int, ...]:
    return (chunk,) * (size // chunk) + ((size % chunk,) if size % chunk else ())


def lazy_labels(height: int, width: int, n_labels: int, chunk: int = 2048, dtype: Any = np.int32) -> da.Array:
    """A lazily generated ``(1, height, width)`` label mask of :class:`CellGrid` cells.

    Examples
    --------
    >>> labels = lazy_labels(64, 64, n_labels=10, chunk=32)
    >>> labels.shape, labels.chunks[1]
    ((1, 64, 64), (32, 32))
    >>> int((np.unique(labels.compute()) > 0).sum())
    10
    """
    grid = CellGrid(height, width, n_labels)
    if np.iinfo(dtype).max < n_labels:
        raise ValueError(f"dtype: {np.dtype(dtype)} cannot hold {n_labels} labels")

    def block(block_info: dict[Any, Any] | None = None) -> NDArray[Any]:
        assert block_info is not None
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return grid.block(y0, y1, x0, x1, dtype)[None]

    return da.map_blocks(
        block,
        dtype=dtype,
        chunks=((1,), _chunks(height, chunk), _chunks(width, chunk)),
        meta=np.empty((0, 0, 0), dtype),
    )


def image_block(c0: int, c1: int, y0: int, y1: int, x0: int, x1: int, width: int) -> NDArray[np.uint16]:
    """Pixel values ``[c0:c1, y0:y1, x0:x1]`` of the hashed image: a function of (c, y, x) only.

    Values are 12-bit hashes of the pixel's flat index plus a per-channel offset (0..4095 + c).
    """
    ys = np.arange(y0, y1, dtype=np.uint32) * np.uint32(width)
    xs = np.arange(x0, x1, dtype=np.uint32)
    out = np.empty((c1 - c0, y1 - y0, x1 - x0), np.uint16)
    for band in _bands(y1 - y0, x1 - x0):
        flat = ys[band, None] + xs[None, :]  # wraps past 2**32 px, which a hash may
        hashed = ((flat * np.uint32(2654435761)) >> np.uint32(20)).astype(np.uint16)
        for c in range(c0, c1):
            out[c - c0, band] = hashed + np.uint16(c)
    return out


def lazy_image(channels: int, height: int, width: int, chunk: int = 2048, channel_chunk: int = 1) -> da.Array:
    """A lazily generated ``(channels, 1, height, width)`` uint16 image (see :func:`image_block`).

    Examples
    --------
    >>> image = lazy_image(3, 64, 64, chunk=32)
    >>> image.shape, image.dtype.name
    ((3, 1, 64, 64), 'uint16')
    """

    def block(block_info: dict[Any, Any] | None = None) -> NDArray[np.uint16]:
        assert block_info is not None
        (c0, c1), (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return image_block(c0, c1, y0, y1, x0, x1, width)[:, None]

    chunks = (_chunks(channels, channel_chunk), (1,), _chunks(height, chunk), _chunks(width, chunk))
    return da.map_blocks(block, dtype=np.uint16, chunks=chunks, meta=np.empty((0, 0, 0, 0), np.uint16))
