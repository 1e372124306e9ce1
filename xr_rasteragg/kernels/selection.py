"""Compiled kernels of the whole-label gather: labels' pixels as runs, and their order statistics.

A label's pixels in a block are the runs of the block's run encoding
(:class:`~xr_rasteragg.kernels.numba.Runs`) that carry its id: run ``r`` holds
``values[c, z[r], y[r], x[r]:x[r] + length[r]]`` of channel ``c``. :func:`group_runs` groups the
runs by label once per block; :func:`scatter_runs` then copies a channel's runs, read in raster
order, into one array in which each label's pixels lie together.

:func:`order_statistics` finds the values at given ranks of each label's sorted values, per
channel, without sorting:

- integer images (any integer dtype) whose label spans ``max - min`` are below
  :data:`HIST_BINS` are counted in a histogram over the label's own range (one pass over its
  values, a scan of the bins up to the highest rank); wider spans below
  ``HIST_BINS * HIST_BINS`` in two levels (a histogram of the high part, then one of the low
  part of the values in each bucket that holds a rank). Counting is exact: the value found is
  the value at that rank, converted to float64 only at the end (a monotone conversion, so the
  order statistic of the float64 values);
- float images, and integer spans beyond two levels, by selection (successive
  ``np.partition``), or one sort when many ranks are wanted.
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np
from numpy.typing import NDArray

from .numba import _is_flat_view, _owner

__all__ = ["HIST_BINS", "SELECT_MAX", "group_runs", "order_statistics", "scatter_runs", "valid_counts"]

#: Bins of the per-label histogram (a span of the label's values below this is counted directly).
HIST_BINS = 4096
_HIST_BITS = 12
#: Above this many ranks per label, a label's values are sorted rather than selected.
SELECT_MAX = 8


@nb.njit(nogil=True, cache=True)
def group_runs(row_of_run, k):  # type: ignore[no-untyped-def]
    """Runs grouped by label row (a stable counting sort): the runs' indices and each row's start.

    ``row_of_run[r]`` is the row (in ``0..k-1``) of run ``r``; returns ``order`` (run indices,
    row by row, in their original order within a row) and ``starts`` (``k + 1``: the start of each
    row's runs in ``order``, and the end of the last).
    """
    counts = np.zeros(k + 1, np.int64)
    for r in range(row_of_run.shape[0]):
        counts[row_of_run[r] + 1] += 1
    starts = np.cumsum(counts)
    fill = starts[:-1].copy()
    order = np.empty(row_of_run.shape[0], np.int64)
    for r in range(row_of_run.shape[0]):
        g = row_of_run[r]
        order[fill[g]] = r
        fill[g] += 1
    return order, starts


def scatter_runs(
    values: NDArray[Any],
    z: NDArray[np.int64],
    y: NDArray[np.int64],
    x: NDArray[np.int64],
    length: NDArray[np.int64],
    row_of_run: NDArray[np.int64],
    starts: NDArray[np.int64],
) -> NDArray[Any]:
    """The pixels of every run of ``values`` ``(C, Z, Y, X)`` grouped by row: shape
    ``(C, starts[-1])``, row ``g``'s pixels at ``starts[g]:starts[g + 1]``, in the runs' order.

    The runs are read in their (raster) order, so the image is read sequentially; the writes go
    to the few rows that the current image row crosses. A chunk that views a C-contiguous array
    with contiguous rows is read in place, through a flat view (unit-stride loops, 2x faster
    than indexing the 4-D view); others are copied first.
    """
    owner = _owner(values)
    if not _is_flat_view(values, owner):
        values = owner = np.ascontiguousarray(values)
    item = values.dtype.itemsize
    start = (values.__array_interface__["data"][0] - owner.__array_interface__["data"][0]) // item
    step_c, step_z, step_y = (s // item for s in values.strides[:3])
    offsets = np.array([(start + c * step_c, step_z, step_y) for c in range(values.shape[0])], np.int64)
    flat = owner.reshape(-1).view()
    flat.flags.writeable = False  # one compiled type for read-only and writable chunks alike
    return _scatter(flat, offsets.reshape(-1, 3), z, y, x, length, row_of_run, starts)


@nb.njit(nogil=True, cache=True)
def _scatter(flat, offsets, z, y, x, length, row_of_run, starts):  # type: ignore[no-untyped-def]
    """:func:`scatter_runs` over a flat array: channel ``c``'s pixel (z, y, x) is
    ``flat[o + sz * z + sy * y + x]`` with ``(o, sz, sy) = offsets[c]``."""
    out = np.empty((offsets.shape[0], starts[-1]), flat.dtype)
    for c in range(offsets.shape[0]):
        fill = starts[:-1].copy()
        grouped = out[c]
        o, sz, sy = offsets[c, 0], offsets[c, 1], offsets[c, 2]
        for r in range(row_of_run.shape[0]):
            g = row_of_run[r]
            p = fill[g]
            n = length[r]
            src = o + sz * z[r] + sy * y[r] + x[r]
            for t in range(n):  # unsigned indices: no wrap-around of negative ones to check
                grouped[np.uint64(p + t)] = flat[np.uint64(src + t)]
            fill[g] = p + n
    return out


@nb.njit(nogil=True, cache=True)
def valid_counts(values, starts, rows):  # type: ignore[no-untyped-def]
    """Number of non-NaN values of each group ``rows`` per channel, shape ``(len(rows), C)``."""
    out = np.zeros((rows.shape[0], values.shape[0]), np.int64)
    for i in range(rows.shape[0]):
        for c in range(values.shape[0]):
            n = 0
            for t in range(starts[rows[i]], starts[rows[i] + 1]):
                if not np.isnan(values[c, t]):
                    n += 1
            out[i, c] = n
    return out


@nb.njit(nogil=True, cache=True)
def _sort_small(ranks, w):  # type: ignore[no-untyped-def]
    """Insertion sort of ``ranks[:w]`` in place (a few ranks per label)."""
    for a in range(1, w):
        v = ranks[a]
        b = a - 1
        while b >= 0 and ranks[b] > v:
            ranks[b + 1] = ranks[b]
            b -= 1
        ranks[b + 1] = v


@nb.njit(nogil=True, cache=True)
def _scan(hist, bins, ranks, w, first, residual, bucket):  # type: ignore[no-untyped-def]
    """Walk ``hist[:bins]`` once for the sorted ranks ``ranks[first:w]`` (less ``residual``):
    ``bucket[t]`` gets the bin of rank ``t`` and ``residual`` its rank within that bin."""
    cumulative = 0
    t = first
    v = 0
    while t < w and v < bins:
        below = cumulative
        cumulative += hist[v]
        while t < w and ranks[t] - residual[t] < cumulative:
            residual[t] += below
            bucket[t] = v
            t += 1
        v += 1


@nb.njit(nogil=True, cache=True)
def _select_counting(buf, n, base, span, ranks, w, found, hist, bucket, residual, level):  # type: ignore[no-untyped-def]
    """The values at the sorted ranks ``ranks[:w]`` of the integers ``buf[:n]`` into ``found``
    (in ``buf``'s dtype), by counting over ``[base, base + span]`` (unsigned, modulo 2**64).

    ``span < HIST_BINS``: one histogram. ``span < HIST_BINS**2``: a histogram of the high bits
    of ``value - base``, then, per bucket holding a rank, one of the low bits of its values.
    """
    for t in range(w):
        residual[t] = 0
    if span < np.uint64(HIST_BINS):
        for j in range(n):
            hist[np.uint64(buf[j]) - base] += 1
        bins = np.int64(span) + 1
        _scan(hist, bins, ranks, w, 0, residual, bucket)
        hist[:bins] = 0
        for t in range(w):
            found[t] = base + np.uint64(bucket[t])  # wraps back into buf's dtype
        return
    shift = np.uint64(0)
    while (span >> shift) >= np.uint64(HIST_BINS):
        shift += np.uint64(1)
    top = np.int64(span >> shift) + 1
    for j in range(n):
        hist[(np.uint64(buf[j]) - base) >> shift] += 1
    _scan(hist, top, ranks, w, 0, residual, bucket)
    hist[:top] = 0
    low = np.int64(1) << np.int64(shift)
    mask = np.uint64(low - 1)
    t = 0
    while t < w:
        high = np.uint64(bucket[t])
        last = t
        while last < w and bucket[last] == bucket[t]:
            last += 1
        for j in range(n):
            d = np.uint64(buf[j]) - base
            if (d >> shift) == high:
                level[d & mask] += 1
        _scan(level, low, ranks, last, t, residual, bucket)
        level[:low] = 0
        for u in range(t, last):
            found[u] = base + (high << shift) + np.uint64(bucket[u])
        t = last


@nb.njit(nogil=True, cache=True)
def _select_partition(values, ranks, w, found):  # type: ignore[no-untyped-def]
    """The values at the sorted ranks ``ranks[:w]`` of ``values`` into ``found``, by selection
    (successive partitions of the part above the last rank found), or a sort for many ranks."""
    if w > SELECT_MAX:
        ordered = np.sort(values)
        for t in range(w):
            found[t] = ordered[ranks[t]]
        return
    base = 0
    for t in range(w):
        if t > 0 and ranks[t] == ranks[t - 1]:
            found[t] = found[t - 1]
            continue
        part = np.partition(values, ranks[t] - base)
        found[t] = part[ranks[t] - base]
        values = part[ranks[t] - base + 1 :]
        base = ranks[t] + 1


@nb.njit(nogil=True, cache=True)
def order_statistics(values, starts, rows, wanted, skipna, integer):  # type: ignore[no-untyped-def]
    """The values at ranks ``wanted[i, c]`` of the sorted (non-NaN) values of group ``rows[i]`` in
    channel ``c``, as float64; shape ``wanted.shape``.

    Group ``g`` holds ``values[:, starts[g]:starts[g + 1]]``. ``integer`` says that ``values`` hold
    integers (counted, see the module's docstring); float values are selected. A group that holds
    NaN without ``skipna``, or no value, gives arbitrary values (the caller puts NaN there).
    """
    out = np.zeros(wanted.shape)
    w = wanted.shape[2]
    longest = 0
    for i in range(rows.shape[0]):
        longest = max(longest, starts[rows[i] + 1] - starts[rows[i]])
    floats = np.empty(longest if not integer else 0)
    ranks = np.empty(w, np.int64)
    found = np.empty(w, values.dtype)
    found_float = np.empty(w)
    bucket = np.empty(w, np.int64)
    residual = np.empty(w, np.int64)
    hist = np.zeros(HIST_BINS, np.int32)
    level = np.zeros(HIST_BINS, np.int32)
    for i in range(rows.shape[0]):
        a, b = starts[rows[i]], starts[rows[i] + 1]
        if a == b:
            continue
        for c in range(values.shape[0]):
            group = values[c, a:b]
            n = b - a
            if not integer:
                n = 0
                for t in range(group.shape[0]):
                    v = np.float64(group[t])
                    if np.isnan(v):
                        if skipna:
                            continue
                        n = 0
                        break
                    floats[n] = v
                    n += 1
                if n == 0:
                    continue
            for t in range(w):
                ranks[t] = wanted[i, c, t]
            _sort_small(ranks, w)
            if integer:
                lo = group[0]
                hi = lo
                for t in range(group.shape[0]):
                    lo = min(lo, group[t])
                    hi = max(hi, group[t])
                base = np.uint64(lo)  # signed values wrap: differences stay exact modulo 2**64
                span = np.uint64(hi) - base
                if span < np.uint64(HIST_BINS * HIST_BINS):
                    _select_counting(group, n, base, span, ranks, w, found, hist, bucket, residual, level)
                else:
                    _select_partition(group, ranks, w, found)
                for t in range(w):
                    found_float[t] = np.float64(found[t])
            else:
                _select_partition(floats[:n], ranks, w, found_float)
            for t in range(w):
                out[i, c, t] = found_float[np.searchsorted(ranks, wanted[i, c, t])]
    return out
