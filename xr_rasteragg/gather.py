"""Whole-label gather: statistics that need each label's pixels all at once.

::

    label blocks ──survey──► ids, and the ids found in more than one block ("crossing")
    blocks of (labels, image) ──► labels wholly inside the block: finished here
                               └─► crossing labels' pixels, by piece of ids ──► one task per piece
                                                                              finishes them

A median, a quantile or a user function of a label's pixels cannot be merged from partials of
its pieces (as the moments are): it needs the label whole. Which labels lie wholly inside one
block cannot be told from one block (a label may have pieces far apart), so a cheap labels-only
pass (the survey, computed when the call is made) lists the ids of each block and finds those
in more than one. Then the image pass: each block's task groups its pixels by label once (a
counting sort, linear in the pixels), finishes the labels that lie wholly inside it and emits
the values (and, for crop functions, the positions) of the crossing labels, split by the pieces
of label ids of the result. One task per piece gathers the crossing labels' pixels of its ids
from every block (``blockwise`` with the blocks' axes contracted, as the engine's finalization)
and finishes them. No overlap depth to guess; memory per task is a block plus the pixels of the
crossing labels of one piece.

The image is read once per call, also together with the moment statistics (:func:`aggregate`
computes both graphs at once); the labels are read twice (survey and pass).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numba as nb
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .engine import (
    PIECE_LABELS,
    SPLIT_EVERY,
    Aggregation,
    _channel_groups,
    _check_inputs,
    _cut,
    _finalized,
    _holding,
    _merged_partials,
    _objects,
    _pick,
    as_dask,
    locate,
    prepare_index,
)
from .stats import STATISTICS, needs_of
from .validation import check_background
from .whole_label import Segments, WholeLabel

__all__ = ["aggregate", "crossing_labels"]


# -- the survey: which labels are in more than one block ----------------------------------------


@nb.njit(nogil=True, cache=True, inline="always")
def _hash(key, size):  # type: ignore[no-untyped-def]
    """Slot of ``key`` in a table of ``size`` (a power of two) slots (Fibonacci hashing)."""
    return np.int64((np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & (size - 1)


@nb.njit(nogil=True, cache=True)
def _number(flat, skip, use_skip):  # type: ignore[no-untyped-def]
    """Each pixel's label numbered in order of first appearance (-1 where skipped), and the ids.

    An open-addressing hash table finds the ids in one walk, so nothing is allocated by the
    size of the largest id; a pixel with the label of the pixel before it needs no lookup.
    """
    n = flat.shape[0]
    local = np.empty(n, dtype=np.int64)
    ids = np.empty(64, dtype=flat.dtype)
    if n == 0:
        return local, ids[:0]
    size = 1024
    keys = np.empty(size, dtype=flat.dtype)
    slots = np.full(size, -1, dtype=np.int64)
    k = 0
    last, last_id = flat[0], np.int64(-2)
    for i in range(n):
        key = flat[i]
        if last_id != -2 and key == last:
            local[i] = last_id
            continue
        last = key
        if use_skip and key == skip:
            last_id = -1
            local[i] = -1
            continue
        s = _hash(key, size)
        while slots[s] != -1 and keys[s] != key:
            s = (s + 1) & (size - 1)
        if slots[s] != -1:
            last_id = slots[s]
        else:
            slots[s], keys[s] = k, key
            if k == ids.shape[0]:
                grown = np.empty(2 * k, dtype=flat.dtype)
                grown[:k] = ids
                ids = grown
            ids[k] = key
            last_id = k
            k += 1
            if 2 * k > size:  # keep the table at most half full
                size *= 2
                keys = np.empty(size, dtype=flat.dtype)
                slots = np.full(size, -1, dtype=np.int64)
                for j in range(k):
                    t = _hash(ids[j], size)
                    while slots[t] != -1:
                        t = (t + 1) & (size - 1)
                    slots[t], keys[t] = j, ids[j]
        local[i] = last_id
    return local, ids[:k]


@nb.njit(nogil=True, cache=True)
def _group(local, rank, k):  # type: ignore[no-untyped-def]
    """Pixels grouped by label (a stable counting sort), groups in the order ``rank`` gives.

    ``rank[j]`` is the group of the label numbered ``j``; returns the pixels' positions and
    the start of each group (and the end of the last).
    """
    counts = np.zeros(k + 1, dtype=np.int64)
    for i in range(local.shape[0]):
        if local[i] >= 0:
            counts[rank[local[i]] + 1] += 1
    starts = np.cumsum(counts)
    fill = starts[:-1].copy()
    order = np.empty(starts[-1], dtype=np.int64)
    for i in range(local.shape[0]):
        if local[i] >= 0:
            g = rank[local[i]]
            order[fill[g]] = i
            fill[g] += 1
    return order, starts


def _skip_value(skip: int | None, dtype: np.dtype) -> tuple[bool, Any]:
    """Whether a label id is skipped, and that id in ``dtype`` (not skipped if it cannot hold it)."""
    if skip is None:
        return False, dtype.type(0)
    info = np.iinfo(dtype)
    if not info.min <= skip <= info.max:
        return False, dtype.type(0)
    return True, dtype.type(skip)


def _ids_block(labels: Any, skip: int | None) -> NDArray[Any]:
    """The sorted ids of one label block, each marked as seen in one block (a survey task)."""
    flat = np.ascontiguousarray(labels).reshape(-1)
    use_skip, value = _skip_value(skip, flat.dtype)
    _, ids = _number(flat, value, use_skip)
    ids = np.sort(ids)
    return _holding((ids, np.zeros(ids.shape[0], dtype=bool)), 3)


def _merge_ids(block: NDArray[Any]) -> NDArray[Any]:
    """The union of several blocks' ids, each marked when it is in more than one (a survey task)."""
    parts = list(block.ravel())
    ids = np.concatenate([p[0] for p in parts])
    many = np.concatenate([p[1] for p in parts])
    order = np.argsort(ids, kind="stable")
    ids, many = ids[order], many[order]
    first = np.ones(ids.shape[0], dtype=bool)
    first[1:] = ids[1:] != ids[:-1]
    starts = np.flatnonzero(first)
    repeated = np.diff(np.append(starts, ids.shape[0])) > 1
    many = np.logical_or.reduceat(many, starts) | repeated if ids.shape[0] else many
    return _holding((ids[starts], many), block.ndim)


def crossing_labels(labels: da.Array, skip: int | None) -> tuple[NDArray[np.integer], NDArray[np.integer]]:
    """The ids of ``labels`` (all but ``skip``), and those found in more than one block.

    A labels-only pass, computed now: one task per block lists its ids, and a tree of tasks
    merges the lists, so that only the ids leave the workers.
    """
    token = dask.base.tokenize(labels.name, skip)
    one_each = tuple((1,) * n for n in labels.numblocks)
    ids = da.map_blocks(
        _ids_block,
        labels,
        skip,
        dtype=object,
        chunks=one_each,
        meta=_objects(3),
        name=f"rasteragg-survey-{token}",
    )
    level = 0
    while int(np.prod(ids.numblocks)) > 1:
        axis = int(np.argmax(ids.numblocks))
        ids = ids.rechunk({axis: SPLIT_EVERY})
        chunks = list(ids.chunks)
        chunks[axis] = (1,) * ids.numblocks[axis]
        ids = ids.map_blocks(
            _merge_ids,
            dtype=object,
            chunks=tuple(chunks),
            meta=_objects(3),
            name=f"rasteragg-survey-{level}-{token}",
        )
        level += 1
    (found,) = dask.compute(ids)
    union, many = found.flat[0]
    return union, union[many]


# -- the image pass: each block finishes its own labels and emits the crossing ones ------------


@dataclass(frozen=True)
class _Layout:
    """A label block's pixels grouped by label (see :func:`_layout_block`).

    ``inside`` and ``crossing`` are the groups (rows of ``ids``) of the wanted labels that lie
    wholly in this block, and of those that cross its borders.
    """

    ids: NDArray[np.integer]
    order: NDArray[np.int64]
    starts: NDArray[np.int64]
    inside: NDArray[np.intp]
    crossing: NDArray[np.intp]
    shape: tuple[int, int, int]
    offset: tuple[int, int, int]

    def position(self, pixels: NDArray[np.int64]) -> NDArray[np.int64]:
        """Global ``(z, y, x)`` indices of the block's flat pixel positions, shape ``(m, 3)``."""
        return np.stack(np.unravel_index(pixels, self.shape), axis=1) + np.asarray(self.offset)


def _member(ids: NDArray[np.integer], sorted_ids: NDArray[np.integer]) -> NDArray[np.bool_]:
    """Whether each of ``ids`` is in ``sorted_ids``, exactly across dtypes."""
    return locate(sorted_ids, ids)[1] if sorted_ids.shape[0] else np.zeros(ids.shape[0], bool)


def _layout_block(
    labels: Any,
    crossing: NDArray[np.integer],
    wanted: NDArray[np.integer] | None,
    skip: int | None,
    block_info: Any = None,
) -> NDArray[Any]:
    """Group one label block's pixels by label (a ``map_blocks`` task)."""
    offset = tuple(int(start) for start, _ in block_info[0]["array-location"])
    block = np.ascontiguousarray(labels)
    use_skip, value = _skip_value(skip, block.dtype)
    local, ids = _number(block.reshape(-1), value, use_skip)
    ranks = np.empty(ids.shape[0], dtype=np.int64)
    by_id = np.argsort(ids, kind="stable")
    ranks[by_id] = np.arange(ids.shape[0])
    order, starts = _group(local, ranks, ids.shape[0])
    ids = ids[by_id]
    keep = np.ones(ids.shape[0], dtype=bool) if wanted is None else _member(ids, wanted)
    cross = _member(ids, crossing)
    layout = _Layout(
        ids,
        order,
        starts,
        np.flatnonzero(keep & ~cross),
        np.flatnonzero(keep & cross),
        block.shape,
        offset,  # type: ignore[arg-type]
    )
    return _holding(layout, 3)


@dataclass(frozen=True)
class _Gathered:
    """One block's share of a channel group: values of its own labels, pixels of crossing ones.

    ``values`` holds, per statistic, one row per id of ``inside``; ``counts``, ``pixels`` and
    ``positions`` hold the crossing labels' pixel counts (one per id of ``crossing``), values
    ``(C, m)`` and global positions ``(m, 3)`` (None when no statistic needs them).
    """

    inside: NDArray[np.integer]
    values: dict[str, NDArray[np.float64]]
    crossing: NDArray[np.integer]
    counts: NDArray[np.int64]
    pixels: NDArray[Any]
    positions: NDArray[np.int64] | None

    def rows(self, ids: NDArray[np.integer]) -> _Gathered:
        """This share's rows of the ids of one piece of the result (sorted ids: by their range)."""
        if ids.shape[0] and np.all(ids[1:] > ids[:-1]):
            a, b = _cut(self.inside, int(ids[0]), int(ids[-1]))
            mine = np.arange(a, b)
            c, d = _cut(self.crossing, int(ids[0]), int(ids[-1]))
            theirs = np.arange(c, d)
        else:
            wanted = np.unique(ids)
            mine = np.flatnonzero(_member(self.inside, wanted))
            theirs = np.flatnonzero(_member(self.crossing, wanted))
        ends = np.cumsum(self.counts)
        starts = ends - self.counts
        pixels = (
            np.concatenate([np.arange(starts[i], ends[i]) for i in theirs])
            if theirs.size
            else np.zeros(0, int)
        )
        return _Gathered(
            self.inside[mine],
            {name: v[mine] for name, v in self.values.items()},
            self.crossing[theirs],
            self.counts[theirs],
            self.pixels[:, pixels],
            None if self.positions is None else self.positions[pixels],
        )


def _gather_block(
    layout: NDArray[Any], image: list[Any], *, wholes: Mapping[str, WholeLabel], skipna: bool
) -> NDArray[Any]:
    """Finish a block's own labels over a group of channel chunks; emit the crossing labels'
    pixels (a ``blockwise`` task)."""
    lay: _Layout = layout.flat[0]
    chunk = np.concatenate([np.asarray(c) for c in image], axis=0) if len(image) > 1 else np.asarray(image[0])
    flats = chunk.reshape(chunk.shape[0], -1)
    segments = Segments(flats, lay.order, lay.starts, lay.ids, lay.position)
    values = {name: spec.reduce(segments, lay.inside, skipna) for name, spec in wholes.items()}
    spans = [np.arange(lay.starts[r], lay.starts[r + 1]) for r in lay.crossing]
    pixels = lay.order[np.concatenate(spans)] if spans else np.zeros(0, dtype=np.int64)
    positions = lay.position(pixels) if any(s.needs_positions for s in wholes.values()) else None
    counts = (lay.starts[lay.crossing + 1] - lay.starts[lay.crossing]).astype(np.int64)
    share = _Gathered(lay.ids[lay.inside], values, lay.ids[lay.crossing], counts, flats[:, pixels], positions)
    return _holding(share, 3)


def _share_rows(block: NDArray[Any], ids: NDArray[np.integer]) -> NDArray[Any]:
    """One block's share of the ids of one piece of the result (a ``blockwise`` task)."""
    return _holding(block.flat[0].rows(ids), block.ndim + 1)


def _finish_piece(
    *blocks_and_ids: Any, wholes: Mapping[str, WholeLabel], skipna: bool, nchan: int
) -> NDArray[Any]:
    """Every statistic for the ids of one piece (a ``blockwise`` task).

    The arguments are, per channel group, the blocks' shares of this piece, then the piece's ids.
    Crossing labels are finished here from the pixels the blocks sent; the others were finished
    by their block.
    """
    *groups, ids = blocks_and_ids
    out = {name: np.full((ids.shape[0], nchan, *spec.shape), np.nan) for name, spec in wholes.items()}
    start = 0
    for group in groups:
        shares: list[_Gathered] = list(group.ravel())
        width = shares[0].pixels.shape[0]
        channels = slice(start, start + width)
        start += width
        for share in shares:
            if not share.inside.shape[0]:
                continue
            rows, found = locate(share.inside, ids)
            if found.any():
                for name in wholes:
                    out[name][found, channels] = share.values[name][rows[found]]
        crossing = np.concatenate([s.crossing for s in shares])
        if not crossing.shape[0]:
            continue
        label_of_pixel = np.repeat(crossing, np.concatenate([s.counts for s in shares]))
        order = np.argsort(label_of_pixel, kind="stable")
        pixels = np.concatenate([s.pixels for s in shares], axis=1)
        positions = None
        if shares[0].positions is not None:
            positions = np.concatenate([s.positions for s in shares if s.positions is not None])
        sorted_labels = label_of_pixel[order]
        first = np.ones(sorted_labels.shape[0], dtype=bool)
        first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        starts = np.append(np.flatnonzero(first), sorted_labels.shape[0]).astype(np.int64)
        labels = sorted_labels[first]
        segments = Segments(pixels, order.astype(np.int64), starts, labels, _positions_of(positions))
        rows, found = locate(labels, ids)
        every = np.arange(labels.shape[0])
        for name, spec in wholes.items():
            values = spec.reduce(segments, every, skipna)
            out[name][found, channels] = values[rows[found]]
    return _holding(out, 1)


def _positions_of(positions: NDArray[np.int64] | None) -> Any:
    """The ``position`` map of :class:`~xr_rasteragg.whole_label.Segments` over gathered pixels."""

    def position(pixels: NDArray[np.int64]) -> NDArray[np.int64]:
        assert positions is not None
        return positions[pixels]

    return position


def gathered(
    labels: da.Array,
    image: da.Array,
    crossing: NDArray[np.integer],
    wanted: NDArray[np.integer],
    wholes: Mapping[str, WholeLabel],
    skip: int | None,
    skipna: bool,
    sorted_ids: bool,
) -> dict[str, da.Array]:
    """Dask arrays of the whole-label statistics for ``wanted``, one task per piece of ids.

    ``sorted_ids`` says whether ``wanted`` are all the labels (then every block finishes all of
    its own); otherwise the blocks finish only the wanted ones.
    """
    layouts = da.map_blocks(
        _layout_block,
        labels,
        crossing,
        None if sorted_ids else np.unique(wanted),
        skip,
        dtype=object,
        chunks=tuple((1,) * n for n in labels.numblocks),
        meta=_objects(3),
        name=f"rasteragg-layout-{uuid.uuid4().hex}",
    )
    k = int(wanted.shape[0])
    sizes = tuple(min(PIECE_LABELS, k - start) for start in range(0, k, PIECE_LABELS)) or (0,)
    token = uuid.uuid4().hex
    pieces_of_ids = da.from_array(wanted, chunks=(sizes,), name=f"rasteragg-gather-ids-{token}")
    shares: list[Any] = []
    for start, stop in _channel_groups(image):
        blocks = da.blockwise(
            _gather_block, "zyx", layouts, "zyx", image[start:stop], "czyx",
            wholes=wholes, skipna=skipna, dtype=object, meta=_objects(3), concatenate=False,
            align_arrays=False,
        )  # fmt: skip
        rows = da.blockwise(
            _share_rows, "zyxp", blocks, "zyx", pieces_of_ids, "p",
            dtype=object, meta=_objects(4), align_arrays=False, adjust_chunks={"p": 1},
        )  # fmt: skip
        shares += [rows, "zyxp"]
    nchan = int(image.shape[0])
    pieces = da.blockwise(
        _finish_piece, "p", *shares, pieces_of_ids, "p",
        wholes=wholes, skipna=skipna, nchan=nchan, dtype=object, meta=_objects(1), concatenate=True,
        align_arrays=False, adjust_chunks={"p": 1},
    )  # fmt: skip
    values = {}
    for name, spec in wholes.items():
        values[name] = pieces.map_blocks(
            _pick, name, dtype=np.float64, chunks=(sizes, (nchan,), *((w,) for w in spec.shape)),
            new_axis=list(range(1, 2 + len(spec.shape))), meta=np.empty((0,) * (2 + len(spec.shape))),
            name=f"rasteragg-{name}-{token}",
        )  # fmt: skip
    return values


# -- one call: moment statistics and whole-label ones, one read of the image -----------------------


def aggregate(
    labels: Any,
    image: Any,
    stats: Sequence[str],
    wholes: Mapping[str, WholeLabel],
    *,
    index: ArrayLike | None,
    background: int | None,
    skipna: bool,
    split_every: int,
    eager: bool,
) -> Aggregation:
    """:func:`xr_rasteragg.engine.aggregate` with whole-label statistics among ``stats`` or in
    ``wholes`` (named specs beyond the statistics, such as quantiles and user functions).

    The survey of the labels runs now; the rest is one graph, in which the moment statistics'
    pass and the gather read the image's blocks once (when computed together). With dask inputs
    (and not ``eager``) the values are dask arrays of that graph, NumPy arrays otherwise.
    """
    check_background(background)
    lazy = not eager and (isinstance(labels, da.Array) or isinstance(image, da.Array))
    wholes = {**{n: STATISTICS[n].whole for n in stats if STATISTICS[n].whole is not None}, **wholes}  # type: ignore[misc]
    moments = tuple(n for n in stats if STATISTICS[n].whole is None)
    if image is None:
        raise ValueError(f"statistics {sorted(wholes)} need an image; 'image' is None")
    labels, image = as_dask(labels, "labels"), as_dask(image, "image")
    labels, image = _check_inputs(labels, image, moments)
    assert image is not None
    wanted = None if index is None else prepare_index(index)
    skip = background
    if wanted is not None and background is not None and np.any(wanted == background):
        skip = None
    ids, crossing = crossing_labels(labels, skip)
    everything = wanted is None
    if wanted is None:
        wanted = ids
    values: dict[str, Any] = {}
    if moments:
        parts = _merged_partials(labels, image, needs_of(moments, skipna), skip, split_every, split_every**2)
        values.update(_finalized(parts, wanted, moments, int(image.shape[0])))
    values.update(gathered(labels, image, crossing, wanted, wholes, skip, skipna, everything))
    values = {name: values[name] for name in (*stats, *wholes) if name in values}
    if not lazy:
        (values,) = dask.compute(values)
    return Aggregation(wanted, values)
