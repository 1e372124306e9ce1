"""Generic array kernel, written with array operations only: runs on NumPy and on CuPy.

It computes the same partials as the compiled kernels with sorting (``unique``, ``argsort``) and
weighted ``bincount``, both of which NumPy and CuPy provide with the same signature. It is the
reference the compiled kernels are tested against, and it lets the logic of the GPU path be
tested on machines without a GPU. Only the small per-label tables leave the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..partials import Needs, Partials

__all__ = ["block_partials"]


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
    xp = namespace(labels)
    _, ny, nx = labels.shape
    flat = labels.reshape(-1)
    position = xp.arange(flat.shape[0], dtype=xp.int64)
    info = np.iinfo(labels.dtype)
    if skip is not None and info.min <= skip <= info.max:
        keep = flat != labels.dtype.type(skip)
        flat, position = flat[keep], position[keep]
    uniq, inverse = xp.unique(flat, return_inverse=True)
    inverse = inverse.reshape(-1)
    k = int(uniq.shape[0])

    def per_label(weights: Any) -> Any:
        return xp.bincount(inverse, weights=weights, minlength=k)

    count = xp.bincount(inverse, minlength=k).astype(xp.int64)
    z, rest = position // (ny * nx), position % (ny * nx)
    index_sums = [per_label(axis.astype(xp.float64)) for axis in (z, rest // nx, rest % nx)]
    coords = xp.stack(index_sums, axis=1) + xp.asarray(offset, dtype=xp.float64) * count[:, None]
    parts = Partials(labels=to_numpy(uniq), count=to_numpy(count), coords=to_numpy(coords))
    if image is None or (needs.order == 0 and not needs.extrema):
        return parts

    dtype = image[0].dtype
    pixels = xp.concatenate([chunk.reshape(chunk.shape[0], -1) for chunk in image])
    if pixels.shape[1] != position.shape[0]:
        pixels = pixels[:, position]
    skipna = needs.skipna and np.issubdtype(pixels.dtype, np.floating)
    columns: dict[str, list[Any]] = {name: [] for name in ("nvalid", "sum", "m2", "m3", "m4", "min", "max")}
    for channel in pixels:
        values = channel.astype(xp.float64)
        nan = xp.isnan(values)
        if skipna:
            n = per_label((~nan).astype(xp.float64))
            values = xp.where(nan, 0.0, values)
        else:
            n = count.astype(xp.float64)
        columns["nvalid"].append(n)
        total = per_label(values)
        columns["sum"].append(total)
        if needs.extrema:
            lo, hi = _extrema(xp, channel, inverse, k, nan if skipna else None)
            if not skipna:
                has_nan = per_label(nan.astype(xp.float64)) > 0
                lo = xp.where(has_nan, xp.nan, lo) if has_nan.any() else lo
                hi = xp.where(has_nan, xp.nan, hi) if has_nan.any() else hi
            columns["min"].append(lo)
            columns["max"].append(hi)
        if needs.order >= 2:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = total / n
            d = values - mean[inverse]
            if skipna:
                d = xp.where(nan, 0.0, d)
            # Central moments about the exact mean: correct for the rounding of `mean`.
            with np.errstate(invalid="ignore", divide="ignore"):
                delta = xp.where(n > 0, per_label(d) / n, 0.0)
            s2 = per_label(d**2)
            columns["m2"].append(s2 - n * delta**2)
            if needs.order >= 3:
                s3 = per_label(d**3)
                columns["m3"].append(s3 - 3 * delta * s2 + 2 * n * delta**3)
                if needs.order >= 4:
                    s4 = per_label(d**4)
                    columns["m4"].append(s4 - 4 * delta * s3 + 6 * delta**2 * s2 - 3 * n * delta**4)

    def table(name: str) -> np.ndarray:
        return to_numpy(xp.stack(columns[name], axis=1))

    if needs.skipna:
        parts.nvalid = table("nvalid").astype(np.int64)
    if needs.extrema:
        parts.min, parts.max = table("min"), table("max")
        if not np.issubdtype(parts.min.dtype, np.floating):
            parts.min, parts.max = parts.min.astype(dtype), parts.max.astype(dtype)
    if needs.order >= 1:
        parts.sum = table("sum")
    for order, name in ((2, "m2"), (3, "m3"), (4, "m4")):
        if needs.order >= order:
            setattr(parts, name, table(name))
    return parts


def _extrema(xp: ModuleType, values: Any, inverse: Any, k: int, skip: Any | None) -> tuple[Any, Any]:
    """Per-label minimum and maximum by sorting, in the dtype of ``values``.

    Pixels flagged in ``skip`` are ignored; a label without any pixel left gets the dtype's
    largest value as minimum and its smallest as maximum (``inf`` and ``-inf`` for floats).
    """
    if k == 0:
        return values[:0], values[:0]
    results = []
    for largest_first in (False, True):
        ranked = values
        if skip is not None:
            ranked = xp.where(skip, -xp.inf if largest_first else xp.inf, values)
        order = xp.argsort(ranked, kind="stable")
        order = order[xp.argsort(inverse[order], kind="stable")]
        grouped = ranked[order]
        ends = xp.cumsum(xp.bincount(inverse, minlength=k))
        pick = ends - 1 if largest_first else xp.concatenate([xp.zeros(1, ends.dtype), ends[:-1]])
        results.append(grouped[pick])
    return results[0], results[1]
