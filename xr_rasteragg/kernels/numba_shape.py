"""Kernel code of the shape families (:mod:`xr_rasteragg.families`) for the compiled CPU kernel.

Each update fills one family's fields into a block's partials from the runs of its labels
(:class:`~xr_rasteragg.kernels.numba.LabelRuns`), in the label order of the partials:

- :class:`~xr_rasteragg.families.Geometry`: per run, closed forms of the sums of index offsets
  and their products (a run is an arithmetic sequence in x at fixed z and y), and the bounding box
  from the run ends; integer arithmetic, so exact;
- :class:`~xr_rasteragg.families.Border`: for each pixel of each run, the perimeter weight class
  of :func:`skimage.measure.perimeter` (a border pixel's 4- and 8-neighbours that are border
  pixels of the same label), coded per pixel from the label block widened by two pixels
  (:func:`border_codes`) and counted along the runs;
- :class:`~xr_rasteragg.families.Hull`: per label and z plane, the convex hull of its row
  extremes, sorted, in a ragged array (:class:`~xr_rasteragg.ragged.Ragged`);
- :class:`~xr_rasteragg.families.Weighted`: per run and channel, ``Σ I`` and ``Σ I x``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numba as nb
import numpy as np
from numpy.typing import NDArray

from ..families import PRODUCT_AXES, Border, Family, Geometry, Hull, Weighted
from ..hulls import sorted_hull
from ..partials import Partials
from ..ragged import Ragged

if TYPE_CHECKING:
    from .numba import LabelRuns

__all__ = ["SHAPE_NEIGHBOURHOODS", "SHAPE_UPDATES", "border_codes"]


def _geometry(parts: Partials, image: Any, runs: LabelRuns, family: Family) -> None:
    """Fill :class:`~xr_rasteragg.families.Geometry` from the runs."""
    fields = _run_geometry(*runs.runs, runs.count.shape[0], np.asarray(runs.offset, np.int64))
    parts.add(family, **{name: value[runs.local] for name, value in zip(family.names(), fields, strict=True)})


@nb.njit(nogil=True, cache=True)
def _run_geometry(run_z, run_y, run_x, run_len, run_id, k, offset):  # type: ignore[no-untyped-def]
    """Origin (each label's first pixel), offset sums, product sums and bounding box by local id.

    A run of length ``L`` at offsets ``(dz, dy, a..a+L-1)`` from its label's origin adds
    ``Σ dx = L a + L(L-1)/2`` and ``Σ dx² = L a² + a L(L-1) + (L-1) L (2L-1) / 6``; the other sums
    are products of its constant ``dz`` and ``dy`` with these. Sums are int64 inside the block.
    """
    origin = np.zeros((k, 3), np.int64)
    seen = np.zeros(k, np.bool_)
    s1 = np.zeros((k, 3), np.int64)
    s2 = np.zeros((k, 6), np.int64)
    low = np.empty((k, 3), np.int64)
    high = np.empty((k, 3), np.int64)
    for r in range(run_id.shape[0]):
        i = run_id[r]
        z, y, x0, n = np.int64(run_z[r]), np.int64(run_y[r]), np.int64(run_x[r]), np.int64(run_len[r])
        if not seen[i]:
            seen[i] = True
            origin[i, 0], origin[i, 1], origin[i, 2] = z, y, x0
            low[i, 0], low[i, 1], low[i, 2] = z, y, x0
            high[i, 0], high[i, 1], high[i, 2] = z + 1, y + 1, x0 + n
        dz, dy, a = z - origin[i, 0], y - origin[i, 1], x0 - origin[i, 2]
        sx = n * a + n * (n - 1) // 2
        sxx = n * a * a + a * n * (n - 1) + (n - 1) * n * (2 * n - 1) // 6
        s1[i, 0] += n * dz
        s1[i, 1] += n * dy
        s1[i, 2] += sx
        s2[i, 0] += n * dz * dz
        s2[i, 1] += n * dy * dy
        s2[i, 2] += sxx
        s2[i, 3] += n * dz * dy
        s2[i, 4] += dz * sx
        s2[i, 5] += dy * sx
        low[i, 0] = min(low[i, 0], z)
        low[i, 1] = min(low[i, 1], y)
        low[i, 2] = min(low[i, 2], x0)
        high[i, 0] = max(high[i, 0], z + 1)
        high[i, 1] = max(high[i, 1], y + 1)
        high[i, 2] = max(high[i, 2], x0 + n)
    for i in range(k):
        for a in range(3):
            origin[i, a] += offset[a]
            low[i, a] += offset[a]
            high[i, a] += offset[a]
    return origin, s1.astype(np.float64), s2.astype(np.float64), low, high


assert PRODUCT_AXES == ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))  # the order of _run_geometry


def _border(parts: Partials, image: Any, runs: LabelRuns, family: Family) -> None:
    """Fill :class:`~xr_rasteragg.families.Border` from the runs and the block's border codes."""
    if runs.codes is None:
        raise ValueError("the perimeter needs the label block's border codes; the engine gave none")
    counts = _count_codes(*runs.runs, runs.count.shape[0], runs.codes)
    parts.add(family, border=counts[runs.local])


@nb.njit(nogil=True, cache=True)
def _count_codes(run_z, run_y, run_x, run_len, run_id, k, codes):  # type: ignore[no-untyped-def]
    """Per local id, how many of its pixels have each perimeter weight class (codes 0, 1, 2)."""
    out = np.zeros((k, 3), np.int64)
    for r in range(run_id.shape[0]):
        z, y, i = run_z[r], run_y[r], run_id[r]
        for x in range(run_x[r], run_x[r] + run_len[r]):
            c = codes[z, y, x]
            if c >= 0:
                out[i, c] += 1
    return out


def border_codes(block: NDArray[np.integer]) -> NDArray[np.int8]:
    """Perimeter weight class of each pixel of a label block (z, y, x), plane by plane: -1 for
    none, 0, 1, 2 for the weights 1, √2, (1 + √2) / 2 (see :func:`_border_classes`)."""
    out = np.empty(block.shape, np.int8)
    for z in range(block.shape[0]):
        out[z] = _border_classes(np.ascontiguousarray(block[z]))
    return out


@nb.njit(nogil=True, cache=True)
def _border_classes(labels):  # type: ignore[no-untyped-def]
    """Perimeter weight class of each pixel of a plane of labels, for the pixel's own label.

    As in :func:`skimage.measure.perimeter` (4-connected erosion, border value 0), a pixel is a
    border pixel of its label when one of its 4-neighbours is not that label (outside the plane
    counts as not); a border pixel's code is ``1 + 2 (4-neighbours on the label's border) + 10
    (diagonal neighbours on the label's border)``, and codes 5, 7, 15, 17, 25, 27 weigh 1
    (class 0), codes 21, 33 weigh √2 (class 1) and codes 13, 23 weigh (1 + √2) / 2 (class 2).
    """
    weight_class = np.full(50, -1, np.int8)
    for code in (5, 7, 15, 17, 25, 27):
        weight_class[code] = 0
    for code in (21, 33):
        weight_class[code] = 1
    for code in (13, 23):
        weight_class[code] = 2
    ny, nx = labels.shape
    border = np.ones((ny, nx), np.bool_)  # pixels on the plane's edge have a neighbour outside
    for y in range(1, ny - 1):
        up, row, down = labels[y - 1], labels[y], labels[y + 1]
        for x in range(1, nx - 1):
            key = row[x]
            border[y, x] = up[x] != key or down[x] != key or row[x - 1] != key or row[x + 1] != key
    out = np.full((ny, nx), -1, np.int8)
    for y in range(ny):
        for x in range(nx):
            if not border[y, x]:
                continue
            key = labels[y, x]
            if 0 < y < ny - 1 and 0 < x < nx - 1:
                code = (
                    1
                    + 2
                    * (
                        (border[y - 1, x] and labels[y - 1, x] == key)
                        + (border[y + 1, x] and labels[y + 1, x] == key)
                    )
                    + 2
                    * (
                        (border[y, x - 1] and labels[y, x - 1] == key)
                        + (border[y, x + 1] and labels[y, x + 1] == key)
                    )
                    + 10
                    * (
                        (border[y - 1, x - 1] and labels[y - 1, x - 1] == key)
                        + (border[y - 1, x + 1] and labels[y - 1, x + 1] == key)
                        + (border[y + 1, x - 1] and labels[y + 1, x - 1] == key)
                        + (border[y + 1, x + 1] and labels[y + 1, x + 1] == key)
                    )
                )
            else:
                code = 1
                for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                    code += 2 * _border_of(labels, border, y + dy, x + dx, key)
                for dy, dx in ((-1, -1), (-1, 1), (1, -1), (1, 1)):
                    code += 10 * _border_of(labels, border, y + dy, x + dx, key)
            out[y, x] = weight_class[code]
    return out


@nb.njit(nogil=True, cache=True, inline="always")
def _border_of(labels, border, y, x, key):  # type: ignore[no-untyped-def]
    """Whether pixel (y, x) is a border pixel of label ``key``."""
    return 0 <= y < labels.shape[0] and 0 <= x < labels.shape[1] and border[y, x] and labels[y, x] == key


@nb.njit(nogil=True, cache=True, inline="always")
def _is(labels, y, x, key):  # type: ignore[no-untyped-def]
    return 0 <= y < labels.shape[0] and 0 <= x < labels.shape[1] and labels[y, x] == key


@nb.njit(nogil=True, cache=True, inline="always")
def _on_border(labels, y, x, key):  # type: ignore[no-untyped-def]
    """Whether pixel (y, x) is of label ``key`` and a 4-neighbour is not."""
    if not _is(labels, y, x, key):
        return False
    return not (
        _is(labels, y - 1, x, key)
        and _is(labels, y + 1, x, key)
        and _is(labels, y, x - 1, key)
        and _is(labels, y, x + 1, key)
    )


def _hull(parts: Partials, image: Any, runs: LabelRuns, family: Family) -> None:
    """Fill :class:`~xr_rasteragg.families.Hull` from the runs."""
    offsets, points = _run_hulls(*runs.runs, runs.rank, np.asarray(runs.offset, np.int64))
    parts.add(family, hull=Ragged(offsets, points))


@nb.njit(nogil=True, cache=True)
def _run_hulls(run_z, run_y, run_x, run_len, run_id, rank, offset):  # type: ignore[no-untyped-def]
    """Per label (in label order: row ``rank[id]``) and z plane, the hull vertices of its pixel
    centres, sorted by (z, y, x), from its row extremes (global indices); and where each label's
    vertices start.

    One pass over the runs, in their (z, y, x) order, writes each label's rows (z, y, first
    column, last column) into its own stretch of a table (a counting sort, which keeps them
    sorted); then each label's rows are read in turn and hulled plane by plane.
    """
    k = rank.shape[0]
    nruns = run_id.shape[0]
    start = np.zeros(k + 1, np.int64)
    for r in range(nruns):
        start[rank[run_id[r]] + 1] += 1
    for i in range(k):
        start[i + 1] += start[i]
    end = start[:-1].copy()
    rows = np.empty((nruns, 4), np.int64)  # z, y, first and last column of a label's row
    for r in range(nruns):
        i = rank[run_id[r]]
        e = end[i] - 1
        z, y = run_z[r], run_y[r]
        if e >= start[i] and rows[e, 1] == y and rows[e, 0] == z:
            rows[e, 3] = run_x[r] + run_len[r] - 1
        else:
            e += 1
            rows[e, 0], rows[e, 1], rows[e, 2], rows[e, 3] = z, y, run_x[r], run_x[r] + run_len[r] - 1
            end[i] = e + 1
    points = np.empty((2 * nruns + 1, 3), np.int64)
    where = np.zeros(k + 1, np.int64)
    room = 2 * nruns + 1
    ys = np.empty(room, np.int64)
    xs = np.empty(room, np.int64)
    hy = np.empty(room, np.int64)
    hx = np.empty(room, np.int64)
    oy = np.empty(room, np.int64)
    ox = np.empty(room, np.int64)
    m = 0
    for i in range(k):
        e = start[i]
        while e < end[i]:
            z = rows[e, 0]
            n = 0
            while e < end[i] and rows[e, 0] == z:
                ys[n], xs[n] = rows[e, 1], rows[e, 2]
                n += 1
                if rows[e, 3] > rows[e, 2]:
                    ys[n], xs[n] = rows[e, 1], rows[e, 3]
                    n += 1
                e += 1
            h = sorted_hull(ys, xs, n, hy, hx, oy, ox)
            for q in range(h):
                points[m, 0] = z + offset[0]
                points[m, 1] = oy[q] + offset[1]
                points[m, 2] = ox[q] + offset[2]
                m += 1
        where[i + 1] = m
    return where, points[:m].copy()


def _weighted(
    parts: Partials, image: Sequence[NDArray[np.number]] | None, runs: LabelRuns, family: Family
) -> None:
    """Fill :class:`~xr_rasteragg.families.Weighted` from the runs and the image chunks."""
    if image is None:
        raise ValueError("the intensity-weighted centroid needs an image; got none")
    k = runs.count.shape[0]
    nchan = sum(chunk.shape[0] for chunk in image)
    sums = np.zeros((4, k, nchan))
    c0 = 0
    offset = np.asarray(runs.offset, np.float64)
    for chunk in image:
        _weighted_sweep(chunk, *runs.runs, offset, c0, sums)
        c0 += chunk.shape[0]
    parts.add(family, **{name: sums[j][runs.local] for j, name in enumerate(family.names())})


@nb.njit(nogil=True, cache=True)
def _weighted_sweep(chunk, run_z, run_y, run_x, run_len, run_id, offset, c0, sums):  # type: ignore[no-untyped-def]
    """Add ``Σ I``, ``Σ I z``, ``Σ I y``, ``Σ I x`` (global indices) of each run to its label."""
    for cc in range(chunk.shape[0]):
        c = c0 + cc
        for r in range(run_id.shape[0]):
            i = run_id[r]
            z, y, a = run_z[r], run_y[r], run_x[r]
            total = 0.0
            moment = 0.0
            for x in range(a, a + run_len[r]):
                value = float(chunk[cc, z, y, x])
                total += value
                moment += value * (x + offset[2])
            sums[0, i, c] += total
            sums[1, i, c] += total * (z + offset[0])
            sums[2, i, c] += total * (y + offset[1])
            sums[3, i, c] += moment


#: The updates, by family type (merged into :data:`~xr_rasteragg.kernels.numba.FAMILY_UPDATES`).
SHAPE_UPDATES: dict[type[Family], Callable[[Partials, Any, LabelRuns, Family], None]] = {
    Geometry: _geometry,
    Border: _border,
    Hull: _hull,
    Weighted: _weighted,
}
#: The per-pixel neighbourhood codes, by family type
#: (merged into :data:`~xr_rasteragg.kernels.numba.NEIGHBOURHOODS`).
SHAPE_NEIGHBOURHOODS: dict[type[Family], Callable[[NDArray[np.integer]], NDArray[np.int8]]] = {
    Border: border_codes
}
