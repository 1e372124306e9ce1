"""Sparse per-label partial results and the rules that merge them.

A :class:`Partials` holds, for the labels present in some part of the data (one block, or the
merge of several), everything the requested statistics need: the pixel count, coordinate sums,
and per channel the sum, the central moments about the part's own mean, and the extrema.
Partials are merged with the multi-set form of the pairwise update formulas for central moments
(Chan et al. for M2, Pébay 2008 for M3 and M4), so no statistic is ever derived from raw power
sums that cancel catastrophically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import numba as nb
import numpy as np
from numpy.typing import NDArray

__all__ = ["Needs", "Partials", "concat_channels", "merge"]

#: The fields of :class:`Partials` that hold one column per channel.
CHANNEL_FIELDS = ("nvalid", "sum", "m2", "m3", "m4", "min", "max")


@dataclass(frozen=True)
class Needs:
    """What the partials must carry for a set of statistics.

    Parameters
    ----------
    order
        Highest moment needed: 0 for none (count only), 1 for the sum, 2 to 4 for the central
        moments M2 to M4.
    extrema
        Whether per-channel minima and maxima are needed.
    skipna
        Whether NaN pixels are ignored; then every channel carries its own count of valid pixels.
    """

    order: int = 0
    extrema: bool = False
    skipna: bool = False

    def __or__(self, other: Needs) -> Needs:
        if self.skipna != other.skipna:
            raise ValueError("cannot combine needs with different 'skipna' settings")
        return Needs(max(self.order, other.order), self.extrema or other.extrema, self.skipna)


@dataclass
class Partials:
    """Per-label partial results for the labels present in one part of the data.

    Attributes
    ----------
    labels
        Sorted, unique label ids, shape ``(k,)``, in the dtype of the label mask.
    count
        Number of pixels of each label, shape ``(k,)``, int64.
    coords
        Sums of the (z, y, x) pixel indices of each label, shape ``(k, 3)``, float64 (exact for
        integer sums below 2**53).
    nvalid
        Per-channel number of non-NaN pixels, shape ``(k, C)``, int64; only when NaN pixels are
        skipped, otherwise every channel counts ``count`` pixels.
    sum, m2, m3, m4
        Per-channel sum and central moments ``sum((x - mean) ** p)`` about the part's own mean,
        shape ``(k, C)``, float64; present up to the order that was needed.
    min, max
        Per-channel extrema, shape ``(k, C)``, in the image dtype (so merges are exact).
    """

    labels: NDArray[Any]
    count: NDArray[Any]
    coords: NDArray[Any]
    nvalid: NDArray[Any] | None = None
    sum: NDArray[Any] | None = None
    m2: NDArray[Any] | None = None
    m3: NDArray[Any] | None = None
    m4: NDArray[Any] | None = None
    min: NDArray[Any] | None = None
    max: NDArray[Any] | None = None

    @property
    def size(self) -> int:
        """Number of labels held."""
        return int(self.labels.shape[0])

    def channel_arrays(self) -> dict[str, NDArray[Any]]:
        """The per-channel arrays that are present, by field name."""
        out = {}
        for name in CHANNEL_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def n(self) -> NDArray[Any]:
        """Number of pixels entering the moments, shape ``(k, C)`` or ``(k, 1)``."""
        if self.nvalid is not None:
            return self.nvalid
        return self.count[:, None]

    def take(self, rows: NDArray[Any]) -> Partials:
        """Select labels by position."""
        channel = {name: value[rows] for name, value in self.channel_arrays().items()}
        return replace(
            self, labels=self.labels[rows], count=self.count[rows], coords=self.coords[rows], **channel
        )


def merge(parts: Sequence[Partials]) -> Partials:
    """Merge partials of disjoint pixel sets into the partials of their union.

    Label ids are merged as a sorted union (a linear merge of the sorted ids of the parts), and
    every part's rows are then accumulated into the union's rows in one pass per part, in part
    order: counts, sums and extrema are added or compared, and the central moments are combined
    about the merged mean::

        M2 = Σ_i [M2_i + n_i d_i²]
        M3 = Σ_i [M3_i + 3 d_i M2_i + n_i d_i³]
        M4 = Σ_i [M4_i + 4 d_i M3_i + 6 d_i² M2_i + n_i d_i⁴]

    with ``d_i = mean_i - mean``, the k-way form of the pairwise formulas of Chan et al. and
    Pébay (2008); a label that one part holds alone has ``d_i = 0`` and its rows are copied.
    Parts whose ids follow each other without overlap are simply stacked. The operation is
    associative and commutative up to rounding.

    Parameters
    ----------
    parts
        Partials computed over disjoint sets of pixels, all with the same channels and fields.

    Returns
    -------
    Partials
        The partials of the union, holding every label of any part.
    """
    parts = [p for p in parts if p.size] or list(parts[:1])
    if len(parts) == 1:
        return parts[0]
    if all(a.labels[-1] < b.labels[0] for a, b in pairwise(parts)):
        return _concat(parts)
    labels, positions = _union([p.labels for p in parts])
    k = labels.shape[0]
    first = parts[0]
    merged = replace(
        first,
        labels=labels,
        count=np.zeros(k, first.count.dtype),
        coords=np.zeros((k, 3), first.coords.dtype),
        **{
            name: np.zeros((k, value.shape[1]), value.dtype) for name, value in first.channel_arrays().items()
        },
    )
    seen = np.zeros(k, np.bool_)
    for part, rows in zip(parts, positions, strict=True):
        _add_rows(merged.count[:, None], rows, part.count[:, None])
        _add_rows(merged.coords, rows, part.coords)
        for name in ("nvalid", "sum"):
            value = getattr(merged, name)
            if value is not None:
                _add_rows(value, rows, getattr(part, name))
        if merged.min is not None and merged.max is not None:
            _extrema_rows(merged.min, merged.max, seen, rows, part.min, part.max)
    if merged.m2 is None:
        return merged
    assert merged.sum is not None
    order = 4 if merged.m4 is not None else 3 if merged.m3 is not None else 2
    m3 = merged.m3 if merged.m3 is not None else merged.m2  # placeholders below the order
    m4 = merged.m4 if merged.m4 is not None else merged.m2
    n = merged.n()
    for part, rows in zip(parts, positions, strict=True):
        assert part.sum is not None
        assert part.m2 is not None
        _moment_rows(
            merged.m2,
            m3,
            m4,
            order,
            rows,
            n,
            merged.sum,
            part.n(),
            part.sum,
            part.m2,
            part.m3 if part.m3 is not None else part.m2,
            part.m4 if part.m4 is not None else part.m2,
        )
    return merged


@nb.njit(nogil=True, cache=True)
def _add_rows(out, rows, values):  # type: ignore[no-untyped-def]
    """``out[rows] += values`` for 2-D arrays (the rows of one part are distinct)."""
    for r in range(rows.shape[0]):
        k = rows[r]
        for c in range(values.shape[1]):
            out[k, c] += values[r, c]


@nb.njit(nogil=True, cache=True)
def _extrema_rows(out_min, out_max, seen, rows, vmin, vmax):  # type: ignore[no-untyped-def]
    """Fold one part's extrema into rows ``rows`` of the output; ``seen`` marks rows already set.

    NaN propagates as in ``np.minimum`` (partials of NaN pixels not skipped carry NaN extrema).
    """
    for r in range(rows.shape[0]):
        k = rows[r]
        if seen[k]:
            for c in range(vmin.shape[1]):
                low, high = vmin[r, c], vmax[r, c]
                if low < out_min[k, c] or low != low:  # NaN propagates, as in np.minimum
                    out_min[k, c] = low
                if high > out_max[k, c] or high != high:
                    out_max[k, c] = high
        else:
            seen[k] = True
            for c in range(vmin.shape[1]):
                out_min[k, c] = vmin[r, c]
                out_max[k, c] = vmax[r, c]


@nb.njit(nogil=True, cache=True)
def _moment_rows(m2, m3, m4, order, rows, n, total, n_i, sum_i, m2_i, m3_i, m4_i):  # type: ignore[no-untyped-def]
    """Add one part's terms of the k-way central-moment update (see :func:`merge`) to rows ``rows``.

    ``n`` and ``total`` are the merged counts and sums; ``n`` and ``n_i`` have one column per
    channel, or a single column shared by all channels.
    """
    wide = n.shape[1] > 1
    for r in range(rows.shape[0]):
        k = rows[r]
        for c in range(sum_i.shape[1]):
            ni = float(n_i[r, c if wide else 0])
            d = 0.0
            if ni > 0:
                d = sum_i[r, c] / ni - total[k, c] / float(n[k, c if wide else 0])
            a2 = m2_i[r, c]
            nd2 = ni * d * d
            m2[k, c] += a2 + nd2
            if order >= 3:
                a3 = m3_i[r, c]
                m3[k, c] += a3 + d * (3.0 * a2 + nd2)
                if order >= 4:
                    m4[k, c] += m4_i[r, c] + d * (4.0 * a3 + d * (6.0 * a2 + nd2))


def _union(ids: list[NDArray[Any]]) -> tuple[NDArray[Any], list[NDArray[np.intp]]]:
    """Sorted union of sorted, unique id arrays, and the row of each part's ids in the union.

    Parts are merged pairwise in a balanced tree, so each id takes ``log2(len(ids))`` linear
    merges.
    """
    if len(ids) == 1:
        return ids[0], [np.arange(ids[0].shape[0])]
    half = len(ids) // 2
    left, left_rows = _union(ids[:half])
    right, right_rows = _union(ids[half:])
    union, to_left, to_right = _union2(left, right)
    return union, [to_left[rows] for rows in left_rows] + [to_right[rows] for rows in right_rows]


@nb.njit(nogil=True, cache=True)
def _union2(a, b):  # type: ignore[no-untyped-def]
    """Sorted union of two sorted arrays of unique ids, and the row of each id of ``a`` and ``b`` in it."""
    out = np.empty(a.shape[0] + b.shape[0], a.dtype)
    rows_a = np.empty(a.shape[0], np.intp)
    rows_b = np.empty(b.shape[0], np.intp)
    i = j = k = 0
    while i < a.shape[0] and j < b.shape[0]:
        if a[i] <= b[j]:
            out[k] = a[i]
            rows_a[i] = k
            if a[i] == b[j]:
                rows_b[j] = k
                j += 1
            i += 1
        else:
            out[k] = b[j]
            rows_b[j] = k
            j += 1
        k += 1
    while i < a.shape[0]:
        out[k] = a[i]
        rows_a[i] = k
        i += 1
        k += 1
    while j < b.shape[0]:
        out[k] = b[j]
        rows_b[j] = k
        j += 1
        k += 1
    return out[:k], rows_a, rows_b


def concat_channels(parts: Sequence[Partials]) -> Partials:
    """Join partials of the same pixels and labels but different channels, in channel order.

    Parameters
    ----------
    parts
        Partials over the same labels, one per group of channels.

    Returns
    -------
    Partials
        One partial with the channels of all parts side by side.
    """
    first = parts[0]
    for p in parts[1:]:
        if not np.array_equal(p.labels, first.labels):
            raise ValueError("channel groups of the same pixels must hold the same labels")
    channel = {
        name: np.concatenate([getattr(p, name) for p in parts], axis=1) for name in first.channel_arrays()
    }
    return replace(first, **channel)


def _concat(parts: Sequence[Partials]) -> Partials:
    """Stack partials row-wise, without merging repeated labels."""
    first = parts[0]
    channel = {
        name: np.concatenate([getattr(p, name) for p in parts], axis=0) for name in first.channel_arrays()
    }
    return replace(
        first,
        labels=np.concatenate([p.labels for p in parts]),
        count=np.concatenate([p.count for p in parts]),
        coords=np.concatenate([p.coords for p in parts]),
        **channel,
    )
