"""GPU kernel for CuPy blocks: the array kernel's two passes with atomic scatter reductions.

The block stays on the device. It is relabelled with ``cupy.unique(..., return_inverse=True)``
(a radix sort, never an allocation by the largest id), background pixels are compacted away
(so no single hot counter takes the background's atomics), and every per-label quantity is a
scatter reduction over the inverse index, one kernel launch per quantity and channel:

- sums of float64 values with ``bincount(weights=...)`` (atomic adds);
- sums of the differences from the shifts of integer images of up to 32 bits exactly, with
  integer atomic adds into uint64 (two's complement, so negative values add exactly too),
  rounded to float64 once;
- extrema with ``cupyx.scatter_min`` / ``scatter_max`` on order-preserving unsigned keys
  (uint32 or uint64) of the values, which makes them exact for every dtype: CuPy's own float64
  ``atomicMin``/``atomicMax`` compare through ``fminf``/``fmaxf`` in single precision;
- central moments in a second pass over the block, about the per-label mean, as in
  :mod:`xr_rasteragg.kernels.xp` (whose driver :func:`~xr_rasteragg.kernels.xp.partials_with`
  this kernel shares).

Only the per-label tables, ``(k, C)`` for k labels in the block, are copied to the host.

The reductions are chosen by the array namespace: on NumPy arrays the same code runs with
``np.add.at``, ``np.minimum.at`` and ``np.maximum.at``, which behave as CuPy's scatter functions
(as CuPy documents). That is how the logic of this kernel is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..partials import Needs, Partials
from .xp import ArrayReductions, namespace, partials_with

__all__ = ["ScatterReductions", "block_partials", "reductions_for"]

Scatter = Callable[[Any, Any, Any], None]


class ScatterReductions(ArrayReductions):
    """Per-label reductions with atomic scatter operations.

    Parameters
    ----------
    xp
        The array module of the data (``numpy`` or ``cupy``).
    scatter_add, scatter_min, scatter_max
        In-place ``(out, indices, values)`` reductions with the semantics of ``np.add.at``,
        ``np.minimum.at`` and ``np.maximum.at``; used on uint32 and uint64 arrays only, which
        every CUDA device supports with native atomics.
    """

    def __init__(
        self, xp: ModuleType, scatter_add: Scatter, scatter_min: Scatter, scatter_max: Scatter
    ) -> None:
        super().__init__(xp)
        self.scatter_add = scatter_add
        self.scatter_min = scatter_min
        self.scatter_max = scatter_max

    def channel_sum(self, exact: Any, values: Any, inverse: Any, k: int) -> Any:
        """Per-label sums of the differences from the shifts; exact for integer images of up to 32 bits.

        Their int64 differences (``exact``) are added as 64-bit two's complement integers (in
        uint64, where CUDA has atomic adds), which is exact for fewer than 2**30 pixels per
        block, and rounded to float64 once. Other differences are summed in float64.
        """
        xp = self.xp
        if exact.dtype.kind != "i":
            return self.sum(values, inverse, k)
        total = xp.zeros(k, dtype=xp.uint64)
        self.scatter_add(total, inverse, exact.view(xp.uint64))
        return total.view(xp.int64).astype(xp.float64)

    def extrema(self, channel: Any, inverse: Any, k: int, ignore: Any | None) -> tuple[Any, Any]:
        """Per-label minimum and maximum of ``channel``, exactly, in its dtype.

        Values are mapped to unsigned integer keys in the same order (:func:`order_keys`), reduced
        with unsigned atomic minima and maxima, and mapped back. Pixels flagged in ``ignore``
        are left out; a label without any pixel left gets the dtype's largest value as minimum and
        its smallest as maximum (``inf`` and ``-inf`` for floats).
        """
        xp = self.xp
        dtype = channel.dtype
        if dtype.kind == "f":
            largest, smallest = dtype.type(np.inf), dtype.type(-np.inf)
        else:
            info = np.iinfo(dtype)
            largest, smallest = dtype.type(info.max), dtype.type(info.min)
        bounds = order_keys(np, np.array([largest, smallest], dtype=dtype))
        keys = order_keys(xp, channel)  # one set of keys for both
        results = []
        for init, scatter in ((0, self.scatter_min), (1, self.scatter_max)):
            # Skipped pixels take the neutral key (that of the dtype's largest or smallest value).
            kept = keys if ignore is None else xp.where(ignore, bounds[init], keys)
            out = xp.full(k, bounds[init], dtype=bounds.dtype)
            scatter(out, inverse, kept)
            results.append(from_order_keys(xp, out, dtype))
        return results[0], results[1]


def order_keys(xp: ModuleType, values: Any) -> Any:
    """Unsigned integer keys (uint32 or uint64) that sort as ``values`` do.

    Unsigned integers are widened to uint32 (uint64 stays); signed integers are widened to int32
    (int64 stays) and have their sign bit flipped; floats have their sign bit flipped when
    positive and all bits flipped when negative (the radix-sort key of IEEE 754 numbers). NaN
    must not occur.
    """
    dtype = values.dtype
    wide = 8 if dtype.itemsize == 8 else 4
    unsigned = np.dtype(f"u{wide}")
    sign = unsigned.type(1 << (8 * wide - 1))
    if dtype.kind == "u":
        return values.astype(unsigned)
    if dtype.kind == "i":
        return values.astype(f"i{wide}").view(unsigned) ^ sign
    bits = values.view(unsigned)
    return xp.where((bits & sign) != 0, ~bits, bits | sign)


def from_order_keys(xp: ModuleType, keys: Any, dtype: np.dtype) -> Any:
    """The values of ``dtype`` whose :func:`order_keys` are ``keys``."""
    sign = keys.dtype.type(1 << (8 * keys.dtype.itemsize - 1))
    if dtype.kind == "u":
        return keys.astype(dtype)
    if dtype.kind == "i":
        return (keys ^ sign).view(f"i{keys.dtype.itemsize}").astype(dtype)
    return xp.where((keys & sign) != 0, keys ^ sign, ~keys).view(dtype)


def reductions_for(array: Any) -> ScatterReductions:
    """Scatter reductions for the array module of ``array``: CuPy's atomics, or NumPy's ``ufunc.at``."""
    xp = namespace(array)
    if xp is np:
        return ScatterReductions(np, np.add.at, np.minimum.at, np.maximum.at)
    import cupyx

    return ScatterReductions(xp, cupyx.scatter_add, cupyx.scatter_min, cupyx.scatter_max)


def block_partials(
    labels: Any,
    image: Sequence[Any] | None,
    offset: tuple[int, int, int],
    needs: Needs,
    skip: int | None = None,
) -> Partials:
    """Partials of one block on the device that holds it (CuPy; NumPy runs the same logic).

    Parameters
    ----------
    labels
        Label block, shape ``(z, y, x)``, any integer dtype, a CuPy (or NumPy) array.
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
    return partials_with(reductions_for(labels), labels, image, offset, needs, skip)
