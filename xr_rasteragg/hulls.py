"""Convex hulls of pixel centres, in exact integer arithmetic, compiled.

The :class:`~xr_rasteragg.families.Hull` family keeps, per label and z plane, the vertices of
the convex hull of its pixel centres, sorted by (z, y, x), in a
:class:`~xr_rasteragg.ragged.Ragged` field. This module makes those vertex lists from sorted
points (:func:`sorted_hull`), merges those of several parts (:func:`fold_hulls`: the hull of a union is
the hull of the parts' hulls) and counts the pixels of
:func:`skimage.morphology.convex_hull_image` of a 2-D label from its vertices
(:func:`convex_pixels_2d`), row by row, analytically. Every step is a loop over the points,
with no Python loop per label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba as nb
import numpy as np
from numpy.typing import NDArray

__all__ = ["chain_pixels", "convex_pixels_2d", "fold_hulls", "monotone_chain", "sorted_hull"]


@nb.njit(nogil=True, cache=True, inline="always")
def _cross(ay, ax, by, bx, cy, cx):  # type: ignore[no-untyped-def]
    return (by - ay) * (cx - ax) - (bx - ax) * (cy - ay)


@nb.njit(nogil=True, cache=True)
def monotone_chain(ys, xs, n, hy, hx):  # type: ignore[no-untyped-def]
    """Convex hull of the first ``n`` points ``(ys, xs)``, sorted by (y, x) (Andrew's monotone chain).

    Writes the hull's vertices (collinear points dropped) into ``hy, hx`` (room for ``n + 1``),
    counter-clockwise from the first point, and returns their number; integer cross products, so
    the hull is exact.
    """
    if n <= 2:
        for q in range(n):
            hy[q] = ys[q]
            hx[q] = xs[q]
        return n
    h = 0
    for i in range(n):
        while h >= 2 and _cross(hy[h - 2], hx[h - 2], hy[h - 1], hx[h - 1], ys[i], xs[i]) <= 0:
            h -= 1
        hy[h] = ys[i]
        hx[h] = xs[i]
        h += 1
    lower = h + 1
    for i in range(n - 2, -1, -1):
        while h >= lower and _cross(hy[h - 2], hx[h - 2], hy[h - 1], hx[h - 1], ys[i], xs[i]) <= 0:
            h -= 1
        hy[h] = ys[i]
        hx[h] = xs[i]
        h += 1
    return max(h - 1, 1)


@nb.njit(nogil=True, cache=True)
def sorted_hull(ys, xs, n, hy, hx, oy, ox):  # type: ignore[no-untyped-def]
    """The hull vertices of the first ``n`` points ``(ys, xs)`` (sorted by (y, x), distinct),
    sorted by (y, x) into ``oy, ox``; returns their number (``hy, hx``: scratch of ``n + 1``).

    The monotone chain runs from the first point to the last (the largest) and back; the two
    chains, each sorted, are merged.
    """
    h = monotone_chain(ys, xs, n, hy, hx)
    top = 0  # the last point: where the chain turns back
    for q in range(1, h):
        if hy[q] > hy[top] or (hy[q] == hy[top] and hx[q] > hx[top]):
            top = q
    a, b, m = 0, h - 1, 0  # a climbs the first chain (0..top), b the second (h - 1 down to top + 1)
    while a <= top or b > top:
        if b <= top or (a <= top and (hy[a] < hy[b] or (hy[a] == hy[b] and hx[a] < hx[b]))):
            oy[m], ox[m] = hy[a], hx[a]
            a += 1
        else:
            oy[m], ox[m] = hy[b], hx[b]
            b -= 1
        m += 1
    return m


@nb.njit(nogil=True, cache=True)
def _plane_hulls(points, n, out, at, ys, xs, hy, hx, oy, ox):  # type: ignore[no-untyped-def]
    """Write the per-z-plane hull vertices of the first ``n`` ``points`` (``(m, 3)``, sorted by
    (z, y, x), distinct) into ``out`` from row ``at``, sorted; returns the row after the last."""
    j = 0
    while j < n:
        z = points[j, 0]
        m = 0
        while j < n and points[j, 0] == z:
            ys[m], xs[m] = points[j, 1], points[j, 2]
            m += 1
            j += 1
        h = sorted_hull(ys, xs, m, hy, hx, oy, ox)
        for q in range(h):
            out[at, 0], out[at, 1], out[at, 2] = z, oy[q], ox[q]
            at += 1
    return at


def fold_hulls(
    offsets: Sequence[NDArray[np.int64]],
    values: Sequence[NDArray[np.int64]],
    rows: NDArray[np.int64],
    k: int,
    keep: NDArray[np.bool_] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Hull rows of ``k`` labels from rows of several parts, all folded at once.

    The parts are ragged arrays ``(offsets[p], values[p])`` (int64); row ``r`` of the parts'
    rows one after the other goes to row ``rows[r]``. A row whose points come from one part row
    is copied where ``keep`` (a flag per part row, None: all) holds, and left empty elsewhere
    (for a merge whose result needs only the hulls it makes); the vertex lists of several (those
    of disjoint pixel sets, so their points are distinct) are merged in (z, y, x) order, in the
    order of the parts, and re-hulled plane by plane. Returns the new, compact ``(offsets,
    values)`` and, per row, the part row its points come from (-1 where several give points, -2
    where none does).

    The parts are read in place, part by part (:func:`_scatter_points`): first the points of
    the rows of several parts, which are gathered and re-hulled (:func:`_rehull_rows`), then,
    their sizes known, the rows of one part, copied to their place. The loop over the parts is
    Python's: a typed list of them would compile numba's list code in every process (it cannot
    be cached; 0.4 s on the first call).
    """
    bounds = np.cumsum([0] + [len(o) - 1 for o in offsets])
    parts = [
        (o, v, rows[bounds[p] : bounds[p + 1]], bounds[p])
        for p, (o, v) in enumerate(zip(offsets, values, strict=True))
    ]
    sizes, holders = np.zeros(k, np.int64), np.zeros(k + 1, np.int64)
    for part, _, part_rows, _ in parts:
        _count_points(part, part_rows, sizes, holders)
    np.cumsum(holders, out=holders)
    several = np.diff(holders) > 1
    # The rows of several parts, gathered (only theirs) and re-hulled.
    starts = np.zeros(k + 1, np.int64)
    np.cumsum(np.where(several, sizes, 0), out=starts[1:])
    gathered = np.empty((starts[k], 3), np.int64)
    fill, held = starts[:-1].copy(), holders[:-1].copy()
    ends = np.empty(holders[k], np.int64)  # where each holder's points end in their row
    source = np.full(k, -2, np.int64)
    for part, vertices, part_rows, first in parts:
        _scatter_points(
            part, vertices, part_rows, first, several, fill, held, ends, gathered, source, several
        )
    hulled = _rehull_rows(gathered, starts, holders, ends, several, int(sizes.max(initial=0)))
    # Then every row in its place: the re-hulled ones from ``gathered``, the others from their part.
    copied = ~several  # the rows of one holder that keep their points
    if keep is not None:
        kept = np.zeros(k, np.bool_)
        kept[rows[keep]] = True
        copied &= kept
    new_offsets = np.zeros(k + 1, np.int64)
    np.cumsum(np.where(several, np.diff(hulled), np.where(copied, sizes, 0)), out=new_offsets[1:])
    out = np.empty((new_offsets[k], 3), np.int64)
    for part, vertices, part_rows, first in parts:
        _scatter_points(
            part,
            vertices,
            part_rows,
            first,
            ~several,
            new_offsets[:-1].copy(),
            None,  # (a row of one holder needs no note of where its points end)
            None,
            out,
            source,
            copied,
        )
    _copy_rows(gathered, hulled, several, out, new_offsets)
    return new_offsets, out, source


@nb.njit(nogil=True, cache=True)
def _count_points(offsets, rows, sizes, holders):  # type: ignore[no-untyped-def]
    """Add the points of each part row to its new row's ``sizes``, and one to ``holders[row + 1]``
    where it has points."""
    for r in range(rows.shape[0]):
        size = offsets[r + 1] - offsets[r]
        if size:
            sizes[rows[r]] += size
            holders[rows[r] + 1] += 1


@nb.njit(nogil=True, cache=True)
def _scatter_points(offsets, values, rows, first, chosen, fill, held, ends, points, source, copy):  # type: ignore[no-untyped-def]
    """Copy the points of each part row whose new row is ``chosen`` (and ``copy``) to
    ``fill[row]`` of ``points`` (moving it on) and, unless ``held`` and ``ends`` are None, note
    where they end in ``ends[held[row]]`` (moving that on); note in ``source`` each ``chosen``
    row's holder, its index among all parts' rows from ``first`` (-1 for a row of several
    holders)."""
    for r in range(rows.shape[0]):
        i = rows[r]
        a, b = offsets[r], offsets[r + 1]
        if a == b or not chosen[i]:
            continue
        source[i] = first + r if source[i] == -2 else -1
        if not copy[i]:
            continue
        at = fill[i]
        for p in range(a, b):
            for axis in range(3):
                points[at, axis] = values[p, axis]
            at += 1
        fill[i] = at
        if ends is not None and held is not None:
            ends[held[i]] = at
            held[i] += 1


@nb.njit(nogil=True, cache=True)
def _rehull_rows(points, starts, holders, ends, several, longest):  # type: ignore[no-untyped-def]
    """Re-hull the rows of ``points`` that have ``several`` holders (row ``i`` from
    ``starts[i]``, its holders' points ending at ``ends[holders[i]:holders[i + 1]]``, each
    holder's sorted): their sorted points merged one holder after the other, then re-hulled
    plane by plane, in place. Returns the rows' new offsets (with no points for other rows).
    (A row's vertices never pass its points, so nothing is overwritten before it is read.)"""
    k = starts.shape[0] - 1
    out = np.zeros(k + 1, np.int64)
    union = np.empty((longest, 3), np.int64)
    merged = np.empty((longest, 3), np.int64)
    ys = np.empty(longest, np.int64)
    xs = np.empty(longest, np.int64)
    oy = np.empty(longest, np.int64)
    ox = np.empty(longest, np.int64)
    hy = np.empty(longest + 1, np.int64)
    hx = np.empty(longest + 1, np.int64)
    at = 0
    for i in range(k):
        if several[i]:  # merge the sorted vertex lists one by one, then re-hull each plane
            n_union = 0
            q = starts[i]
            for h in range(holders[i], holders[i + 1]):
                p, p_end, m = 0, n_union, 0
                while p < p_end or q < ends[h]:
                    if q >= ends[h] or (p < p_end and _before(union, p, points, q)):
                        for axis in range(3):
                            merged[m, axis] = union[p, axis]
                        p += 1
                    else:
                        for axis in range(3):
                            merged[m, axis] = points[q, axis]
                        q += 1
                    m += 1
                union, merged, n_union = merged, union, m
            at = _plane_hulls(union, n_union, points, at, ys, xs, hy, hx, oy, ox)
        out[i + 1] = at
    return out


@nb.njit(nogil=True, cache=True)
def _copy_rows(points, offsets, chosen, out, out_offsets):  # type: ignore[no-untyped-def]
    """Copy the ``chosen`` rows of ``(offsets, points)`` to their rows of ``(out_offsets, out)``."""
    for i in range(chosen.shape[0]):
        if chosen[i]:
            at = out_offsets[i]
            for p in range(offsets[i], offsets[i + 1]):
                for axis in range(3):
                    out[at, axis] = points[p, axis]
                at += 1


@nb.njit(nogil=True, cache=True, inline="always")
def _before(a, i, b, j):  # type: ignore[no-untyped-def]
    """Whether point ``a[i]`` comes before ``b[j]`` in (z, y, x) order."""
    for axis in range(3):
        if a[i, axis] != b[j, axis]:
            return a[i, axis] < b[j, axis]
    return False


@nb.njit(nogil=True, cache=True)
def convex_pixels_2d(offsets, points):  # type: ignore[no-untyped-def]
    """Pixels of :func:`skimage.morphology.convex_hull_image` of each 2-D label, from the hull
    vertices ``points[offsets[i]:offsets[i + 1]]`` of its pixel centres ((row, column), sorted).

    skimage takes the hull of the pixels' edge midpoints (each centre ± 1/2 along each axis) and
    keeps the pixel centres inside or on it. That hull is the hull ``H`` of the centres widened
    by the diamond ``|dy| + |dx| <= 1/2``; ``H``'s vertices lie on whole rows, so on each row
    ``y`` its right end is the largest of ``R(y) + 1/2``, ``(R(y) + R(y - 1)) / 2`` and
    ``(R(y) + R(y + 1)) / 2`` (where those rows are in ``H``), ``R`` the right end of ``H``; the
    left end likewise, mirrored. The row holds the columns between the two ends, counted in
    exact integer arithmetic from the upper chains of ``H``'s right ends and mirrored left ends
    (:func:`chain_pixels`).
    """
    k = offsets.shape[0] - 1
    longest = 1
    for i in range(k):
        longest = max(longest, offsets[i + 1] - offsets[i])
    chain_y = np.empty((2, longest), np.int64)
    chain_v = np.empty((2, longest), np.int64)
    out = np.zeros(k, np.int64)
    for i in range(k):
        a, b = offsets[i], offsets[i + 1]
        if a == b:
            continue
        # The upper chains of the right ends (v = column) and of the mirrored left ends (v = -column).
        hr = _upper_chain(points, a, b, 1, chain_y[0], chain_v[0])
        hl = _upper_chain(points, a, b, -1, chain_y[1], chain_v[1])
        out[i] = chain_pixels(chain_y[0], chain_v[0], hr, chain_y[1], chain_v[1], hl)
    return out


@nb.njit(nogil=True, cache=True)
def chain_pixels(right_y, right_v, hr, left_y, left_v, hl):  # type: ignore[no-untyped-def]
    """Pixels of the convex hull image of a 2-D label from the two upper chains of its hull
    (:func:`convex_pixels_2d`): ``(right_y, right_v)`` (``hr`` vertices) over the rows' right
    ends, ``v`` = column, and ``(left_y, left_v)`` (``hl`` vertices) over their left ends, ``v``
    = -column; each strictly clockwise, one vertex per row, rows ascending from the label's
    first row to its last. A row ``y`` holds the columns from ``-floor(L(y))`` to
    ``floor(R(y))``, ``R`` and ``L`` the widened ends (:func:`_chain_floors`)."""
    rows = right_y[hr - 1] - right_y[0] + 1
    return rows + _chain_floors(right_y, right_v, hr) + _chain_floors(left_y, left_v, hl)


def _edge_floors(most: int) -> NDArray[np.int32]:
    """``table[d, w + most]``: ``Σ floor((max(d, |w|) + 2 w t) / 2d)`` over ``t = 1 .. d - 1``,
    the floors of the rows between the ends of a chain's edge of ``d`` rows and ``w`` columns
    (:func:`_chain_floors`), less ``v`` each, for ``d`` from 2 to ``most`` and ``|w| <= most``."""
    d = np.arange(2, most + 1)[:, None, None]
    w = np.arange(-most, most + 1)[None, :, None]
    t = np.arange(1, most)[None, None, :]
    terms = (np.maximum(d, np.abs(w)) + 2 * w * t) // (2 * d)
    table = np.zeros((most + 1, 2 * most + 1), np.int32)
    table[2:] = np.where(t < d, terms, 0).sum(axis=2)
    return table


#: The widest and tallest edge whose rows' floors :func:`_chain_floors` looks up (:func:`_edge_floors`).
_EDGE_MOST = 32
_EDGE_FLOORS = _edge_floors(_EDGE_MOST)


@nb.njit(nogil=True, cache=True, inline="always")
def _chain_floors(chain_y, chain_v, h):  # type: ignore[no-untyped-def]
    """``Σ floor(W(y))`` over the rows of an upper chain ``V`` (``h`` vertices, one per row, rows
    ascending), ``W(y)`` the largest of ``V(y) + 1/2`` and ``(V(y) + V(y ± 1)) / 2`` (rows
    ``y ± 1`` where the chain has them; see :func:`convex_pixels_2d`), in integers.

    On an edge of ``d`` rows and ``w`` columns, ``V(y ± 1) = V(y) ± w / d`` between its ends:
    at its ``t``-th row ``floor(W) = v + floor((max(d, |w|) + 2 w t) / 2d)``; at a vertex
    between edges ``(d', w')`` and ``(d, w)``, ``floor(W) = v + max(0, floor(-w' / 2d'),
    floor(w / 2d))`` (a term for each edge there is). The rows between the ends of an edge of at
    most :data:`_EDGE_MOST` rows and columns are looked up (a loop of unforeseeable length, whose
    exits the branch predictor misses: on 2048 x 2048 blocks of cells 30 pixels across, the
    hull's kernel took 3.4 against 4.1 ms a block with the loop alone).
    """
    if h == 1:
        return np.int64(chain_v[0])
    total = np.int64(0)
    ahead = np.int64(0)  # the term of the edge before the vertex, max(0, floor(-w' / 2d'))
    for j in range(h - 1):
        v = np.int64(chain_v[j])
        d = np.int64(chain_y[j + 1]) - np.int64(chain_y[j])
        w = np.int64(chain_v[j + 1]) - v
        width = 2 * d
        steep = abs(w) <= d
        # floor(w / 2d), without a division on a steep edge, where it is -1 or 0; floor(-w / 2d)
        # is -slope, less 1 where inexact
        slope = -np.int64(w < 0) if steep else w // width
        rest = w - slope * width
        total += v + max(ahead, slope)
        ahead = max(0, -slope - (rest != 0))
        if 1 < d <= _EDGE_MOST and abs(w) <= _EDGE_MOST:  # the edge's rows between its ends, looked up
            total += (d - 1) * v + _EDGE_FLOORS[d, w + _EDGE_MOST]
        elif d > 1:  # the quotients stepped, without a division
            # max(d, |w|) + 2w is a * slope * 2d + b: (a, b) = (2, d + 2 rest) on a steep edge,
            # (3, 3 rest) where w > d, (1, rest) where w < -d; and 0 <= b < 3 * 2d
            a = np.int64(2) if steep else (np.int64(3) if w > 0 else np.int64(1))
            b = d + 2 * rest if steep else (3 * rest if w > 0 else rest)
            f = np.int64(b >= width) + np.int64(b >= 2 * width)
            q = a * slope + f
            r = b - f * width
            step, extra = 2 * slope, 2 * rest  # 2w = step * 2d + extra
            if extra >= width:
                step, extra = step + 1, extra - width
            for _ in range(d - 1):
                total += v + q
                q += step
                r += extra
                carry = r >= width  # without a branch (the carries of a slope follow no pattern)
                q += carry
                r -= carry * width
    return total + chain_v[h - 1] + ahead


@nb.njit(nogil=True, cache=True, inline="always")
def _upper_chain(points, a, b, sign, chain_y, chain_v):  # type: ignore[no-untyped-def]
    """The upper chain of the points ``(y, sign * x)`` of ``points[a:b]`` (sorted by (y, x)), one
    vertex per row (the largest ``v`` of the row), into ``chain_y, chain_v``; returns its number
    of vertices."""
    h = 0
    for p in range(a, b):
        y, v = points[p, 0], sign * points[p, 1]
        if h >= 1 and chain_y[h - 1] == y:
            if v <= chain_v[h - 1]:
                continue
            h -= 1  # a larger value on the chain's last row
        while h >= 2 and _not_clockwise(chain_y, chain_v, h, y, v):
            h -= 1  # an upper chain turns clockwise at every vertex
        chain_y[h], chain_v[h] = y, v
        h += 1
    return h


@nb.njit(nogil=True, cache=True, inline="always")
def _not_clockwise(chain_y, chain_v, h, y, v):  # type: ignore[no-untyped-def]
    """Whether the chain's last two vertices and ``(y, v)`` turn anticlockwise or not at all."""
    return _cross(chain_y[h - 2], chain_v[h - 2], chain_y[h - 1], chain_v[h - 1], y, v) >= 0
