"""What is computed from each label's pixels taken whole: quantiles and user functions.

A whole-label statistic cannot be merged from partials of the pieces of a label: it needs all of
the label's pixels at once. The gather (:mod:`xr_rasteragg.gather`) brings each label's pixels
together, in the task of the block that holds the whole label or in the task of the label's piece
of ids when the label crosses block borders, as :class:`Segments`: pixel values grouped by label.
The specs here turn segments into values:

- :class:`Quantiles` -- exactly :func:`numpy.quantile` of each label's pixels as float64, for
  every method NumPy offers: the same virtual indices, neighbours and interpolation, with the
  order statistics found by selection (a compiled ``partition`` per label) rather than sorting;
- :class:`LabelFunction` -- a user function of a label's pixel values, or of its mask and
  intensity crops (as scikit-image's ``extra_properties``), called once per label and channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numba as nb
import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "QUANTILE_METHODS",
    "LabelFunction",
    "LabelFunctionError",
    "Quantiles",
    "Segments",
    "WholeLabel",
    "check_quantiles",
]

#: The methods of :func:`numpy.quantile`.
QUANTILE_METHODS = (
    "inverted_cdf",
    "averaged_inverted_cdf",
    "closest_observation",
    "interpolated_inverted_cdf",
    "hazen",
    "weibull",
    "linear",
    "median_unbiased",
    "normal_unbiased",
    "lower",
    "higher",
    "midpoint",
    "nearest",
)
#: (alpha, beta) of the continuous methods of Hyndman and Fan that NumPy computes from them.
_ALPHA_BETA = {
    "interpolated_inverted_cdf": (0.0, 1.0),
    "hazen": (0.5, 0.5),
    "weibull": (0.0, 0.0),
    "median_unbiased": (1 / 3.0, 1 / 3.0),
    "normal_unbiased": (3 / 8.0, 3 / 8.0),
}
#: Above this many order statistics per label, a label's values are sorted rather than selected.
SELECT_MAX = 8


class LabelFunctionError(RuntimeError):
    """A user's per-label function failed, or returned a value of the wrong shape, on a label."""


@dataclass(frozen=True)
class Segments:
    """Pixels grouped by label: what a whole-label statistic is computed from.

    Attributes
    ----------
    flats
        Pixel values, shape ``(C, N)``, in the image's dtype.
    order
        Positions of pixels in ``flats``, grouped by label, shape ``(M,)``.
    starts
        Start of each label's group in ``order``, and the end of the last, shape ``(k + 1,)``.
    ids
        The label id of each group, shape ``(k,)``.
    position
        Maps positions in ``flats`` to global ``(z, y, x)`` pixel indices, shape ``(m, 3)``.
    """

    flats: NDArray[Any]
    order: NDArray[np.int64]
    starts: NDArray[np.int64]
    ids: NDArray[np.integer]
    position: Callable[[NDArray[np.int64]], NDArray[np.int64]]


class WholeLabel(Protocol):
    """A statistic of each label's pixels taken whole: what :mod:`~xr_rasteragg.gather` runs.

    Attributes
    ----------
    shape
        Shape of its values for one label and channel: ``()`` or ``(m,)``.
    needs_positions
        Whether it needs the pixels' positions (crops), which then travel with the values of
        labels that cross block borders.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def needs_positions(self) -> bool: ...

    def reduce(self, segments: Segments, rows: NDArray[np.intp], skipna: bool) -> NDArray[np.float64]:
        """Values for the groups ``rows`` of ``segments``, shape ``(len(rows), C, *shape)``."""


def check_quantiles(q: ArrayLike, method: str, argument: str = "q") -> tuple[tuple[float, ...], bool]:
    """Check quantiles and a method name as :func:`numpy.quantile` takes them.

    Returns
    -------
    tuple
        The quantiles as float64 values, and whether ``q`` was a scalar.

    Raises
    ------
    TypeError
        If ``q`` is not numeric, or ``method`` not a string.
    ValueError
        If ``q`` is empty, not 0-D or 1-D, holds NaN or values outside [0, 1], or ``method`` is
        not one of :data:`QUANTILE_METHODS`.
    """
    if not isinstance(method, str) or method not in QUANTILE_METHODS:
        raise ValueError(f"'method' must be one of {list(QUANTILE_METHODS)}; got {method!r}")
    values = np.asarray(q)
    if values.dtype.kind not in "iuf":
        raise TypeError(f"'{argument}' must be a number or a sequence of numbers in [0, 1]; got {q!r}")
    if values.ndim > 1:
        raise ValueError(f"'{argument}' must be a scalar or 1-D; got an array of shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"'{argument}' must hold at least one quantile; got an empty sequence")
    values = values.astype(np.float64)
    wrong = values[~((values >= 0) & (values <= 1))]
    if wrong.size:
        raise ValueError(f"'{argument}' must hold quantiles in [0, 1]; got {wrong.tolist()}")
    return tuple(float(v) for v in np.atleast_1d(values)), values.ndim == 0


@dataclass(frozen=True)
class Quantiles:
    """Quantiles of each label's pixel values, exactly as :func:`numpy.quantile` of them as float64.

    Parameters
    ----------
    q
        Quantiles in [0, 1] (checked by :func:`check_quantiles`).
    method
        One of :data:`QUANTILE_METHODS`.
    scalar
        Whether ``q`` was a scalar: one value per label and channel rather than a vector.
    """

    q: tuple[float, ...]
    method: str = "linear"
    scalar: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """``()`` for a scalar ``q``, ``(len(q),)`` otherwise."""
        return () if self.scalar else (len(self.q),)

    @property
    def needs_positions(self) -> bool:
        """False: quantiles need the values only."""
        return False

    def reduce(self, segments: Segments, rows: NDArray[np.intp], skipna: bool) -> NDArray[np.float64]:
        """Quantiles per label and channel, shape ``(len(rows), C, *shape)``."""
        flats, order, starts = segments.flats, segments.order, segments.starts
        nchan = flats.shape[0]
        lengths = (starts[rows + 1] - starts[rows]).astype(np.int64)
        if flats.dtype.kind == "f":
            nvalid = _valid_counts(flats, order, starts, rows.astype(np.int64))
        else:
            nvalid = np.repeat(lengths[:, None], nchan, axis=1)
        q = np.asarray(self.q, dtype=np.float64)
        n = nvalid[..., None]  # (k, C, 1)
        first, second, gamma = _neighbours(n, q, self.method)
        wanted = np.concatenate([first, second], axis=-1)
        stats = _order_statistics(flats, order, starts, rows.astype(np.int64), wanted, skipna)
        a, b = stats[..., : q.shape[0]], stats[..., q.shape[0] :]
        out = a if gamma is None else _lerp(a, b, gamma)
        bad = nvalid == 0 if skipna else nvalid < lengths[:, None]
        out[bad] = np.nan
        return out[..., 0] if self.scalar else out


def _neighbours(
    n: NDArray[np.int64], q: NDArray[np.float64], method: str
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64] | None]:
    """Positions in the sorted values of the two neighbours of each quantile, and the weight of
    the second, for samples of ``n`` values (as NumPy's ``_quantile`` computes them).

    Discrete methods take one value (the weight is None). Positions are resolved into
    ``[0, n - 1]`` (NumPy's index -1 is the last value); ``n = 0`` gives position 0.
    """
    if method in ("inverted_cdf", "closest_observation", "lower", "higher", "nearest"):
        if method == "inverted_cdf":
            index = _boundaries(n * q - 1, lambda gamma, _: gamma == 0)
        elif method == "closest_observation":
            index = _boundaries(n * q - 1 - 0.5, lambda gamma, i: (gamma == 0) & (np.floor(i) % 2 == 1))
        elif method == "lower":
            index = np.floor((n - 1) * q).astype(np.intp)
        elif method == "higher":
            index = np.ceil((n - 1) * q).astype(np.intp)
        else:
            index = np.around((n - 1) * q).astype(np.intp)
        index = np.clip(index, 0, np.maximum(n - 1, 0)).astype(np.int64)
        return index, index, None
    if method == "linear":
        virtual = (n - 1) * q
    elif method == "averaged_inverted_cdf":
        virtual = n * q - 1
    elif method == "midpoint":
        virtual = 0.5 * (np.floor((n - 1) * q) + np.ceil((n - 1) * q))
    else:
        alpha, beta = _ALPHA_BETA[method]
        virtual = n * q + (alpha + q * (1 - alpha - beta)) - 1
    previous = np.floor(virtual)
    following = previous + 1
    above, below = virtual >= n - 1, virtual < 0
    previous[above] = following[above] = -1
    previous[below] = following[below] = 0
    previous, following = previous.astype(np.intp), following.astype(np.intp)
    gamma = np.asarray(virtual - previous, dtype=np.float64)
    if method == "averaged_inverted_cdf":
        gamma = np.where(gamma == 0, 0.5, 1.0)
    elif method == "midpoint":
        gamma = np.where(virtual % 1 == 0, 0.0, 0.5)
    last = np.maximum(n - 1, 0)
    return (
        np.where(previous < 0, last, previous).astype(np.int64),
        np.where(following < 0, last, following).astype(np.int64),
        gamma,
    )


def _boundaries(index: NDArray[np.float64], previous_where: Callable[..., Any]) -> NDArray[np.intp]:
    """NumPy's discrete index: the previous or next integer of ``index``, at least 0."""
    previous = np.floor(index)
    gamma = index - previous
    out = np.where(previous_where(gamma, index), previous, previous + 1).astype(np.intp)
    out[out < 0] = 0
    return out


def _lerp(a: NDArray[np.float64], b: NDArray[np.float64], t: NDArray[np.float64]) -> NDArray[np.float64]:
    """NumPy's linear interpolation between neighbours (from the nearer end, for exactness)."""
    with np.errstate(invalid="ignore"):
        diff = b - a
        out = np.add(a, diff * t)
        np.subtract(b, diff * (1 - t), out=out, where=t >= 0.5)
    return out


@nb.njit(nogil=True, cache=True)
def _valid_counts(flats, order, starts, rows):  # type: ignore[no-untyped-def]
    """Number of non-NaN values of each group ``rows`` per channel, shape ``(len(rows), C)``."""
    out = np.zeros((rows.shape[0], flats.shape[0]), dtype=np.int64)
    for i in range(rows.shape[0]):
        for j in range(starts[rows[i]], starts[rows[i] + 1]):
            p = order[j]
            for c in range(flats.shape[0]):
                if not np.isnan(flats[c, p]):
                    out[i, c] += 1
    return out


@nb.njit(nogil=True, cache=True)
def _order_statistics(flats, order, starts, rows, wanted, skipna):  # type: ignore[no-untyped-def]
    """The values at positions ``wanted[i, c]`` in the sorted (non-NaN) float64 values of group
    ``rows[i]``, channel ``c``; shape ``wanted.shape``.

    Groups are selected (successive partitions, each of the part above the last position found)
    when they need few positions, sorted otherwise. A group that holds NaN without ``skipna``, or
    no value, gives arbitrary values (the caller puts NaN there).
    """
    out = np.zeros(wanted.shape)
    longest = 0
    for i in range(rows.shape[0]):
        longest = max(longest, starts[rows[i] + 1] - starts[rows[i]])
    buf = np.empty(longest)
    for i in range(rows.shape[0]):
        a, b = starts[rows[i]], starts[rows[i] + 1]
        for c in range(flats.shape[0]):
            n = 0
            for j in range(a, b):
                x = np.float64(flats[c, order[j]])
                if np.isnan(x):
                    if skipna:
                        continue
                    n = 0
                    break
                buf[n] = x
                n += 1
            if n == 0:
                continue
            ranks = np.unique(wanted[i, c])
            values = buf[:n]
            if ranks.shape[0] > SELECT_MAX:
                values = np.sort(values)
                for r in range(wanted.shape[2]):
                    out[i, c, r] = values[wanted[i, c, r]]
                continue
            found = np.empty(ranks.shape[0])
            base = 0
            for r in range(ranks.shape[0]):
                part = np.partition(values, ranks[r] - base)
                found[r] = part[ranks[r] - base]
                values = part[ranks[r] - base + 1 :]
                base = ranks[r] + 1
            for r in range(wanted.shape[2]):
                out[i, c, r] = found[np.searchsorted(ranks, wanted[i, c, r])]
    return out


@dataclass(frozen=True, eq=False)
class LabelFunction:
    """A user function of each label's pixels, called once per label and channel.

    Parameters
    ----------
    func
        With ``on="values"``: ``func(values)`` of the label's pixel values of one channel, a 1-D
        float64 array in raster order (without NaN when ``skipna``). With ``on="crops"``:
        ``func(mask, intensity)`` of the label's bounding box, as scikit-image's
        ``extra_properties``: ``mask`` is boolean, True on the label's pixels, ``intensity``
        holds one channel's values there and 0 elsewhere (float64).
    output_size
        Number of values it returns: a scalar for 1, a 1-D sequence of that length otherwise.
    on
        ``"values"`` or ``"crops"``.
    spatial_ndim
        Dims of the crops: 3 gives ``(z, y, x)`` crops, 2 drops the z axis, 1 the z and y axes.
    """

    func: Callable[..., Any]
    output_size: int = 1
    on: Literal["values", "crops"] = "values"
    spatial_ndim: int = 3

    def __post_init__(self) -> None:
        if not callable(self.func):
            raise TypeError(f"'func' must be callable; got {type(self.func).__name__}")
        size = self.output_size
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"'output_size' must be a positive integer; got {size!r}")
        if self.on not in ("values", "crops"):
            raise ValueError(f"'on' must be 'values' or 'crops'; got {self.on!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """``()`` for one value, ``(output_size,)`` otherwise."""
        return () if self.output_size == 1 else (int(self.output_size),)

    @property
    def needs_positions(self) -> bool:
        """Whether the function takes crops."""
        return self.on == "crops"

    def reduce(self, segments: Segments, rows: NDArray[np.intp], skipna: bool) -> NDArray[np.float64]:
        """The function's values per label and channel, shape ``(len(rows), C, *shape)``."""
        nchan = segments.flats.shape[0]
        out = np.empty((rows.shape[0], nchan, *self.shape))
        for i, row in enumerate(rows):
            pixels = segments.order[segments.starts[row] : segments.starts[row + 1]]
            values = segments.flats[:, pixels].astype(np.float64)
            label = segments.ids[row].item()
            if self.on == "crops":
                mask, where = self._mask(segments.position(pixels))
            for c in range(nchan):
                if self.on == "values":
                    x = values[c]
                    args: Sequence[Any] = (x[~np.isnan(x)] if skipna else x,)
                else:
                    intensity = np.zeros(mask.shape)
                    intensity[where] = values[c]
                    args = (mask, intensity)
                out[i, c] = self._call(args, label, c)
        return out

    def _mask(self, positions: NDArray[np.int64]) -> tuple[NDArray[np.bool_], tuple[NDArray[Any], ...]]:
        """The label's mask over its bounding box, and its pixels' indices in that box."""
        low = positions.min(axis=0)
        local = positions - low
        shape = tuple(int(s) for s in local.max(axis=0) + 1)
        drop = 3 - self.spatial_ndim
        where = tuple(local[:, axis] for axis in range(drop, 3))
        mask = np.zeros(shape[drop:], dtype=bool)
        mask[where] = True
        return mask, where

    def _call(self, args: Sequence[Any], label: int, channel: int) -> NDArray[np.float64]:
        try:
            result = self.func(*args)
        except Exception as error:
            raise LabelFunctionError(
                f"'func' raised {type(error).__name__} on label {label} (channel {channel}): {error}"
            ) from error
        try:
            value = np.asarray(result, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise LabelFunctionError(
                f"'func' must return numbers; on label {label} (channel {channel}) it returned {result!r}"
            ) from error
        if value.size != self.output_size or value.ndim > 1:
            raise LabelFunctionError(
                f"'func' must return {self.output_size} value(s) (output_size={self.output_size}) as a "
                f"scalar or 1-D sequence; on label {label} (channel {channel}) it returned shape "
                f"{value.shape}"
            )
        return value.reshape(self.shape)
