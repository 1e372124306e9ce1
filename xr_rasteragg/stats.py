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

from .partials import Needs, Partials
from .whole_label import Quantiles, WholeLabel

__all__ = ["STATISTICS", "Derived", "StatName", "Statistic", "finalize", "needs_of", "validate_stats"]

StatName = Literal[
    "count", "sum", "mean", "var", "std", "skew", "kurtosis", "min", "max", "center_of_mass", "median"
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
        channel) or ``("axis",)`` (one per spatial axis z, y, x).
    dtype
        The dtype of its values.
    whole
        For a statistic of each label's pixels taken whole (a median): how the gather
        (:mod:`xr_rasteragg.gather`) computes it, rather than from partials.
    """

    needs: Needs
    compute: Callable[[Derived], NDArray[np.generic]] | None
    fill: float
    dims: tuple[str, ...] = ("c",)
    dtype: np.dtype = FLOAT64
    whole: WholeLabel | None = None

    @property
    def per_channel(self) -> bool:
        """Whether it has one value per channel."""
        return "c" in self.dims

    def row_shape(self, nchan: int) -> tuple[int, ...]:
        """Shape of its values for one label, for an image of ``nchan`` channels."""
        return tuple(nchan if dim == "c" else _DIM_SIZES[dim] for dim in self.dims)


#: Sizes of the trailing dimensions that do not depend on the image.
_DIM_SIZES = {"axis": 3}


class Derived:
    """Merged partials with the quantities that several statistics share, each computed once.

    Finalizing var, std, skew and kurtosis together would otherwise convert the counts, divide
    the sums and form the variance once per statistic, over every label and channel.

    Parameters
    ----------
    partials
        Merged partials (of labels that have pixels).
    """

    def __init__(self, partials: Partials) -> None:
        self.p = partials

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
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.maximum(self.p.m2, 0.0) / self.n


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

assert set(STATISTICS) == set(get_args(StatName))


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
    parts: Partials, stats: Sequence[str], rows: NDArray[np.intp], found: NDArray[np.bool_]
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

    Returns
    -------
    dict
        One array per statistic, with one row per requested label; labels without pixels hold the
        statistic's fill value (count 0, sum 0, NaN otherwise).
    """
    everything = found.all() and rows.shape[0] == parts.size and np.array_equal(rows, np.arange(parts.size))
    present = parts if everything else parts.take(rows[found])
    derived = Derived(present)
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
