"""Families of partial fields: what each holds per label, how empty ones look and how they merge.

A family is a group of per-label fields that one kernel computes together and that merge by one
rule: the pixel count and coordinate sums (:class:`Counts`, always present), the per-channel
counts of valid pixels (:class:`Valid`, when NaN pixels are skipped), the shifted sums and
central moments up to an order (:class:`Moments`) and the extrema (:class:`Extrema`). A
statistic names the families it needs (:class:`~xr_rasteragg.partials.Needs`); a new kind of
statistic adds a family, with its fields and its merge rule, and the kernel code that fills it.

Merging folds one part after another into the rows of the union of their labels
(:func:`~xr_rasteragg.partials.merge`). A row's first holder is copied; a later one is combined
with it. Each family's fold is a compiled loop over the part's rows that receives the arrays it
merges as records (tuples), so a family with more fields takes a longer record, not more
arguments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import numba as nb
import numpy as np
from numba.extending import overload
from numpy.typing import NDArray

from .hulls import fold_hulls
from .ragged import Ragged

__all__ = [
    "Border",
    "Counts",
    "Extrema",
    "Family",
    "Field",
    "Geometry",
    "Hull",
    "Moments",
    "Valid",
    "Weighted",
    "difference",
    "pixel_counts",
    "shift_dtype",
]

#: Per-label arrays of a part, by field name.
Fields = Mapping[str, NDArray[Any]]
#: The name of every field of every family.
FIELD_NAMES: set[str] = set()


@dataclass(frozen=True)
class Field:
    """One per-label array of the partials.

    Attributes
    ----------
    name
        The field's name (unique over all families).
    dtype
        Its dtype, as a function of the image dtype (None when there is no image).
    width
        Its trailing shape: None for one value per label, an int for that many values per label
        (``(k, width)``), or ``"c"`` for one value per channel (``(k, C)``).
    """

    name: str
    dtype: Callable[[np.dtype | None], np.dtype]
    width: int | str | None = "c"

    def empty(self, k: int, nchan: int, image_dtype: np.dtype | None) -> NDArray[Any]:
        """An uninitialised array of this field for ``k`` labels and ``nchan`` channels."""
        shape = (k,) if self.width is None else (k, nchan if self.width == "c" else int(self.width))
        return np.empty(shape, self.dtype(image_dtype))


def _fixed(dtype: type) -> Callable[[np.dtype | None], np.dtype]:
    return lambda _image_dtype: np.dtype(dtype)


def _image(image_dtype: np.dtype | None) -> np.dtype:
    assert image_dtype is not None
    return image_dtype


def shift_dtype(dtype: np.dtype | None) -> np.dtype:
    """The dtype of the shifts of an image of ``dtype``: uint64 for uint64, int64 for other integers
    (and booleans), float64 for floating-point images."""
    assert dtype is not None
    if dtype.kind in "iub":
        return np.dtype(np.uint64 if dtype == np.uint64 else np.int64)
    return np.dtype(np.float64)


class Family(ABC):
    """A group of partial fields computed together and merged by one rule.

    Subclasses are frozen dataclasses (so that equal families compare and hash equal) and set:

    Attributes
    ----------
    name
        The family's name; :class:`~xr_rasteragg.partials.Needs` holds one family per name.
    weights
        Whether its fields are the pixel counts other families merge with; those fold after
        the others, which read the counts of the rows before the fold.
    channel
        Whether its fields hold one column per channel (and so need an image).
    halo
        How many pixels around each label block (in y and x) its kernel code reads.
    at_once
        Whether a merge folds every part in one call (:meth:`fold_all`) rather than one part
        after another; such a family reads no pixel counts.
    all_fields
        The name of every field it may hold, whatever its parameters (registered in
        :data:`FIELD_NAMES`).
    """

    name: ClassVar[str]
    weights: ClassVar[bool] = False
    channel: ClassVar[bool] = True
    halo: ClassVar[int] = 0
    at_once: ClassVar[bool] = False
    all_fields: ClassVar[tuple[str, ...]]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        FIELD_NAMES.update(cls.all_fields)

    @abstractmethod
    def fields(self) -> tuple[Field, ...]:
        """The fields it holds, in order."""

    def join(self, other: Family) -> Family:
        """One family that serves both ``self`` and ``other`` (of the same name)."""
        return self

    def empty(self, k: int, nchan: int, image_dtype: np.dtype | None) -> dict[str, NDArray[Any]]:
        """Uninitialised fields for ``k`` labels and ``nchan`` channels."""
        return {f.name: f.empty(k, nchan, image_dtype) for f in self.fields()}

    @abstractmethod
    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        """Copy or combine ``part``'s rows into rows ``rows`` (all distinct) of ``merged``, in place.

        ``first[r]`` tells whether part row ``r`` is its label's first holder (then copied).
        Families that merge with the pixel counts read them in ``merged`` as they were before
        the fold (:func:`pixel_counts`): the ``weights`` families fold last.
        """

    def fold_all(
        self,
        merged: Fields,
        parts: Sequence[Fields],
        rows: Sequence[NDArray[np.intp]],
        firsts: Sequence[NDArray[np.bool_]],
    ) -> None:
        """Fold several parts, in order (``rows`` and ``firsts`` of each as in :meth:`fold`): one
        after another, or in one pass where the family does better (:attr:`at_once`)."""
        for part, where, first in zip(parts, rows, firsts, strict=True):
            self.fold(merged, part, where, first)

    def names(self) -> tuple[str, ...]:
        """The names of its fields."""
        return tuple(f.name for f in self.fields())


@dataclass(frozen=True)
class Counts(Family):
    """Pixel count (int64) and (z, y, x) index sums (float64, shape ``(k, 3)``) of each label; added."""

    name: ClassVar[str] = "counts"
    weights: ClassVar[bool] = True
    channel: ClassVar[bool] = False
    all_fields: ClassVar[tuple[str, ...]] = ("count", "coords")

    def fields(self) -> tuple[Field, ...]:
        return (Field("count", _fixed(np.int64), None), Field("coords", _fixed(np.float64), 3))

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        _fold_sums(rows, first, merged["count"][:, None], part["count"][:, None])
        _fold_sums(rows, first, merged["coords"], part["coords"])


@dataclass(frozen=True)
class Valid(Family):
    """Per-channel number of non-NaN pixels (int64), when NaN pixels are skipped; added."""

    name: ClassVar[str] = "valid"
    weights: ClassVar[bool] = True
    all_fields: ClassVar[tuple[str, ...]] = ("nvalid",)

    def fields(self) -> tuple[Field, ...]:
        return (Field("nvalid", _fixed(np.int64)),)

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        _fold_sums(rows, first, merged["nvalid"], part["nvalid"])


@dataclass(frozen=True)
class Moments(Family):
    """Per-channel shift ``K``, ``Σ(x - K)`` and central moments ``M2..M_order``.

    See :class:`~xr_rasteragg.partials.Partials` for the fields and
    :func:`~xr_rasteragg.partials.merge` for the pairwise update formulas (Chan et al., Pébay).

    Parameters
    ----------
    order
        Highest moment: 1 (the sum), 2 to 4 (the central moments M2 to M4).
    """

    name: ClassVar[str] = "moments"
    all_fields: ClassVar[tuple[str, ...]] = ("shift", "shifted", "m2", "m3", "m4")
    order: int = 1

    def fields(self) -> tuple[Field, ...]:
        central = tuple(Field(f"m{p}", _fixed(np.float64)) for p in range(2, self.order + 1))
        return (Field("shift", shift_dtype), Field("shifted", _fixed(np.float64)), *central)

    def join(self, other: Family) -> Family:
        assert isinstance(other, Moments)
        return self if self.order >= other.order else other

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        _fold_moments(
            rows,
            first,
            (pixel_counts(merged), pixel_counts(part)),
            _moment_record(merged),
            _moment_record(part),
            self.order,
        )


def _moment_record(fields: Fields) -> tuple[NDArray[Any], ...]:
    """(shift, shifted, m2, m3, m4), the absent moments standing in by ``shifted`` (never read)."""
    shifted = fields["shifted"]
    return (fields["shift"], shifted, *(fields.get(f"m{p}", shifted) for p in (2, 3, 4)))


@dataclass(frozen=True)
class Extrema(Family):
    """Per-channel minima and maxima in the image dtype (merges are exact); NaN propagates."""

    name: ClassVar[str] = "extrema"
    all_fields: ClassVar[tuple[str, ...]] = ("min", "max")

    def fields(self) -> tuple[Field, ...]:
        return (Field("min", _image), Field("max", _image))

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        _fold_extrema(rows, first, (merged["min"], merged["max"]), (part["min"], part["max"]))


@nb.njit(nogil=True, cache=True)
def _fold_sums(rows, first, out, part):  # type: ignore[no-untyped-def]
    """Copy (first holder) or add each 2-D ``part`` row into row ``rows[r]`` of ``out``."""
    for r in range(rows.shape[0]):
        i = rows[r]
        if first[r]:
            for j in range(part.shape[1]):
                out[i, j] = part[r, j]
        else:
            for j in range(part.shape[1]):
                out[i, j] += part[r, j]


@nb.njit(nogil=True, cache=True)
def _fold_extrema(rows, first, out, part):  # type: ignore[no-untyped-def]
    """Copy or combine the (min, max) record ``part`` into ``out``; NaN propagates, as in np.minimum."""
    lo, hi = out
    lo_b, hi_b = part
    for r in range(rows.shape[0]):
        i = rows[r]
        if first[r]:
            for c in range(lo_b.shape[1]):
                lo[i, c] = lo_b[r, c]
                hi[i, c] = hi_b[r, c]
            continue
        for c in range(lo_b.shape[1]):
            low, high = lo_b[r, c], hi_b[r, c]
            if low < lo[i, c] or low != low:
                lo[i, c] = low
            if high > hi[i, c] or high != high:
                hi[i, c] = high


@nb.njit(nogil=True, cache=True)
def _fold_moments(rows, first, counts, out, part, order):  # type: ignore[no-untyped-def]
    """Copy or combine the moment record ``part`` (shift, shifted, m2, m3, m4) into ``out``.

    ``counts`` holds the pixel counts of the merged rows (before the fold) and of the part's
    rows, each of shape ``(k, C)`` or ``(k, 1)`` (one count for all channels). A combined row
    keeps its shift ``K``; the part's sum moves onto it by ``Δ = K_b - K`` (:func:`difference`),
    and the means the moment formulas compare are ``sum(x - K) / n``, small numbers where the
    label's spread is small.
    """
    shift, total, m2, m3, m4 = out
    shift_b, total_b, m2_b, m3_b, m4_b = part
    n_a, n_b = counts
    wide = n_a.shape[1] > 1
    for r in range(rows.shape[0]):
        i = rows[r]
        copy = first[r]
        for c in range(total_b.shape[1]):
            na = 0.0 if copy else float(n_a[i, c if wide else 0])
            nb_ = float(n_b[r, c if wide else 0])
            if copy or (nb_ > 0 and na == 0):  # no valid pixel in this channel yet: take the part's
                shift[i, c] = shift_b[r, c]
                total[i, c] = total_b[r, c]
                if order >= 2:
                    m2[i, c] = m2_b[r, c]
                if order >= 3:
                    m3[i, c] = m3_b[r, c]
                if order >= 4:
                    m4[i, c] = m4_b[r, c]
            elif nb_ > 0:
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


def pixel_counts(fields: Fields) -> NDArray[np.int64]:
    """Pixels entering the per-channel fields: ``nvalid`` (``(k, C)``) when NaN pixels are skipped,
    otherwise ``count`` as a column (``(k, 1)``)."""
    nvalid = fields.get("nvalid")
    return fields["count"][:, None] if nvalid is None else nvalid


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


# -- shape: label geometry, perimeter, convex hull, intensity-weighted centroid -------------------

#: The pairs of axes (of z, y, x) whose index products :class:`Geometry` sums, in field order.
PRODUCT_AXES = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


@dataclass(frozen=True)
class Geometry(Family):
    """Per label: a reference pixel, the sums of index offsets from it and their products, and the
    bounding box; merged exactly.

    ``origin`` (int64, ``(k, 3)``) is one (z, y, x) pixel of the label; ``offsets`` holds
    ``Σ d`` and ``products`` ``Σ d_a d_b`` (the pairs of :data:`PRODUCT_AXES`) over the label's
    pixels, with ``d`` = pixel index - origin (float64 holding integers, exact below 2**53);
    ``low`` and ``high`` (int64) are the bounding box, ``high`` exclusive. A merge moves the part's
    sums onto the merged row's origin by the integer shift ``t`` between the origins
    (``Σ (d + t)_a (d + t)_b = Σ d_a d_b + t_a Σ d_b + t_b Σ d_a + n t_a t_b``), so the central
    moments come out of integers whatever the label's distance from the image origin.
    """

    name: ClassVar[str] = "geometry"
    channel: ClassVar[bool] = False
    all_fields: ClassVar[tuple[str, ...]] = ("origin", "offsets", "products", "low", "high")

    def fields(self) -> tuple[Field, ...]:
        return (
            Field("origin", _fixed(np.int64), 3),
            Field("offsets", _fixed(np.float64), 3),
            Field("products", _fixed(np.float64), len(PRODUCT_AXES)),
            Field("low", _fixed(np.int64), 3),
            Field("high", _fixed(np.int64), 3),
        )

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        names = self.names()
        _fold_geometry(
            rows, first, part["count"], tuple(merged[n] for n in names), tuple(part[n] for n in names)
        )


@nb.njit(nogil=True, cache=True)
def _fold_geometry(rows, first, count, out, part):  # type: ignore[no-untyped-def]
    """Copy or combine the :class:`Geometry` record ``part`` into ``out`` (``count``: the part's pixels)."""
    origin, offsets, products, low, high = out
    origin_b, offsets_b, products_b, low_b, high_b = part
    for r in range(rows.shape[0]):
        i = rows[r]
        if first[r]:
            for a in range(3):
                origin[i, a] = origin_b[r, a]
                offsets[i, a] = offsets_b[r, a]
                low[i, a] = low_b[r, a]
                high[i, a] = high_b[r, a]
            for q in range(products_b.shape[1]):
                products[i, q] = products_b[r, q]
            continue
        n = float(count[r])
        t = np.empty(3)
        for a in range(3):
            t[a] = float(origin_b[r, a] - origin[i, a])
        for q in range(6):
            a, b = PRODUCT_AXES[q]
            products[i, q] += (
                products_b[r, q] + t[a] * offsets_b[r, b] + t[b] * offsets_b[r, a] + n * t[a] * t[b]
            )
        for a in range(3):
            offsets[i, a] += offsets_b[r, a] + n * t[a]
            low[i, a] = min(low[i, a], low_b[r, a])
            high[i, a] = max(high[i, a], high_b[r, a])


@dataclass(frozen=True)
class Border(Family):
    """Per label: how many of its border pixels have each perimeter weight of
    :func:`skimage.measure.perimeter` (int64, ``(k, 3)``: weights 1, √2 and (1 + √2) / 2); added.

    A pixel's weight depends on the label's mask two pixels around it, so the kernel reads each
    label block with a halo of :attr:`halo` pixels in y and x.
    """

    name: ClassVar[str] = "border"
    channel: ClassVar[bool] = False
    halo: ClassVar[int] = 2
    all_fields: ClassVar[tuple[str, ...]] = ("border",)

    def fields(self) -> tuple[Field, ...]:
        return (Field("border", _fixed(np.int64), 3),)

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        _fold_sums(rows, first, merged["border"], part["border"])


@dataclass(frozen=True)
class Hull(Family):
    """Per label: the vertices of the convex hull of its pixel centres in each z plane, as global
    (z, y, x) indices sorted in that order, in a :class:`~xr_rasteragg.ragged.Ragged` field
    ``hull``; and ``convex`` (int64), the pixels of the convex hull image of a label whose
    vertices lie in one plane and come from one part (-1 where that is not known yet).

    The hull of a union is the hull of the parts' hulls, so a merge re-hulls the vertex lists
    of a label's parts plane by plane, all parts at once (:func:`~xr_rasteragg.hulls.fold_hulls`,
    compiled loops over each part in turn, which copy every other row once), and leaves the
    pixel count of the labels it merges unknown; the 3-D hull of a label is the hull of its
    planes' vertices. Most labels lie in one block: their pixel count is made there, in
    parallel, and finalization counts only the others.

    Attributes
    ----------
    lean
        For the last merge before the features of 2-D labels (in (y, x)) are finalized, which
        read only the vertices of the labels whose pixels are not counted yet: a label whose
        vertices come from one part that counted its pixels keeps that count and no vertices
        (their copy was most of that merge's cost).
    """

    lean: bool = False
    name: ClassVar[str] = "hull"
    channel: ClassVar[bool] = False
    at_once: ClassVar[bool] = True
    all_fields: ClassVar[tuple[str, ...]] = ("hull", "convex")

    def fields(self) -> tuple[Field, ...]:
        return (Field("hull", _fixed(object), None), Field("convex", _fixed(np.int64), None))

    def empty(self, k: int, nchan: int, image_dtype: np.dtype | None) -> dict[str, Any]:
        return {"hull": Ragged.empty(k), "convex": np.full(k, -1, np.int64)}

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        self.fold_all(merged, [part], [rows], [first])

    def fold_all(
        self,
        merged: Fields,
        parts: Sequence[Fields],
        rows: Sequence[NDArray[np.intp]],
        firsts: Sequence[NDArray[np.bool_]],
    ) -> None:
        # The merged rows so far are one more part, before the others; a row keeps the pixel
        # count of its convex hull image where its vertices come from one part row.
        out = cast(Ragged, merged["hull"])
        k = len(out)
        hulls = [out, *(cast(Ragged, p["hull"]) for p in parts)]
        targets = np.concatenate([np.arange(k), *rows]).astype(np.int64)
        convex = np.concatenate([merged["convex"], *(p["convex"] for p in parts)])
        out.offsets, out.values, source = fold_hulls(
            [np.ascontiguousarray(h.offsets, np.int64) for h in hulls],
            [np.ascontiguousarray(h.values, np.int64) for h in hulls],
            targets,
            k,
            keep=convex < 0 if self.lean else None,  # lean: the rows whose pixels are not counted
        )
        merged["convex"][:] = np.where(source >= 0, convex[np.maximum(source, 0)], -1)


@dataclass(frozen=True)
class Weighted(Family):
    """Per channel: the sum of the values (``weight``) and of the values times each pixel index
    (``weighted_z``, ``weighted_y``, ``weighted_x``), float64; added."""

    name: ClassVar[str] = "weighted"
    all_fields: ClassVar[tuple[str, ...]] = ("weight", "weighted_z", "weighted_y", "weighted_x")

    def fields(self) -> tuple[Field, ...]:
        return tuple(Field(name, _fixed(np.float64)) for name in self.all_fields)

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        for name in self.all_fields:
            _fold_sums(rows, first, merged[name], part[name])
