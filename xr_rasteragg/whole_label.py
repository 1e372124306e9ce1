"""What is computed from each label's pixels taken whole: quantiles and user functions.

A whole-label statistic cannot be merged from partials of the pieces of a label: it needs all of
the label's pixels at once. The gather (:mod:`xr_rasteragg.gather`) brings each label's pixels
together, in the task of the block that holds the whole label or in the task of the label's piece
of ids when the label crosses block borders, as :class:`Segments`: pixel values grouped by label.
The specs here turn segments into values:

- :class:`Quantiles` -- exactly :func:`numpy.quantile` of each label's pixels as float64, for
  every method NumPy offers: the same virtual indices, neighbours and interpolation, with the
  order statistics found without sorting (:mod:`xr_rasteragg.kernels.selection`: counting in a
  histogram over the label's own range for integer images, selection for float images);
- :class:`LabelFunction` -- a user function of a label's pixel values, or of its mask and
  intensity crops (as scikit-image's ``extra_properties``), called once per label and channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .kernels.selection import order_statistics, valid_counts

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


class LabelFunctionError(RuntimeError):
    """A user's per-label function failed, or returned a value of the wrong shape, on a label."""


@dataclass(frozen=True)
class Segments:
    """Pixels grouped by label: what a whole-label statistic is computed from.

    Group ``g`` (label ``ids[g]``) holds the pixels ``values[:, starts[g]:starts[g + 1]]``. Its
    pixels are those of the runs ``run_starts[g]:run_starts[g + 1]`` in turn: runs along image
    rows of ``length`` pixels whose first pixels lie at the global indices ``origin``.

    Attributes
    ----------
    values
        Pixel values, shape ``(C, N)``, in the image's dtype.
    starts
        Start of each group in ``values``, and the end of the last, shape ``(k + 1,)``.
    ids
        The label id of each group, shape ``(k,)``.
    origin
        Global ``(z, y, x)`` index of each run's first pixel, shape ``(r, 3)``, or None when no
        statistic needs the pixels' positions.
    length
        Pixels of each run, shape ``(r,)``, or None (with ``origin``).
    run_starts
        Start of each group's runs, shape ``(k + 1,)``, or None (with ``origin``).
    """

    values: NDArray[Any]
    starts: NDArray[np.int64]
    ids: NDArray[np.integer]
    origin: NDArray[np.int64] | None = None
    length: NDArray[np.int64] | None = None
    run_starts: NDArray[np.int64] | None = None

    def counts(self, rows: NDArray[np.intp]) -> NDArray[np.int64]:
        """Pixel counts of the groups ``rows``."""
        return self.starts[rows + 1] - self.starts[rows]

    def pixels(self, row: int) -> NDArray[Any]:
        """Values of group ``row``, shape ``(C, n)``."""
        return self.values[:, self.starts[row] : self.starts[row + 1]]

    def positions(self, row: int) -> NDArray[np.int64]:
        """Global ``(z, y, x)`` indices of the pixels of group ``row``, shape ``(n, 3)``."""
        assert self.origin is not None, "segments built without positions"
        assert self.length is not None
        assert self.run_starts is not None
        runs = slice(self.run_starts[row], self.run_starts[row + 1])
        lengths = self.length[runs]
        out = np.repeat(self.origin[runs], lengths, axis=0)
        out[:, 2] += np.arange(out.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return out


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
        values = segments.values
        nchan = values.shape[0]
        rows = rows.astype(np.int64)
        lengths = segments.counts(rows)
        if values.dtype.kind == "f":
            nvalid = valid_counts(values, segments.starts, rows)
        else:
            nvalid = np.repeat(lengths[:, None], nchan, axis=1)
        q = np.asarray(self.q, dtype=np.float64)
        n = nvalid[..., None]  # (k, C, 1)
        first, second, gamma = _neighbours(n, q, self.method)
        wanted = np.concatenate([first, second], axis=-1)
        integer = values.dtype.kind in "iu"
        stats = order_statistics(values, segments.starts, rows, wanted, skipna, integer)
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
        nchan = segments.values.shape[0]
        out = np.empty((rows.shape[0], nchan, *self.shape))
        for i, row in enumerate(rows):
            values = segments.pixels(int(row)).astype(np.float64)
            label = segments.ids[row].item()
            if self.on == "crops":
                mask, where = self._mask(segments.positions(int(row)))
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
