"""Generic array kernel, written with array operations only: runs on NumPy and on CuPy.

A block is relabelled with ``unique(..., return_index=True, return_inverse=True)`` (so nothing is
allocated by the size of the largest id), background pixels are dropped, and every per-label
quantity is a segmented reduction over the inverse index. Each label's shift in a channel is its
first finite value there, and every value enters as its exact difference from the shift (see
:class:`~xr_rasteragg.partials.Partials`). The per-channel central moments are computed in two
passes over the block (the mean of the differences first, then the moments about it, corrected
for the rounding of that mean), which is the most accurate form while the block is in memory
anyway. Only the small per-label tables are copied to the host.

The reductions themselves are a small object, :class:`ArrayReductions`: weighted ``bincount``
for sums and sorting for extrema, which NumPy and CuPy provide with the same signature. This
module is the reference the compiled kernels are tested against: the CPU kernel
(:mod:`xr_rasteragg.kernels.numba`) on NumPy, and the fused GPU kernel
(:mod:`xr_rasteragg.kernels.cuda`), with which it shares no code, on CuPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..families import PRODUCT_AXES, Extrema, Geometry, Moments, Valid
from ..partials import Needs, Partials, shift_dtype

__all__ = ["ArrayReductions", "block_partials", "namespace", "partials_with", "to_numpy"]


def namespace(array: Any) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) that ``array`` belongs to."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    get = getattr(array, "get", None)
    return get() if callable(get) else np.asarray(array)


class ArrayReductions:
    """Per-label reductions over an inverse index, with array-API operations only.

    Parameters
    ----------
    xp
        The array module of the data (``numpy`` or ``cupy``).
    """

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp

    def sum(self, weights: Any, inverse: Any, k: int) -> Any:
        """Per-label sums of float64 ``weights``, shape ``(k,)``."""
        return self.xp.bincount(inverse, weights=weights, minlength=k)

    def channel_sum(self, exact: Any, values: Any, inverse: Any, k: int) -> Any:
        """Per-label sums of one channel's differences from the shifts, in float64.

        ``values`` are the differences in float64; ``exact`` are the same differences as int64
        where they are integers that int64 sums hold exactly (images of at most 32 bits), else
        ``values`` again.
        """
        return self.sum(values, inverse, k)

    def extrema(self, channel: Any, inverse: Any, k: int, ignore: Any | None) -> tuple[Any, Any]:
        """Per-label minimum and maximum of ``channel`` by sorting, in its dtype.

        Pixels flagged in ``ignore`` are left out; a label without any pixel left gets the dtype's
        largest value as minimum and its smallest as maximum (``inf`` and ``-inf`` for floats).
        """
        xp = self.xp
        results = []
        for largest_first in (False, True):
            ranked = channel
            if ignore is not None:
                ranked = xp.where(ignore, -xp.inf if largest_first else xp.inf, channel)
            order = xp.argsort(ranked, kind="stable")
            order = order[xp.argsort(inverse[order], kind="stable")]
            grouped = ranked[order]
            ends = xp.cumsum(xp.bincount(inverse, minlength=k))
            pick = ends - 1 if largest_first else xp.concatenate([xp.zeros(1, ends.dtype), ends[:-1]])
            results.append(grouped[pick])
        return results[0], results[1]


def block_partials(
    labels: Any,
    image: Sequence[Any] | None,
    offset: tuple[int, int, int],
    needs: Needs,
    skip: int | None = None,
) -> Partials:
    """Partials of one block with array operations (NumPy or CuPy).

    Parameters
    ----------
    labels
        Label block, shape ``(z, y, x)``, any integer dtype, NumPy or CuPy.
    image
        The image over the same pixels as chunks of channels, each of shape ``(c_i, z, y, x)``,
        on the same device as ``labels``; or None.
    offset
        Global (z, y, x) index of the block's first pixel.
    needs
        What the partials must carry.
    skip
        A label whose pixels are ignored entirely (the background), or None.

    Returns
    -------
    Partials
        The partials of the labels present in the block, sorted by id, as NumPy arrays.
    """
    return partials_with(ArrayReductions(namespace(labels)), labels, image, offset, needs, skip)


def partials_with(
    reductions: ArrayReductions,
    labels: Any,
    image: Sequence[Any] | None,
    offset: tuple[int, int, int],
    needs: Needs,
    skip: int | None = None,
) -> Partials:
    """Partials of one block, with the given per-label reductions.

    Parameters as in :func:`block_partials`; ``reductions`` supplies the array module and the
    segmented sums and extrema.

    Raises
    ------
    TypeError
        If ``needs`` holds families beyond counts, moments, extrema and the label geometry
        (:class:`~xr_rasteragg.families.Geometry`, the moment-based shape features).
    """
    unknown = [f.name for f in needs.more if not isinstance(f, Geometry)]
    if unknown:
        raise TypeError(f"the array kernel has no update for the families {unknown}")
    xp = reductions.xp
    _, ny, nx = labels.shape
    flat = labels.reshape(-1)
    keep = None
    info = np.iinfo(labels.dtype)
    if skip is not None and info.min <= skip <= info.max:
        keep = flat != labels.dtype.type(skip)
        flat = flat[keep]
    if flat.shape[0] == 0:
        return _empty(labels.dtype, image, needs)
    uniq, first, inverse = xp.unique(flat, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    k = int(uniq.shape[0])

    def per_label(weights: Any) -> Any:
        return reductions.sum(weights, inverse, k)

    count = xp.bincount(inverse, minlength=k).astype(xp.int64)
    position = xp.arange(labels.size, dtype=xp.int64)
    if keep is not None:
        position = position[keep]
    z, rest = position // (ny * nx), position % (ny * nx)
    index_sums = [per_label(axis.astype(xp.float64)) for axis in (z, rest // nx, rest % nx)]
    coords = xp.stack(index_sums, axis=1) + xp.asarray(offset, dtype=xp.float64) * count[:, None]
    parts = Partials(labels=to_numpy(uniq), count=to_numpy(count), coords=to_numpy(coords))
    for family in needs.more:  # Geometry, the only one (checked above)
        pixel = [z, rest // nx, rest % nx]
        parts.add(
            family,
            **_geometry(reductions, [a + o for a, o in zip(pixel, offset, strict=True)], first, inverse, k),
        )
    if image is None or (needs.order == 0 and not needs.extrema):
        return parts

    dtype = image[0].dtype
    floating = np.issubdtype(dtype, np.floating)
    skipna = needs.skipna and floating
    sums = Moments(max(needs.order, 1))
    columns: dict[str, list[Any]] = {name: [] for name in ("nvalid", "min", "max", *sums.names())}
    pixels = count.astype(xp.float64)
    for chunk in image:
        for channel in chunk.reshape(chunk.shape[0], -1):
            if keep is not None:
                channel = channel[keep]
            nan = xp.isnan(channel) if floating else None
            if nan is not None and not bool(nan.any()):
                nan = None  # no NaN in this channel: nothing to skip or to propagate
            n = pixels
            if skipna and nan is not None:
                n = per_label((~nan).astype(xp.float64))
            columns["nvalid"].append(n)
            if needs.order >= 1:  # only the extrema need no differences and no sum
                shift = _shifts(xp, channel, first, inverse, k)
                exact, values = _differences(xp, channel, shift[inverse])
                if skipna and nan is not None:
                    values = xp.where(nan, 0.0, values)
                total = reductions.channel_sum(exact, values, inverse, k)
                columns["shift"].append(shift)
                columns["shifted"].append(total)
            if needs.extrema:
                lo, hi = reductions.extrema(channel, inverse, k, nan)
                if nan is not None and not skipna:
                    has_nan = per_label(nan.astype(xp.float64)) > 0  # NaN wins, as in NumPy
                    lo[has_nan] = xp.nan
                    hi[has_nan] = xp.nan
                columns["min"].append(lo)
                columns["max"].append(hi)
            if needs.order >= 2:
                ignore = nan if skipna else None
                moments = _central_moments(xp, per_label, values, inverse, total, n, needs.order, ignore)
                for name, moment in zip(("m2", "m3", "m4"), moments, strict=False):
                    columns[name].append(moment)

    def table(name: str) -> np.ndarray:
        return to_numpy(xp.stack(columns[name], axis=1))

    if needs.skipna:
        parts.add(Valid(), nvalid=table("nvalid").astype(np.int64))
    if needs.extrema:
        parts.add(Extrema(), min=table("min"), max=table("max"))
    if needs.order >= 1:
        parts.add(sums, **{name: table(name) for name in sums.names()})
    return parts


def _geometry(
    reductions: ArrayReductions, pixel: Sequence[Any], first: Any, inverse: Any, k: int
) -> dict[str, np.ndarray]:
    """The fields of :class:`~xr_rasteragg.families.Geometry` from each pixel's global (z, y, x)
    index: each label's first pixel as its origin, the sums of the offsets ``d`` from it and of
    their products (int64 per pixel, summed in float64: exact below 2**53), and the bounding box
    from per-label extrema."""
    xp = reductions.xp
    origin = xp.stack([axis[first] for axis in pixel], axis=1)
    offsets = [axis - origin[inverse, a] for a, axis in enumerate(pixel)]
    sums = [reductions.sum(d.astype(xp.float64), inverse, k) for d in offsets]
    products = [
        reductions.sum((offsets[a] * offsets[b]).astype(xp.float64), inverse, k) for a, b in PRODUCT_AXES
    ]
    bounds = [reductions.extrema(axis, inverse, k, None) for axis in pixel]
    return {
        "origin": to_numpy(origin),
        "offsets": to_numpy(xp.stack(sums, axis=1)),
        "products": to_numpy(xp.stack(products, axis=1)),
        "low": to_numpy(xp.stack([lo for lo, _ in bounds], axis=1)),
        "high": to_numpy(xp.stack([hi + 1 for _, hi in bounds], axis=1)),
    }


def _shifts(xp: ModuleType, channel: Any, first: Any, inverse: Any, k: int) -> Any:
    """Each label's first finite value in ``channel`` (0 where it has none), in :func:`shift_dtype`.

    ``first`` holds the position of each label's first pixel, ``inverse`` the label of each pixel.
    """
    dtype = shift_dtype(channel.dtype)
    finite = xp.isfinite(channel) if channel.dtype.kind == "f" else None
    if finite is None or bool(finite.all()):
        return channel[first].astype(dtype)
    where = xp.flatnonzero(finite)
    found, at = xp.unique(inverse[where], return_index=True)
    shift = xp.zeros(k, dtype=dtype)
    shift[found] = channel[where[at]]
    return shift


def _differences(xp: ModuleType, channel: Any, shift: Any) -> tuple[Any, Any]:
    """``channel - shift`` pixel by pixel, as exact int64 differences (or None) and as float64.

    The float64 differences are exact wherever float64 holds them, as
    :func:`~xr_rasteragg.partials.difference` explains: integers are subtracted in 64-bit two's
    complement arithmetic and only the difference is rounded, unless it leaves the int64 range.
    The int64 differences are returned for integer images of at most 32 bits, whose differences
    and per-block sums int64 holds exactly; otherwise the float64 differences stand in for them.
    """
    if channel.dtype.kind == "f":
        values = channel.astype(xp.float64) - shift
        return values, values
    if channel.dtype.itemsize <= 4:
        exact = channel.astype(xp.int64) - shift
        return exact, exact.astype(xp.float64)
    wrapped = (channel.astype(xp.uint64) - shift.astype(xp.uint64)).view(xp.int64)  # modulo 2**64
    outside = (channel >= shift) != (wrapped >= 0)  # the difference left the int64 range
    rounded_first = channel.astype(xp.float64) - shift.astype(xp.float64)
    values = xp.where(outside, rounded_first, wrapped.astype(xp.float64))
    return values, values


def _central_moments(
    xp: ModuleType, per_label: Any, values: Any, inverse: Any, total: Any, n: Any, order: int, ignore: Any
) -> list[Any]:
    """``sum((x - mean) ** p)`` per label for p = 2 .. ``order``, in a second pass over the values.

    ``values`` are the differences from the shifts and ``total`` their per-label sums. The
    deviations are taken about their rounded mean and corrected for its rounding with the
    per-label mean deviation ``delta`` (exact algebra, not an approximation). Pixels flagged in
    ``ignore`` (skipped NaNs) contribute nothing; otherwise a NaN pixel makes its label's moments
    NaN, as in NumPy.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n
        d = values - mean[inverse]
        if ignore is not None:
            d = xp.where(ignore, 0.0, d)
        delta = xp.where(n > 0, per_label(d) / n, 0.0)
    d2 = d * d
    s2 = per_label(d2)
    moments = [s2 - n * delta**2]
    if order >= 3:
        s3 = per_label(d2 * d)
        moments.append(s3 - 3 * delta * s2 + 2 * n * delta**3)
    if order >= 4:
        s4 = per_label(d2 * d2)
        moments.append(s4 - 4 * delta * s3 + 6 * delta**2 * s2 - 3 * n * delta**4)
    return moments


def _empty(dtype: np.dtype, image: Sequence[Any] | None, needs: Needs) -> Partials:
    """Partials of a block without labels (every pixel is background)."""
    parts = Partials(
        labels=np.empty(0, dtype), count=np.empty(0, np.int64), coords=np.empty((0, 3), np.float64)
    )
    channels = image is not None and (needs.order >= 1 or needs.extrema)
    nchan = sum(int(chunk.shape[0]) for chunk in image) if image is not None else 0
    for family in needs.families[1:]:
        if channels or not family.channel:
            parts.add(family, **family.empty(0, nchan, image[0].dtype if image is not None else None))
    return parts
