"""Kernel code of the shape families (:mod:`xr_rasteragg.families`) for the compiled CPU kernel.

Each update fills one family's fields into a block's partials from the runs of its labels
(:class:`~xr_rasteragg.kernels.numba.LabelRuns`), in the label order of the partials:

- :class:`~xr_rasteragg.families.Geometry`: per run, closed forms of the sums of index offsets
  and their products (a run is an arithmetic sequence in x at fixed z and y), and the bounding box
  from the run ends; integer arithmetic, so exact;
- :class:`~xr_rasteragg.families.Border`: for each pixel of each run, the perimeter weight class
  of :func:`skimage.measure.perimeter` (a border pixel's 4- and 8-neighbours that are border
  pixels of the same label), from the label block and its frame of two pixels
  (:class:`~xr_rasteragg.frames.Frame`), in the label stage: the classes as bit masks of each
  row before the block is encoded (:func:`border_rows`, which also counts the runs the
  encoding needs, so that the stage reads the block twice rather than three times: on the
  reference dataset's 2048 x 2048 blocks the shape call's label task took 17.4-17.7 against
  19.5-19.7 ms, medians alone), then the pixels of each run's classes (:func:`border_counts`);
- :class:`~xr_rasteragg.families.Hull`: per label and z plane, the convex hull of its row
  extremes, sorted, in a ragged array (:class:`~xr_rasteragg.ragged.Ragged`), and in a block
  of one plane the pixels of each label's convex hull image;
- :class:`~xr_rasteragg.families.Weighted`: per run and channel, ``Σ I`` and ``Σ I x``.

In the loops over runs and labels, an index read from an array or made by a subtraction is
made unsigned (``np.uint64``): Numba wraps a negative signed index around the array's end, a
compare and a select at each access that LLVM leaves in unless it proves the index
non-negative. On the reference dataset's 2048 x 2048 blocks that was a fifth of the hull's time
when it was measured (3.4 against 4.25 ms a block, before the hull's pixel count looked up its
edges' rows) and a tenth of the geometry's (0.92 against 1.02 ms).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numba as nb
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic
from numpy.typing import NDArray

from ..families import PRODUCT_AXES, Border, Family, Geometry, Hull, Weighted
from ..frames import Frame
from ..hulls import chain_pixels
from ..partials import Partials
from ..ragged import Ragged

if TYPE_CHECKING:
    from .numba import LabelRuns, Runs

__all__ = ["SHAPE_NEIGHBOURHOODS", "SHAPE_UPDATES", "border_counts", "border_rows"]


def _geometry(parts: Partials, image: Any, runs: LabelRuns, family: Family) -> None:
    """Fill :class:`~xr_rasteragg.families.Geometry` from the runs."""
    fields = _run_geometry(*runs.runs, runs.local, np.asarray(runs.offset, np.int64), runs.one_plane)
    parts.add(family, **dict(zip(family.names(), fields, strict=True)))


@nb.njit(nogil=True, cache=True)
def _run_geometry(run_z, run_y, run_x, run_len, run_id, local, offset, one_plane):  # type: ignore[no-untyped-def]
    """Origin (each label's first pixel), offset sums, product sums and bounding box, in label
    order (row ``j`` holds local id ``local[j]``).

    A run of length ``L`` at offsets ``(dz, dy, a..a+L-1)`` from its label's origin adds
    ``Σ dx = L a + L(L-1)/2`` and ``Σ dx² = L a² + a L(L-1) + (L-1) L (2L-1) / 6``; the other sums
    are products of its constant ``dz`` and ``dy`` with these. Sums are int64 inside the block,
    made by local id (labels that appear together sit together, so neighbouring runs touch
    neighbouring rows of the sums) and put in label order at the end.

    The runs come in (z, y, x) order, so a label's first run has its first plane and, within a
    plane, its rows ascend. In a block of ``one_plane`` every ``dz`` is 0 and the rows ascend
    throughout: the sums with ``dz`` stay 0 and the bounds along z and y are the first and the
    last run's, so half the updates of a run are left out (the reference dataset's geometry,
    2048 x 2048 blocks of cells 30 pixels across: 1.0 against 1.3 ms a block).
    """
    k = local.shape[0]
    origin = np.zeros((k, 3), np.int64)
    seen = np.zeros(k, np.bool_)
    s1 = np.zeros((k, 3), np.int64)
    s2 = np.zeros((k, 6), np.int64)
    low = np.empty((k, 3), np.int64)
    high = np.empty((k, 3), np.int64)
    for r in range(run_id.shape[0]):
        i = np.uint64(run_id[r])
        z, y, x0, n = np.int64(run_z[r]), np.int64(run_y[r]), np.int64(run_x[r]), np.int64(run_len[r])
        if not seen[i]:
            seen[i] = True
            origin[i, 0], origin[i, 1], origin[i, 2] = z, y, x0
            low[i, 0], low[i, 1], low[i, 2] = z, y, x0
            high[i, 0], high[i, 1], high[i, 2] = z + 1, y + 1, x0 + n
        dy, a = y - origin[i, 1], x0 - origin[i, 2]
        sx = n * a + n * (n - 1) // 2
        sxx = n * a * a + a * n * (n - 1) + (n - 1) * n * (2 * n - 1) // 6
        s1[i, 1] += n * dy
        s1[i, 2] += sx
        s2[i, 1] += n * dy * dy
        s2[i, 2] += sxx
        s2[i, 5] += dy * sx
        low[i, 2] = min(low[i, 2], x0)
        high[i, 2] = max(high[i, 2], x0 + n)
        if one_plane:
            high[i, 1] = y + 1
        else:
            dz = z - origin[i, 0]
            s1[i, 0] += n * dz
            s2[i, 0] += n * dz * dz
            s2[i, 3] += n * dz * dy
            s2[i, 4] += dz * sx
            low[i, 1] = min(low[i, 1], y)
            high[i, 0] = z + 1
            high[i, 1] = max(high[i, 1], y + 1)
    first = np.empty((k, 3), np.int64)
    lows = np.empty((k, 3), np.int64)
    highs = np.empty((k, 3), np.int64)
    offsets = np.empty((k, 3))
    products = np.empty((k, 6))
    for j in range(k):
        i = np.uint64(local[j])
        for a in range(3):
            first[j, a] = origin[i, a] + offset[a]
            lows[j, a] = low[i, a] + offset[a]
            highs[j, a] = high[i, a] + offset[a]
            offsets[j, a] = s1[i, a]
        for q in range(6):
            products[j, q] = s2[i, q]
    return first, offsets, products, lows, highs


assert PRODUCT_AXES == ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))  # the order of _run_geometry


def _border(parts: Partials, image: Any, runs: LabelRuns, family: Family) -> None:
    """Fill :class:`~xr_rasteragg.families.Border` from the counts the label stage made."""
    if runs.around is not None:
        parts.add(family, border=runs.around[runs.local])
    elif runs.pixels == 0:  # a block without pixels has no frame, and no labels
        parts.add(family, border=np.zeros((0, 3), np.int64))
    else:
        raise ValueError("the perimeter needs the label block's frame; the engine gave none")


def border_rows(
    frame: Frame, block: NDArray[np.integer], offset: tuple[int, int, int]
) -> tuple[BorderRows, int, int]:
    """The pixels of each perimeter weight class (1, √2, (1 + √2) / 2) in each row of the label
    block, as bit masks, from the block and its frame (see :func:`_border_rows`), with the
    bounds on the block's runs and labels that its encoding needs, counted from the same masks
    (those of :func:`~xr_rasteragg.kernels.numba._count_runs`: the label stage then reads the
    block once less). The masks are a thread's scratch table, valid until its next block's
    (:func:`_scratch`)."""
    from .numba import _flat_rows

    flat, starts = _flat_rows(block)  # rows read in place, as contiguous arrays
    nz, h, w = block.shape
    d = frame.halo
    rows = _scratch("classes", (nz * h, 3, (w + 2 * d) // 64 + 2), np.dtype(np.uint64))
    valid = frame.valid(offset, block.shape)
    nmax, kmax = _border_rows(flat, starts, block.shape, frame.pieces, valid, d, rows)
    return BorderRows(rows, h, d), int(nmax), int(kmax)


class BorderRows(NamedTuple):
    """The class masks of a label block's rows (:func:`border_rows`): ``masks[z * h + y]`` for
    block row ``(z, y)``, widened by ``halo`` pixels each side."""

    masks: NDArray[np.uint64]
    h: int
    halo: int


def border_counts(rows: BorderRows, runs: Runs, k: int) -> NDArray[np.int64]:
    """Per local id, how many of its pixels have each perimeter weight class, from the class
    masks of :func:`border_rows` and the block's runs."""
    return _count_classes(rows.masks, rows.h, rows.halo, *runs, k)


@nb.njit(nogil=True, cache=True)
def _count_classes(rows, h, d, run_z, run_y, run_x, run_len, run_id, k):  # type: ignore[no-untyped-def]
    """Per local id, the pixels of each weight class of its runs (block indices, local ids, in
    (z, y, x) order), counted from each row's class masks (``rows[z * h + y]``, the widened
    row's pixel ``u`` at bit ``u``: runs start ``d`` pixels in) and prefix counts
    (:func:`_word_counts`, :func:`_add_classes`)."""
    out = np.zeros((k, 3), np.int64)
    before = np.zeros(rows.shape[2] + 1, np.uint64)
    r, nruns = 0, run_id.shape[0]
    while r < nruns:
        line = np.int64(run_z[r]) * h + run_y[r]
        classes = rows[line]
        _word_counts(classes, before)
        while r < nruns and np.int64(run_z[r]) * h + run_y[r] == line:
            _add_classes(out, run_id[r], classes, before, run_x[r] + d, run_len[r])
            r += 1
    return out


@nb.njit(nogil=True, cache=True)
def _border_rows(flat, starts, shape, pieces, valid, d, out):  # type: ignore[no-untyped-def]
    """The pixels of each perimeter weight class, row by row, plane by plane, into ``out``
    (``out[z * h + y, c]``: the mask of class ``c + 1`` of block row ``(z, y)``, widened by
    the frame: pixel ``u`` of the widened row at bit ``u % 64`` of word ``u // 64``); returns
    how many runs of equal labels the block's rows have and how many of them start below
    another label or in a plane's first row (a bound on the labels, as
    :func:`~xr_rasteragg.kernels.numba._count_runs` counts them).

    As in :func:`skimage.measure.perimeter` (4-connected erosion, border value 0), a pixel is a
    border pixel of its label when one of its 4-neighbours is not that label (outside the image
    counts as not); a border pixel with ``s`` 4-neighbours and ``c`` diagonal neighbours on its
    label's border has code ``1 + 2 s + 10 c``: codes 5, 7, 15, 17, 25, 27 (``s`` 2 or 3, ``c``
    at most 2) weigh 1 (class 1), codes 21, 33 (``s, c`` = 0, 2 or 1, 3) weigh √2 (class 2)
    and codes 13, 23 (``s`` 1, ``c`` 1 or 2) weigh (1 + √2) / 2 (class 3).

    The block (``shape``; row ``(z, y)`` is ``flat[starts[z, y]:][:w]``) widened by its frame
    of ``d`` (2) pixels (``pieces``, see :class:`~xr_rasteragg.frames.Frame`) is walked row by
    row, never made whole: each widened row is copied next to its frame near the block's edges
    (:func:`_widened_row`; the rest is read in place), and the labels of the row before are
    compared once, with the pixel to the right and with this row (below and both diagonals),
    into four bit masks of the row, 64 pixels a word, each word one vector comparison
    (:func:`_row_masks`, kept for four rows). The border pixels of the row before that (a mask,
    kept for three rows), and the classes of the row before that (three masks), follow from
    those words alone, in bitwise arithmetic on 64 pixels at once (:func:`_border_words`,
    :func:`_class_words`). The runs of a row start at its first pixel and wherever a pixel
    differs from the one before (the across mask), and start below another label where the
    pixel above differs (the row above's below mask). ``valid`` says which widened rows and
    columns lie in the image (:meth:`~xr_rasteragg.frames.Frame.valid`). (On a 2048 x 2048
    block of cells 30 pixels across, best of 31 in alternating processes: 3.6-4.1 ms, against
    4.2-4.6 ms for the byte per pixel of flags and classes, on whole widened rows, that it
    replaced. The runs counted here spare the label stage a pass over the block.)
    """
    top, bottom, left, right, top_left, top_right, bottom_left, bottom_right = pieces
    y0, y1, x0, x1 = valid
    nz, h, w = shape
    ny, nx = h + 2 * d, w + 2 * d
    nw = nx // 64 + 2  # words of a row's masks, with a zero word after the last pixel
    # Two widened rows, with room for the masks' 64-pixel reads past the last pixel.
    rows = np.zeros((2, 64 * (nw + 1)), flat.dtype)
    masks = np.zeros((4, 4, nw), np.uint64)  # the four flags of widened row y at y % 4
    # The pixels whose flags a row has: all of them below, all but the last across.
    ends = np.zeros((2, nw), np.uint64)
    for u in range(nx):
        ends[0, u >> 6] |= np.uint64(u < nx - 1) << np.uint64(u & 63)
        ends[1, u >> 6] |= np.uint64(1) << np.uint64(u & 63)
    edge = np.zeros((3, nw), np.uint64)  # border pixels of widened row y at y % 3
    lo, hi = max(1, x0), min(nx - 1, x1)
    inside = np.zeros(nw, np.uint64)  # the columns lo to hi - 1
    for u in range(lo, hi):
        inside[u >> 6] |= np.uint64(1) << np.uint64(u & 63)
    # The block's columns after its first (where a run starts if the pixel before differs), and
    # its first column (where a run always starts).
    later = np.zeros(nw, np.uint64)
    for u in range(d + 1, d + w):
        later[u >> 6] |= np.uint64(1) << np.uint64(u & 63)
    first_word, first_bit = d >> 6, np.uint64(1) << np.uint64(d & 63)
    nruns = 0
    fresh = 0
    # The words whose 65 pixels (a word's and the next one) lie within the block's columns: in
    # the block's rows, read in place, the others from the widened row, which then needs only
    # the pixels of the words before and after them.
    inner_lo = (d + 63) // 64
    inner_hi = max(inner_lo, (d + w - 65) // 64 + 1)
    copy_to, copy_from = (64 * inner_lo + 65, 64 * inner_hi) if inner_hi > inner_lo else (0, 0)
    # Whether each of the two rows is a block row read in place, and where it starts in
    # ``flat``, less d (so that pixel u of the widened row is ``flat[at + u]``).
    in_place = np.zeros(2, np.bool_)
    at = np.zeros(2, np.int64)
    for z in range(nz):
        for t in range(ny + 2):
            if t < ny:  # widened row t in, and the flags of the row before
                row = rows[t % 2]
                in_place[t % 2] = False
                if t < d:
                    _widened_row(row, top_left[z, t], top[z, t], top_right[z, t], 0, 0)
                elif t < d + h:
                    start = starts[z, t - d]
                    middle = flat[start : start + w]
                    _widened_row(row, left[z, t - d], middle, right[z, t - d], copy_to, copy_from)
                    in_place[t % 2], at[t % 2] = copy_from > copy_to, start - d
                else:
                    u = t - d - h
                    _widened_row(row, bottom_left[z, u], bottom[z, u], bottom_right[z, u], 0, 0)
                if t >= 1:
                    above, here = rows[(t - 1) % 2], row
                    at_above, at_here = at[(t - 1) % 2], at[t % 2]
                    out_masks = masks[(t - 1) % 4]
                    # Each source spelled out: ``flat`` (read-only) and a widened row (writable)
                    # are of two Numba types, which one variable cannot hold.
                    _row_masks(above, 0, here, 0, 0, inner_lo, ends, out_masks)
                    if in_place[(t - 1) % 2] and in_place[t % 2]:
                        _row_masks(flat, at_above, flat, at_here, inner_lo, inner_hi, ends, out_masks)
                    elif in_place[(t - 1) % 2]:
                        _row_masks(flat, at_above, here, 0, inner_lo, inner_hi, ends, out_masks)
                    elif in_place[t % 2]:
                        _row_masks(above, 0, flat, at_here, inner_lo, inner_hi, ends, out_masks)
                    else:
                        _row_masks(above, 0, here, 0, inner_lo, inner_hi, ends, out_masks)
                    _row_masks(above, 0, here, 0, inner_hi, nw, ends, out_masks)
            y = t - 1  # border pixels and runs of widened row y
            if 1 <= y < ny - 1:
                marks = edge[y % 3]
                if y0 <= y < y1:
                    _border_words(masks[(y - 1) % 4, _DOWN_MASK], masks[y % 4], inside, marks)
                    if y == y0 or y == y1 - 1:  # the image's first and last rows
                        for j in range(nw):
                            marks[j] = inside[j]
                    if x0 >= lo:  # the image's first and last columns
                        marks[x0 >> 6] |= np.uint64(1) << np.uint64(x0 & 63)
                    if x1 - 1 < hi:
                        marks[(x1 - 1) >> 6] |= np.uint64(1) << np.uint64((x1 - 1) & 63)
                else:
                    for j in range(nw):
                        marks[j] = 0
                if d <= y < d + h:
                    runs, starts_below = _row_runs(
                        masks[y % 4, _ACROSS_MASK],
                        masks[(y - 1) % 4, _DOWN_MASK],
                        later,
                        first_word,
                        first_bit,
                        y == d,
                    )
                    nruns += runs
                    fresh += starts_below
            y = t - 2  # classes of widened row y
            if d <= y < d + h:
                b_up, b_row, b_down = edge[(y - 1) % 3], edge[y % 3], edge[(y + 1) % 3]
                _class_words(masks[(y - 1) % 4], masks[y % 4], b_up, b_row, b_down, out[z * h + y - d])
    return nruns, fresh


@nb.njit(nogil=True, cache=True)
def _row_runs(across, down_above, later, first_word, first_bit, first_row):  # type: ignore[no-untyped-def]
    """The runs of a block row (its across mask, see :func:`_row_masks`), and those of them
    that start below another label (the row above's below mask) or in a plane's first row: a
    run starts at the block's first column (bit ``first_bit`` of word ``first_word``) and at
    each later column (``later``) whose pixel differs from the one before."""
    runs = 0
    fresh = 0
    for j in range(across.shape[0]):
        start = ~_left(across, j) & later[j]
        if j == first_word:
            start |= first_bit
        runs += _popcount(start)
        fresh += _popcount(start if first_row else start & ~down_above[j])
    return runs, fresh


@nb.njit(nogil=True, cache=True)
def _widened_row(row, left, middle, right, skip_from, skip_to):  # type: ignore[no-untyped-def]
    """Copy a row of the block (``middle``) and the frame's pixels left and right of it into
    ``row``, but for the pixels ``skip_from`` to ``skip_to - 1`` of the block's (read in place)."""
    d, w = left.shape[0], middle.shape[0]
    for u in range(d):
        row[u] = left[u]
        row[d + w + u] = right[u]
    body = row[d : d + w]
    for u in range(min(w, max(0, skip_from - d))):
        body[u] = middle[u]
    for u in range(max(0, skip_to - d), w):
        body[u] = middle[u]


@nb.njit(nogil=True, cache=True, inline="always")
def _add_classes(out, i, classes, before, a, n):  # type: ignore[no-untyped-def]
    """Add the pixels of each class among pixels ``a`` to ``a + n - 1`` of a row to ``out[i]``
    (three counts), from the row's prefix counts (:func:`_count_before`): each field of a
    difference of packed counts is exact while it holds the run's pixels, so longer runs are
    taken in pieces of 2**21 - 1 pixels."""
    field = np.int64((1 << _FIELD) - 1)
    a, n = np.int64(a), np.int64(n)
    while n > field:
        _add_packed(out, i, _count_before(classes, before, a + field) - _count_before(classes, before, a))
        a += field
        n -= field
    _add_packed(out, i, _count_before(classes, before, a + n) - _count_before(classes, before, a))


@nb.njit(nogil=True, cache=True, inline="always")
def _add_packed(out, i, counts):  # type: ignore[no-untyped-def]
    """Add the three fields of packed counts (:func:`_packed_counts`, modulo 2**64) to ``out[i]``."""
    field = np.uint64((1 << _FIELD) - 1)
    out[i, 0] += np.int64(counts & field)
    out[i, 1] += np.int64((counts >> np.uint64(_FIELD)) & field)
    out[i, 2] += np.int64(counts >> np.uint64(2 * _FIELD))


#: The index of each flag's mask in a row's masks (see :func:`_row_masks`).
_ACROSS_MASK, _DOWN_MASK, _FALL_MASK, _RISE_MASK = 0, 1, 2, 3


@nb.njit(nogil=True, cache=True)
def _row_masks(row, at_row, below, at_below, first, last, ends, masks):  # type: ignore[no-untyped-def]
    """Words ``first`` to ``last - 1`` of the flags of a row's pixels (pixel ``u`` at
    ``row[at_row + u]``, the one below it at ``below[at_below + u]``), as masks of 64 pixels a
    word (bit ``u % 64`` of word ``u // 64`` for pixel ``u``): whether each pixel equals the
    pixel to its right (``masks[_ACROSS_MASK]``), below (``_DOWN_MASK``) and below right
    (``_FALL_MASK``), and whether the pixel to its right equals the one below it
    (``_RISE_MASK``); ``ends`` keeps the pixels that have each flag (the last pixel has none but
    below)."""
    for j in range(first, last):
        u, v = at_row + 64 * j, at_below + 64 * j
        # All four compared before any is stored, so that each of the four runs of 64 pixels
        # is loaded once.
        across = _equal_mask(row, u, row, u + 1)
        down = _equal_mask(row, u, below, v)
        fall = _equal_mask(row, u, below, v + 1)
        rise = _equal_mask(row, u + 1, below, v)
        some = ends[0, j]
        masks[_ACROSS_MASK, j] = across & some
        masks[_DOWN_MASK, j] = down & ends[1, j]
        masks[_FALL_MASK, j] = fall & some
        masks[_RISE_MASK, j] = rise & some


@intrinsic
def _equal_mask(typingctx: Any, a: Any, i: Any, b: Any, j: Any) -> Any:
    """A uint64 whose bit ``u`` says whether ``a[i + u] == b[j + u]``, for ``u`` < 64 (1-D
    contiguous arrays of one integer dtype, each with 64 elements from there): one vector
    comparison of 64 elements, whose 64 results are the word's bits (a few instructions on
    CPUs with mask registers)."""
    arrays = (a, b)
    if not all(isinstance(x, nb.types.Array) and x.ndim == 1 and x.layout == "C" for x in arrays):
        return None  # (a typing error: the loads below read contiguous memory)
    if a.dtype != b.dtype or not isinstance(a.dtype, nb.types.Integer):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        vector = ir.VectorType(context.get_value_type(signature.args[0].dtype), 64)

        def load(array_type: Any, array: Any, start: Any) -> Any:
            data = context.make_array(array_type)(context, builder, array).data
            return builder.load(builder.bitcast(builder.gep(data, [start]), vector.as_pointer()), align=1)

        left = load(signature.args[0], args[0], args[1])
        right = load(signature.args[2], args[2], args[3])
        return builder.bitcast(builder.icmp_unsigned("==", left, right), ir.IntType(64))

    return nb.types.uint64(a, nb.types.intp, b, nb.types.intp), codegen


@nb.njit(nogil=True, cache=True, inline="always")
def _left(masks, j):  # type: ignore[no-untyped-def]
    """Word ``j`` of a row's mask moved one pixel right: bit ``u`` holds pixel ``u - 1``'s."""
    carry = masks[j - 1] >> np.uint64(63) if j > 0 else np.uint64(0)
    return (masks[j] << np.uint64(1)) | carry


@nb.njit(nogil=True, cache=True, inline="always")
def _right(masks, j):  # type: ignore[no-untyped-def]
    """Word ``j`` of a row's mask moved one pixel left: bit ``u`` holds pixel ``u + 1``'s (the
    last word of a row's masks is past its pixels, zero)."""
    carry = masks[j + 1] << np.uint64(63) if j + 1 < masks.shape[0] else np.uint64(0)
    return (masks[j] >> np.uint64(1)) | carry


@nb.njit(nogil=True, cache=True)
def _border_words(down_above, here, inside, out):  # type: ignore[no-untyped-def]
    """The border pixels of a row, among its columns ``inside``: all but those equal to the
    pixels above (``down_above``, the row above's below-mask), below, left and right
    (``here``, the row's masks)."""
    across, down = here[_ACROSS_MASK], here[_DOWN_MASK]
    for j in range(out.shape[0]):
        out[j] = ~(down_above[j] & down[j] & across[j] & _left(across, j)) & inside[j]


@nb.njit(nogil=True, cache=True)
def _class_words(above, here, b_up, b_row, b_down, out):  # type: ignore[no-untyped-def]
    """The pixels of each weight class of a row (``out[0]`` to ``out[2]``: classes 1 to 3), from
    its masks (``here``) and the row above's (``above``), and the border masks ``b_*`` of the
    rows above, this one and below. The neighbours on the border with the pixel's label (``s``
    of the four sides, ``c`` of the four corners) are summed bit by bit (a bit-sliced adder, 64
    pixels per word), and each class is a test of those sums."""
    for j in range(out.shape[1]):
        across, down = here[_ACROSS_MASK, j], here[_DOWN_MASK, j]
        s1 = b_up[j] & above[_DOWN_MASK, j]
        s2 = b_down[j] & down
        s3 = _left(b_row, j) & _left(here[_ACROSS_MASK], j)
        s4 = _right(b_row, j) & across
        c1 = _left(b_up, j) & _left(above[_FALL_MASK], j)
        c2 = _right(b_up, j) & above[_RISE_MASK, j]
        c3 = _left(b_down, j) & _left(here[_RISE_MASK], j)
        c4 = _right(b_down, j) & here[_FALL_MASK, j]
        s_one, s_two, s_four = _sum4(s1, s2, s3, s4)
        c_one, c_two, c_four = _sum4(c1, c2, c3, c4)
        s_is_1 = s_one & ~s_two & ~s_four
        c_is_1_or_2 = (c_one ^ c_two) & ~c_four
        one = s_two & ~s_four & ~(c_four | (c_two & c_one))  # s 2 or 3, c at most 2
        root = (~s_one & ~s_two & ~s_four & c_two & ~c_one & ~c_four) | (s_is_1 & c_two & c_one)
        border = b_row[j]
        out[0, j] = one & border
        out[1, j] = root & border
        out[2, j] = s_is_1 & c_is_1_or_2 & border


@nb.njit(nogil=True, cache=True, inline="always")
def _sum4(a, b, c, d):  # type: ignore[no-untyped-def]
    """The sum of four masks, pixel by pixel, as three masks of its bits (1, 2 and 4)."""
    ab, cd = a ^ b, c ^ d
    carry_ab, carry_cd, carry = a & b, c & d, ab & cd
    return ab ^ cd, carry_ab ^ carry_cd ^ carry, (carry_ab & carry_cd) | ((carry_ab | carry_cd) & carry)


@nb.njit(nogil=True, cache=True)
def _word_counts(classes, before):  # type: ignore[no-untyped-def]
    """``before[j]``: the pixels of each class in the words before word ``j`` of a row's class
    masks, packed (:func:`_packed_counts`), modulo 2**64."""
    n = classes.shape[1]
    total = np.uint64(0)
    for j in range(n):
        before[j] = total
        total += _packed_counts(classes[0, j], classes[1, j], classes[2, j])
    before[n] = total


@nb.njit(nogil=True, cache=True, inline="always")
def _count_before(classes, before, x):  # type: ignore[no-untyped-def]
    """The pixels of each class before pixel ``x`` of a row's class masks, packed, modulo 2**64
    (see :func:`_word_counts`)."""
    j = x >> 6
    low = (np.uint64(1) << np.uint64(x & 63)) - np.uint64(1)  # the word's first x % 64 pixels
    return before[j] + _packed_counts(classes[0, j] & low, classes[1, j] & low, classes[2, j] & low)


@nb.njit(nogil=True, cache=True, inline="always")
def _packed_counts(one, two, three):  # type: ignore[no-untyped-def]
    """The pixels of three class masks' words in fields of :data:`_FIELD` bits (:func:`_popcount`)."""
    return (
        _popcount(one) | (_popcount(two) << np.uint64(_FIELD)) | (_popcount(three) << np.uint64(2 * _FIELD))
    )


@intrinsic
def _popcount(typingctx: Any, word: Any) -> Any:
    """The set bits of a uint64, by LLVM's ``ctpop`` (one instruction on CPUs that have one)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.ctpop(args[0])

    return nb.types.uint64(nb.types.uint64), codegen


#: Bits per class in the packed counts of :func:`_packed_counts`.
_FIELD = 21


def _hull(parts: Partials, image: Any, runs: LabelRuns, family: Family) -> None:
    """Fill :class:`~xr_rasteragg.families.Hull` from the runs."""
    one_plane = runs.one_plane
    # Planes, rows and columns within the block in the table of rows: int16 where they fit.
    planes, rows, columns, lengths = runs.runs.z, runs.runs.y, runs.runs.x, runs.runs.length
    narrow = (
        rows.size == 0
        or max(int(planes.max()), int(rows.max()), int(columns.max()) + int(lengths.max())) < 2**15
    )
    n = runs.runs.z.shape[0]
    rows = _scratch("rows", (n, 4), np.dtype(np.int16 if narrow else np.int32))
    table = _scratch("points", (2 * n, 3), np.dtype(np.int64))
    offset = np.asarray(runs.offset, np.int64)
    offsets, m, convex = _run_hulls(*runs.runs, runs.local, offset, one_plane, rows, table)
    parts.add(family, hull=Ragged(offsets, table[:m].copy()), convex=convex)


#: Bytes of a scratch table that a thread keeps for its next block, at most (:func:`_scratch`):
#: the hull's two tables of a block of 2048 x 2048 pixels (:data:`~xr_rasteragg.engine.BLOCK_PIXELS`)
#: of cells 30 pixels across take 1.2 and 7.3 MiB, the perimeter's class masks 1.7 MiB.
SCRATCH_BYTES = 8 * 2**20
_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> NDArray[Any]:
    """An uninitialised array for a kernel's tables within one block, kept by the thread for its
    next block (up to :data:`SCRATCH_BYTES` a table; larger ones are made for the block alone).

    The hull's tables of every block were fresh memory, and glibc hands a worker thread's freed
    memory back to the kernel: on the reference dataset their first writes made 1,700-2,200 page
    faults a call (4 blocks), about 4 ms of system time, against 490 with the tables kept.
    """
    size = int(np.prod(shape)) * dtype.itemsize
    kept = getattr(_SCRATCH, name, None)
    if kept is None or kept.nbytes < size or kept.dtype != dtype:
        if size > SCRATCH_BYTES:
            return np.empty(shape, dtype)
        kept = np.empty(max(size // dtype.itemsize, 1), dtype)
        setattr(_SCRATCH, name, kept)
    return kept[: size // dtype.itemsize].reshape(shape)


@nb.njit(nogil=True, cache=True)
def _run_hulls(run_z, run_y, run_x, run_len, run_id, local, offset, one_plane, rows, points):  # type: ignore[no-untyped-def]
    """Per label (in label order: local id ``local[row]``) and z plane, the hull vertices of its
    pixel centres, sorted by (z, y, x) (global indices), written to the first ``m`` rows of
    ``points`` (at least two rows per run); where each label's vertices start; ``m``; and with
    ``one_plane``, the pixels of each label's convex hull image (-1 otherwise).

    One pass over the runs, in their (z, y, x) order, writes each label's rows (plane, row,
    first and last column) into its own stretch of the table ``rows`` (a row per run at least,
    int16 or int32: the table is written once, and its writes are much of the cost). Then label by
    label, in label order, each plane's rows are pushed onto two upper chains (Andrew's
    monotone chain, which takes points sorted by row): the right ends (``v`` = column) and the
    mirrored left ends (``v`` = -column), in small tables that stay in the cache. The plane's
    hull vertices are the two chains' vertices merged (once each: the first and last row are in
    both, one vertex where the row is one pixel); the convex hull image's pixels follow from the
    chains (:func:`~xr_rasteragg.hulls.chain_pixels`). (Pushing the rows label by label rather
    than run by run, as the runs come, keeps each label's chains in a few cache lines: 1.7x
    faster on 2048 x 2048 blocks of cells 30 pixels across.)
    """
    k = local.shape[0]
    nruns = run_id.shape[0]
    base = np.zeros(k + 1, np.int64)  # a label has at most one row per run
    for r in range(nruns):
        base[np.uint64(run_id[r] + 1)] += 1
    for i in range(k):
        base[i + 1] += base[i]
    top = base[:k].copy()  # the row after the label's last one so far
    last = np.full(k, -1, np.int64)  # a key of plane and row of the label's last row so far
    for r in range(nruns):
        i = np.uint64(run_id[r])
        key = (np.int64(run_z[r]) << 32) + run_y[r]
        end = run_x[r] + run_len[r] - 1
        if last[i] == key:  # one more run of the label's row
            rows[np.uint64(top[i] - 1), 3] = end
        else:
            t = top[i]
            u = np.uint64(t)
            rows[u, 0], rows[u, 1], rows[u, 2], rows[u, 3] = run_z[r], run_y[r], run_x[r], end
            top[i] = t + 1
            last[i] = key
    longest = 1
    for i in range(k):
        longest = max(longest, top[i] - base[i])
    # Each chain's vertices (y, v) (a plane's rows at a time, whose z is known); the two chains
    # of a plane together have at most two vertices per row, so the label's vertices are at
    # most two per run.
    right, left = np.empty((longest, 2), np.int64), np.empty((longest, 2), np.int64)
    where = np.zeros(k + 1, np.int64)
    convex = np.full(k, -1, np.int64)
    m = 0
    for j in range(k):
        i = np.uint64(local[j])
        p, end = base[i], top[i]
        h_right = h_left = 0
        while p < end:  # plane by plane, each plane's chains after the last's
            z = np.int64(rows[np.uint64(p), 0])
            floor_right, floor_left = h_right, h_left
            while p < end and rows[np.uint64(p), 0] == z:
                u = np.uint64(p)
                y = np.int64(rows[u, 1])
                h_right = _push(right, h_right, floor_right, y, np.int64(rows[u, 3]))
                h_left = _push(left, h_left, floor_left, y, -np.int64(rows[u, 2]))
                p += 1
            # Merge the chains' vertices by (y, x), on a row the left end first; a vertex of
            # both chains (a one-pixel first or last row) is kept once.
            a, c = floor_right, floor_left
            before_y, before_x = np.int64(-1), np.int64(0)
            while a < h_right or c < h_left:
                ua, uc = np.uint64(a), np.uint64(c)
                if c < h_left and (a >= h_right or left[uc, 0] <= right[ua, 0]):
                    y, x = left[uc, 0], -left[uc, 1]
                    c += 1
                else:
                    y, x = right[ua, 0], right[ua, 1]
                    a += 1
                if y != before_y or x != before_x:
                    um = np.uint64(m)
                    points[um, 0], points[um, 1], points[um, 2] = z + offset[0], y + offset[1], x + offset[2]
                    m += 1
                before_y, before_x = y, x
        if one_plane:
            convex[j] = chain_pixels(
                right[:h_right, 0], right[:h_right, 1], h_right, left[:h_left, 0], left[:h_left, 1], h_left
            )
        where[j + 1] = m
    return where, m, convex


@nb.njit(nogil=True, cache=True, inline="always")
def _push(chain, top, floor, y, v):  # type: ignore[no-untyped-def]
    """Push ``(y, v)`` onto an upper chain (its vertices ``(y, v)`` in rows ``floor`` to
    ``top`` of ``chain``), popping the vertices it makes turn anticlockwise or not
    at all; returns the new top. The first pop is made without a branch (whether a row's end
    makes the chain turn follows no pattern); a second one is rare."""
    h = top
    if h - floor >= 2:
        h -= np.int64(_turn(chain, h, y, v) >= 0)
        while h - floor >= 2 and _turn(chain, h, y, v) >= 0:
            h -= 1
    u = np.uint64(h)
    chain[u, 0], chain[u, 1] = y, v
    return h + 1


@nb.njit(nogil=True, cache=True, inline="always")
def _turn(chain, h, y, v):  # type: ignore[no-untyped-def]
    """The cross product of the chain's last two vertices (below ``h``) and ``(y, v)``: negative
    where they turn clockwise."""
    a, b = np.uint64(h - 2), np.uint64(h - 1)
    ay, av = np.int64(chain[a, 0]), np.int64(chain[a, 1])
    return (np.int64(chain[b, 0]) - ay) * (v - av) - (np.int64(chain[b, 1]) - av) * (y - ay)


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
#: The kernel code that reads a label block's frame, by family type: its ``read`` and ``counts``
#: (made :class:`~xr_rasteragg.kernels.numba.Neighbourhood` entries of
#: :data:`~xr_rasteragg.kernels.numba.NEIGHBOURHOODS`).
SHAPE_NEIGHBOURHOODS: dict[type[Family], tuple[Callable[..., Any], Callable[..., Any]]] = {
    Border: (border_rows, border_counts)
}
