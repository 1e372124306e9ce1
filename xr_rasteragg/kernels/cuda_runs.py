"""The CUDA kernels of :mod:`xr_rasteragg.kernels.cuda` (``numba-cuda``), run by run.

Every kernel that walks the block gives each thread a segment of :data:`SEGMENT` pixels of one
row and reduces each run of equal labels in registers, with one atomic update per run and
field. The walk is written once, in device functions that Numba inlines: :func:`_segment` (the
thread's segment), :func:`_next_run` (the run at ``x``, its end, and whether it counts) and
:func:`_row` (its label's row, kept while the label is the same); each kernel adds its per-run
work. Arithmetic that must wrap (hashes, power sums modulo 2**64 and 2**128) is written
without overflowing uint64, so that it also runs, unchanged and without warnings, under Numba's
CUDA simulator. The host side, and what the fields mean, are in :mod:`xr_rasteragg.kernels.cuda`.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

#: Pixels of a row that one CUDA thread walks as runs.
SEGMENT = 64
#: CUDA threads per thread block.
THREADS = 128

_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U2 = np.uint64(2)
_U32 = np.uint64(32)
_U29 = np.uint64(29)
_M32 = np.uint64(0xFFFFFFFF)
_UMAX = np.uint64(2**64 - 1)
_SIGN = np.uint64(2**63)
_G1 = np.uint64(0x9E3779B1)
_G2 = np.uint64(0x85EBCA77)
_IMAX = np.int64(2**63 - 1)
_IMIN = np.int64(-(2**63))
#: The key of an empty slot of the hash table; a label whose key it is has a slot of its own.
_EMPTY = _UMAX

# Image kinds: how pixels become differences from the shift and order keys.
_SMALL, _UINT64, _INT64, _FLOAT = 0, 1, 2, 3


# --- device helpers --------------------------------------------------------------------------


@cuda.jit(device=True, inline=True)
def _segment(labels, seg):
    """(z, y, first x, end x) of this thread's segment of ``labels``, or z = -1 past the last one."""
    nz, ny, nx = labels.shape
    t = cuda.grid(1)
    nseg = (nx + seg - 1) // seg
    r = t // nseg
    if r >= nz * ny:
        return -1, 0, 0, 0
    s = t - r * nseg
    z = r // ny
    a = s * seg
    return z, r - z * ny, a, min(a + seg, nx)


@cuda.jit(device=True, inline=True)
def _next_run(labels, z, y, x0, b, use_skip, skip):
    """The run of equal labels that starts at ``x0``: ``(key, end, counts)``.

    Its end is at most ``b``; it counts unless its key is ``skip`` (with ``use_skip``).
    """
    key = np.uint64(labels[z, y, x0])
    x1 = x0 + 1
    while x1 < b and np.uint64(labels[z, y, x1]) == key:
        x1 += 1
    return key, x1, not (use_skip and key == skip)


@cuda.jit(device=True, inline=True)
def _hash(key, mask):
    """Slot of ``key`` in a table of ``mask + 1`` slots (products of 32-bit halves: no overflow)."""
    h = (key & _M32) * _G1 ^ (key >> _U32) * _G2
    h = h ^ (h >> _U29)
    return np.int64(h & mask)


@cuda.jit(device=True, inline=True)
def _insert(table, mask, key):
    """The slot of ``key``, claimed with ``atomic.cas`` if it has none yet."""
    if key == _EMPTY:
        return np.int64(mask) + 1
    s = _hash(key, mask)
    while True:
        old = cuda.atomic.cas(table, s, _EMPTY, key)
        if old == _EMPTY or old == key:  # noqa: SIM109
            return s
        s = (s + 1) & np.int64(mask)


@cuda.jit(device=True, inline=True)
def _find(table, mask, key):
    """The slot of ``key``, which is in the table."""
    if key == _EMPTY:
        return np.int64(mask) + 1
    s = _hash(key, mask)
    while table[s] != key:
        s = (s + 1) & np.int64(mask)
    return s


@cuda.jit(device=True, inline=True)
def _row(table, mask, ids, key, i, last_key):
    """``(row, key)`` of a counted run's ``key``, given ``(i, last_key)`` of the thread's last one.

    The table is searched only when the key differs from the last (or ``i < 0``: no run yet);
    else the last row is kept.
    """
    if i < 0 or key != last_key:
        return np.int64(ids[_find(table, mask, key)]), key
    return i, last_key


@cuda.jit(device=True, inline=True)
def _add_wide(hi, lo, value):
    """``(hi, lo) + value`` in 128 bits (two uint64 words)."""
    if value > _UMAX - lo:
        return hi + _U1, value - (_UMAX - lo) - _U1
    return hi, lo + value


@cuda.jit(device=True, inline=True)
def _atomic_add_wide(array, i, c, j, hi, lo):
    """Add the 128-bit ``(hi, lo)`` to ``array[i, c, j]`` (low word) and ``array[i, c, j + 1]``."""
    old = cuda.atomic.add(array, (i, c, j), lo)
    if lo > _UMAX - old:  # the low word wrapped: carry one
        hi += _U1
    if hi != _U0:
        cuda.atomic.add(array, (i, c, j + 1), hi)


@cuda.jit(device=True, inline=True)
def _mod_add(a, b):
    """``a + b`` modulo 2**64, without overflow."""
    if b > _UMAX - a:
        return b - (_UMAX - a) - _U1
    return a + b


@cuda.jit(device=True, inline=True)
def _full_product(a, b):
    """The 128-bit product of two uint64 values as ``(hi, lo)``, from 32-bit halves."""
    a0, a1 = a & _M32, a >> _U32
    b0, b1 = b & _M32, b >> _U32
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> _U32) + (p01 & _M32) + (p10 & _M32)
    return p11 + (p01 >> _U32) + (p10 >> _U32) + (mid >> _U32), (p00 & _M32) | ((mid & _M32) << _U32)


@cuda.jit(device=True, inline=True)
def _mod_product(a, b):
    """``a * b`` modulo 2**64."""
    return _full_product(a, b)[1]


@cuda.jit(device=True, inline=True)
def _wide_add(ah, al, bh, bl):
    """``a + b`` modulo 2**128."""
    hi = _mod_add(ah, bh)
    if bl > _UMAX - al:
        hi = _mod_add(hi, _U1)
    return hi, _mod_add(al, bl)


@cuda.jit(device=True, inline=True)
def _wide_product(ah, al, bh, bl):
    """``a * b`` modulo 2**128."""
    hi, lo = _full_product(al, bl)
    hi = _mod_add(hi, _mod_add(_mod_product(ah, bl), _mod_product(al, bh)))
    return hi, lo


@cuda.jit(device=True, inline=True)
def _wide_float(hi, lo):
    """The signed 128-bit integer ``(hi, lo)`` (two's complement) as float64."""
    if hi >= _SIGN:  # negative: minus its negation
        nh, nl = _wide_add(~hi, ~lo, _U0, _U1)
        return -(np.float64(nh) * 18446744073709551616.0 + np.float64(nl))
    return np.float64(hi) * 18446744073709551616.0 + np.float64(lo)


@cuda.jit(device=True, inline=True)
def _difference(x, k, kind):
    """``x - k`` in float64, exact wherever float64 holds it (:func:`~xr_rasteragg.partials.difference`)."""
    if kind == _SMALL:
        return np.float64(np.int64(x) - k)
    if kind == _UINT64:
        if x >= k:
            return np.float64(x - k)
        return -np.float64(k - x)
    if kind == _INT64:
        if (x >= 0) == (k >= 0) or (x >= 0 and x <= _IMAX + k) or (x < 0 and x >= _IMIN + k):
            return np.float64(x - k)
        return np.float64(x) - np.float64(k)
    return np.float64(x) - k


@cuda.jit(device=True, inline=True)
def _order_key(x, bits, kind, low, sign, full):
    """An unsigned key that sorts as the value ``x`` does (``bits``: its bits, for floats)."""
    if kind == _SMALL:
        return np.uint64(np.int64(x) - low)
    if kind == _UINT64:
        return np.uint64(x)
    if kind == _INT64:
        if x >= 0:
            return np.uint64(x) + _SIGN
        return np.uint64(x + _IMAX + 1)
    b = np.uint64(bits)
    if b & sign:
        return full - b
    return b | sign


# --- encoding kernels ------------------------------------------------------------------------


@cuda.jit
def _count_fresh(labels, seg, use_skip, skip, counter):
    """Count the runs that start below another label (or in a plane's first row): a bound on the labels."""
    z, y, a, b = _segment(labels, seg)
    if z < 0:
        return
    fresh = 0
    x0 = a
    while x0 < b:
        key, x1, counts = _next_run(labels, z, y, x0, b, use_skip, skip)
        if counts and (y == 0 or np.uint64(labels[z, y - 1, x0]) != key):
            fresh += 1
        x0 = x1
    if fresh:
        cuda.atomic.add(counter, 0, fresh)


@cuda.jit
def _discover(labels, seg, use_skip, skip, table, mask, sums):
    """Claim a slot for each label and add each run's pixels and index sums to its slot.

    ``sums[slot]`` holds the pixel count and the sums of z, y and 2 x (integers, exact).
    """
    z, y, a, b = _segment(labels, seg)
    if z < 0:
        return
    last_key = _EMPTY
    slot = np.int64(-1)
    x0 = a
    while x0 < b:
        key, x1, counts = _next_run(labels, z, y, x0, b, use_skip, skip)
        if counts:
            if slot < 0 or key != last_key:
                slot = _insert(table, mask, key)
                last_key = key
            n = np.uint64(x1 - x0)
            cuda.atomic.add(sums, (slot, 0), n)
            cuda.atomic.add(sums, (slot, 1), np.uint64(z) * n)
            cuda.atomic.add(sums, (slot, 2), np.uint64(y) * n)
            cuda.atomic.add(sums, (slot, 3), np.uint64(x0 + x1 - 1) * n)
        x0 = x1


@cuda.jit
def _number(table, sums, ids, packed):
    """Give each occupied slot a row (``ids[slot]``) and write its key and sums to ``packed``.

    The number of rows is counted in ``packed[-1, 0]``.
    """
    s = cuda.grid(1)
    size = table.shape[0] - 1
    if s > size:
        return
    if (s < size and table[s] != _EMPTY) or (s == size and sums[s, 0] != _U0):
        i = cuda.atomic.add(packed, (packed.shape[0] - 1, 0), _U1)
        ids[s] = i
        packed[i, 0] = table[s]
        for j in range(4):
            packed[i, j + 1] = sums[s, j]


# --- channel kernels -------------------------------------------------------------------------


@cuda.jit
def _power_pass(
    labels, seg, use_skip, skip, table, mask, ids, image, low, order, extrema, power, key_lo, key_hi
):
    """Exact power sums ``Σ v**p`` (``v = x - low``, p = 1..order) and extrema keys, run by run.

    ``power[i, c]`` holds ``[T1, T2, T3 low, T3 high, T4 low, T4 high]`` (128-bit T3, T4).
    """
    z, y, a, b = _segment(labels, seg)
    if z < 0:
        return
    last_key = _EMPTY
    i = np.int64(-1)
    x0 = a
    while x0 < b:
        key, x1, counts = _next_run(labels, z, y, x0, b, use_skip, skip)
        if counts:
            i, last_key = _row(table, mask, ids, key, i, last_key)
            for c in range(image.shape[0]):
                mn = _UMAX
                mx = _U0
                t1 = _U0
                t2 = _U0
                t3 = _U0
                t4h = _U0
                t4l = _U0
                for p in range(x0, x1):
                    v = np.uint64(np.int64(image[c, z, y, p]) - low)
                    mn = min(mn, v)
                    mx = max(mx, v)
                    t1 += v
                    v2 = v * v
                    t2 += v2
                    t3 += v2 * v
                    t4h, t4l = _add_wide(t4h, t4l, v2 * v2)
                if extrema:
                    cuda.atomic.min(key_lo, (i, c), mn)
                    cuda.atomic.max(key_hi, (i, c), mx)
                if order >= 1:
                    cuda.atomic.add(power, (i, c, 0), t1)
                if order >= 2:
                    cuda.atomic.add(power, (i, c, 1), t2)
                if order >= 3:
                    _atomic_add_wide(power, i, c, 2, _U0, t3)
                    _atomic_add_wide(power, i, c, 4, t4h, t4l)
        x0 = x1


@cuda.jit
def _power_moments(packed, power, low, order, shift, shifted, m2, m3, m4):
    """Shift (the mean rounded to an integer), ``Σ(x - shift)`` and M2..M_order per label and channel.

    With ``e = -s`` for the rounded mean ``s`` of ``v``, ``U_p = Σ (v - s)**p = Σ_j C(p, j)
    e**(p - j) T_j`` modulo 2**128 is the exact integer (its magnitude is far below 2**127);
    with ``δ = U_1 / n`` the moments follow as in :func:`_moments_from_powers` of the CPU kernel.
    """
    t = cuda.grid(1)
    k, nchan = shifted.shape
    if t >= k * nchan:
        return
    i = t // nchan
    c = t - i * nchan
    n = packed[i, 1]
    t1 = power[i, c, 0]
    s = (_U2 * t1 + n) // (_U2 * n)
    u1 = np.int64(t1) - np.int64(n) * np.int64(s)
    shift[i, c] = np.int64(s) + low
    shifted[i, c] = np.float64(u1)
    if order < 2:
        return
    fn = np.float64(n)
    f1 = np.float64(u1)
    delta = f1 / fn
    # U2 = T2 - 2 s T1 + n s**2 lies in [0, 2**64): exact modulo 2**64.
    e = _U0 - s if s == _U0 else _UMAX - s + _U1
    u2 = _mod_add(power[i, c, 1], _mod_product(e, _mod_add(_mod_product(_U2, t1), _mod_product(n, e))))
    f2 = np.float64(u2)
    if fn * f2 < 4611686018427387904.0:  # n U2 - U1**2 exactly in int64
        m2[i, c] = np.float64(np.int64(n) * np.int64(u2) - u1 * u1) / fn
    else:
        m2[i, c] = f2 - delta * f1
    if order < 3:
        return
    eh = _UMAX if s != _U0 else _U0  # e = -s modulo 2**128
    e2h, e2l = _wide_product(eh, e, eh, e)
    e3h, e3l = _wide_product(e2h, e2l, eh, e)
    t3h, t3l = power[i, c, 3], power[i, c, 2]
    t4h, t4l = power[i, c, 5], power[i, c, 4]
    t2 = power[i, c, 1]
    # U3 = T3 + 3 e T2 + 3 e**2 T1 + n e**3
    ah, al = _wide_product(_U0, np.uint64(3), eh, e)
    ph, pl = _wide_product(ah, al, _U0, t2)
    uh, ul = _wide_add(t3h, t3l, ph, pl)
    ah, al = _wide_product(_U0, np.uint64(3), e2h, e2l)
    ph, pl = _wide_product(ah, al, _U0, t1)
    uh, ul = _wide_add(uh, ul, ph, pl)
    ph, pl = _wide_product(_U0, n, e3h, e3l)
    uh, ul = _wide_add(uh, ul, ph, pl)
    f3 = _wide_float(uh, ul)
    m3[i, c] = f3 - delta * (3.0 * f2 - 2.0 * delta * f1)
    if order < 4:
        return
    # U4 = T4 + 4 e T3 + 6 e**2 T2 + 4 e**3 T1 + n e**4
    e4h, e4l = _wide_product(e2h, e2l, e2h, e2l)
    ah, al = _wide_product(_U0, np.uint64(4), eh, e)
    ph, pl = _wide_product(ah, al, t3h, t3l)
    uh, ul = _wide_add(t4h, t4l, ph, pl)
    ah, al = _wide_product(_U0, np.uint64(6), e2h, e2l)
    ph, pl = _wide_product(ah, al, _U0, t2)
    uh, ul = _wide_add(uh, ul, ph, pl)
    ah, al = _wide_product(_U0, np.uint64(4), e3h, e3l)
    ph, pl = _wide_product(ah, al, _U0, t1)
    uh, ul = _wide_add(uh, ul, ph, pl)
    ph, pl = _wide_product(_U0, n, e4h, e4l)
    uh, ul = _wide_add(uh, ul, ph, pl)
    m4[i, c] = _wide_float(uh, ul) - delta * (4.0 * f3 - delta * (6.0 * f2 - 3.0 * delta * f1))


@cuda.jit
def _first_pass(
    labels, seg, use_skip, skip, table, mask, ids, image, bits, kind, zero, low, sign, full,
    skipna, sums, extrema, position, exact, total, nvalid, key_lo, key_hi,
):  # fmt: skip
    """Shifts, sums of the differences from them, valid counts and extrema keys, run by run.

    A label's shift in a channel is the first finite value of the first run that claims it
    (``position[i, c]``, the pixel's index in the block, set by ``atomic.cas``). Differences of
    integers of up to 32 bits are summed exactly in int64 (``exact``), others in float64
    (``total``).
    """
    _, ny, nx = labels.shape
    z, y, a, b = _segment(labels, seg)
    if z < 0:
        return
    last_key = _EMPTY
    i = np.int64(-1)
    x0 = a
    while x0 < b:
        key, x1, counts = _next_run(labels, z, y, x0, b, use_skip, skip)
        if counts:
            i, last_key = _row(table, mask, ids, key, i, last_key)
            for c in range(image.shape[0]):
                if sums:
                    k = zero
                    first = x0
                    while first < x1 and image[c, z, y, first] - image[c, z, y, first] != 0:  # NaN or ±inf
                        first += 1
                    if first < x1:
                        mine = (z * ny + y) * nx + first
                        held = cuda.atomic.cas(position, (i, c), np.int64(-1), np.int64(mine))
                        at = mine if held < 0 else held
                        kz = at // (ny * nx)
                        ky = (at - kz * ny * nx) // nx
                        k = zero + image[c, kz, ky, at - (kz * ny + ky) * nx]
                    else:
                        at = position[i, c]
                        if at >= 0:
                            kz = at // (ny * nx)
                            ky = (at - kz * ny * nx) // nx
                            k = zero + image[c, kz, ky, at - (kz * ny + ky) * nx]
                    acc_i = np.int64(0)
                    acc = 0.0
                    valid = 0
                    for p in range(x0, x1):
                        x = image[c, z, y, p]
                        if skipna and x != x:
                            continue
                        valid += 1
                        if kind == _SMALL:
                            acc_i += np.int64(x) - k
                        else:
                            acc += _difference(x, k, kind)
                    if kind == _SMALL:
                        cuda.atomic.add(exact, (i, c), acc_i)
                    else:
                        cuda.atomic.add(total, (i, c), acc)
                    if skipna:
                        cuda.atomic.add(nvalid, (i, c), valid)
                if extrema:
                    mn = _UMAX
                    mx = _U0
                    nan = False
                    valid = 0
                    for p in range(x0, x1):
                        x = image[c, z, y, p]
                        if x != x:
                            nan = True
                            continue
                        valid += 1
                        v = _order_key(x, bits[c, z, y, p], kind, low, sign, full)
                        mn = min(mn, v)
                        mx = max(mx, v)
                    if skipna and not sums:  # the valid pixels, when no sum pass counts them
                        cuda.atomic.add(nvalid, (i, c), valid)
                    if nan and not skipna:  # NaN wins, as in NumPy: the keys of NaN bit patterns
                        mn = _U0
                        mx = full
                    if mn <= mx:
                        cuda.atomic.min(key_lo, (i, c), mn)
                        cuda.atomic.max(key_hi, (i, c), mx)
        x0 = x1


@cuda.jit
def _finish_sums(image, kind, position, exact, total, shift, shifted):
    """Each label's shift (the value at its claimed position, or 0) and its shifted sum in float64."""
    t = cuda.grid(1)
    k, nchan = shifted.shape
    if t >= k * nchan:
        return
    i = t // nchan
    c = t - i * nchan
    _, ny, nx = image.shape[1:]
    at = position[i, c]
    if at >= 0:
        kz = at // (ny * nx)
        ky = (at - kz * ny * nx) // nx
        shift[i, c] = image[c, kz, ky, at - (kz * ny + ky) * nx]
    else:
        shift[i, c] = 0
    shifted[i, c] = np.float64(exact[i, c]) if kind == _SMALL else total[i, c]


@cuda.jit
def _second_pass(
    labels, seg, use_skip, skip, table, mask, ids, image, kind, skipna, packed, nvalid, shift, shifted,
    order, central,
):  # fmt: skip
    """``Σ d**p`` (p = 1..order) of the deviations ``d`` of each pixel from its label's mean, run by run."""
    z, y, a, b = _segment(labels, seg)
    if z < 0:
        return
    last_key = _EMPTY
    i = np.int64(-1)
    x0 = a
    while x0 < b:
        key, x1, counts = _next_run(labels, z, y, x0, b, use_skip, skip)
        if counts:
            i, last_key = _row(table, mask, ids, key, i, last_key)
            for c in range(image.shape[0]):
                n = nvalid[i, c] if skipna else np.int64(packed[i, 1])
                if n == 0:
                    continue
                k = shift[i, c]
                mean = shifted[i, c] / n
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                s4 = 0.0
                for p in range(x0, x1):
                    x = image[c, z, y, p]
                    if skipna and x != x:
                        continue
                    d = _difference(x, k, kind) - mean
                    d2 = d * d
                    s1 += d
                    s2 += d2
                    s3 += d2 * d
                    s4 += d2 * d2
                cuda.atomic.add(central, (i, c, 0), s1)
                cuda.atomic.add(central, (i, c, 1), s2)
                if order >= 3:
                    cuda.atomic.add(central, (i, c, 2), s3)
                if order >= 4:
                    cuda.atomic.add(central, (i, c, 3), s4)
        x0 = x1


@cuda.jit
def _finish_moments(packed, nvalid, skipna, central, order, m2, m3, m4):
    """M2..M_order from the sums of deviations about the rounded mean, corrected by ``δ = Σd / n``."""
    t = cuda.grid(1)
    k, nchan = m2.shape
    if t >= k * nchan:
        return
    i = t // nchan
    c = t - i * nchan
    n = np.float64(nvalid[i, c] if skipna else np.int64(packed[i, 1]))
    if n == 0:
        m2[i, c] = 0.0
        m3[i, c] = 0.0
        m4[i, c] = 0.0
        return
    s2 = central[i, c, 1]
    s3 = central[i, c, 2]
    delta = central[i, c, 0] / n
    m2[i, c] = s2 - n * delta * delta
    if order >= 3:
        m3[i, c] = s3 - 3.0 * delta * s2 + 2.0 * n * delta**3
    if order >= 4:
        m4[i, c] = central[i, c, 3] - 4.0 * delta * s3 + 6.0 * delta**2 * s2 - 3.0 * n * delta**4


@cuda.jit
def _fill(array, value):
    """Set every element of a 1-D array to ``value``."""
    t = cuda.grid(1)
    if t < array.shape[0]:
        array[t] = value
