"""GPU kernel code of the shape families (:mod:`xr_rasteragg.families`).

Each update launches its CUDA kernel over an encoded label block
(:class:`~xr_rasteragg.kernels.cuda.DeviceRuns`) and returns the step that copies its fields to
the host, so that :meth:`~xr_rasteragg.kernels.cuda.CudaRunKernel.channels` launches every
kernel of a stage before the first copy. The fields are those of the CPU kernel's updates
(:mod:`xr_rasteragg.kernels.numba_shape`), in the label order of the partials:

- :class:`~xr_rasteragg.families.Geometry`: per run, one atomic per field: the run's first
  pixel (as its index in the block; the label's smallest is its origin, the first pixel in
  (z, y, x) order, as on the CPU), the bounding box from the run's ends, and the closed forms
  of the run's index products ``Σ p_a p_b`` about the block's first pixel, in uint64. Moved
  to each label's origin on the host by the same integer identity that the merge uses
  (``Σ d_a d_b = Σ p_a p_b - o_a Σ p_b - o_b Σ p_a + n o_a o_b``, with the pixel counts and
  index sums of the label stage), all modulo 2**64, so the offsets and products are the CPU
  kernel's int64 sums bit for bit;
- :class:`~xr_rasteragg.families.Weighted`: per run and channel, ``Σ I`` and ``Σ I x`` in
  float64 (four atomic adds), as the CPU kernel sums them run by run.

:class:`~xr_rasteragg.families.Border` (perimeter) and :class:`~xr_rasteragg.families.Hull`
(solidity) have no GPU update: they need each label's neighbourhood (a halo of pixels, from the
frame around the block) and its convex hulls, which the CPU kernel builds. On CuPy blocks they
run on the host (:func:`_on_host`): the label block is copied to the host and encoded with the
compiled CPU kernel as well, once per label stage
(:meth:`~xr_rasteragg.kernels.cuda.DeviceRuns.host_runs`; for the perimeter in
:meth:`~xr_rasteragg.kernels.cuda.CudaRunKernel.encode_framed`, with the block's frame, whose
rings are kept on the host), and the CPU kernel's updates of these two families fill their
fields, bit for bit those of NumPy blocks. Both kernels hold a block's
labels sorted by id and leave out the same label, so the rows align (checked). The moments,
extrema and the moment-based families above stay on the device; the host work is done in the
update's copy step, after every kernel of the stage is launched, so that it overlaps them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import cuda
from numpy.typing import NDArray

from ..families import PRODUCT_AXES, Border, Family, Geometry, Hull, Weighted
from ..partials import Partials
from .cuda_runs import _EMPTY, _U0, _U1, _U2, _UMAX, _next_run, _row, _segment

if TYPE_CHECKING:
    from .cuda import DeviceRuns

__all__ = ["SHAPE_UPDATES"]

_U6 = np.uint64(6)

#: A launched update's last step: copy its fields to the host and add them to the partials.
Copy = Callable[[], None]


@cuda.jit
def _geometry_pass(labels, seg, use_skip, skip, table, mask, ids, first, low, high, products):  # type: ignore[no-untyped-def]
    """Per label: its first pixel's index in the block, the bounding box and the index products.

    ``first[i]`` is the smallest ``(z ny + y) nx + x`` of label ``i``'s pixels; ``low[i]`` the
    smallest (y, x) and ``high[i]`` the largest (z, y, x) plus one (exclusive ends);
    ``products[i]`` the sums ``Σ p_a p_b`` over the pairs of axes of
    :data:`~xr_rasteragg.families.PRODUCT_AXES`, of block indices ``p``. A run of length
    ``n`` at ``(z, y, a..a+n-1)`` adds ``Σ x = n a + n(n-1)/2`` and ``Σ x² = n a² + a n(n-1) +
    (n-1) n (2n-1)/6``, and their products with its constant z and y. uint64, modulo 2**64.
    """
    _, ny, nx = labels.shape
    z, y, a, b = _segment(labels, seg)
    if z < 0:
        return
    last_key = _EMPTY
    i = np.int64(-1)
    uz = np.uint64(z)
    uy = np.uint64(y)
    x0 = a
    while x0 < b:
        key, x1, counts = _next_run(labels, z, y, x0, b, use_skip, skip)
        if counts:
            i, last_key = _row(table, mask, ids, key, i, last_key)
            n = np.uint64(x1 - x0)
            ux = np.uint64(x0)
            sx = n * ux + n * (n - _U1) // _U2
            sxx = n * ux * ux + ux * n * (n - _U1) + (n - _U1) * n * (_U2 * n - _U1) // _U6
            cuda.atomic.min(first, i, (uz * np.uint64(ny) + uy) * np.uint64(nx) + ux)
            cuda.atomic.min(low, (i, 0), uy)
            cuda.atomic.min(low, (i, 1), ux)
            cuda.atomic.max(high, (i, 0), uz + _U1)
            cuda.atomic.max(high, (i, 1), uy + _U1)
            cuda.atomic.max(high, (i, 2), ux + n)
            cuda.atomic.add(products, (i, 0), n * uz * uz)
            cuda.atomic.add(products, (i, 1), n * uy * uy)
            cuda.atomic.add(products, (i, 2), sxx)
            cuda.atomic.add(products, (i, 3), n * uz * uy)
            cuda.atomic.add(products, (i, 4), uz * sx)
            cuda.atomic.add(products, (i, 5), uy * sx)
        x0 = x1


assert PRODUCT_AXES == ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))  # the order of _geometry_pass


def _geometry(parts: Partials, image: Sequence[Any] | None, runs: DeviceRuns, family: Family) -> Copy:
    """Launch :func:`_geometry_pass` for :class:`~xr_rasteragg.families.Geometry`."""
    from .cuda import _full, _launch

    k = parts.size
    first = _full((k,), np.uint64, _UMAX)
    low = _full((k, 2), np.uint64, _UMAX)
    high = _full((k, 3), np.uint64, _U0)
    products = _full((k, len(PRODUCT_AXES)), np.uint64, _U0)
    _launch(_geometry_pass, runs.threads, *runs.walk(), first, low, high, products)

    def copy() -> None:
        local = runs.local
        fields = _at_origins(
            runs.labels.shape,
            runs.totals,
            first.copy_to_host()[local],
            low.copy_to_host()[local],
            high.copy_to_host()[local],
            products.copy_to_host()[local],
        )
        offset = np.asarray(runs.offset, np.int64)
        for name in ("origin", "low", "high"):
            fields[name] += offset
        parts.add(family, **fields)

    return copy


def _at_origins(
    shape: tuple[int, int, int],
    totals: NDArray[np.uint64],
    first: NDArray[np.uint64],
    low: NDArray[np.uint64],
    high: NDArray[np.uint64],
    products: NDArray[np.uint64],
) -> dict[str, NDArray[Any]]:
    """The :class:`~xr_rasteragg.families.Geometry` fields in block indices, from the kernel's
    sums about the block's first pixel (``totals``: count and sums of z, y and 2 x per label).

    uint64 array arithmetic wraps silently: the sums about each label's origin come out modulo
    2**64 and, read as int64, are the CPU kernel's int64 sums.
    """
    _, ny, nx = (np.uint64(s) for s in shape)
    n = totals[:, 1]
    sums = np.stack([totals[:, 2], totals[:, 3], totals[:, 4] // _U2], axis=1)
    origin = np.stack([first // (ny * nx), first // nx % ny, first % nx], axis=1)
    offsets = sums - n[:, None] * origin
    moved = np.empty_like(products)
    for q, (a, b) in enumerate(PRODUCT_AXES):
        moved[:, q] = (
            products[:, q]
            - origin[:, a] * sums[:, b]
            - origin[:, b] * sums[:, a]
            + n * origin[:, a] * origin[:, b]
        )
    return {
        "origin": origin.astype(np.int64),
        "offsets": offsets.view(np.int64).astype(np.float64),
        "products": moved.view(np.int64).astype(np.float64),
        "low": np.concatenate([origin[:, :1], low], axis=1).astype(np.int64),
        "high": high.astype(np.int64),
    }


@cuda.jit
def _weighted_pass(labels, seg, use_skip, skip, table, mask, ids, image, oz, oy, ox, sums):  # type: ignore[no-untyped-def]
    """``Σ I``, ``Σ I z``, ``Σ I y`` and ``Σ I x`` (global indices ``z + oz``, ...) per label and
    channel, in ``sums[0..3, i, c]`` (float64), run by run."""
    z, y, a, b = _segment(labels, seg)
    if z < 0:
        return
    last_key = _EMPTY
    i = np.int64(-1)
    gz = z + oz
    gy = y + oy
    x0 = a
    while x0 < b:
        key, x1, counts = _next_run(labels, z, y, x0, b, use_skip, skip)
        if counts:
            i, last_key = _row(table, mask, ids, key, i, last_key)
            for c in range(image.shape[0]):
                total = 0.0
                moment = 0.0
                for p in range(x0, x1):
                    value = np.float64(image[c, z, y, p])
                    total += value
                    moment += value * (p + ox)
                cuda.atomic.add(sums, (0, i, c), total)
                cuda.atomic.add(sums, (1, i, c), total * gz)
                cuda.atomic.add(sums, (2, i, c), total * gy)
                cuda.atomic.add(sums, (3, i, c), moment)
        x0 = x1


def _weighted(parts: Partials, image: Sequence[Any] | None, runs: DeviceRuns, family: Family) -> Copy:
    """Launch :func:`_weighted_pass` for :class:`~xr_rasteragg.families.Weighted`."""
    from .cuda import _full, _launch, _on_device, _stacked

    if image is None:
        raise ValueError("the intensity-weighted centroid needs an image; got none")
    stacked = _stacked(image)
    sums = _full((4, parts.size, int(stacked.shape[0])), np.float64, 0.0)
    oz, oy, ox = (np.float64(o) for o in runs.offset)
    _launch(_weighted_pass, runs.threads, *runs.walk(), _on_device(stacked), oz, oy, ox, sums)

    def copy() -> None:
        host = sums.copy_to_host()[:, runs.local]
        parts.add(family, **{name: host[j] for j, name in enumerate(family.names())})

    return copy


def _on_host(parts: Partials, image: Sequence[Any] | None, runs: DeviceRuns, family: Family) -> Copy:
    """The fields of a family without GPU update (:class:`~xr_rasteragg.families.Border`,
    :class:`~xr_rasteragg.families.Hull`, which read no image), from the compiled CPU kernel's
    update over the CPU kernel's encoding of a host copy of the block, in the copy step."""
    from .numba import FAMILY_UPDATES as CPU_UPDATES

    def copy() -> None:
        CPU_UPDATES[type(family)](parts, None, runs.host_runs(), family)

    return copy


#: The updates, by family type (merged into :data:`~xr_rasteragg.kernels.cuda.FAMILY_UPDATES`).
SHAPE_UPDATES: dict[type[Family], Callable[[Partials, Sequence[Any] | None, DeviceRuns, Any], Copy]] = {
    Geometry: _geometry,
    Weighted: _weighted,
    Border: _on_host,
    Hull: _on_host,
}
