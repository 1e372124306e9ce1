"""The engine: one pass over the blocks, a tree merge of sparse partials, and finalization.

::

    blocks of (labels, image) ──map──► per-block partials ──tree-merge──► ≤ 64 partials
        ──merge + finalize in pieces of label ids, on all cores──► stats

Every statistic asked for, and the set of labels itself, comes out of one read of each block.
The kernel for a block is chosen by the block's type when the task runs, so one graph serves
NumPy and CuPy blocks alike. A kernel that runs in two stages (the compiled CPU kernel) encodes
each label block in a task of its own, as soon as the block is read, and the channels' tasks
start from that encoding. Tasks are small, pure functions of their inputs, which is all a
``dask.distributed`` cluster needs.
"""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph
from numpy.typing import ArrayLike, NDArray

from .kernels import BlockKernel, StagedKernel, array_backend, kernel_for
from .partials import Needs, Partials, concat_channels, label_union, merge
from .stats import STATISTICS, finalize, needs_of, validate_stats
from .validation import check_background, check_image_dtype, check_known_shape, check_labels_dtype

__all__ = ["Aggregation", "aggregate", "as_dask", "locate", "prepare_index"]

#: How many partials one merge task combines.
SPLIT_EVERY = 8
#: Upper bound on the image bytes one task reads: channel chunks of a spatial block are grouped
#: up to this size, so that a group's sweep shares the runs of the labels across its channels
#: (and kernels that take whole blocks read the labels once per group rather than once per chunk).
GROUP_BYTES = 256 * 2**20
#: Rows of the result per task when results are lazy.
ROWS_PER_CHUNK = 2**20
#: Pixels per block when NumPy or CuPy inputs are split for the threads.
BLOCK_PIXELS = 2**22
#: Labels per piece of the final merge and finalization (small enough for the caches).
PIECE_LABELS = 2**16
#: Results of at least this many bytes are allocated on a memory map (see :func:`_empty`).
MAPPED_BYTES = 64 * 2**20


@dataclass
class Aggregation:
    """Per-label statistics.

    Attributes
    ----------
    labels
        The label ids, one per row of every result.
    values
        One array per statistic, with one row per label: NumPy arrays, or dask arrays when the
        call was lazy.
    """

    labels: NDArray[np.integer]
    values: dict[str, Any]


def aggregate(
    labels: Any,
    image: Any | None,
    stats: str | Iterable[str],
    *,
    index: ArrayLike | None = None,
    background: int | None = None,
    skipna: bool = False,
    split_every: int = SPLIT_EVERY,
    eager: bool = False,
) -> Aggregation:
    """Compute per-label statistics of ``image`` over ``labels`` in one pass.

    Parameters
    ----------
    labels
        Label mask ``(z, y, x)`` of any integer dtype: a NumPy, CuPy or dask array.
    image
        Image ``(c, z, y, x)`` over the same pixels, of the same array type, or None when only
        ``count`` and ``center_of_mass`` are asked for.
    stats
        Names of the statistics, see :data:`~xr_rasteragg.stats.StatName`.
    index
        Label ids to report, in this order (absent ids get count 0, sum 0 and NaN otherwise).
        None reports every label present, sorted.
    background
        A label to leave out when ``index`` is None (its pixels are skipped). It is kept when
        ``index`` names it.
    skipna
        Ignore NaN pixels; by default they make their label's statistics NaN, as in NumPy.
    split_every
        How many partials one merge task combines.
    eager
        Run the pass now and return NumPy arrays even for dask inputs with an ``index`` (for
        callers that need the values at once).

    Returns
    -------
    Aggregation
        The labels and one array per statistic. With dask inputs and an ``index`` (and not
        ``eager``) the arrays are dask arrays of one graph and nothing has been computed: compute
        them together (``dask.compute(result.values)``) to read the data once; each array
        computed by itself runs the pass again. Otherwise the pass has run.
    """
    stats = validate_stats(stats)
    if split_every < 2:
        raise ValueError(f"'split_every' must be at least 2 partials per merge; got {split_every}")
    check_background(background)
    lazy = not eager and index is not None and (isinstance(labels, da.Array) or isinstance(image, da.Array))
    labels, image = as_dask(labels, "labels"), None if image is None else as_dask(image, "image")
    labels, image = _check_inputs(labels, image, stats)
    wanted = None if index is None else prepare_index(index)
    skip = background
    if wanted is not None and background is not None and np.any(wanted == background):
        skip = None
    needs = needs_of(stats, skipna)
    # The tree stops at split_every**2 partials (two levels short of the top): the rest of the
    # merge runs in pieces over the label ids, in parallel and fused with finalization (see
    # :func:`final_table`), which saves writing every label once more per level.
    parts = _merged_partials(labels, image, needs, skip, split_every, split_every**2)
    if wanted is not None and lazy:
        return Aggregation(wanted, _lazy_values(parts, wanted, stats, image))
    (parts,) = dask.compute(parts)
    return Aggregation(*final_table(parts, stats, PIECE_LABELS, wanted))


def final_table(
    parts: Sequence[Partials], stats: Sequence[str], piece: int, index: NDArray[np.integer] | None = None
) -> tuple[NDArray[np.integer], dict[str, NDArray[Any]]]:
    """Merge partials and finalize them, piece by piece over the sorted label ids.

    Each piece of ``piece`` labels takes the rows of its ids from every part, merges them and
    finalizes the labels asked for straight into their rows of the result. Pieces are
    independent, so they run on all cores (the compiled merge releases the GIL), and their
    temporaries stay in the caches: no table of merged partials of all labels is ever made.

    Parameters
    ----------
    parts
        Partials of disjoint pixel sets (the outputs of the merge tree).
    stats
        Names of the statistics.
    piece
        Labels per piece.
    index
        Label ids to report, in this order (absent ids get count 0, sum 0 and NaN otherwise);
        None reports every label of the parts, sorted.

    Returns
    -------
    labels, values
        The label ids of the rows, and one array per statistic with one row per label.
    """
    labels = label_union([p.labels for p in parts])
    k = labels.shape[0]
    if index is None:
        ids, rows, found = labels, np.arange(k), np.ones(k, bool)
    else:
        ids, (rows, found) = index, locate(labels, index)
    if len(parts) == 1 or k <= piece or not found.any():
        return ids, finalize(merge(parts), stats, rows, found)
    # The result rows that each piece serves (``at``), in the order of their labels' rows in the
    # union (``served``); without an index, result row and union row are the same.
    at = rows if index is None else np.flatnonzero(found)
    if index is not None:
        at = at[np.argsort(rows[at], kind="stable")]
    served = at if index is None else rows[at]
    starts = np.arange(0, k, piece)
    bounds = np.searchsorted(served, np.append(starts, k))
    busy = [i for i in range(starts.shape[0]) if bounds[i] < bounds[i + 1]]
    values: dict[str, NDArray[Any]] = {}

    def run(i: int) -> tuple[slice | NDArray[np.intp], dict[str, NDArray[Any]]]:
        start, stop = int(starts[i]), min(int(starts[i]) + piece, k)
        low, high = labels[start], labels[stop - 1]
        cuts = [(np.searchsorted(p.labels, low), np.searchsorted(p.labels, high, "right")) for p in parts]
        merged = merge([p.rows(int(a), int(b)) for p, (a, b) in zip(parts, cuts, strict=True)])
        mine = slice(bounds[i], bounds[i + 1])
        where = mine if index is None else at[mine]
        return where, finalize(merged, stats, served[mine] - start, np.ones(bounds[i + 1] - bounds[i], bool))

    def write(i: int) -> None:
        where, piece_values = run(i)
        for name, value in piece_values.items():
            values[name][where] = value

    where, first = run(busy[0])  # the first piece gives each result's shape and dtype
    for name, value in first.items():
        values[name] = _empty((ids.shape[0], *value.shape[1:]), value.dtype)
        if not found.all():
            values[name][~found] = STATISTICS[name].fill
        values[name][where] = value
    with ThreadPoolExecutor(min(len(busy) - 1, _cores()) or 1) as pool:
        list(pool.map(write, busy[1:]))
    return ids, values


def _empty(shape: tuple[int, ...], dtype: np.dtype) -> NDArray[Any]:
    """An uninitialised array for a result; large ones on fresh pages of an anonymous memory map.

    NumPy asks the kernel for huge pages on large arrays (``madvise``). Where memory is
    fragmented, the kernel then compacts memory on the first write of each huge page, which
    made writing 2.9 GiB of results (10^7 labels, all statistics, 4 channels) 1.7-2.6x slower
    than on ordinary pages. The results are written once, piece by piece, and handed to the
    caller, so ordinary pages lose nothing.
    """
    count = int(np.prod(shape))
    size = count * dtype.itemsize
    if size < MAPPED_BYTES:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, size), dtype, count).reshape(shape)


def _cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare_index(index: ArrayLike) -> NDArray[np.integer]:
    """Check a list of label ids and return it as a 1-D integer array.

    Raises
    ------
    TypeError
        If the ids are not integers.
    ValueError
        If ``index`` is not one-dimensional, or holds ids outside the 64-bit integer range (or
        negative ids next to ids of 2**63 or more).
    """
    values = np.atleast_1d(np.asarray(index))
    if values.dtype.kind in "fO" and values.ndim == 1:
        values = _integer_ids(list(index) if isinstance(index, Sequence) else values.tolist(), values)
    if values.ndim != 1:
        raise ValueError(f"'index' must be a 1-D sequence of label ids; got an array of shape {values.shape}")
    if values.size == 0:
        return values.astype(np.int64)
    if values.dtype.kind not in "iu":
        raise TypeError(f"'index' must hold integer label ids; got dtype {values.dtype}")
    return values


def _integer_ids(items: Sequence[Any], values: NDArray[Any]) -> NDArray[Any]:
    """Python ints that NumPy could not fit in one dtype (such as 2**64 - 1 next to 1) as an array."""
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) for v in items):
        return values
    outside = [v for v in items if not -(2**63) <= v < 2**64]
    if outside:
        raise ValueError(f"'index' must hold ids within the 64-bit integer range; got {outside[:5]}")
    if all(v <= np.iinfo(np.int64).max for v in items):
        return np.array(items, dtype=np.int64)
    if all(v >= 0 for v in items):
        return np.array(items, dtype=np.uint64)
    raise ValueError("'index' mixes negative ids with ids of 2**63 or more; no integer dtype holds both")


def locate(
    ids: NDArray[np.integer], index: NDArray[np.integer]
) -> tuple[NDArray[np.intp], NDArray[np.bool_]]:
    """Rows of ``index``'s ids in the sorted ``ids``, and whether each one is there.

    Comparisons are exact across signed and unsigned dtypes: an id that the dtype of ``ids``
    cannot hold is simply not found.
    """
    info = np.iinfo(ids.dtype)
    fits = (index >= info.min) & (index <= info.max)
    wanted = np.where(fits, index, 0).astype(ids.dtype)
    rows = np.minimum(np.searchsorted(ids, wanted), max(ids.shape[0] - 1, 0))
    found = fits & (ids[rows] == wanted) if ids.shape[0] else np.zeros(index.shape, bool)
    return rows, found


def as_dask(array: Any, name: str) -> da.Array:
    """A dask array over ``array``; NumPy and CuPy arrays are split into blocks for the threads.

    Parameters
    ----------
    array
        A dask, NumPy or CuPy array, or anything :func:`numpy.asarray` takes.
    name
        The start of the graph name (``labels``, ``image``).

    Returns
    -------
    dask.array.Array
        ``array`` itself if it is a dask array; otherwise a dask array over it, in blocks of about
        :data:`BLOCK_PIXELS` pixels (whatever its size, including zero-sized dims) and all channels.
    """
    if isinstance(array, da.Array):
        return array
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        array = np.asarray(array)
    chunks: Any = "auto"
    if array.ndim in (3, 4):
        chunks = (*array.shape[:-3], *_spatial_chunks(array.shape[-3:]))
    # A fresh name, not a token of the content: tokenizing reads the whole array (0.6 s for the
    # reference dataset; for device arrays, through a copy to the host).
    return da.from_array(array, chunks=chunks, asarray=False, name=f"{name}-{uuid.uuid4().hex}")


def _spatial_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """Blocks of about :data:`BLOCK_PIXELS` pixels, whole rows first."""
    if len(shape) != 3:
        return tuple(shape)
    nz, ny, nx = shape
    side = max(1, int(BLOCK_PIXELS**0.5))
    cy, cx = min(ny, side), min(nx, side)
    cz = max(1, min(nz, BLOCK_PIXELS // max(1, cy * cx)))
    return cz, cy, cx


def _check_inputs(
    labels: da.Array, image: da.Array | None, stats: Sequence[str]
) -> tuple[da.Array, da.Array | None]:
    """Validate the engine's inputs and put the labels on the image's spatial chunks."""
    check_labels_dtype(labels.dtype)
    check_known_shape(labels.shape, "labels")
    if image is not None:
        check_known_shape(image.shape, "image")
    if labels.ndim != 3:
        raise ValueError(f"'labels' must be 3-D (z, y, x); got shape {labels.shape}")
    if not labels.dtype.isnative:
        labels = labels.astype(labels.dtype.newbyteorder("="))
    if image is None:
        per_channel = [name for name in stats if STATISTICS[name].per_channel]
        if per_channel:
            raise ValueError(f"statistics {per_channel} need an image; 'image' is None")
        return labels, None
    if image.ndim != 4:
        raise ValueError(f"'image' must be 4-D (c, z, y, x); got shape {image.shape}")
    if image.shape[1:] != labels.shape:
        raise ValueError(
            f"'image' and 'labels' must cover the same pixels; got image (z, y, x) shape "
            f"{image.shape[1:]} and labels shape {labels.shape}"
        )
    check_image_dtype(image.dtype)
    if not image.dtype.isnative:  # first, so that the dtype checks below see native dtypes
        image = image.astype(image.dtype.newbyteorder("="))
    if image.dtype.kind == "b":
        image = image.astype(np.uint8)
    elif image.dtype == np.float16:
        image = image.astype(np.float32)
    if array_backend(labels) != array_backend(image):
        raise TypeError(
            f"'labels' and 'image' must live on the same device; got {array_backend(labels)} labels "
            f"and a {array_backend(image)} image (move both to the GPU with cupy.asarray, or both to "
            "the host with cupy.asnumpy)"
        )
    if labels.chunks != image.chunks[1:]:
        labels = labels.rechunk(image.chunks[1:])
    return labels, image


@dataclass(frozen=True)
class _LabelStage:
    """A label block as the channel tasks of its spatial block receive it (see :func:`_label_task`).

    ``block`` is the kernel's encoding of the labels for a kernel that runs in two stages, and
    the labels block itself for a kernel that takes whole blocks.
    """

    backend: str
    kernel: BlockKernel
    block: Any
    offset: tuple[int, int, int]
    skip: int | None


def _label_task(labels: Any, offset: tuple[int, int, int], skip: int | None) -> _LabelStage:
    """The label stage of one spatial block (a dask task)."""
    kernel = kernel_for(labels)
    block = kernel.encode(labels, offset, skip) if isinstance(kernel, StagedKernel) else labels
    return _LabelStage(array_backend(labels), kernel, block, offset, skip)


def _channel_task(stage: _LabelStage, image: list[Any], needs: Needs) -> Partials:
    """Partials of one spatial block over a group of channel chunks (a dask task)."""
    backends = {stage.backend, *(array_backend(chunk) for chunk in image)}
    if len(backends) > 1:
        raise TypeError(f"a block mixes arrays from {sorted(backends)}; put labels and image on one device")
    if isinstance(stage.kernel, StagedKernel):
        return stage.kernel.channels(stage.block, image or None, needs)
    return stage.kernel(stage.block, image or None, stage.offset, needs, stage.skip)


def _channel_groups(image: da.Array | None) -> list[list[int]]:
    """Channel-chunk indices grouped so that one task reads at most :data:`GROUP_BYTES` (or one chunk)."""
    if image is None:
        return [[]]
    block_bytes = image.dtype.itemsize * int(np.prod([max(c) for c in image.chunks[1:]]))
    groups: list[list[int]] = [[]]
    size = 0
    for i, channels in enumerate(image.chunks[0]):
        chunk_bytes = block_bytes * channels
        if groups[-1] and size + chunk_bytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += chunk_bytes
    return groups


def _merged_partials(
    labels: da.Array, image: da.Array | None, needs: Needs, skip: int | None, split_every: int, left: int
) -> Delayed:
    """The graph of the pass: label and channel tasks per spatial block, and a tree merge.

    Each spatial block has a label task, one task per group of channel chunks (the block's
    partials for those channels) and, with several groups, a join of their channels. The tree
    merges the blocks' partials until at most ``left`` are left; the graph's value is their list.

    Built as a plain task graph on top of the arrays' graphs (cheaper than one ``delayed`` call per
    task, which merges the arrays' graphs again for every block). Keys start with what the task
    does (``rasteragg-labels-…``, ``rasteragg-block-…``, ``rasteragg-merge-…``), so that the dask
    dashboard shows the stages apart.
    """
    token = dask.base.tokenize(labels.name, None if image is None else image.name, needs, skip, split_every)
    name = f"rasteragg-{token}"
    groups = _channel_groups(image)
    starts = [np.cumsum((0, *c))[:-1] for c in labels.chunks]
    graph: dict[Any, Any] = {}
    keys: list[Any] = []
    for iz, iy, ix in product(*(range(n) for n in labels.numblocks)):
        offset = (int(starts[0][iz]), int(starts[1][iy]), int(starts[2][ix]))
        stage: Any = (f"rasteragg-labels-{token}", iz, iy, ix)
        graph[stage] = (_label_task, (labels.name, iz, iy, ix), offset, skip)
        parts = []
        for g, group in enumerate(groups):
            chunks = [] if image is None else [(image.name, c, iz, iy, ix) for c in group]
            key: Any = (f"rasteragg-block-{token}", g, iz, iy, ix)
            graph[key] = (_channel_task, stage, chunks, needs)
            parts.append(key)
        if len(parts) > 1:
            key = (f"rasteragg-join-{token}", iz, iy, ix)
            graph[key] = (concat_channels, parts)
        keys.append(key)
    level = 0
    while len(keys) > left:
        merged = []
        for i in range(0, len(keys), split_every):
            key = (f"rasteragg-merge-{token}", level, i)
            graph[key] = (merge, keys[i : i + split_every])
            merged.append(key)
        keys, level = merged, level + 1
    graph[name] = keys
    inputs: list[Any] = [labels] if image is None else [labels, image]
    return Delayed(name, HighLevelGraph.from_collections(name, graph, dependencies=inputs))


def _lazy_values(
    parts: Delayed, index: NDArray[np.integer], stats: Sequence[str], image: da.Array | None
) -> dict[str, da.Array]:
    """Dask arrays of the statistics for ``index``, in chunks of rows, all from one pass."""
    nchan = 0 if image is None else image.shape[0]
    table = delayed(_finalize_table, pure=True)(parts, stats, index)
    pieces: dict[str, list[da.Array]] = {name: [] for name in stats}
    for start in range(0, max(index.shape[0], 1), ROWS_PER_CHUNK):
        stop = min(start + ROWS_PER_CHUNK, index.shape[0])
        for name in stats:
            width: tuple[int, ...] = ()
            if name == "center_of_mass":
                width = (3,)
            elif name != "count":
                width = (nchan,)
            dtype = np.int64 if name == "count" else np.float64
            value = delayed(_table_rows, pure=True)(table, name, start, stop)
            pieces[name].append(da.from_delayed(value, (stop - start, *width), dtype=dtype))
    return {name: da.concatenate(arrays) for name, arrays in pieces.items()}


def _finalize_table(
    parts: list[Partials], stats: Sequence[str], index: NDArray[np.integer]
) -> dict[str, Any]:
    """The statistics for ``index`` (a task of the lazy graph)."""
    return final_table(parts, stats, PIECE_LABELS, index)[1]


def _table_rows(values: dict[str, Any], name: str, start: int, stop: int) -> Any:
    """Rows ``start`` to ``stop`` of one statistic (a task of the lazy graph)."""
    return values[name][start:stop]
