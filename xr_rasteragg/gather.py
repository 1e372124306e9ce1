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
in more than one. Then the image pass starts from each label block's run encoding, the label
stage of the engine (shared with the moment statistics of the same call: one encoding per
block): one task per block groups the runs by label, and one task per block and group of
channel chunks copies each chunk's runs, read in raster order, into one array in which each
label's pixels lie together (:func:`~xr_rasteragg.kernels.selection.scatter_runs`), finishes
the labels that lie wholly inside the block and emits the values of the crossing labels with
one pixel count per label, split by the pieces of label ids of the result. Where those pixels
lie (their runs' positions) is sent only for statistics that need it (crop functions), once
per block for all channels. One task per piece gathers the crossing labels' pixels of its ids
from every block (``blockwise`` with the blocks' axes contracted, as the engine's
finalization) and finishes them. No overlap depth to guess; memory per task is a block plus
the pixels of the crossing labels of one piece.

The image is read once per call, also together with the moment statistics: then the task of a
block and group of channel chunks also computes the moments' partials from the same chunks
(:func:`_both_block`; the shape features' partials too, the label-only ones from the label
stage and the perimeter's from a label stage with each block's frame), so that each image chunk
has one reader and is freed as soon as it is read (two readers, ordered far apart, kept chunks
alive in between: memory grew with the image). The gather alone groups the chunks too: with a
task per chunk (each block's layout read by several tasks), the peak memory of a median at
16384² was twice as high. The labels are read twice (survey and pass; more with the frames).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .engine import (
    PIECE_LABELS,
    SPLIT_EVERY,
    Aggregation,
    as_dask,
    channel_groups,
    channel_partials,
    check_inputs,
    finalized,
    label_stages,
    locate,
    merge_tree,
    piece_labels,
    prepare_index,
    row_bytes,
    rows_between,
)
from .kernels import HostRuns
from .kernels.numba import LabelRuns, block_partials
from .kernels.selection import group_runs, scatter_runs
from .kernels.xp import to_numpy
from .object_arrays import holding, objects, pick, tree_reduce
from .partials import Needs
from .stats import STATISTICS, Space, needs_of
from .validation import check_background
from .whole_label import Segments, WholeLabel

__all__ = ["aggregate", "crossing_labels"]


# -- the survey: which labels are in more than one block ----------------------------------------


def _ids_block(labels: Any, skip: int | None) -> NDArray[Any]:
    """The sorted ids of one label block, each marked as seen in one block (a survey task)."""
    ids = block_partials.encode(to_numpy(labels), (0, 0, 0), skip).parts.labels
    return holding((ids, np.zeros(ids.shape[0], dtype=bool)), 3)


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
    return holding((ids[starts], many), block.ndim)


def crossing_labels(labels: da.Array, skip: int | None) -> tuple[NDArray[np.integer], NDArray[np.integer]]:
    """The ids of ``labels`` (all but ``skip``), and those found in more than one block.

    A labels-only pass, computed now: one task per block lists its ids (the compiled run
    encoder's walk, which looks up only the runs whose label differs from the pixel above),
    and a tree of tasks merges the lists, so that only the ids leave the workers.
    """
    token = dask.base.tokenize(labels.name, skip)
    one_each = tuple((1,) * n for n in labels.numblocks)
    ids = da.map_blocks(
        _ids_block,
        labels,
        skip,
        dtype=object,
        chunks=one_each,
        meta=objects(3),
        name=f"rasteragg-survey-{token}",
    )
    ids = tree_reduce(ids, _merge_ids, SPLIT_EVERY, name="rasteragg-survey", token=token)
    (found,) = dask.compute(ids)
    union, many = found.flat[0]
    return union, union[many]


# -- the image pass: each block finishes its own labels and emits the crossing ones ------------


def _spans(starts: NDArray[np.int64], rows: NDArray[np.intp]) -> NDArray[np.int64]:
    """The positions ``starts[r]:starts[r + 1]`` of every row ``r`` of ``rows``, concatenated."""
    lengths = starts[rows + 1] - starts[rows]
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts[rows] - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


@dataclass(frozen=True)
class _Layout:
    """A label block's runs grouped by label (see :func:`_layout_block`).

    ``ids`` are the block's label ids, sorted (its rows); the runs ``z, y, x, length`` (block
    indices, in raster order) belong to the rows ``row_of_run``, and are listed row by row in
    ``order``, with ``run_starts`` where each row's runs begin; ``starts`` places each row's
    pixels in a channel's grouped pixels. ``inside`` and ``crossing`` are the rows of the wanted
    labels that lie wholly in this block, and of those that cross its borders.
    """

    ids: NDArray[np.integer]
    z: NDArray[np.int64]
    y: NDArray[np.int64]
    x: NDArray[np.int64]
    length: NDArray[np.int64]
    row_of_run: NDArray[np.int64]
    order: NDArray[np.int64]
    run_starts: NDArray[np.int64]
    starts: NDArray[np.int64]
    inside: NDArray[np.intp]
    crossing: NDArray[np.intp]
    offset: tuple[int, int, int]

    def segments(self, values: NDArray[Any], positions: bool) -> Segments:
        """The block's pixels of ``values`` ``(C, z, y, x)`` grouped by label (with the runs'
        global positions when asked for)."""
        grouped = scatter_runs(values, self.z, self.y, self.x, self.length, self.row_of_run, self.starts)
        if not positions:
            return Segments(grouped, self.starts, self.ids)
        runs = self.order
        return Segments(grouped, self.starts, self.ids, self.origin(runs), self.length[runs], self.run_starts)

    def origin(self, runs: NDArray[np.int64]) -> NDArray[np.int64]:
        """Global ``(z, y, x)`` index of the first pixel of each of ``runs``, shape ``(r, 3)``."""
        return np.stack([self.z[runs], self.y[runs], self.x[runs]], axis=1) + np.asarray(self.offset)


def _member(ids: NDArray[np.integer], sorted_ids: NDArray[np.integer]) -> NDArray[np.bool_]:
    """Whether each of ``ids`` is in ``sorted_ids``, exactly across dtypes."""
    return locate(sorted_ids, ids)[1] if sorted_ids.shape[0] else np.zeros(ids.shape[0], bool)


def _layout_block(
    stage: NDArray[Any], crossing: NDArray[np.integer], wanted: NDArray[np.integer] | None
) -> NDArray[Any]:
    """Group a label block's runs by label, from its label stage (a ``map_blocks`` task).

    The stage is the one the moment statistics' pass starts from (:func:`label_stages`): a call
    with both encodes each label block once.
    """
    label_stage = stage.flat[0]
    encoded = label_stage.block
    if isinstance(encoded, HostRuns):  # a device kernel's stage: its host copy's runs
        encoded = encoded.host_runs()
    elif not isinstance(encoded, LabelRuns):  # a kernel that takes whole blocks: encode them here
        encoded = block_partials.encode(to_numpy(encoded), label_stage.offset, label_stage.skip)
    runs, ids = encoded.runs, encoded.parts.labels
    row_of_run = encoded.rank[runs.id].astype(np.int64)
    order, run_starts = group_runs(row_of_run, ids.shape[0])
    starts = np.zeros(ids.shape[0] + 1, dtype=np.int64)
    np.cumsum(encoded.parts.count, out=starts[1:])
    keep = np.ones(ids.shape[0], dtype=bool) if wanted is None else _member(ids, wanted)
    cross = _member(ids, crossing)
    z, y, x, length = (np.asarray(a, dtype=np.int64) for a in (runs.z, runs.y, runs.x, runs.length))
    layout = _Layout(
        ids,
        z,
        y,
        x,
        length,
        row_of_run,
        order,
        run_starts,
        starts,
        np.flatnonzero(keep & ~cross),
        np.flatnonzero(keep & cross),
        label_stage.offset,
    )
    return holding(layout, 3)


@dataclass(frozen=True)
class _Gathered:
    """One block's share of a channel chunk: values of its own labels, pixels of crossing ones.

    ``values`` holds, per statistic, one row per id of ``inside``. The crossing labels' pixels
    are ``pixels`` ``(C, m)``, label by label in the order of ``crossing``, ``counts`` of them
    per label (in raster order within the block). Where they lie travels apart, once per block
    (:class:`_Places`), and only for statistics that need it.
    """

    inside: NDArray[np.integer]
    values: dict[str, NDArray[np.float64]]
    crossing: NDArray[np.integer]
    counts: NDArray[np.int64]
    pixels: NDArray[Any]

    def rows(self, ids: NDArray[np.integer]) -> _Gathered:
        """This share's rows of the ids of one piece of the result (sorted ids: by their range)."""
        mine, theirs = _rows_of(self.inside, ids), _rows_of(self.crossing, ids)
        if mine is None and theirs is None:
            return self
        mine = np.arange(self.inside.shape[0]) if mine is None else mine
        theirs = np.arange(self.crossing.shape[0]) if theirs is None else theirs
        pixel_starts = np.zeros(self.counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(self.counts, out=pixel_starts[1:])
        return _Gathered(
            self.inside[mine],
            {name: v[mine] for name, v in self.values.items()},
            self.crossing[theirs],
            self.counts[theirs],
            self.pixels[:, _spans(pixel_starts, theirs)],
        )


@dataclass(frozen=True)
class _Places:
    """Where one block's pixels of its crossing labels lie, for statistics that need positions.

    The same for every channel chunk, so sent once per block: the pixels of label
    ``crossing[i]`` (in a :class:`_Gathered` of the block) are ``runs[i]`` runs of ``length``
    pixels, in raster order, whose first pixels lie at the global indices ``origin`` ``(r, 3)``.
    """

    crossing: NDArray[np.integer]
    runs: NDArray[np.int64]
    length: NDArray[np.int64]
    origin: NDArray[np.int64]

    def rows(self, ids: NDArray[np.integer]) -> _Places:
        """These places' rows of the ids of one piece of the result."""
        theirs = _rows_of(self.crossing, ids)
        if theirs is None:
            return self
        run_starts = np.zeros(self.runs.shape[0] + 1, dtype=np.int64)
        np.cumsum(self.runs, out=run_starts[1:])
        runs = _spans(run_starts, theirs)
        return _Places(self.crossing[theirs], self.runs[theirs], self.length[runs], self.origin[runs])


def _rows_of(have: NDArray[np.integer], ids: NDArray[np.integer]) -> NDArray[np.intp] | None:
    """The rows of sorted ``have`` whose ids are among ``ids`` (the ids of one piece of the
    result; when sorted, by their range), or None when that is all of them."""
    if ids.shape[0] and np.all(ids[1:] > ids[:-1]):
        rows = np.arange(*rows_between(have, int(ids[0]), int(ids[-1])))
    else:
        rows = np.flatnonzero(_member(have, np.unique(ids)))
    return None if rows.shape[0] == have.shape[0] else rows


def _share(lay: _Layout, chunk: NDArray[Any], wholes: Mapping[str, WholeLabel], skipna: bool) -> _Gathered:
    """A block's share of one channel chunk: its own labels finished, the crossing labels' pixels."""
    segments = lay.segments(chunk, any(s.needs_positions for s in wholes.values()))
    values = {name: spec.reduce(segments, lay.inside, skipna) for name, spec in wholes.items()}
    return _Gathered(
        lay.ids[lay.inside],
        values,
        lay.ids[lay.crossing],
        segments.counts(lay.crossing),
        segments.values[:, _spans(lay.starts, lay.crossing)],
    )


def _places_block(layout: NDArray[Any]) -> NDArray[Any]:
    """Where a block's pixels of its crossing labels lie (a ``map_blocks`` task, once per block)."""
    lay: _Layout = layout.flat[0]
    runs = lay.order[_spans(lay.run_starts, lay.crossing)]
    places = _Places(
        lay.ids[lay.crossing],
        lay.run_starts[lay.crossing + 1] - lay.run_starts[lay.crossing],
        lay.length[runs],
        lay.origin(runs),
    )
    return holding(places, 3)


def _gather_block(
    layout: NDArray[Any], image: list[Any], *, wholes: Mapping[str, WholeLabel], skipna: bool
) -> NDArray[Any]:
    """A block's share of each of a group of channel chunks (a ``blockwise`` task), as
    ``(None, [share per chunk])``: the form of :func:`_both_block`'s results, without partials."""
    lay: _Layout = layout.flat[0]
    return holding((None, [_share(lay, to_numpy(chunk), wholes, skipna) for chunk in image]), 3)


def _both_block(
    stage: NDArray[Any],
    layout: NDArray[Any],
    image: list[Any],
    *,
    needs: Needs,
    wholes: Mapping[str, WholeLabel],
    skipna: bool,
) -> NDArray[Any]:
    """A block's moment partials over a group of channel chunks and its share of each chunk,
    from one read of the chunks (a ``blockwise`` task): ``(partials, [share per chunk])``.

    The one task that reads each image chunk, when a call has both kinds of statistics: dask
    then frees a chunk as soon as it is read, where two tasks reading it (the pass's and the
    gather's) could keep it in memory between them, ordered far apart.
    """
    lay: _Layout = layout.flat[0]
    partials = channel_partials(stage.flat[0], image, needs)
    return holding((partials, [_share(lay, to_numpy(chunk), wholes, skipna) for chunk in image]), 3)


def _partials_of(block: NDArray[Any]) -> NDArray[Any]:
    """The moment partials of a :func:`_both_block` result (a ``map_blocks`` task)."""
    return holding(block.flat[0][0], 3)


def _share_rows(block: NDArray[Any], ids: NDArray[np.integer], chunk: int) -> NDArray[Any]:
    """One block's share of channel chunk ``chunk`` (of the task's) for the ids of one piece of
    the result (a ``blockwise`` task)."""
    share: _Gathered = block.flat[0][1][chunk]
    return holding(share.rows(ids), block.ndim + 1)


def _place_rows(block: NDArray[Any], ids: NDArray[np.integer]) -> NDArray[Any]:
    """One block's places (:class:`_Places`) for the ids of one piece (a ``blockwise`` task)."""
    return holding(block.flat[0].rows(ids), block.ndim + 1)


def _grouping(
    crossing: NDArray[np.integer],
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.integer]]:
    """The stable order that groups the rows of the blocks' ``crossing`` ids (concatenated) by
    label, where each label's group begins in that order, and the labels (sorted)."""
    order = np.argsort(crossing, kind="stable")
    ordered = crossing[order]
    first = np.ones(ordered.shape[0], dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return order, np.flatnonzero(first), ordered[first]


def _positions(places: list[_Places]) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """The blocks' runs of their crossing labels, label by label in the order of the blocks:
    ``origin``, ``length`` and where each label's runs begin (see :class:`Segments`)."""
    label_of_run = np.concatenate([np.repeat(p.crossing, p.runs) for p in places])
    order, first, _ = _grouping(label_of_run)
    origin = np.concatenate([p.origin for p in places])[order]
    length = np.concatenate([p.length for p in places])[order]
    return origin, length, np.append(first, label_of_run.shape[0]).astype(np.int64)


def _finish_piece(
    *blocks_and_ids: Any, wholes: Mapping[str, WholeLabel], skipna: bool, nchan: int, positions: bool
) -> NDArray[Any]:
    """Every statistic for the ids of one piece (a ``blockwise`` task).

    The arguments are, per channel chunk, the blocks' shares of this piece, then (with
    ``positions``) the blocks' places of this piece, then the piece's ids. Crossing labels are
    finished here from the pixels the blocks sent, grouped by label (in the order of the blocks);
    the others were finished by their block.
    """
    *groups, ids = blocks_and_ids
    places: list[_Places] = list(groups.pop().ravel()) if positions else []
    increasing = bool(np.all(ids[1:] > ids[:-1]))
    where: dict[int, NDArray[np.intp]] = {}
    out = {name: np.full((ids.shape[0], nchan, *spec.shape), np.nan) for name, spec in wholes.items()}
    grouped: tuple[Any, ...] | None = None  # the same for every channel chunk: found once
    start = 0
    for group in groups:
        shares: list[_Gathered] = list(group.ravel())
        width = shares[0].pixels.shape[0]
        channels = slice(start, start + width)
        start += width
        for b, share in enumerate(shares):
            if not share.inside.shape[0]:
                continue
            if increasing and share.inside.dtype == ids.dtype:  # among the piece's (see _Gathered.rows)
                # Every channel chunk of a block finishes the same labels: located once per block.
                if b not in where or where[b].shape != share.inside.shape:
                    where[b] = np.searchsorted(ids, share.inside)
                for name in wholes:
                    out[name][where[b], channels] = share.values[name]
                continue
            rows, found = locate(share.inside, ids)
            if found.any():
                for name in wholes:
                    out[name][found, channels] = share.values[name][rows[found]]
        if grouped is None:
            counts = np.concatenate([s.counts for s in shares])
            order, first, labels = _grouping(np.concatenate([s.crossing for s in shares]))
            pixel_starts = np.zeros(counts.shape[0] + 1, dtype=np.int64)
            np.cumsum(counts, out=pixel_starts[1:])
            take = _spans(pixel_starts, order)
            np.cumsum(counts[order], out=pixel_starts[1:])
            starts = pixel_starts[np.append(first, counts.shape[0])]
            rows, found = locate(labels, ids)
            grouped = (take, starts, labels, rows, found, _positions(places) if positions else ())
        take, starts, labels, rows, found, where_runs = grouped
        if not labels.shape[0]:
            continue
        pixels = np.concatenate([s.pixels for s in shares], axis=1)[:, take]
        segments = Segments(pixels, starts, labels, *where_runs)
        every = np.arange(labels.shape[0])
        for name, spec in wholes.items():
            values = spec.reduce(segments, every, skipna)
            out[name][found, channels] = values[rows[found]]
    return holding(out, 1)


def gathered(
    labels: da.Array,
    image: da.Array,
    crossing: NDArray[np.integer],
    wanted: NDArray[np.integer],
    wholes: Mapping[str, WholeLabel],
    skip: int | None,
    skipna: bool,
    sorted_ids: bool,
    needs: Needs | None = None,
    step: int = PIECE_LABELS,
) -> tuple[dict[str, da.Array], list[da.Array]]:
    """Dask arrays of the whole-label statistics for ``wanted``, one task per piece of ``step``
    ids, and the moment statistics' per-block partials when ``needs`` asks for them.

    The runs of each label block come from its label stage (:func:`label_stages`, shared with
    the moment statistics' pass); one task per block and group of channel chunks
    (:func:`channel_groups`, as the engine's pass) finishes the block's own labels in those
    chunks and emits the crossing labels' pixels. With ``needs`` (the families of the moment
    statistics of the same call), that task also computes the partials of its chunks, so that
    each image chunk is read by one task; the second result then holds, per
    channel group, an object array of the blocks' partials, for the engine's tree merge
    (:func:`merge_tree`). ``sorted_ids`` says whether ``wanted`` are all the labels (then every
    block finishes all of its own); otherwise the blocks finish only the wanted ones. The shape
    features' families are among ``needs`` as in the engine's pass: those of the labels alone
    are computed from the label stage, and a family that reads a label's neighbourhood (the
    perimeter's) gets each block's frame in its label stage (:func:`label_stages`), so that the
    image is still read once.
    """
    stages = label_stages(labels, skip, needs)
    layouts = da.map_blocks(
        _layout_block,
        stages,
        crossing,
        None if sorted_ids else np.unique(wanted),
        dtype=object,
        meta=objects(3),
        name=f"rasteragg-layout-{uuid.uuid4().hex}",
    )
    k = int(wanted.shape[0])
    sizes = tuple(min(step, k - start) for start in range(0, k, step)) or (0,)
    token = uuid.uuid4().hex
    pieces_of_ids = da.from_array(wanted, chunks=(sizes,), name=f"rasteragg-gather-ids-{token}")
    bounds = np.cumsum((0, *image.chunks[0])).tolist()
    shares: list[Any] = []
    partials: list[da.Array] = []
    for start, stop in channel_groups(image):
        if needs is None:
            blocks = da.blockwise(
                _gather_block, "zyx", layouts, "zyx", image[start:stop], "czyx",
                wholes=wholes, skipna=skipna, dtype=object, meta=objects(3), concatenate=False,
                align_arrays=False, adjust_chunks=dict.fromkeys("zyx", 1),
            )  # fmt: skip
        else:
            blocks = da.blockwise(
                _both_block, "zyx", stages, "zyx", layouts, "zyx", image[start:stop], "czyx",
                needs=needs, wholes=wholes, skipna=skipna, dtype=object, meta=objects(3),
                concatenate=False, align_arrays=False, adjust_chunks=dict.fromkeys("zyx", 1),
            )  # fmt: skip
            partials.append(blocks.map_blocks(_partials_of, dtype=object, meta=objects(3)))
        for chunk in range(bounds.index(stop) - bounds.index(start)):
            rows = da.blockwise(
                _share_rows, "zyxp", blocks, "zyx", pieces_of_ids, "p", chunk, None,
                dtype=object, meta=objects(4), align_arrays=False, adjust_chunks={"p": 1},
            )  # fmt: skip
            shares += [rows, "zyxp"]
    positions = any(spec.needs_positions for spec in wholes.values())
    if positions:  # once per block, for every channel chunk
        places = layouts.map_blocks(_places_block, dtype=object, meta=objects(3))
        shares += [
            da.blockwise(
                _place_rows, "zyxp", places, "zyx", pieces_of_ids, "p",
                dtype=object, meta=objects(4), align_arrays=False, adjust_chunks={"p": 1},
            ),
            "zyxp",
        ]  # fmt: skip
    nchan = int(image.shape[0])
    pieces = da.blockwise(
        _finish_piece, "p", *shares, pieces_of_ids, "p",
        wholes=wholes, skipna=skipna, nchan=nchan, positions=positions, dtype=object,
        meta=objects(1), concatenate=True, align_arrays=False, adjust_chunks={"p": 1},
    )  # fmt: skip
    values = {}
    for name, spec in wholes.items():
        values[name] = pieces.map_blocks(
            pick, name, dtype=np.float64, chunks=(sizes, (nchan,), *((w,) for w in spec.shape)),
            new_axis=list(range(1, 2 + len(spec.shape))), meta=np.empty((0,) * (2 + len(spec.shape))),
            name=f"rasteragg-{name}-{token}",
        )  # fmt: skip
    return values, partials


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
    space: Space | None = None,
) -> Aggregation:
    """:func:`xr_rasteragg.engine.aggregate` with whole-label statistics among ``stats`` or in
    ``wholes`` (named specs beyond the statistics, such as quantiles and user functions), and
    ``space`` for the shape features among ``stats`` (see :func:`xr_rasteragg.engine.aggregate`).

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
    labels, image = check_inputs(labels, image, moments)
    assert image is not None
    wanted = None if index is None else prepare_index(index)
    skip = background
    if wanted is not None and background is not None and np.any(wanted == background):
        skip = None
    ids, crossing = crossing_labels(labels, skip)
    everything = wanted is None
    if wanted is None:
        wanted = ids
    needs = needs_of(moments, skipna) if moments else None
    nchan = int(image.shape[0])
    # One piece size for every statistic, so that the results are chunked alike.
    row = row_bytes(moments, nchan, (space or Space()).ndim)
    step = piece_labels(row + sum(8 * nchan * int(np.prod(spec.shape)) for spec in wholes.values()))
    values: dict[str, Any]
    values, groups = gathered(labels, image, crossing, wanted, wholes, skip, skipna, everything, needs, step)
    if moments:
        token = dask.base.tokenize(labels.name, image.name, needs, skip, split_every, "gather")
        parts = merge_tree(groups, split_every, split_every**2, token)
        values.update(finalized(parts, wanted, moments, nchan, space, step))
    values = {name: values[name] for name in (*stats, *wholes) if name in values}
    if not lazy:
        (values,) = dask.compute(values)
    return Aggregation(wanted, values)
