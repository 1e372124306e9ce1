"""The statistics: what partials each one needs, and how it is finalized from them.

Each statistic is a small spec (as in flox's aggregations): the :class:`~xr_rasteragg.partials.Needs`
it puts on the one pass over the data, the function that turns merged partials into its values,
and the value it takes for a label that has no pixels. Adding a statistic is adding a spec.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from numpy.typing import NDArray

from .partials import Needs, Partials

__all__ = ["STATISTICS", "StatName", "Statistic", "finalize", "needs_of", "validate_stats"]

StatName = Literal["count", "sum", "mean", "var", "std", "skew", "kurtosis", "min", "max", "center_of_mass"]

#: Relative size of the variance below which a label counts as constant (as in scipy.stats).
_CONSTANT = np.finfo(np.float64).resolution


@dataclass(frozen=True)
class Statistic:
    """How one statistic is computed.

    Attributes
    ----------
    needs
        What the partials must carry for it.
    compute
        Turns partials (of labels that have pixels) into values, shape ``(k,)``, ``(k, C)`` or
        ``(k, 3)``.
    fill
        Its value for a label without pixels.
    per_channel
        Whether it has one value per channel.
    """

    needs: Needs
    compute: Callable[[Partials], NDArray[np.generic]]
    fill: float
    per_channel: bool = True


def _n(p: Partials) -> NDArray[np.float64]:
    return p.n().astype(np.float64)


def _sum(p: Partials) -> NDArray[np.float64]:
    assert p.sum is not None
    return p.sum


def _mean(p: Partials) -> NDArray[np.float64]:
    assert p.sum is not None
    with np.errstate(invalid="ignore", divide="ignore"):
        return p.sum / _n(p)


def _var(p: Partials) -> NDArray[np.float64]:
    assert p.m2 is not None
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.maximum(p.m2, 0.0) / _n(p)


def _standardized(p: Partials, moment: NDArray[np.float64] | None, power: float) -> NDArray[np.float64]:
    """``m_k / m_2^(k/2)``, NaN where the label is constant (m_2 ≈ 0), as scipy.stats does."""
    assert moment is not None
    var = _var(p)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = moment / _n(p) / var**power
        constant = var <= (_CONSTANT * _mean(p)) ** 2
    return np.where(constant, np.nan, value)


def _extremum(values: NDArray[np.generic] | None, p: Partials) -> NDArray[np.float64]:
    assert values is not None
    out = values.astype(np.float64)
    if p.nvalid is not None:
        out[p.nvalid == 0] = np.nan
    return out


STATISTICS: dict[str, Statistic] = {
    "count": Statistic(Needs(0), lambda p: p.count, 0, per_channel=False),
    "sum": Statistic(Needs(1), _sum, 0),
    "mean": Statistic(Needs(1), _mean, np.nan),
    "var": Statistic(Needs(2), _var, np.nan),
    "std": Statistic(Needs(2), lambda p: np.sqrt(_var(p)), np.nan),
    "skew": Statistic(Needs(3), lambda p: _standardized(p, p.m3, 1.5), np.nan),
    "kurtosis": Statistic(Needs(4), lambda p: _standardized(p, p.m4, 2.0) - 3.0, np.nan),
    "min": Statistic(Needs(0, extrema=True), lambda p: _extremum(p.min, p), np.nan),
    "max": Statistic(Needs(0, extrema=True), lambda p: _extremum(p.max, p), np.nan),
    "center_of_mass": Statistic(Needs(0), lambda p: p.coords / p.count[:, None], np.nan, per_channel=False),
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
        spec = STATISTICS[name].needs
        needs = needs | Needs(spec.order, spec.extrema, skipna)
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
    out: dict[str, NDArray[np.generic]] = {}
    for name in stats:
        spec = STATISTICS[name]
        values = np.asarray(spec.compute(present))
        dtype = np.int64 if name == "count" else np.float64
        if everything:
            out[name] = values.astype(dtype, copy=False)
            continue
        result = np.full((found.shape[0], *values.shape[1:]), spec.fill, dtype=dtype)
        result[found] = values
        out[name] = result
    return out
