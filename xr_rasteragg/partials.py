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

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numba as nb
import numpy as np
from numpy.typing import NDArray

from .families import (
    FIELD_NAMES,
    Counts,
    Extrema,
    Family,
    Moments,
    Valid,
    difference,
    pixel_counts,
    shift_dtype,
)
from .ragged import Ragged

__all__ = ["Needs", "Partials", "concat_channels", "difference", "label_union", "merge", "shift_dtype"]


@dataclass(frozen=True)
class Needs:
    """What the partials must carry for a set of statistics: a set of field families.

    Parameters
    ----------
    order
        Highest moment needed (:class:`~xr_rasteragg.families.Moments`): 0 for none (count
        only), 1 for the sum, 2 to 4 for the central moments M2 to M4.
    extrema
        Whether per-channel minima and maxima are needed (:class:`~xr_rasteragg.families.Extrema`).
    skipna
        Whether NaN pixels are ignored; then every channel carries its own count of valid pixels
        (:class:`~xr_rasteragg.families.Valid`).
    more
        Further families, for statistics beyond the moments and extrema; at most one per name.
    """

    order: int = 0
    extrema: bool = False
    skipna: bool = False
    more: tuple[Family, ...] = ()

    @property
    def families(self) -> tuple[Family, ...]:
        """The families, :class:`~xr_rasteragg.families.Counts` first."""
        channel: list[Family] = [Moments(self.order)] if self.order >= 1 else []
        channel += [Extrema()] if self.extrema else []
        channel += [f for f in self.more if f.channel]
        valid: list[Family] = [Valid()] if self.skipna and channel else []
        return (Counts(), *valid, *channel, *(f for f in self.more if not f.channel))

    @property
    def halo(self) -> int:
        """How many pixels around each label block (in y and x) the kernels of the families read."""
        return max((f.halo for f in self.more), default=0)

    def __or__(self, other: Needs) -> Needs:
        if self.skipna != other.skipna:
            raise ValueError("cannot combine needs with different 'skipna' settings")
        more = {f.name: f for f in self.more}
        for f in other.more:
            more[f.name] = more[f.name].join(f) if f.name in more else f
        return Needs(
            max(self.order, other.order), self.extrema or other.extrema, self.skipna, tuple(more.values())
        )


class Partials:
    """Per-label partial results for the labels present in one part of the data.

    The fields come in families (:mod:`xr_rasteragg.families`), each read as an attribute
    (None where its family is absent):

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
    fields
        Every field, by name.
    families
        The families of the fields, :class:`~xr_rasteragg.families.Counts` first.

    Parameters
    ----------
    labels, count, coords
        As above.
    """

    __slots__ = ("__dict__", "families")  # the instance dict holds the arrays only

    labels: NDArray[Any]
    count: NDArray[np.int64]
    coords: NDArray[np.float64]
    families: tuple[Family, ...]

    def __init__(self, labels: NDArray[Any], count: NDArray[Any], coords: NDArray[Any]) -> None:
        self.__dict__.update(labels=labels, count=count, coords=coords)
        self.families = (Counts(),)

    def __getattr__(self, name: str) -> NDArray[Any] | None:
        """An absent field: None (only called for names that are not set)."""
        if name not in FIELD_NAMES:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return None

    @property
    def fields(self) -> dict[str, NDArray[Any]]:
        """Every field, by name."""
        return {name: value for name, value in self.__dict__.items() if name != "labels"}

    def channel_arrays(self) -> dict[str, NDArray[Any]]:
        """The fields that hold one column per channel, by name."""
        return {name: self.__dict__[name] for f in self.families if f.channel for name in f.names()}

    def add(self, family: Family, **fields: NDArray[Any] | Ragged) -> None:
        """Add (or replace) a family with its fields, one array per name of ``family.fields()``."""
        if set(fields) != set(family.names()):
            raise ValueError(f"family {family.name!r} has fields {family.names()}; got {sorted(fields)}")
        for f in self.families:
            if f.name == family.name:
                for name in f.names():
                    del self.__dict__[name]
        self.families = (*(f for f in self.families if f.name != family.name), family)
        self.__dict__.update(fields)

    def _with(self, labels: NDArray[Any], fields: dict[str, NDArray[Any]]) -> Partials:
        """Partials of the same families with other labels and fields."""
        out = Partials.__new__(Partials)
        out.__dict__.update(labels=labels, **fields)
        out.families = self.families
        return out

    def with_families(self, names: Collection[str]) -> Partials:
        """The same labels with only the families of these names (no copy)."""
        out = Partials.__new__(Partials)
        kept = tuple(f for f in self.families if f.name in names)
        out.__dict__.update(
            labels=self.labels, **{name: self.__dict__[name] for f in kept for name in f.names()}
        )
        out.families = kept
        return out

    def with_family(self, family: Family) -> Partials:
        """The same partials with ``family`` in place of the family of its name, if they hold
        one (no copy): one that folds the same fields otherwise
        (:attr:`~xr_rasteragg.families.Hull.lean`)."""
        out = Partials.__new__(Partials)
        out.__dict__.update(self.__dict__)
        out.families = tuple(family if f.name == family.name else f for f in self.families)
        return out

    @property
    def size(self) -> int:
        """Number of labels held."""
        return int(self.labels.shape[0])

    def sums(self) -> NDArray[np.float64]:
        """Per-channel sums ``n K + sum(x - K)``, shape ``(k, C)``."""
        assert self.shift is not None
        assert self.shifted is not None
        # Written into one output, without temporaries of its size (as the result's first pages
        # are costly to touch at 10^7 labels): the same operations, in the same order.
        out = np.multiply(self.n(), self.shift, dtype=np.float64)
        out += self.shifted
        return out

    def means(self) -> NDArray[np.float64]:
        """Per-channel means ``K + sum(x - K) / n`` (NaN where a channel has no valid pixel)."""
        assert self.shift is not None
        assert self.shifted is not None
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.divide(self.shifted, self.n(), dtype=np.float64)
        out += self.shift
        return out

    def n(self) -> NDArray[Any]:
        """Number of pixels entering the moments, shape ``(k, C)`` or ``(k, 1)``."""
        return pixel_counts(self.fields)

    def rows(self, start: int, stop: int) -> Partials:
        """The labels in rows ``start`` to ``stop`` (views, no copy)."""
        return self._with(
            self.labels[start:stop], {name: value[start:stop] for name, value in self.fields.items()}
        )

    def take(self, rows: NDArray[Any]) -> Partials:
        """Select labels by position."""
        return self._with(self.labels[rows], {name: value[rows] for name, value in self.fields.items()})


def merge(parts: Sequence[Partials]) -> Partials:
    """Merge partials of disjoint pixel sets into the partials of their union.

    Label ids are merged as a sorted union (a linear merge of the sorted ids of the parts), and
    each part is then folded into the union's rows in one pass, in part order, so that every
    output row is written once per part that holds its label: a label's first part is copied,
    and a later part's row is combined with it, family by family
    (:meth:`~xr_rasteragg.families.Family.fold`). Counts, sums and extrema are added or compared;
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
        Partials computed over disjoint sets of pixels, all with the same channels and families.

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
    merged = first._with(labels, {name: _empty_rows(v, k) for name, v in first.fields.items()})
    # Whether each part's rows are their label's first holders.
    seen = np.zeros(k, np.bool_)
    firsts = []
    for rows in positions:
        firsts.append(~seen[rows])
        seen[rows] = True
    into, fields = merged.fields, [part.fields for part in parts]
    # Part by part, families that merge with the pixel counts fold before the counts themselves;
    # families that fold every part at once, after.
    families = sorted((f for f in first.families if not f.at_once), key=lambda f: f.weights)
    for part, rows, fresh in zip(fields, positions, firsts, strict=True):
        for family in families:
            family.fold(into, part, rows, fresh)
    for family in first.families:
        if family.at_once:
            family.fold_all(into, fields, positions, firsts)
    return merged


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
    # The marked ids written in the ids' dtype at once (no index array of int64 first: for 10^7
    # labels, 120 MB less of fresh memory on the calling thread, between the pass and the rest).
    union = np.empty(int(np.count_nonzero(seen)), ids[0].dtype)
    _marked_ids(seen, low, union)
    return union, seen


@nb.njit(nogil=True, cache=True)
def _marked_ids(seen, low, out):  # type: ignore[no-untyped-def]
    """Write ``low + i`` for each marked entry ``i`` of ``seen`` into ``out``, in order (in the
    dtype of ``out`` and ``low``, so that uint64 ids do not overflow)."""
    j = 0
    for i in range(seen.shape[0]):
        if seen[i]:
            out[j] = low + out.dtype.type(i)
            j += 1


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
    fields = dict(first.fields)
    for family in first.families:
        if family.channel:
            for name in family.names():
                fields[name] = np.concatenate([p.fields[name] for p in parts], axis=1)
    return first._with(first.labels, fields)


def _concat(parts: Sequence[Partials]) -> Partials:
    """Stack partials row-wise, without merging repeated labels."""
    first = parts[0]
    return first._with(
        np.concatenate([p.labels for p in parts]),
        {name: _stack([p.fields[name] for p in parts]) for name in first.fields},
    )


def _empty_rows(field: Any, k: int) -> Any:
    """An uninitialised field like ``field`` with ``k`` rows (ragged fields: rows without points)."""
    if isinstance(field, Ragged):
        return Ragged.empty(k, field.values.shape[1])
    return np.empty((k, *field.shape[1:]), field.dtype)


def _stack(fields: Sequence[Any]) -> Any:
    """The rows of ``fields`` one after the other."""
    if isinstance(fields[0], Ragged):
        return Ragged.concatenate(fields)
    return np.concatenate(fields, axis=0)
