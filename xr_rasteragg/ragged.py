"""Ragged rows of integer points: a per-label field whose rows have different lengths.

A :class:`Ragged` holds, for ``k`` labels, a variable number of integer points each (the convex
hull vertices of :class:`~xr_rasteragg.families.Hull`), in compressed sparse row form: one
array of points and the offsets where each label's points start. It answers the row operations
that :class:`~xr_rasteragg.partials.Partials` applies to every field (``len``, slices, selection
by position, stacking) with NumPy arrays and compiled loops, never a Python loop per label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba as nb
import numpy as np
from numpy.typing import NDArray

__all__ = ["Ragged"]


class Ragged:
    """Rows of ``(m_i, width)`` int64 points, in compressed sparse row form.

    Row ``i`` is ``values[offsets[i]:offsets[i + 1]]``. Offsets index ``values`` directly, so a
    slice of rows shares the arrays (a view); they need not start at 0.

    Parameters
    ----------
    offsets
        Where each row starts, and after the last one where it ends: int64, shape ``(k + 1,)``,
        non-decreasing.
    values
        The points, int64, shape ``(m, width)``.
    """

    __slots__ = ("offsets", "values")

    dtype = np.dtype(object)  # one value per label, as for an object array

    def __init__(self, offsets: NDArray[np.int64], values: NDArray[np.int64]) -> None:
        if offsets.ndim != 1 or offsets.shape[0] < 1 or values.ndim != 2:
            raise ValueError(
                f"'offsets' must be 1-D with at least one entry and 'values' 2-D; got shapes "
                f"{offsets.shape} and {values.shape}"
            )
        self.offsets = offsets
        self.values = values

    @classmethod
    def empty(cls, k: int, width: int = 3) -> Ragged:
        """``k`` rows without points."""
        return cls(np.zeros(k + 1, np.int64), np.empty((0, width), np.int64))

    @property
    def shape(self) -> tuple[int]:
        """``(k,)``: one row per label."""
        return (self.offsets.shape[0] - 1,)

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def row(self, i: int) -> NDArray[np.int64]:
        """The points of row ``i``."""
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> NDArray[np.int64]:
        """The number of points of each row."""
        return np.diff(self.offsets)

    def compact(self) -> Ragged:
        """The same rows with offsets from 0 and only their points (a copy where needed)."""
        start, stop = int(self.offsets[0]), int(self.offsets[-1])
        if start == 0 and stop == self.values.shape[0]:
            return self
        return Ragged(self.offsets - start, self.values[start:stop])

    def __getitem__(self, rows: Any) -> Ragged:
        """Rows by a slice (a view) or by an array of positions (a copy)."""
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step != 1:
                raise ValueError(f"rows of a Ragged take a slice with step 1; got step {step}")
            return Ragged(self.offsets[start : max(start, stop) + 1], self.values)
        positions = np.asarray(rows)
        if positions.dtype == np.bool_:
            positions = np.flatnonzero(positions)
        if positions.ndim != 1 or positions.dtype.kind not in "iu":
            raise TypeError(
                f"rows of a Ragged take a slice or 1-D positions; got {positions.dtype} {positions.shape}"
            )
        return Ragged(*_take(self.offsets, self.values, positions.astype(np.int64)))

    def __repr__(self) -> str:
        return f"Ragged({len(self)} rows, {int(self.offsets[-1] - self.offsets[0])} points)"

    @staticmethod
    def concatenate(parts: Sequence[Ragged]) -> Ragged:
        """The rows of ``parts`` one after the other."""
        parts = [p.compact() for p in parts]
        values = np.concatenate([p.values for p in parts])
        starts = np.cumsum([0] + [p.values.shape[0] for p in parts[:-1]])
        offsets = np.concatenate(
            [parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, starts, strict=True)]
        )
        return Ragged(offsets, values)


@nb.njit(nogil=True, cache=True)
def _take(offsets, values, rows):  # type: ignore[no-untyped-def]
    """The rows ``rows`` of the ragged array ``(offsets, values)``, compacted."""
    out_offsets = np.zeros(rows.shape[0] + 1, np.int64)
    for r in range(rows.shape[0]):
        out_offsets[r + 1] = out_offsets[r] + offsets[rows[r] + 1] - offsets[rows[r]]
    out = np.empty((out_offsets[-1], values.shape[1]), np.int64)
    for r in range(rows.shape[0]):
        start = offsets[rows[r]]
        for j in range(out_offsets[r + 1] - out_offsets[r]):
            for a in range(values.shape[1]):
                out[out_offsets[r] + j, a] = values[start + j, a]
    return out_offsets, out
