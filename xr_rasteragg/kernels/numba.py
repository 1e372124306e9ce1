"""Compiled CPU kernel for NumPy blocks.

The kernel walks the label block once, row by row, and encodes it as runs of equal labels
((z, y, x) start, length, local id). Label ids are discovered in the same walk with an
open-addressing hash table, so nothing is ever allocated by the size of the largest id, and
numbered in order of first appearance, so that neighbouring runs use neighbouring rows of the
accumulators; the rows are put in label order at the end. The runs then drive the sweep over the
image (strided blocks are read in place):

- for images of at most 16-bit integers (the common microscopy case), one loop per run and
  channel accumulates exact integer power sums ``Σ x**p`` modulo 2**64 and the extrema. The
  shifted sums and central moments follow per label at the end by exact integer shifts to the
  rounded mean; where the bound that guarantees exactness fails (wide ranges in large labels),
  those labels are recomputed in float64 about that integer;
- for other images, every pixel enters as its exact difference from its label's shift (see
  :class:`~xr_rasteragg.partials.Partials`). Run sums of differences come from exact int64
  prefix sums of the row for integer images of up to 32 bits, or from a loop over the run
  otherwise, and one more loop over the run (then in L1 cache) finds the extrema and the
  central moments about the run's own mean, which are merged into the label's running moments
  with the pairwise formulas of Pébay (2008).

No statistic rests on float power sums that cancel. Encoding and sweep are separate stages
(:class:`RunKernel`): the engine encodes each label block once, in a task of its own, and sweeps
each group of channel chunks over it in another.

All loops are compiled with Numba (``nogil``, cached on disk) and specialise on the label and
image dtypes; the statistics to compute are run-time flags.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numba as nb
import numpy as np
from numpy.typing import NDArray

from ..families import Extrema, Family, Moments, Valid, Weighted
from ..frames import Frame
from ..partials import Needs, Partials, difference, shift_dtype

__all__ = ["FAMILY_UPDATES", "LabelRuns", "RunKernel", "Runs", "block_partials"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
#: Flat image arrays that one sweep over the runs reads side by side (see :func:`_flat_channels`).
FLATS_PER_SWEEP = 4


class Runs(NamedTuple):
    """Runs of equal labels along the rows of a block: (z, y, x) start, length and local id."""

    z: NDArray[np.int32]
    y: NDArray[np.int32]
    x: NDArray[np.int32]
    length: NDArray[np.int32]
    id: NDArray[np.int32]


class MomentSums(NamedTuple):
    """Per-label, per-channel shift, ``Σ(x - K)`` and central moments M2..M4 (the fields of
    :class:`~xr_rasteragg.families.Moments`; moments beyond the order needed stand in by any
    float64 array and are never written)."""

    shift: NDArray[Any]
    shifted: NDArray[np.float64]
    m2: NDArray[np.float64]
    m3: NDArray[np.float64]
    m4: NDArray[np.float64]


class Extremes(NamedTuple):
    """Per-label, per-channel running minima and maxima, in the image dtype."""

    lo: NDArray[Any]
    hi: NDArray[Any]


class Flags(NamedTuple):
    """What a sweep accumulates: moments up to ``order``, the ``extrema``, valid counts (``skipna``)."""

    order: int
    extrema: bool
    skipna: bool


@nb.njit(nogil=True, cache=True, inline="always")
def _slot(key, mask):
    h = np.uint64(np.int64(key)) * _GOLDEN
    h ^= h >> np.uint64(29)
    return np.int64(h & np.uint64(mask))


@nb.njit(nogil=True, cache=True)
def _count_runs(flat, starts, nx):
    """Number of runs of equal labels along the rows of a (z, y, x) block, and a bound on the labels.

    Row ``(z, y)`` of the block is ``flat[starts[z, y]:starts[z, y] + nx]`` (see :func:`_flat_rows`).
    A label's first run cannot start below a pixel of the same label, so the runs that start
    below another label (or in a plane's first row) bound the number of labels: tight for small
    cells, and far below the number of runs when cells span many rows.
    """
    nz, ny = starts.shape
    n = 0
    fresh = 0
    for z in range(nz):
        for y in range(ny):
            row = flat[starts[z, y] : starts[z, y] + nx]
            up = flat[starts[z, y - 1] : starts[z, y - 1] + nx] if y > 0 else row
            n += 1
            fresh += y == 0 or up[0] != row[0]
            for x in range(1, nx):
                if row[x] != row[x - 1]:
                    n += 1
                    fresh += y == 0 or up[x] != row[x]
    return n, fresh


@nb.njit(nogil=True, cache=True)
def _encode_runs(flat, starts, nx, nmax, kmax, skip, use_skip):
    """Run-length encode a (z, y, x) label block, laid out as in :func:`_count_runs`, and collect its ids.

    Returns the ids in order of first appearance, their pixel counts and (z, y, x) index sums, and
    the runs as (z, y, x) start, length and id (as a position in the returned id array).
    ``nmax`` bounds the number of runs and ``kmax`` the number of labels (see
    :func:`_count_runs`). Runs of the label ``skip`` are dropped when ``use_skip`` is set.
    A run takes the id of the previous run or of the pixel above when its label is theirs;
    only the others are looked up in the hash table. Indices that LLVM cannot prove
    non-negative are made unsigned: Numba wraps a negative signed index around, a compare and a
    select at each access (a 2048 x 2048 block of the reference dataset: 6.0 against 7.2 ms).
    """
    nz, ny = starts.shape
    # Open addressing, at most half full (kmax bounds the labels), each slot holding its id and
    # the label's key so that a probe reads one place.
    size = 1024
    while size < 2 * kmax:
        size *= 2
    mask = size - 1
    table = np.full(size, -1, np.int64)
    table_keys = np.empty(size, flat.dtype)
    keys = np.empty(kmax, flat.dtype)
    count = np.zeros(kmax, np.int64)
    coords = np.zeros((kmax, 3), np.float64)
    run_z = np.empty(nmax, np.int32)
    run_y = np.empty(nmax, np.int32)
    run_x = np.empty(nmax, np.int32)
    run_len = np.empty(nmax, np.int32)
    run_id = np.empty(nmax, np.int32)
    k = 0
    nruns = 0
    last_key = skip
    last_id = -1
    row_start = 0
    for z in range(nz):
        for y in range(ny):
            row = flat[starts[z, y] : starts[z, y] + nx]
            up = flat[starts[z, y - 1] : starts[z, y - 1] + nx] if y > 0 else row
            # The runs of the row above are above..row_start - 1 (none in a plane's first row).
            above, row_start = (row_start if y > 0 else nruns), nruns
            x0 = 0
            while x0 < nx:
                key = row[np.uint64(x0)]
                x1 = x0 + 1
                while x1 < nx and row[np.uint64(x1)] == key:
                    x1 += 1
                if not (use_skip and key == skip):
                    if key != last_key and above < row_start and up[np.uint64(x0)] == key:
                        # The label of the pixel above: its run there gives the id without a
                        # look-up in the table (whose random reads miss the cache).
                        while run_x[np.uint64(above)] + run_len[np.uint64(above)] <= x0:
                            above += 1
                        last_id = run_id[np.uint64(above)]
                        last_key = key
                    elif key != last_key or last_id < 0:
                        s = _slot(key, mask)
                        while table[s] >= 0 and table_keys[s] != key:
                            s = (s + 1) & mask
                        if table[s] >= 0:
                            last_id = table[s]
                        else:
                            keys[k] = key
                            table[s] = k
                            table_keys[s] = key
                            last_id = k
                            k += 1
                        last_key = key
                    length = x1 - x0
                    run_z[nruns] = z
                    run_y[nruns] = y
                    run_x[nruns] = x0
                    run_len[nruns] = length
                    run_id[nruns] = last_id
                    nruns += 1
                    at = np.uint64(last_id)
                    count[at] += length
                    coords[at, 0] += z * length
                    coords[at, 1] += y * length
                    coords[at, 2] += 0.5 * (x0 + x1 - 1) * length
                x0 = x1
    runs = Runs(run_z[:nruns], run_y[:nruns], run_x[:nruns], run_len[:nruns], run_id[:nruns])
    return keys[:k], count[:k], coords[:k], runs


@nb.njit(nogil=True, cache=True)
def _first_shift(row, a, b, zero):
    """The shift of a label: the first finite value of ``row[a:b]``, or ``zero`` if there is none."""
    for p in range(a, b):
        x = row[p]
        if x - x == 0:  # neither NaN nor ±inf (always true for integers)
            return zero + x
    return zero


@nb.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _sweep(chunk, c0, runs, prefix, flags, done, nvalid, moments, extremes):
    """Accumulate one block's image into per-label partials, run by run.

    ``chunk`` is a (c, z, y, x) image array, channels ``c0`` on of the partials (a block's
    chunks are swept one by one), ``runs`` a :class:`Runs`, ``flags`` the :class:`Flags`,
    ``done`` a per-label scratch count, ``nvalid`` the valid counts (written with ``skipna``),
    ``moments`` a :class:`MomentSums` and ``extremes`` an :class:`Extremes`, all indexed by
    local label id.
    A label's shift ``K`` in a channel is the first finite value of its first run there (see
    :class:`~xr_rasteragg.partials.Partials`), and every pixel enters as ``d = x - K``, taken
    exactly (:func:`~xr_rasteragg.partials.difference`). For each run and channel the pixels
    (then in L1 cache) are read twice: once for ``Σ d``, the extrema and the valid count; once
    for the central moments about the run's own mean. With ``prefix`` (integer images of at most
    32 bits), run sums are differences of exact int64 prefix sums of the row: one long, fast
    loop per row instead of one short loop per run. The run's moments are then merged into the
    label's running moments with the pairwise formulas of Pébay (2008), comparing the means of
    ``d``, so accuracy never rests on power sums that cancel nor on large means.
    """
    run_z, run_y, run_x, run_len, run_id = runs
    order, extrema, skipna = flags
    shift, sums, m2, m3, m4 = moments
    lo, hi = extremes
    nruns = run_id.shape[0]
    zero = shift.dtype.type(0)
    cumulative = np.zeros(chunk.shape[3] + 1, np.int64)
    for cc in range(chunk.shape[0]):
        c = c0 + cc
        done[:] = 0
        r = 0
        while r < nruns:
            z = run_z[r]
            y = run_y[r]
            row = chunk[cc, z, y]  # one view per image row, shared by its runs
            if prefix:
                total = np.int64(0)
                for p in range(row.shape[0]):
                    total += row[p]
                    cumulative[p + 1] = total
            while r < nruns and run_z[r] == z and run_y[r] == y:
                i = run_id[r]
                a = run_x[r]
                b = a + run_len[r]
                r += 1
                na_all = done[i]
                nb_all = b - a
                done[i] = na_all + nb_all
                na = nvalid[i, c] if skipna else na_all
                if na == 0:
                    shift[i, c] = _first_shift(row, a, b, zero)
                k = shift[i, c]
                acc = 0.0
                nb_ = nb_all
                if skipna:
                    nb_ = 0
                    for p in range(a, b):
                        x = row[p]
                        if x == x:
                            acc += difference(x, k)
                            nb_ += 1
                    nvalid[i, c] = na + nb_
                elif prefix:
                    acc = float(cumulative[b] - cumulative[a] - nb_all * np.int64(k))
                else:
                    for p in range(a, b):
                        acc += difference(row[p], k)
                ua = sums[i, c]
                sums[i, c] = ua + acc
                if not extrema and (order < 2 or nb_ == 0):
                    continue
                # One loop over the run for the extrema and the moments about the run mean.
                mb = acc / max(nb_, 1)
                mn = lo[i, c]
                mx = hi[i, c]
                t2 = 0.0
                t3 = 0.0
                t4 = 0.0
                for p in range(a, b):
                    x = row[p]
                    if extrema:
                        mn = min(mn, x)
                        mx = max(mx, x)
                    if order >= 2 and not (skipna and x != x):
                        d = difference(x, k) - mb
                        d2 = d * d
                        t2 += d2
                        if order >= 3:
                            t3 += d2 * d
                            t4 += d2 * d2
                if extrema:
                    if not skipna and acc != acc:
                        # The sum is NaN: from a NaN pixel (which wins, as in NumPy) or from +inf + -inf.
                        for p in range(a, b):
                            if row[p] != row[p]:
                                mn = row[p]
                                mx = row[p]
                                break
                    lo[i, c] = mn
                    hi[i, c] = mx
                if order < 2 or nb_ == 0:
                    continue
                if na == 0:
                    m2[i, c] = t2
                    m3[i, c] = t3
                    m4[i, c] = t4
                    continue
                n = na + nb_
                delta = mb - ua / na
                dn = delta / n
                ab = float(na) * nb_
                a2 = m2[i, c]
                m2[i, c] = a2 + t2 + delta * dn * ab
                if order >= 3:
                    a3 = m3[i, c]
                    m3[i, c] = a3 + t3 + delta * dn * dn * ab * (na - nb_) + 3.0 * dn * (na * t2 - nb_ * a2)
                    if order >= 4:
                        m4[i, c] = (
                            m4[i, c]
                            + t4
                            + delta * dn * dn * dn * ab * (float(na) * na - ab + float(nb_) * nb_)
                            + 6.0 * dn * dn * (float(na) * na * t2 + float(nb_) * nb_ * a2)
                            + 4.0 * dn * (na * t3 - nb_ * a3)
                        )


@nb.njit(nogil=True, cache=True)
def _power_sweep(flats, rows, runs, flags, power, extremes, positions):
    """Exact power sums and extrema of an image of at most 16-bit integers, run by run.

    ``runs`` is a :class:`Runs`, ``flags`` the :class:`Flags` (``order`` and ``extrema`` read),
    ``extremes`` an :class:`Extremes`.

    The pixel (z, y, x) of channel ``rows[j, 1]`` is ``flats[f][o + sz * z + sy * y + x]`` with
    ``(f, _, o, sz, sy) = rows[j]`` (see :func:`_flat_channels`).
    ``power[i, c, p - 1]`` receives ``Σ x**p`` (p = 1..order) over the pixels of label ``i`` in
    channel ``c``, modulo 2**64. uint64 arithmetic wraps, and sums, differences and products
    modulo 2**64 are exact, so any later integer combination of these sums is exact as soon as
    its true value fits in 64 bits (see :func:`_moments_from_powers`). Integer additions have no
    rounding and a short latency, and no run needs a division or a merge formula: the per-pixel
    loop is a few integer operations on a unit-stride array. Runs are outer and channels inner,
    so the channels of a run share its loop bounds (which the branch predictor then learns) and
    its label's rows of the accumulators; with label ids numbered in order of first appearance
    (see :func:`_encode_runs`), neighbouring runs touch neighbouring rows.

    ``positions`` is None, or receives in ``positions[i, c]`` the sums ``Σ x z``, ``Σ x y`` and
    ``Σ x j`` (block indices z, y and column j), modulo 2**64 as well, with ``Σ x`` in
    ``power[i, c, 0]`` whatever the order: the intensity-weighted centroid costs one product more
    in the loop that reads the pixels anyway. (Numba compiles the sweep without that product
    where ``positions`` is None.)
    """
    run_z, run_y, run_x, run_len, run_id = runs
    order, extrema = flags.order, flags.extrema
    lo, hi = extremes
    for r in range(run_id.shape[0]):
        i = np.uint64(run_id[r])  # (unsigned: no wraparound at each access)
        z = run_z[r]
        y = run_y[r]
        a = run_x[r]
        b = a + run_len[r]
        for j in range(rows.shape[0]):
            c = np.uint64(rows[j, 1])
            start = rows[j, 2] + rows[j, 3] * z + rows[j, 4] * y
            row = flats[rows[j, 0]][start + a : start + b]
            mn = lo[i, c]
            mx = hi[i, c]
            if extrema:  # its own loop, in the image dtype: faster than one loop for everything
                for p in range(row.shape[0]):
                    mn = min(mn, row[p])
                    mx = max(mx, row[p])
            lo[i, c] = mn  # stored even when unused: a conditional store makes the loop 2x slower
            hi[i, c] = mx
            if order == 0 and positions is None:  # the extrema alone
                continue
            t1 = np.uint64(0)
            t2 = np.uint64(0)
            t3 = np.uint64(0)
            t4 = np.uint64(0)
            tj = np.uint64(0)
            for p in range(row.shape[0]):
                d = np.uint64(row[p])  # negative values wrap: exact modulo 2**64
                t1 += d
                if positions is not None:
                    # p < 2**32 (see _weighted_family): a product of 32-bit halves, one cheap
                    # vector instruction, where a 64-bit product is three 32-bit products and
                    # their sums (a 2048 x 2048 block of 8 channels: the weighted centroid 3.0
                    # against 5.0 ms)
                    tj += d * np.uint64(np.uint32(p))
                if order >= 2:
                    d2 = d * d
                    t2 += d2
                    if order >= 3:
                        t3 += d2 * d
                        t4 += d2 * d2
            if positions is not None:
                # z is 0 in every block of 2-D labels: a store fewer per run and channel there
                # (the weighted centroid of a 2048 x 2048 block of 8 channels: 3.2 against 3.6 ms)
                if z > 0:
                    positions[i, c, 0] += np.uint64(z) * t1
                positions[i, c, 1] += np.uint64(y) * t1
                positions[i, c, 2] += tj + np.uint64(a) * t1
            power[i, c, 0] += t1
            if order >= 2:
                power[i, c, 1] += t2
                if order >= 3:
                    power[i, c, 2] += t3
                    power[i, c, 3] += t4


@nb.njit(nogil=True, cache=True)
def _moments_from_powers(rank, count, power, order, extremes, span, moments, unsafe):
    """Shifts, shifted sums and central moments per label and channel from power sums modulo 2**64.

    The inputs (``extremes`` an :class:`Extremes`) are indexed by local label id ``i``, the
    outputs (``moments`` a :class:`MomentSums`, and ``unsafe``) by row ``rank[i]`` (so the rows
    come out sorted by label id in the same pass).

    With ``T_p = Σ x**p`` modulo 2**64 (from :func:`_power_sweep`), the sum ``T_1`` is exact
    (below 2**63 for 16-bit values). The shift is the mean rounded to an integer, ``s``; the
    sums about it follow from the binomial theorem with ``e = -s``, again modulo 2**64, where they
    are exact whatever the size of the raw power sums::

        U_p = Σ (x - s)**p = Σ_j C(p, j) e**(p - j) T_j        (T_0 = n)

    ``U_1`` is the shifted sum. Each ``U_p`` equals the true integer as soon as
    ``|U_p| < 2**63``, which holds when ``n R**order < 2**62`` for ``R = max(max - s, s - min)``
    (or ``span``, the dtype's range, when the extrema were not collected, ``lo > hi``). Labels and
    channels where that bound fails are marked ``unsafe`` for :func:`_central_moments`. With
    ``δ = U_1 / n`` (``|δ| <= 1/2``) the central moments follow with little cancellation::

        M2 = U2 - δ U1            (exact in integers, (n U2 - U1²) / n, when n U2 < 2**62)
        M3 = U3 - 3 δ U2 + 2 δ² U1
        M4 = U4 - 4 δ U3 + 6 δ² U2 - 3 δ³ U1
    """
    lo, hi = extremes
    shift, sums, m2, m3, m4 = moments
    k, nchan = sums.shape
    for i in range(k):
        r = rank[i]
        n = count[i]
        un = np.uint64(n)
        for c in range(nchan):
            t1 = power[i, c, 0]
            total = np.int64(t1)
            s = (2 * total + n) // (2 * n)  # the mean rounded to an integer (floor division)
            e = np.uint64(0) - np.uint64(s)  # -s modulo 2**64
            u1 = np.int64(t1 + un * e)
            shift[r, c] = s
            sums[r, c] = u1
            if order < 2:
                continue
            reach = float(span)
            if lo[i, c] <= hi[i, c]:
                reach = float(max(np.int64(hi[i, c]) - s, s - np.int64(lo[i, c]), 1))
            bound = reach * reach
            if order == 4:
                bound *= bound
            elif order == 3:
                bound *= reach
            if n * bound >= 2.0**62:
                unsafe[r, c] = True
                continue
            t2 = power[i, c, 1]
            u2 = np.int64(t2 + e * (np.uint64(2) * t1 + un * e))
            f1 = float(u1)
            delta = f1 / n
            if n * float(u2) < 2.0**62:
                m2[r, c] = float(n * u2 - u1 * u1) / n
            else:
                m2[r, c] = float(u2) - delta * f1
            if order < 3:
                continue
            t3 = power[i, c, 2]
            t4 = power[i, c, 3]
            e2 = e * e
            u3 = np.int64(t3 + np.uint64(3) * e * t2 + np.uint64(3) * e2 * t1 + un * e2 * e)
            u4 = np.int64(
                t4
                + np.uint64(4) * e * t3
                + np.uint64(6) * e2 * t2
                + np.uint64(4) * e2 * e * t1
                + un * e2 * e2
            )
            f2 = float(u2)
            f3 = float(u3)
            m3[r, c] = f3 - delta * (3.0 * f2 - 2.0 * delta * f1)
            m4[r, c] = float(u4) - delta * (4.0 * f3 - delta * (6.0 * f2 - 3.0 * delta * f1))


@nb.njit(nogil=True, cache=True)
def _sums_about_mean(flats, rows, runs, rank, unsafe, shift, t):
    """Add ``Σ d**p`` (p = 1..4, ``d = x - shift``, exact) to ``t[r, c, p - 1]`` where ``unsafe``.

    The image layout is that of :func:`_power_sweep`; the :class:`Runs` hold local label ids, and
    the label ``i`` has row ``r = rank[i]`` of ``unsafe``, ``shift`` and ``t``.
    """
    run_z, run_y, run_x, run_len, run_id = runs
    for q in range(run_id.shape[0]):
        r = rank[run_id[q]]
        for j in range(rows.shape[0]):
            c = rows[j, 1]
            if not unsafe[r, c]:
                continue
            start = rows[j, 2] + rows[j, 3] * run_z[q] + rows[j, 4] * run_y[q] + run_x[q]
            flat = flats[rows[j, 0]]
            s = shift[r, c]
            for p in range(start, start + run_len[q]):
                d = float(np.int64(flat[p]) - s)
                d2 = d * d
                t[r, c, 0] += d
                t[r, c, 1] += d2
                t[r, c, 2] += d2 * d
                t[r, c, 3] += d2 * d2


@nb.njit(nogil=True, cache=True)
def _central_moments(t, count, unsafe, order, m2, m3, m4):
    """Central moments where ``unsafe`` from the sums of :func:`_sums_about_mean`.

    The deviations from the rounded mean are corrected by ``δ = Σd / n`` as in
    :func:`_moments_from_powers`.
    """
    k, nchan = unsafe.shape
    for i in range(k):
        for c in range(nchan):
            if not unsafe[i, c]:
                continue
            f1, f2, f3, f4 = t[i, c, 0], t[i, c, 1], t[i, c, 2], t[i, c, 3]
            delta = f1 / count[i]
            m2[i, c] = f2 - delta * f1
            if order >= 3:
                m3[i, c] = f3 - delta * (3.0 * f2 - 2.0 * delta * f1)
                m4[i, c] = f4 - delta * (4.0 * f3 - delta * (6.0 * f2 - 3.0 * delta * f1))


@nb.njit(nogil=True, cache=True)
def _in_label_order(local, keys, count, coords, offset):
    """The block's ids, pixel counts and global coordinate sums, in the label order ``local``.

    ``coords`` hold sums of indices within the block; ``offset`` (float64) is the block's first
    pixel, so each sum gains ``offset * count``.
    """
    k = local.shape[0]
    labels = np.empty(k, keys.dtype)
    counts = np.empty(k, np.int64)
    sums = np.empty((k, 3), np.float64)
    for r in range(k):
        i = local[r]
        labels[r] = keys[i]
        counts[r] = count[i]
        for j in range(3):
            sums[r, j] = coords[i, j] + offset[j] * count[i]
    return labels, counts, sums


@nb.njit(nogil=True, cache=True)
def _take_rows(values, rows):
    """``values[rows]`` for a 2-D array (one compiled loop: faster than NumPy's fancy indexing)."""
    out = np.empty((rows.shape[0], values.shape[1]), values.dtype)
    for r in range(rows.shape[0]):
        i = rows[r]
        for c in range(values.shape[1]):
            out[r, c] = values[i, c]
    return out


def _flat_channels(
    image: Sequence[NDArray[np.number]],
) -> list[tuple[tuple[NDArray[Any], ...], NDArray[np.int64]]]:
    """The channel chunks of a block as flat arrays, with where each channel's rows are.

    Returns batches ``(flats, rows)``, one per :data:`FLATS_PER_SWEEP` flat arrays: ``flats`` is
    a tuple of that many read-only, 1-D contiguous arrays (padded with repeats, so that one
    compiled sweep serves any number of arrays), ``rows`` has shape ``(C_b, 5)`` and the pixel
    (z, y, x) of channel ``c`` is ``flats[f][o + sz * z + sy * y + x]`` with
    ``(f, c, o, sz, sy)`` a row of ``rows``. A chunk whose rows are contiguous is read in place,
    through a flat view of the C-contiguous array it is a view of (dask's blocks of an in-memory
    array all share one, so all channels come from one flat array); other chunks are copied.
    """
    owners: dict[int, int] = {}
    flats: list[NDArray[Any]] = []
    rows: list[tuple[int, int, int, int, int]] = []
    for chunk in image:
        owner = _owner(chunk)
        if not _is_flat_view(chunk, owner):
            chunk = owner = np.ascontiguousarray(chunk)
        if id(owner) not in owners:
            owners[id(owner)] = len(flats)
            flat = owner.reshape(-1).view()
            flat.flags.writeable = False  # one type for read-only and writable blocks alike
            flats.append(flat)
        item = chunk.dtype.itemsize
        start = (chunk.__array_interface__["data"][0] - owner.__array_interface__["data"][0]) // item
        step_c, step_z, step_y = (s // item for s in chunk.strides[:3])
        for cc in range(chunk.shape[0]):
            rows.append((owners[id(owner)], len(rows), start + cc * step_c, step_z, step_y))
    table = np.array(rows, np.int64).reshape(-1, 5)
    batches = []
    for first in range(0, len(flats), FLATS_PER_SWEEP):
        mine = flats[first : first + FLATS_PER_SWEEP]
        padded = tuple(mine + mine[:1] * (FLATS_PER_SWEEP - len(mine)))
        batch = table[(table[:, 0] >= first) & (table[:, 0] < first + FLATS_PER_SWEEP)]
        batch[:, 0] -= first
        batches.append((padded, batch))
    return batches


def _owner(array: NDArray[Any]) -> NDArray[Any]:
    """The array at the end of ``array``'s chain of views."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _is_flat_view(chunk: NDArray[Any], owner: NDArray[Any]) -> bool:
    """Whether ``chunk`` views the C-contiguous ``owner``, rows contiguous, strides whole and non-negative."""
    item = owner.dtype.itemsize
    return bool(
        owner.flags.c_contiguous
        and chunk.dtype == owner.dtype
        and (chunk.strides[-1] == item or chunk.shape[-1] <= 1)
        and all(s >= 0 and s % item == 0 for s in chunk.strides)
    )


def _flat_rows(labels: NDArray[Any]) -> tuple[NDArray[Any], NDArray[np.int64]]:
    """A label block ``(z, y, x)`` as a flat, C-contiguous array and where each of its rows starts.

    Row ``(z, y)`` is ``flat[starts[z, y]:starts[z, y] + nx]``. A block that views a C-contiguous
    array with contiguous rows (as dask's blocks of an in-memory array do) is read in place: the
    compiled loops then index contiguous rows, which is 1.8x faster than a strided view; others
    are copied.
    """
    owner = _owner(labels)
    if not _is_flat_view(labels, owner):
        labels = owner = np.ascontiguousarray(labels)
    item = labels.dtype.itemsize
    start = (labels.__array_interface__["data"][0] - owner.__array_interface__["data"][0]) // item
    step_z, step_y = (s // item for s in labels.strides[:2])
    nz, ny = labels.shape[:2]
    starts = start + step_z * np.arange(nz, dtype=np.int64)[:, None] + step_y * np.arange(ny, dtype=np.int64)
    flat = owner.reshape(-1).view()
    flat.flags.writeable = False  # one type for read-only and writable blocks alike
    return flat, starts


def _extrema_init(dtype: np.dtype) -> tuple[np.generic, np.generic]:
    """Initial (min, max) accumulators: the largest and smallest value of the dtype."""
    if np.issubdtype(dtype, np.floating):
        return dtype.type(np.inf), dtype.type(-np.inf)
    info = np.iinfo(dtype)
    return dtype.type(info.max), dtype.type(info.min)


@dataclass(frozen=True)
class LabelRuns:
    """A label block encoded as runs: what every group of channels of the block starts from.

    Attributes
    ----------
    parts
        The block's label ids, pixel counts and global coordinate sums, in label order.
    runs
        (z, y, x) start, length and local id of each run of equal labels along the rows (the
        background's runs left out); local ids number the labels in order of first appearance.
    local
        The local id of each row of ``parts``.
    rank
        The row of ``parts`` of each local id (the inverse of ``local``).
    count
        Pixel counts by local id.
    pixels
        Pixels in the block.
    offset
        The global (z, y, x) index of the block's first pixel.
    around
        By local id, what the kernel code of a family that reads the block's frame counted
        (:data:`NEIGHBOURHOODS`), when the block came with one.
    """

    parts: Partials
    runs: Runs
    local: NDArray[np.intp]
    rank: NDArray[np.intp]
    count: NDArray[np.int64]
    pixels: int
    offset: tuple[int, int, int] = (0, 0, 0)
    around: NDArray[Any] | None = None

    @cached_property
    def one_plane(self) -> bool:
        """Whether the runs lie in one z plane (as in every block of 2-D labels; False without runs)."""
        return self.parts.size > 0 and int(self.runs.z.max()) == int(self.runs.z.min())


class RunKernel:
    """The compiled CPU kernel, in two stages: the label block once, then each group of channels.

    The engine encodes a block's labels in one task (:meth:`encode`) and sweeps each group of
    channel chunks in its own task (:meth:`channels`), so that a chunk is read as soon as it is
    made (while it is still in the caches) and the labels are encoded once for all channels.
    Calling the kernel runs both stages on one block, as every block kernel does.
    """

    def encode_framed(
        self,
        labels: NDArray[np.integer],
        offset: tuple[int, int, int],
        skip: int | None,
        frame: Frame,
        families: Sequence[Family] = (),
    ) -> LabelRuns:
        """:meth:`encode`, with the pixels around the block for the family whose kernel code reads
        them (:data:`NEIGHBOURHOODS`), which then runs here, once per block."""
        return self.encode(labels, offset, skip, families, frame)

    def encode(
        self,
        labels: NDArray[np.integer],
        offset: tuple[int, int, int],
        skip: int | None = None,
        families: Sequence[Family] = (),
        frame: Frame | None = None,
    ) -> LabelRuns:
        """Run-length encode a label block ``(z, y, x)`` of any integer dtype.

        ``offset`` is the global (z, y, x) index of the block's first pixel, ``skip`` a label
        whose pixels are ignored entirely (the background), or None, ``families`` families of
        the labels alone (``Family.channel`` False: the shape features') whose kernel code
        (:data:`FAMILY_UPDATES`) runs here, once per block, rather than in each group of
        channels, and ``frame`` the pixels around the block (see :meth:`encode_framed`), whose
        family's kernel code (:data:`NEIGHBOURHOODS`) reads the block first and gives the
        encoding its bounds on the block's runs and labels.
        """
        use_skip, skip_value = _as_label_value(skip, labels.dtype)
        flat, starts = _flat_rows(labels)
        nx = labels.shape[2]
        offset = tuple(int(o) for o in offset)  # type: ignore[assignment]
        reader = None if frame is None else NEIGHBOURHOODS[type(frame.family)]
        if reader is not None and frame is not None:
            read, nmax, kmax = reader.read(frame, labels, offset)
        else:
            nmax, kmax = _count_runs(flat, starts, nx) if labels.size else (0, 0)
        keys, count, coords, runs = _encode_runs(flat, starts, nx, nmax, kmax, skip_value, use_skip)
        # The sweeps use the ids in order of first appearance, so that neighbouring runs touch
        # neighbouring rows of the accumulators; the rows come out sorted by label id.
        local = np.argsort(keys)  # the ids are unique: any sort gives this order (and quicksort is SIMD)
        rank = np.empty_like(local)
        rank[local] = np.arange(local.shape[0])
        parts = Partials(*_in_label_order(local, keys, count, coords, np.asarray(offset, dtype=np.float64)))
        around = None if reader is None else reader.counts(read, runs, int(keys.shape[0]))
        block = LabelRuns(parts, runs, local, rank, count, int(labels.size), offset, around)
        for family in families:
            _update(family)(parts, None, block, family)
        return block

    def channels(self, runs: LabelRuns, image: Sequence[NDArray[np.number]] | None, needs: Needs) -> Partials:
        """Partials of a group of channel chunks over an encoded label block.

        ``image`` holds chunks of shape ``(c_i, z, y, x)`` over the block's pixels, of one
        dtype, or is None when only counts and coordinates are needed. The partials share the
        label ids, counts and coordinate sums of ``runs``.
        """
        parts = runs.parts.rows(0, runs.parts.size)
        if image is not None:
            if image[0].dtype.kind in "iu" and image[0].dtype.itemsize <= 2:
                if needs.order >= 1 or needs.extrema or _weighted_family(needs, runs, image):
                    _small_integer_partials(parts, image, runs, needs)
            elif needs.order >= 1 or needs.extrema:
                _general_partials(parts, image, runs, needs)
        filled = {f.name for f in parts.families}
        for family in needs.more:
            if family.name not in filled:  # not filled by the label stage or the sweep above
                _update(family)(parts, image, runs, family)
        return parts

    def __call__(
        self,
        labels: NDArray[np.integer],
        image: Sequence[NDArray[np.number]] | None,
        offset: tuple[int, int, int],
        needs: Needs,
        skip: int | None = None,
    ) -> Partials:
        """Partials of one block, both stages in turn (the :class:`~xr_rasteragg.kernels.BlockKernel` call).

        ``labels`` is a block ``(z, y, x)`` of any integer dtype; the other arguments are those of
        :meth:`encode` and :meth:`channels`. The partials hold the labels present in the block,
        sorted by id.
        """
        return self.channels(self.encode(labels, offset, skip), image, needs)


#: The kernel for NumPy blocks.
block_partials = RunKernel()


def _general_partials(
    parts: Partials, image: Sequence[NDArray[np.number]], runs: LabelRuns, needs: Needs
) -> None:
    """Fill ``parts`` for any image with the run-merging sweep (:func:`_sweep`), in place."""
    local = runs.local
    dtype: Any = image[0].dtype
    k, nchan = parts.size, sum(chunk.shape[0] for chunk in image)
    lo_init, hi_init = _extrema_init(dtype)
    skipna = needs.skipna and np.issubdtype(dtype, np.floating)
    nvalid = np.zeros((k, nchan), np.int64)
    sums = np.zeros((k, nchan), np.float64)
    central = [np.zeros((k, nchan)) for _ in range(3)] if needs.order >= 2 else [sums] * 3
    moments = MomentSums(np.zeros((k, nchan), shift_dtype(dtype)), sums, *central)
    extremes = Extremes(np.full((k, nchan), lo_init, dtype), np.full((k, nchan), hi_init, dtype))
    # Chunk by chunk, in Python: a typed list of the chunks would compile numba's list code in
    # every process (it cannot be cached), 0.2 s on the first call.
    prefix = dtype.kind in "iu" and dtype.itemsize <= 4  # exact int64 prefix sums of the rows
    flags, done, c0 = Flags(needs.order, needs.extrema, skipna), np.zeros(k, np.int64), 0
    for chunk in image:
        _sweep(chunk, c0, runs.runs, prefix, flags, done, nvalid, moments, extremes)
        c0 += chunk.shape[0]
    if needs.skipna:
        valid = _take_rows(nvalid, local) if skipna else np.repeat(parts.count[:, None], nchan, axis=1)
        parts.add(Valid(), nvalid=valid)
    if needs.extrema:
        parts.add(Extrema(), min=_take_rows(extremes.lo, local), max=_take_rows(extremes.hi, local))
    if needs.order >= 1:
        _add_moments(parts, needs.order, [_take_rows(a, local) for a in moments[: needs.order + 1]])


def _small_integer_partials(
    parts: Partials, image: Sequence[NDArray[np.number]], runs: LabelRuns, needs: Needs
) -> None:
    """Fill ``parts`` for an image of at most 16-bit integers from exact power sums, in place."""
    local, rank, count, pixels = runs.local, runs.rank, runs.count, runs.pixels
    dtype: Any = image[0].dtype
    nchan = sum(chunk.shape[0] for chunk in image)
    k = parts.size
    order = 4 if needs.order >= 3 else needs.order
    info = np.iinfo(dtype)
    span = int(info.max) - int(info.min)
    # The extrema bound the power sums about the mean; without them the dtype's range must do.
    extrema = needs.extrema or (order >= 2 and pixels * float(span) ** order >= 2.0**62)
    lo_init, hi_init = _extrema_init(dtype)
    extremes = Extremes(np.full((k, nchan), lo_init, dtype), np.full((k, nchan), hi_init, dtype))
    weighted = _weighted_family(needs, runs, image)
    power = np.zeros((k, nchan, max(order, 1)), np.uint64)
    positions = None if weighted is None else np.zeros((k, nchan, 3), np.uint64)
    batches = _flat_channels(image)
    for flats, rows in batches:
        _power_sweep(flats, rows, runs.runs, Flags(order, extrema, False), power, extremes, positions)
    if weighted is not None and positions is not None:
        sums = _weighted_sums(power, positions, local, np.asarray(runs.offset, np.float64))
        parts.add(weighted, **dict(zip(weighted.names(), sums, strict=True)))
    if needs.skipna:
        parts.add(Valid(), nvalid=np.repeat(parts.count[:, None], nchan, axis=1))
    if needs.extrema:
        parts.add(Extrema(), min=_take_rows(extremes.lo, local), max=_take_rows(extremes.hi, local))
    if order == 0:
        return
    sums = np.empty((k, nchan))
    central = [np.empty((k, nchan)) if order >= p else sums for p in (2, 3, 4)]
    moments = MomentSums(np.empty((k, nchan), np.int64), sums, *central)
    unsafe = np.zeros((k, nchan), np.bool_)
    _moments_from_powers(rank, count, power, order, extremes, span, moments, unsafe)
    if unsafe.any():
        about_mean = np.zeros((k, nchan, 4))
        for flats, rows in batches:
            _sums_about_mean(flats, rows, runs.runs, rank, unsafe, moments.shift, about_mean)
        _central_moments(about_mean, parts.count, unsafe, order, *central)
    _add_moments(parts, needs.order, list(moments[: needs.order + 1]))


def _weighted_family(needs: Needs, runs: LabelRuns, image: Sequence[NDArray[np.number]]) -> Weighted | None:
    """The :class:`~xr_rasteragg.families.Weighted` family of ``needs`` if :func:`_power_sweep`
    fills it for this block of at most 16-bit integers: when its sums modulo 2**64 are the true
    sums, as ``|Σ x j| < 2**16 * pixels * width < 2**63`` (blocks with pixels × width < 2**47,
    so that a run's pixels, at most ``width <= pixels``, number less than 2**24)."""
    family = next((f for f in needs.more if isinstance(f, Weighted)), None)
    width = max(image[0].shape[1:], default=0)
    return family if family is not None and 2.0**16 * runs.pixels * width < 2.0**63 else None


@nb.njit(nogil=True, cache=True)
def _weighted_sums(power, positions, local, offset):
    """The fields of :class:`~xr_rasteragg.families.Weighted` in label order (rows ``local``), from
    the sums of :func:`_power_sweep`: ``Σ x`` and ``Σ x j`` about global indices ``j`` (block
    indices plus ``offset``). The sums modulo 2**64 are read as int64: the true values fit (see
    :func:`_weighted_family`)."""
    k, nchan = local.shape[0], power.shape[1]
    weight = np.empty((k, nchan))
    moments = (np.empty((k, nchan)), np.empty((k, nchan)), np.empty((k, nchan)))
    for r in range(k):
        i = local[r]
        for c in range(nchan):
            w = float(np.int64(power[i, c, 0]))
            weight[r, c] = w
            for a in range(3):
                moments[a][r, c] = float(np.int64(positions[i, c, a])) + offset[a] * w
    return weight, moments[0], moments[1], moments[2]


def _add_moments(parts: Partials, order: int, moments: list[NDArray[Any]]) -> None:
    """Add the :class:`~xr_rasteragg.families.Moments` of ``order`` from a :class:`MomentSums`'s arrays."""
    family = Moments(order)
    parts.add(family, **dict(zip(family.names(), moments, strict=True)))


#: The kernel code of a family: it fills the family's fields into a block's partials from the
#: runs (and the image chunks, or None).
Update = Callable[[Partials, Sequence[NDArray[np.number]] | None, LabelRuns, Any], None]
#: Kernel code for the families beyond counts, moments and extrema, by family type.
FAMILY_UPDATES: dict[type[Family], Update] = {}


def _update(family: Family) -> Update:
    """The kernel code of ``family`` (:data:`FAMILY_UPDATES`)."""
    if type(family) not in FAMILY_UPDATES:
        raise TypeError(f"the Numba kernel has no update for the family {family.name!r}")
    return FAMILY_UPDATES[type(family)]


def _as_label_value(value: int | None, dtype: np.dtype) -> tuple[bool, np.generic]:
    """``value`` in the label dtype, and whether it can occur there at all."""
    zero = dtype.type(0)
    if value is None:
        return False, zero
    info = np.iinfo(dtype)
    if not info.min <= value <= info.max:
        return False, zero
    return True, dtype.type(value)


class Neighbourhood(NamedTuple):
    """Kernel code of a family that reads a label block's frame
    (:class:`~xr_rasteragg.frames.Frame`), in two steps around the block's encoding: ``read``
    takes the frame, the block and its offset, and returns what ``counts`` needs and the bounds
    on the block's runs and labels that the encoding needs (as :func:`_count_runs` counts them,
    so that the block is not read for them again); ``counts`` then takes that, the block's runs
    and its number of labels, and returns per local id what the family counts."""

    read: Callable[[Frame, NDArray[np.integer], tuple[int, int, int]], tuple[Any, int, int]]
    counts: Callable[[Any, Runs, int], NDArray[Any]]


#: The kernel code that reads a label block's frame, by the type of the family it serves.
NEIGHBOURHOODS: dict[type[Family], Neighbourhood] = {}


def _register_shape_updates() -> None:
    """Add the kernel code of the shape families (:mod:`~xr_rasteragg.kernels.numba_shape`)."""
    from .numba_shape import SHAPE_NEIGHBOURHOODS, SHAPE_UPDATES

    FAMILY_UPDATES.update(SHAPE_UPDATES)
    NEIGHBOURHOODS.update({family: Neighbourhood(*code) for family, code in SHAPE_NEIGHBOURHOODS.items()})


_register_shape_updates()
