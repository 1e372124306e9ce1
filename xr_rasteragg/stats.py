"""The statistics: what partials each one needs, and how it is finalized from them.

Each statistic is a small spec (as in flox's aggregations): the :class:`~xr_rasteragg.partials.Needs`
it puts on the one pass over the data, the function that turns merged partials into its values,
and the value it takes for a label that has no pixels. Adding a statistic is adding a spec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal, get_args

import numba as nb
import numpy as np
from numpy.typing import NDArray

from .families import Border, Geometry, Hull, Weighted
from .partials import Needs, Partials
from .shape import ShapeQuantities, Space
from .whole_label import Quantiles, WholeLabel

__all__ = [
    "SHAPE_FEATURES",
    "STATISTICS",
    "Derived",
    "Space",
    "StatName",
    "Statistic",
    "check_space",
    "finalize",
    "needs_of",
    "validate_stats",
]

StatName = Literal[
    "count",
    "sum",
    "mean",
    "var",
    "std",
    "skew",
    "kurtosis",
    "min",
    "max",
    "center_of_mass",
    "median",
    "area",
    "bbox",
    "centroid",
    "axis_major_length",
    "axis_minor_length",
    "eccentricity",
    "orientation",
    "inertia_tensor",
    "inertia_tensor_eigvals",
    "extent",
    "equivalent_diameter_area",
    "perimeter",
    "solidity",
    "centroid_weighted",
    "radii",
    "principal_axes",
]


#: The dtype of most statistics.
FLOAT64 = np.dtype(np.float64)


@dataclass(frozen=True)
class Statistic:
    """How one statistic is computed.

    Attributes
    ----------
    needs
        What the partials must carry for it.
    compute
        Turns partials (of labels that have pixels, wrapped in :class:`Derived`) into values,
        shape ``(k, *row_shape(C))``; None for a whole-label statistic.
    fill
        Its value for a label without pixels.
    dims
        Names of the trailing dimensions of its values: ``()``, ``("c",)`` (one value per
        channel), ``("axis",)`` (one per engine axis z, y, x), or for shape features ``"space"``
        and ``"space_j"`` (one per spatial axis of the labels), ``"eig"`` (one per eigenvalue,
        as many as spatial axes) and ``"bound"`` (the bounding box: twice as many).
    dtype
        The dtype of its values.
    whole
        For a statistic of each label's pixels taken whole (a median): how the gather
        (:mod:`xr_rasteragg.gather`) computes it, rather than from partials.
    ndims
        The numbers of spatial dims of labels for which it is defined.
    """

    needs: Needs
    compute: Callable[[Derived], NDArray[np.generic]] | None
    fill: float
    dims: tuple[str, ...] = ("c",)
    dtype: np.dtype = FLOAT64
    whole: WholeLabel | None = None
    ndims: tuple[int, ...] = (1, 2, 3)

    @property
    def per_channel(self) -> bool:
        """Whether it has one value per channel."""
        return "c" in self.dims

    def row_shape(self, nchan: int, ndim: int = 3) -> tuple[int, ...]:
        """Shape of its values for one label, for an image of ``nchan`` channels and labels of
        ``ndim`` spatial dims."""
        return tuple(
            nchan if dim == "c" else _DIM_SIZES[dim] * (ndim if dim in _PER_DIM else 1) for dim in self.dims
        )


#: Sizes of the trailing dimensions that do not depend on the image (per spatial dim of the
#: labels for those in :data:`_PER_DIM`).
_DIM_SIZES = {"axis": 3, "space": 1, "space_j": 1, "eig": 1, "bound": 2}
_PER_DIM = {"space", "space_j", "eig", "bound"}


class Derived:
    """Merged partials with the quantities that several statistics share, each computed once.

    Finalizing var, std, skew and kurtosis together would otherwise convert the counts, divide
    the sums and form the variance once per statistic, over every label and channel.

    Parameters
    ----------
    partials
        Merged partials (of labels that have pixels).
    """

    def __init__(self, partials: Partials, space: Space | None = None) -> None:
        self.p = partials
        self.space = space or Space()

    @cached_property
    def shape(self) -> ShapeQuantities:
        """The quantities that the shape features share."""
        return ShapeQuantities(self.p, self.space)

    @cached_property
    def n(self) -> NDArray[np.float64]:
        """Pixels entering the moments, shape ``(k, C)`` or ``(k, 1)``, as float64."""
        return self.p.n().astype(np.float64)

    @cached_property
    def mean(self) -> NDArray[np.float64]:
        """Per-channel means (NaN where a channel has no valid pixel)."""
        return self.p.means()

    @cached_property
    def var(self) -> NDArray[np.float64]:
        """Per-channel population variances."""
        assert self.p.m2 is not None
        out = np.maximum(self.p.m2, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out /= self.n
        return out


def _standardized(
    d: Derived, moment: NDArray[np.float64] | None, power: int, offset: float = 0.0
) -> NDArray[np.float64]:
    """``m_k / m_2^(k/2) + offset`` for ``k = power``, NaN where the label is constant (m_2 = 0).

    The moments are exact for a constant label (every deviation from its shift is 0), so
    constancy is tested exactly; scipy.stats also calls a label constant whose variance is below
    ``(1e-14 mean)**2``, which would wrongly cover 64-bit integer images with large values.
    """
    assert moment is not None
    return _standardized_rows(moment, d.n, d.var, power, offset)


@nb.njit(nogil=True, cache=True, error_model="numpy")  # x / 0 gives inf or NaN, as in NumPy
def _standardized_rows(moment, n, var, power, offset):  # type: ignore[no-untyped-def]
    """One loop over labels and channels for :func:`_standardized` (no temporaries of size (k, C)).

    A label counts as constant where ``var == 0``; ``power`` is 3 (skewness, ``var**1.5``) or 4
    (kurtosis, ``var**2``).
    """
    out = np.empty(moment.shape)
    wide = n.shape[1] > 1
    for i in range(moment.shape[0]):
        for c in range(moment.shape[1]):
            v = var[i, c]
            if v == 0:
                out[i, c] = np.nan
                continue
            scale = v * v if power == 4 else v * np.sqrt(v)
            out[i, c] = moment[i, c] / n[i, c if wide else 0] / scale + offset
    return out


def _extremum(values: NDArray[np.generic] | None, d: Derived) -> NDArray[np.float64]:
    assert values is not None
    out = values.astype(np.float64)
    if d.p.nvalid is not None:
        out[d.p.nvalid == 0] = np.nan
    return out


STATISTICS: dict[str, Statistic] = {
    "count": Statistic(Needs(0), lambda d: d.p.count, 0, dims=(), dtype=np.dtype(np.int64)),
    "sum": Statistic(Needs(1), lambda d: d.p.sums(), 0),
    "mean": Statistic(Needs(1), lambda d: d.mean, np.nan),
    "var": Statistic(Needs(2), lambda d: d.var, np.nan),
    "std": Statistic(Needs(2), lambda d: np.sqrt(d.var), np.nan),
    "skew": Statistic(Needs(3), lambda d: _standardized(d, d.p.m3, 3), np.nan),
    "kurtosis": Statistic(Needs(4), lambda d: _standardized(d, d.p.m4, 4, -3.0), np.nan),
    "min": Statistic(Needs(0, extrema=True), lambda d: _extremum(d.p.min, d), np.nan),
    "max": Statistic(Needs(0, extrema=True), lambda d: _extremum(d.p.max, d), np.nan),
    "center_of_mass": Statistic(Needs(0), lambda d: d.p.coords / d.p.count[:, None], np.nan, dims=("axis",)),
    "median": Statistic(Needs(0), None, np.nan, whole=Quantiles((0.5,), scalar=True)),
}

_GEOMETRY = Needs(more=(Geometry(),))
_INT64 = np.dtype(np.int64)

#: The shape features (:mod:`xr_rasteragg.shape`), named and defined as in
#: :func:`skimage.measure.regionprops`, plus harpy's radii and principal axes.
SHAPE_FEATURES: dict[str, Statistic] = {
    "area": Statistic(_GEOMETRY, lambda d: d.shape.area, np.nan, dims=()),
    "bbox": Statistic(_GEOMETRY, lambda d: d.shape.bbox, 0, dims=("bound",), dtype=_INT64),
    "centroid": Statistic(_GEOMETRY, lambda d: d.shape.centroid, np.nan, dims=("space",)),
    "axis_major_length": Statistic(
        _GEOMETRY, lambda d: d.shape.axis_length(True), np.nan, dims=(), ndims=(2, 3)
    ),
    "axis_minor_length": Statistic(
        _GEOMETRY, lambda d: d.shape.axis_length(False), np.nan, dims=(), ndims=(2, 3)
    ),
    "eccentricity": Statistic(_GEOMETRY, lambda d: d.shape.eccentricity(), np.nan, dims=(), ndims=(2,)),
    "orientation": Statistic(_GEOMETRY, lambda d: d.shape.orientation(), np.nan, dims=(), ndims=(2,)),
    "inertia_tensor": Statistic(
        _GEOMETRY, lambda d: d.shape.inertia_tensor, np.nan, dims=("space", "space_j")
    ),
    "inertia_tensor_eigvals": Statistic(_GEOMETRY, lambda d: d.shape.eigvals, np.nan, dims=("eig",)),
    "extent": Statistic(_GEOMETRY, lambda d: d.shape.extent(), np.nan, dims=()),
    "equivalent_diameter_area": Statistic(
        _GEOMETRY, lambda d: d.shape.equivalent_diameter_area(), np.nan, dims=()
    ),
    "perimeter": Statistic(
        Needs(more=(Border(),)), lambda d: d.shape.perimeter(), np.nan, dims=(), ndims=(2,)
    ),
    "solidity": Statistic(
        Needs(more=(Geometry(), Hull())), lambda d: d.shape.solidity(), np.nan, dims=(), ndims=(2, 3)
    ),
    "centroid_weighted": Statistic(
        Needs(more=(Weighted(),)), lambda d: d.shape.centroid_weighted(), np.nan, dims=("c", "space")
    ),
    "radii": Statistic(_GEOMETRY, lambda d: d.shape.principal[0], np.nan, dims=("eig",)),
    "principal_axes": Statistic(_GEOMETRY, lambda d: d.shape.principal[1], np.nan, dims=("eig", "space")),
}
STATISTICS.update(SHAPE_FEATURES)

assert set(STATISTICS) == set(get_args(StatName))


def check_space(stats: Sequence[str], space: Space) -> None:
    """Check that every statistic is defined for labels of ``space.ndim`` spatial dims.

    Raises
    ------
    ValueError
        Naming the statistics that are not, and those that are available.
    """
    wrong = [name for name in stats if space.ndim not in STATISTICS[name].ndims]
    if wrong:
        available = sorted(name for name, spec in STATISTICS.items() if space.ndim in spec.ndims)
        raise ValueError(
            f"'stats' holds statistic(s) {wrong} that are not defined for labels of {space.ndim} spatial "
            f"dim(s); available for such labels: {available}"
        )
    if "perimeter" in stats and space.axes != (1, 2):
        raise ValueError(
            f"'perimeter' needs labels with dims (y, x); got labels on axes {space.axes} of (z, y, x)"
        )
    # Spacings the same to rounding are one already (Space).
    if "perimeter" in stats and len(set(space.spacing)) > 1:
        raise ValueError(
            f"'perimeter' needs the same pixel spacing on both axes; got spacing {space.spacing} (a dim "
            "without coordinates, or of one pixel, counts with spacing 1)"
        )


def validate_stats(stats: str | Iterable[str], argument: str = "stats") -> tuple[str, ...]:
    """Check statistic names and return them as a tuple, in order, without repeats.

    Raises
    ------
    TypeError
        If ``stats`` is neither a string nor an iterable of strings.
    ValueError
        If the list is empty or a name is unknown; the message names ``argument``.
    """
    if isinstance(stats, str):
        names: tuple[str, ...] = (stats,)
    elif isinstance(stats, Iterable):
        names = tuple(stats)
    else:
        raise TypeError(
            f"'{argument}' must be a statistic name or a list of them; got {type(stats).__name__}"
        )
    wrong = [name for name in names if not isinstance(name, str)]
    if wrong:
        raise TypeError(f"'{argument}' must hold statistic names as strings; got {wrong!r}")
    if not names:
        raise ValueError(f"'{argument}' must name at least one statistic; got an empty list")
    unknown = [name for name in names if name not in STATISTICS]
    if unknown:
        raise ValueError(
            f"'{argument}' holds unknown statistic(s) {unknown}; expected names from {sorted(STATISTICS)}"
        )
    return tuple(dict.fromkeys(names))


def needs_of(stats: Sequence[str], skipna: bool = False) -> Needs:
    """The partials that a set of statistics needs, for one pass that serves them all."""
    needs = Needs(skipna=skipna)
    for name in stats:
        needs = needs | replace(STATISTICS[name].needs, skipna=skipna)
    return needs


def finalize(
    parts: Partials,
    stats: Sequence[str],
    rows: NDArray[np.intp],
    found: NDArray[np.bool_],
    space: Space | None = None,
) -> dict[str, NDArray[np.generic]]:
    """Values of the statistics for a list of labels.

    Parameters
    ----------
    parts
        Merged partials of all pixels.
    stats
        Names of the statistics.
    rows
        For each requested label, its row in ``parts`` (any value where ``found`` is False).
    found
        For each requested label, whether it has pixels.
    space
        The labels' spatial axes and spacing, for shape features (default: (z, y, x), spacing 1).

    Returns
    -------
    dict
        One array per statistic, with one row per requested label; labels without pixels hold the
        statistic's fill value (count 0, sum 0, NaN otherwise).
    """
    everything = found.all() and rows.shape[0] == parts.size and np.array_equal(rows, np.arange(parts.size))
    present = parts if everything else parts.take(rows[found])
    derived = Derived(present, space)
    out: dict[str, NDArray[np.generic]] = {}
    for name in stats:
        spec = STATISTICS[name]
        assert spec.compute is not None, f"{name} is a whole-label statistic (see gather.py)"
        values = np.asarray(spec.compute(derived))
        dtype = spec.dtype
        if everything:
            out[name] = values.astype(dtype, copy=False)
            continue
        result = np.full((found.shape[0], *values.shape[1:]), spec.fill, dtype=dtype)
        result[found] = values
        out[name] = result
    return out
