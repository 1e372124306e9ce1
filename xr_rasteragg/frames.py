"""The pixels around each label block, for families whose kernel code reads a label's neighbourhood.

A family with a halo of ``d`` pixels (:attr:`~xr_rasteragg.families.Family.halo`, the
perimeter's 2) needs, for each label block, the ``d`` rows above and below it, the ``d``
columns left and right of it and the four ``d × d`` corners: its :class:`Frame`. The engine
gets them with one cheap task per block: its :class:`Ring`, the block's own pixels within ``d``
of its edges (:func:`frame_arrays`). Each label task receives the rings of its neighbouring
blocks (as many blocks away as it takes to reach ``d`` pixels, for blocks thinner than that)
and cuts its frame from them (:meth:`Frame.around`), so that the label stage reads its block
once and nothing but thin rings travels between blocks. On the local schedulers, where nothing
travels, the label tasks of a grid of at most 3 × 3 blocks get the blocks themselves instead
and cut their frames from the blocks around theirs (:func:`frame_in_grid`), without the rings'
tasks. Pixels beyond the image stay 0 and are marked invalid (:meth:`Frame.valid`); blocks of
any size, one pixel included, work alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
from numpy.typing import NDArray

from .families import Family

__all__ = [
    "GATHERED",
    "PIECES",
    "Frame",
    "FrameCut",
    "Ring",
    "block_offsets",
    "frame_arrays",
    "frame_from_rings",
    "frame_in_grid",
    "gathers",
    "offset_array",
]

#: A rectangle of the image: (first row, row after the last, first column, column after the last).
Rect = tuple[int, int, int, int]

#: The most blocks along y and along x of a grid whose label tasks get every block (see
#: :func:`frame_in_grid`): a block's neighbourhood spans three blocks each way.
GATHERED = 3

#: The frame's pieces, in the order of :class:`Frame`.
PIECES = ("top", "bottom", "left", "right", "top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class Frame:
    """The pixels around one label block ``(z, y, x)``.

    Attributes
    ----------
    pieces
        The eight pieces, in the order of :data:`PIECES`: ``(z, d, w)`` rows above and below,
        ``(z, h, d)`` columns left and right, and the ``(z, d, d)`` corners.
    shape
        The shape of the whole label image, to tell pixels beyond it.
    family
        The family whose kernel code reads the frame.
    """

    pieces: tuple[Any, ...]
    shape: tuple[int, int, int]
    family: Family

    @classmethod
    def around(
        cls,
        block: Any,
        offset: tuple[int, int, int],
        rings: Sequence[Ring],
        shape: tuple[int, int, int],
        family: Family,
    ) -> Frame:
        """The frame of the block at ``offset``, cut from the rings of the blocks around it (a
        ring may come twice, or be the block's own, where the block lies at the image's edge)."""
        d = family.halo
        nz, h, w = block.shape
        _, y0, x0 = offset
        y1, x1 = y0 + h, x0 + w
        rects: list[Rect] = [
            (y0 - d, y0, x0, x1),
            (y1, y1 + d, x0, x1),
            (y0, y1, x0 - d, x0),
            (y0, y1, x1, x1 + d),
            (y0 - d, y0, x0 - d, x0),
            (y0 - d, y0, x1, x1 + d),
            (y1, y1 + d, x0 - d, x0),
            (y1, y1 + d, x1, x1 + d),
        ]
        pieces = []
        for rect in rects:
            piece = np.zeros((nz, rect[1] - rect[0], rect[3] - rect[2]), block.dtype)
            for ring in rings:
                for part, values in zip(ring.rects, ring.values, strict=True):
                    _paste(piece, rect, values, part)
            pieces.append(piece)
        return cls(tuple(pieces), shape, family)

    @property
    def halo(self) -> int:
        """How many pixels the frame reaches around the block."""
        return self.family.halo

    def valid(self, offset: tuple[int, int, int], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        """Which rows and columns of the block widened by its frame, ``(z, h + 2d, w + 2d)``, lie
        in the image, for the block at ``offset`` of ``shape``: ``(first row, row after the last,
        first column, column after the last)``."""
        d = self.halo
        _, h, w = shape
        _, ny, nx = self.shape
        _, y0, x0 = offset
        return d - min(d, y0), d + h + min(d, ny - y0 - h), d - min(d, x0), d + w + min(d, nx - x0 - w)


@dataclass(frozen=True)
class Ring:
    """A label block's pixels within ``halo`` of its edges: rectangles of the image and their
    pixels (the whole block when it is at most ``2 halo`` pixels high or wide)."""

    rects: tuple[Rect, ...]
    values: tuple[NDArray[Any], ...]

    @classmethod
    def of(cls, block: NDArray[Any], offset: tuple[int, int, int], halo: int) -> Ring:
        """The ring of the block at ``offset``; its pixels are copied, to the host for a block on
        a GPU (the ring outlives the block, and frames are read on the host)."""
        _, h, w = block.shape
        _, y0, x0 = offset
        if h <= 2 * halo or w <= 2 * halo:
            return cls(((y0, y0 + h, x0, x0 + w),), (_host_copy(block),))
        rects = (
            (y0, y0 + halo, x0, x0 + w),
            (y0 + h - halo, y0 + h, x0, x0 + w),
            (y0 + halo, y0 + h - halo, x0, x0 + halo),
            (y0 + halo, y0 + h - halo, x0 + w - halo, x0 + w),
        )
        return cls(
            rects, tuple(_host_copy(block[:, a - y0 : b - y0, c - x0 : e - x0]) for a, b, c, e in rects)
        )


def _host_copy(array: Any) -> NDArray[Any]:
    """A NumPy copy of a NumPy or CuPy array."""
    get = getattr(array, "get", None)
    return get() if callable(get) else np.array(array)


def _paste(out: NDArray[Any], rect: Rect, values: NDArray[Any], source: Rect) -> None:
    """Copy the pixels of ``values`` (covering ``source``) that fall in ``rect`` into ``out``
    (covering ``rect``)."""
    a, b = max(rect[0], source[0]), min(rect[1], source[1])
    c, e = max(rect[2], source[2]), min(rect[3], source[3])
    if a < b and c < e:
        out[:, a - rect[0] : b - rect[0], c - rect[2] : e - rect[2]] = values[
            :, a - source[0] : b - source[0], c - source[2] : e - source[2]
        ]


def _ring_block(block: NDArray[Any], offset: NDArray[Any], halo: int) -> NDArray[Any]:
    """The :class:`Ring` of one label block, at the offset that ``offset`` holds (a
    ``blockwise`` task), in a ``(1, 1, 1)`` object array."""
    out = np.empty((1, 1, 1), dtype=object)
    out[0, 0, 0] = Ring.of(block, offset.flat[0], halo)
    return out


def _joined_rings(rings: NDArray[Any]) -> NDArray[Any]:
    """The rings of an object array of rings joined into one, in a ``(1, 1, 1)`` object array
    (a ``map_blocks`` task)."""
    parts = list(rings.ravel())
    out = np.empty((1, 1, 1), dtype=object)
    out[0, 0, 0] = Ring(
        tuple(rect for ring in parts for rect in ring.rects),
        tuple(values for ring in parts for values in ring.values),
    )
    return out


def gathers(labels: da.Array) -> bool:
    """Whether the block grid of ``labels`` ``(z, y, x)`` is small enough for each label block to
    see every other (one block in z, at most :data:`GATHERED` in y and in x; see
    :func:`frame_in_grid`)."""
    return labels.numblocks[0] == 1 and max(labels.numblocks[1:]) <= GATHERED


def block_offsets(labels: da.Array) -> NDArray[Any]:
    """The offset ``(z, y, x)`` of each block of ``labels``, in an object array on its block grid."""
    starts = [np.cumsum((0, *chunks[:-1])).tolist() for chunks in labels.chunks]
    offsets = np.empty(labels.numblocks, dtype=object)
    for index in np.ndindex(*labels.numblocks):
        offsets[index] = tuple(start[i] for start, i in zip(starts, index, strict=True))
    return offsets


def offset_array(labels: da.Array) -> da.Array:
    """:func:`block_offsets` as a dask array of one offset per block, for the ``blockwise`` tasks
    of each block (which get no ``block_info``; ``map_blocks`` with it loses its task names
    under dask's array query planning). Named after ``labels``, so that the graphs of one call
    share it; its tasks are fused into the ones that read them."""
    name = f"rasteragg-offsets-{labels.name}"
    return da.from_array(block_offsets(labels), chunks=1, name=name)


#: How a label task gets its block's frame: from the block, its offset, what it was handed
#: around the block, the image's shape and the family (:func:`frame_from_rings`,
#: :func:`frame_in_grid`).
FrameCut = Callable[[Any, tuple[int, int, int], Any, tuple[int, int, int], Family], Frame]


def frame_from_rings(
    block: Any, offset: tuple[int, int, int], rings: NDArray[Any], shape: tuple[int, int, int], family: Family
) -> Frame:
    """The frame of the block at ``offset``, cut from ``rings``: the object array of the rings
    around it that :func:`frame_arrays` hands each block."""
    return Frame.around(block, offset, list(rings.ravel()), shape, family)


def frame_in_grid(
    block: Any, offset: tuple[int, int, int], grid: Sequence[Any], shape: tuple[int, int, int], family: Family
) -> Frame:
    """The frame of the block at ``offset``, cut from the blocks around it in ``grid``: every
    block of a label image of one block in z (nested lists by z, y and x, as ``blockwise`` hands
    the blocks of an array whose axes it contracts; see :func:`gathers`).

    On the local schedulers, where a task's inputs are the blocks themselves, the label task of
    a small grid reads the pixels around its block in place (NumPy blocks) rather than from
    rings that tasks of their own copied: those tasks, and the task that gathered them, delayed
    every label task (see :func:`xr_rasteragg.engine.label_stages`). A block on a device gives
    its ring (a copy of its pixels near the edges, to the host) instead.
    """
    d = family.halo
    _, h, w = block.shape
    _, y0, x0 = offset
    near = []
    top = 0
    for row in grid[0]:
        left = 0
        for other in row:
            _, oh, ow = other.shape
            if top < y0 + h + d and y0 - d < top + oh and left < x0 + w + d and x0 - d < left + ow:
                if isinstance(other, np.ndarray):
                    near.append(Ring(((top, top + oh, left, left + ow),), (other,)))
                else:
                    near.append(Ring.of(other, (0, top, left), d))
            left += ow
        top += row[0].shape[1]
    return Frame.around(block, offset, near, shape, family)


def frame_arrays(labels: da.Array, halo: int) -> da.Array:
    """An object array on the block grid of ``labels`` ``(z, y, x)`` whose block ``(k, j, i)``
    holds the :class:`Ring` of each block around block ``(k, j, i)``, its own included, as far
    as ``halo`` pixels reach (an object array of rings, ``(1, 3, 3)`` or fewer at the grid's
    edges).

    One task per block makes its ring; dask's ``overlap`` hands each block the rings of the
    blocks next to it (one graph step, however many blocks; beyond the grid's edges the frame
    lies beyond the image). Blocks at least ``halo`` pixels high and wide need nothing more; for
    thinner blocks, the rings around each block are joined into one ring and handed on again,
    until they reach ``halo`` blocks away.
    """
    one_each = tuple((1,) * n for n in labels.numblocks)
    meta = np.empty((0, 0, 0), dtype=object)
    rings = da.blockwise(
        _ring_block, "zyx", labels, "zyx", offset_array(labels), "zyx", halo, None,
        token="rasteragg-rings", dtype=object, meta=meta, concatenate=False, align_arrays=False,
        adjust_chunks={"z": 1, "y": 1, "x": 1},
    )  # fmt: skip
    reach = 1 if min(labels.chunks[1]) >= halo and min(labels.chunks[2]) >= halo else halo
    for step in range(reach):
        if step:
            rings = rings.map_blocks(_joined_rings, dtype=object, chunks=one_each, meta=meta)
        rings = da.overlap.overlap(rings, depth={0: 0, 1: 1, 2: 1}, boundary="none")
    return rings
