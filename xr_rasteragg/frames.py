"""The pixels around each label block, for families whose kernel code reads a label's neighbourhood.

A family with a halo of ``d`` pixels (:attr:`~xr_rasteragg.families.Family.halo`, the
perimeter's 2) needs, for each label block, the ``d`` rows above and below it, the ``d``
columns left and right of it and the four ``d × d`` corners: its :class:`Frame`. The engine
makes them with cheap graph steps on the label array (:func:`frame_arrays`: one-row and
one-column slices, stacked and put on the block grid), and gives each block's label task its
eight pieces, so that the label stage reads its block once and nothing but the thin frame of
its neighbours travels. Rows and columns beyond the image stand in as copies of its edge and are
marked invalid (:meth:`Frame.valid`); blocks of any size, one pixel included, work alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np

from .families import Family

__all__ = ["PIECES", "Frame", "frame_arrays"]

#: The frame's pieces, in the order of :func:`frame_arrays` and :class:`Frame`.
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


def frame_arrays(labels: da.Array, halo: int) -> list[da.Array]:
    """The frame pieces of every block of ``labels`` ``(z, y, x)``, as dask arrays on its block grid.

    Block ``(k, j, i)`` of the ``n``-th array is that block's piece ``PIECES[n]``: the rows
    ``y_j - halo .. y_j - 1`` above the block (and ``y_{j+1} ..`` below it), the columns likewise,
    and their crossings. Indices beyond the image are clipped to its edge (the kernel ignores
    them). Built from one-row and one-column slices, stacked and rechunked: a graph of small
    tasks over the block edges, never the blocks themselves.
    """
    ny, nx = labels.shape[1:]
    if ny == 0 or nx == 0:
        raise ValueError(f"'labels' without pixels have no frames; got shape {labels.shape}")
    above = _strips(labels, 1, halo, before=True)
    below = _strips(labels, 1, halo, before=False)
    return [
        above,
        below,
        _strips(labels, 2, halo, before=True),
        _strips(labels, 2, halo, before=False),
        _strips(above, 2, halo, before=True),  # the strips keep the blocks' columns
        _strips(above, 2, halo, before=False),
        _strips(below, 2, halo, before=True),
        _strips(below, 2, halo, before=False),
    ]


def _strips(array: da.Array, axis: int, halo: int, before: bool) -> da.Array:
    """``halo`` slices along ``axis`` before (or after) each chunk boundary, clipped to the array,
    stacked in chunk order and chunked ``halo`` per chunk (the other axes keep their chunks)."""
    sizes = array.chunks[axis]
    length = array.shape[axis]
    starts = np.cumsum((0, *sizes))
    slices = []
    for j in range(len(sizes)):
        first = starts[j] - halo if before else starts[j + 1]
        for index in range(first, first + halo):
            at = int(min(max(index, 0), length - 1))
            where: list[slice] = [slice(None)] * array.ndim
            where[axis] = slice(at, at + 1)
            slices.append(array[tuple(where)])
    return da.concatenate(slices, axis=axis).rechunk({axis: (halo,) * len(sizes)})
