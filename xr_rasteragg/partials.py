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
from typing import Any

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

    def put(self, rows: NDArray[Any], other: Partials) -> None:
        """Overwrite the partials at positions ``rows`` with ``other``'s (same label ids), in place."""
        self.count[rows] = other.count
        self.coords[rows] = other.coords
        for name, value in self.channel_arrays().items():
            value[rows] = getattr(other, name)

    def take(self, rows: NDArray[Any]) -> Partials:
        """Select labels by position."""
        channel = {name: value[rows] for name, value in self.channel_arrays().items()}
        return replace(
            self, labels=self.labels[rows], count=self.count[rows], coords=self.coords[rows], **channel
        )


def merge(parts: Sequence[Partials]) -> Partials:
    """Merge partials of disjoint pixel sets into the partials of their union.

    Label ids are merged as a sorted union; the counts, sums and extrema are added or compared,
    and the central moments are combined about the merged mean::

        M2 = Σ_i [M2_i + n_i d_i²]
        M3 = Σ_i [M3_i + 3 d_i M2_i + n_i d_i³]
        M4 = Σ_i [M4_i + 4 d_i M3_i + 6 d_i² M2_i + n_i d_i⁴]

    with ``d_i = mean_i - mean``, the k-way form of the pairwise formulas of Chan et al. and
    Pébay (2008). The operation is associative and commutative up to rounding.

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
    labels = np.concatenate([p.labels for p in parts])
    _, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
    stacked = _concat(parts)
    merged = stacked.take(first)  # already right for the labels that only one part holds
    shared = np.flatnonzero(counts > 1)
    if shared.size:
        rows = np.flatnonzero(counts[inverse] > 1)
        merged.put(shared, _combine(stacked.take(rows), inverse[rows]))
    return merged


def _combine(stacked: Partials, inverse: NDArray[Any]) -> Partials:
    """Reduce rows of partials that share labels (``inverse`` numbers the labels in sorted order)."""
    order = np.argsort(inverse, kind="stable")
    stacked, inverse = stacked.take(order), inverse[order]
    starts = np.flatnonzero(np.r_[True, np.diff(inverse) != 0])
    inverse = np.cumsum(np.r_[0, np.diff(inverse) != 0])  # renumbered 0..m-1

    def segment_sum(values: NDArray[Any]) -> NDArray[Any]:
        return np.add.reduceat(values, starts, axis=0)

    merged = Partials(
        labels=stacked.labels[starts],
        count=segment_sum(stacked.count),
        coords=segment_sum(stacked.coords),
    )
    if stacked.nvalid is not None:
        merged.nvalid = segment_sum(stacked.nvalid)
    if stacked.min is not None and stacked.max is not None:
        merged.min = np.minimum.reduceat(stacked.min, starts, axis=0)
        merged.max = np.maximum.reduceat(stacked.max, starts, axis=0)
    if stacked.sum is None:
        return merged
    merged.sum = segment_sum(stacked.sum)
    if stacked.m2 is None:
        return merged

    n_i = stacked.n().astype(np.float64)
    n = merged.n().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = merged.sum / n
        d = np.where(n_i > 0, stacked.sum / n_i - mean[inverse], 0.0)
    # Horner forms of the update terms: fewer temporaries than the expanded formulas.
    m2_i = stacked.m2
    nd2 = n_i * d * d
    merged.m2 = segment_sum(m2_i + nd2)
    if stacked.m3 is not None:
        m3_i = stacked.m3
        merged.m3 = segment_sum(m3_i + d * (3.0 * m2_i + nd2))
        if stacked.m4 is not None:
            merged.m4 = segment_sum(stacked.m4 + d * (4.0 * m3_i + d * (6.0 * m2_i + nd2)))
    return merged


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
