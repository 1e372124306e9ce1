"""Sparse per-label partial results and the rules that merge them.

A :class:`Partials` holds, for the labels present in some part of the data (one block, or the
merge of several), everything the requested statistics need: the pixel count, coordinate sums,
and per channel a shift (one of the label's own values), the sum of the values less the shift,
the central moments about the part's own mean, and the extrema.
Partials are merged with the multi-set form of the pairwise update formulas for central moments
(Chan et al. for M2, Pébay 2008 for M3 and M4), so no statistic is ever derived from raw power
sums that cancel catastrophically.

Why a shift: a mean far larger than the spread (1e8 ± 1 in float64, uint32 values near 2**32,
int64 values near 2**62) is not representable to the precision the merge formulas need, and
64-bit integers are not representable in float64 at all. Every value enters the moments as its
difference from the shift, taken exactly in the image's own arithmetic (:func:`difference`), so
the means that the merges compare are small numbers close to the spread, and a constant label has
deviations, moments and variance exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import numba as nb
import numpy as np
from numba.extending import overload
from numpy.typing import NDArray

__all__ = ["Needs", "Partials", "concat_channels", "difference", "label_union", "merge", "shift_dtype"]

#: Parts of at most this many rows in all are stacked before a merge (see :func:`merge`).
STACK_ROWS = 2**20
#: The fields of :class:`Partials` that hold one column per channel.
CHANNEL_FIELDS = ("nvalid", "shift", "shifted", "m2", "m3", "m4", "min", "max")


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
    shift
        Per-channel shift ``K``: one of the label's values in the part (its first finite one),
        or 0 where it has none, shape ``(k, C)``, in :func:`shift_dtype` of the image dtype
        (int64 or uint64 for integer images, float64 otherwise); present with ``shifted``.
    shifted
        Per-channel ``sum(x - K)``, shape ``(k, C)``, float64, each difference taken exactly
        where float64 can hold it (:func:`difference`); the sum is ``n K + shifted`` and the
        mean ``K + shifted / n``.
    m2, m3, m4
        Per-channel central moments ``sum((x - mean) ** p)`` about the part's own mean, shape
        ``(k, C)``, float64; present up to the order that was needed.
    min, max
        Per-channel extrema, shape ``(k, C)``, in the image dtype (so merges are exact).
    """

    labels: NDArray[Any]
    count: NDArray[Any]
    coords: NDArray[Any]
    nvalid: NDArray[Any] | None = None
    shift: NDArray[Any] | None = None
    shifted: NDArray[Any] | None = None
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

    def sums(self) -> NDArray[np.float64]:
        """Per-channel sums ``n K + sum(x - K)``, shape ``(k, C)``."""
        assert self.shift is not None
        assert self.shifted is not None
        return self.n() * self.shift.astype(np.float64) + self.shifted

    def means(self) -> NDArray[np.float64]:
        """Per-channel means ``K + sum(x - K) / n`` (NaN where a channel has no valid pixel)."""
        assert self.shift is not None
        assert self.shifted is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.shift.astype(np.float64) + self.shifted / self.n()

    def n(self) -> NDArray[Any]:
        """Number of pixels entering the moments, shape ``(k, C)`` or ``(k, 1)``."""
        if self.nvalid is not None:
            return self.nvalid
        return self.count[:, None]

    def rows(self, start: int, stop: int) -> Partials:
        """The labels in rows ``start`` to ``stop`` (views, no copy)."""
        channel = {name: value[start:stop] for name, value in self.channel_arrays().items()}
        return replace(
            self,
            labels=self.labels[start:stop],
            count=self.count[start:stop],
            coords=self.coords[start:stop],
            **channel,
        )

    def take(self, rows: NDArray[Any]) -> Partials:
        """Select labels by position."""
        channel = {name: value[rows] for name, value in self.channel_arrays().items()}
        return replace(
            self, labels=self.labels[rows], count=self.count[rows], coords=self.coords[rows], **channel
        )


def shift_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of the shifts of an image of ``dtype``: uint64 for uint64, int64 for other integers
    (and booleans), float64 for floating-point images."""
    if dtype.kind in "iub":
        return np.dtype(np.uint64 if dtype == np.uint64 else np.int64)
    return np.dtype(np.float64)


def difference(x: Any, k: Any) -> float:
    """``x - k`` as float64, exact whenever float64 can hold the difference.

    Integers are subtracted in 64-bit two's complement arithmetic first, which is exact while
    ``|x - k| < 2**63`` (always, for values of at most 32 bits), and only the difference is
    rounded to float64; this is what keeps 64-bit integer images exact, whose values float64
    cannot hold. Where the difference itself leaves the 64-bit range, both are rounded to float64
    first. Floats are subtracted in float64 (exact for values within a factor of two of each
    other, as a label's values and its shift are when the mean is large against the spread).
    Compiled for Numba code; from Python it runs as plain arithmetic.
    """
    if isinstance(x, int | np.integer) and isinstance(k, int | np.integer):
        return float(int(x) - int(k))
    return float(x) - float(k)


@overload(difference, jit_options={"nogil": True})
def _difference_compiled(x: Any, k: Any) -> Any:
    """The compiled :func:`difference`, chosen by the types of its arguments."""
    if isinstance(x, nb.types.Integer) and isinstance(k, nb.types.Integer):

        def integers(x: Any, k: Any) -> float:
            wrapped = np.int64(np.uint64(x) - np.uint64(k))  # modulo 2**64
            if (x >= k) != (wrapped >= 0):  # the difference left the int64 range
                return float(x) - float(k)
            return float(wrapped)

        return integers

    def floats(x: Any, k: Any) -> float:
        return float(x) - float(k)

    return floats


def merge(parts: Sequence[Partials]) -> Partials:
    """Merge partials of disjoint pixel sets into the partials of their union.

    Label ids are merged as a sorted union (a linear merge of the sorted ids of the parts), and
    each part is then folded into the union's rows in one pass, in part order, so that every
    output row is written once per part that holds its label: a label's first part is copied,
    and a later part's row is combined with it. Counts, sums and extrema are added or compared;
    the central moments use the pairwise update of Chan et al. (M2) and Pébay (2008) (M3, M4),
    with ``δ = mean_b - mean_a``, ``n = n_a + n_b``::

        M2 = M2_a + M2_b + δ² n_a n_b / n
        M3 = M3_a + M3_b + δ³ n_a n_b (n_a - n_b) / n² + 3 δ (n_a M2_b - n_b M2_a) / n
        M4 = M4_a + M4_b + δ⁴ n_a n_b (n_a² - n_a n_b + n_b²) / n³
             + 6 δ² (n_a² M2_b + n_b² M2_a) / n² + 4 δ (n_a M3_b - n_b M3_a) / n

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
    if len(parts) > 2 and sum(p.size for p in parts) <= STACK_ROWS:
        # Many small parts (the pieces of the final merge): the cost is per call, not per row,
        # so they are stacked and folded in one call.
        parts, positions = [_concat(parts)], [np.concatenate(positions)]
    k = labels.shape[0]
    first = parts[0]
    merged = replace(
        first,
        labels=labels,
        count=np.empty(k, first.count.dtype),
        coords=np.empty((k, 3), first.coords.dtype),
        **{
            name: np.empty((k, value.shape[1]), value.dtype) for name, value in first.channel_arrays().items()
        },
    )
    order = 4 if first.m4 is not None else 3 if first.m3 is not None else 2 if first.m2 is not None else 1
    order = order if first.shifted is not None else 0
    seen = np.zeros(k, np.bool_)
    for part, rows in zip(parts, positions, strict=True):
        _fold(merged, part, rows, seen, order)
    return merged


def _fold(
    merged: Partials, part: Partials, rows: NDArray[np.intp], seen: NDArray[np.bool_], order: int
) -> None:
    """Fold ``part`` into rows ``rows`` of ``merged`` (``seen`` marks the rows already written)."""
    none = np.zeros((1, 1))  # stands in for the fields that are absent (never read)

    def field(p: Partials, name: str) -> NDArray[Any]:
        value = getattr(p, name)
        return none if value is None else value

    _fold_rows(  # type: ignore[call-arg]
        seen,
        rows,
        order,
        merged.nvalid is not None,
        merged.min is not None,
        merged.count,
        merged.coords,
        *(field(merged, name) for name in CHANNEL_FIELDS),
        part.count,
        part.coords,
        *(field(part, name) for name in CHANNEL_FIELDS),
    )


@nb.njit(nogil=True, cache=True)
def _fold_rows(  # type: ignore[no-untyped-def]
    seen, rows, order, skipna, extrema,
    count, coords, nvalid, shift, total, m2, m3, m4, lo, hi,
    count_b, coords_b, nvalid_b, shift_b, total_b, m2_b, m3_b, m4_b, lo_b, hi_b,
):  # fmt: skip
    """Copy or combine one part's rows into the output rows ``rows`` (see :func:`merge`).

    A combined row keeps its shift ``K``; the part's sum moves onto it by ``Δ = K_b - K``
    (:func:`difference`), and the means the moment formulas compare are ``sum(x - K) / n``,
    small numbers where the label's spread is small.
    """
    nchan = total_b.shape[1] if order >= 1 else lo_b.shape[1] if extrema else 0
    for r in range(rows.shape[0]):
        i = rows[r]
        if not seen[i]:
            seen[i] = True
            count[i] = count_b[r]
            for j in range(3):
                coords[i, j] = coords_b[r, j]
            for c in range(nchan):
                if skipna:
                    nvalid[i, c] = nvalid_b[r, c]
                if order >= 1:
                    shift[i, c] = shift_b[r, c]
                    total[i, c] = total_b[r, c]
                if order >= 2:
                    m2[i, c] = m2_b[r, c]
                if order >= 3:
                    m3[i, c] = m3_b[r, c]
                if order >= 4:
                    m4[i, c] = m4_b[r, c]
                if extrema:
                    lo[i, c] = lo_b[r, c]
                    hi[i, c] = hi_b[r, c]
            continue
        for c in range(nchan):
            na = float(nvalid[i, c] if skipna else count[i])
            nb_ = float(nvalid_b[r, c] if skipna else count_b[r])
            if order >= 1 and nb_ > 0 and na == 0:  # no valid pixel in this channel yet: take the part's
                shift[i, c] = shift_b[r, c]
                total[i, c] = total_b[r, c]
                if order >= 2:
                    m2[i, c] = m2_b[r, c]
                if order >= 3:
                    m3[i, c] = m3_b[r, c]
                if order >= 4:
                    m4[i, c] = m4_b[r, c]
            elif order >= 1 and nb_ > 0:
                moved = difference(shift_b[r, c], shift[i, c])
                if order >= 2:
                    n = na + nb_
                    delta = moved + total_b[r, c] / nb_ - total[i, c] / na
                    dn = delta / n
                    ab = na * nb_
                    a2, b2 = m2[i, c], m2_b[r, c]
                    if order >= 3:
                        a3, b3 = m3[i, c], m3_b[r, c]
                        if order >= 4:
                            m4[i, c] = (
                                m4[i, c]
                                + m4_b[r, c]
                                + delta * dn * dn * dn * ab * (na * na - ab + nb_ * nb_)
                                + 6.0 * dn * dn * (na * na * b2 + nb_ * nb_ * a2)
                                + 4.0 * dn * (na * b3 - nb_ * a3)
                            )
                        m3[i, c] = (
                            a3 + b3 + delta * dn * dn * ab * (na - nb_) + 3.0 * dn * (na * b2 - nb_ * a2)
                        )
                    m2[i, c] = a2 + b2 + delta * dn * ab
                total[i, c] += total_b[r, c] + nb_ * moved
            if skipna:
                nvalid[i, c] += nvalid_b[r, c]
            if extrema:
                low, high = lo_b[r, c], hi_b[r, c]
                if low < lo[i, c] or low != low:  # NaN propagates, as in np.minimum
                    lo[i, c] = low
                if high > hi[i, c] or high != high:
                    hi[i, c] = high
        count[i] += count_b[r]
        for j in range(3):
            coords[i, j] += coords_b[r, j]


def label_union(ids: Sequence[NDArray[Any]]) -> NDArray[Any]:
    """Sorted union of sorted, unique id arrays of one dtype.

    Ids that span a range no wider than a few times their number (the usual case: labels
    numbered 1..n) are marked in a table over that range, one pass over each array; others are
    merged pairwise in a balanced tree.
    """
    ids = [a for a in ids if a.shape[0]] or list(ids[:1])
    if len(ids) == 1:
        return ids[0]
    low = _dense_low(ids)
    return _tree_union(ids)[0] if low is None else _marked(ids, low)[0]


def _dense_low(ids: Sequence[NDArray[Any]]) -> Any | None:
    """The smallest id (in the ids' dtype) if the ids span a range at most a few times their number."""
    low = min(int(a[0]) for a in ids)
    width = max(int(a[-1]) for a in ids) - low + 1
    return ids[0].dtype.type(low) if width <= 4 * sum(a.shape[0] for a in ids) + 1024 else None


def _marked(ids: Sequence[NDArray[Any]], low: Any) -> tuple[NDArray[Any], NDArray[np.bool_]]:
    """Union of sorted ids from ``low`` on, through a table that marks each id present, and the table."""
    seen = np.zeros(max(int(a[-1]) for a in ids) - int(low) + 1, np.bool_)
    for a in ids:
        _mark(seen, a, low)
    return np.flatnonzero(seen).astype(ids[0].dtype) + low, seen


@nb.njit(nogil=True, cache=True)
def _mark(seen, ids, low):  # type: ignore[no-untyped-def]
    """Set ``seen[id - low]`` for each id (in the ids' dtype, so that uint64 ids do not overflow)."""
    for i in range(ids.shape[0]):
        seen[ids[i] - low] = True


@nb.njit(nogil=True, cache=True)
def _ranks(seen):  # type: ignore[no-untyped-def]
    """For each marked entry of ``seen``, its number among the marked ones."""
    rank = np.empty(seen.shape[0], np.intp)
    k = 0
    for i in range(seen.shape[0]):
        rank[i] = k
        k += seen[i]
    return rank


@nb.njit(nogil=True, cache=True)
def _rows_of(rank, ids, low):  # type: ignore[no-untyped-def]
    """``rank[id - low]`` for each id."""
    rows = np.empty(ids.shape[0], np.intp)
    for i in range(ids.shape[0]):
        rows[i] = rank[ids[i] - low]
    return rows


def _union(ids: list[NDArray[Any]]) -> tuple[NDArray[Any], list[NDArray[np.intp]]]:
    """Sorted union of sorted, unique id arrays, and the row of each part's ids in the union.

    Dense ids (see :func:`label_union`) find their rows through a table of ranks over their
    range; others are merged pairwise in a balanced tree, so each id takes
    ``log2(len(ids))`` linear merges.
    """
    low = _dense_low(ids)
    if low is not None:
        union, seen = _marked(ids, low)
        rank = _ranks(seen)
        return union, [_rows_of(rank, a, low) for a in ids]
    return _tree_union(ids)


def _tree_union(ids: list[NDArray[Any]]) -> tuple[NDArray[Any], list[NDArray[np.intp]]]:
    """:func:`_union` by pairwise merges in a balanced tree."""
    if len(ids) == 1:
        return ids[0], [np.arange(ids[0].shape[0])]
    half = len(ids) // 2
    left, left_rows = _tree_union(ids[:half])
    right, right_rows = _tree_union(ids[half:])
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
