"""The engine: one pass over the blocks, a tree merge of sparse partials, and finalization in pieces.

::

    blocks of (labels, image) ──map──► per-block partials ──tree-merge──► ≤ 64 partials
        ──split by pieces of label ids──► one task per piece: merge + finalize ──► stats

Every statistic asked for, and the set of labels itself, comes out of one read of each block.
The graph is built from dask's public array API only (``map_blocks``, ``blockwise`` and
``rechunk`` over object arrays of partials), so it runs on the legacy graph and under dask's
array query planning alike, on the local schedulers and on a ``dask.distributed`` cluster.

The kernel for a block is chosen by the block's type when the task runs, so one graph serves
NumPy and CuPy blocks alike. A kernel that runs in two stages (the compiled CPU kernel) encodes
each label block in a task of its own, as soon as the block is read, and the channels' tasks
start from that encoding.

With dask inputs every result is a dask array. Without an ``index`` the call runs the pass and
keeps the merged partials where they were computed (``persist``: on the workers of a cluster),
bringing back only the label ids, which fix the rows; finalization then is one task per piece
of label ids, so the table is made, and written, where the partials are. NumPy and CuPy inputs
give NumPy results.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import dask.local
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .block_views import view_blocks
from .families import Family, Hull
from .frames import Frame, FrameCut, frame_arrays, frame_from_rings, frame_in_grid, gathers, offset_array
from .in_memory import compute
from .kernels import BlockKernel, FrameReader, StagedKernel, array_backend, kernel_for
from .object_arrays import holding, objects, pick, tree_reduce
from .partials import Needs, Partials, concat_channels, label_union, merge
from .stats import STATISTICS, Space, check_space, finalize, needs_of, validate_stats
from .validation import check_background, check_image_dtype, check_known_shape, check_labels_dtype

if TYPE_CHECKING:
    from .whole_label import WholeLabel

__all__ = [
    "PIECE_LABELS",
    "SPLIT_EVERY",
    "Aggregation",
    "LabelStage",
    "aggregate",
    "aggregate_masks",
    "as_dask",
    "channel_groups",
    "channel_partials",
    "check_inputs",
    "distributed_client",
    "finalize_blocks",
    "finalized",
    "label_stages",
    "locate",
    "merge_tree",
    "pass_blocks",
    "piece_labels",
    "prepare_index",
    "progress",
    "row_bytes",
    "rows_between",
    "stat_groups",
]

#: How many partials one merge task combines.
SPLIT_EVERY = 8
#: Upper bound on the image bytes one task reads: channel chunks of a spatial block are grouped
#: up to this size, so that a group's sweep shares the runs of the labels across its channels
#: (and kernels that take whole blocks read the labels once per group rather than once per chunk).
GROUP_BYTES = 256 * 2**20
#: Pixels per block when NumPy inputs are split for the threads.
BLOCK_PIXELS = 2**22
#: Pixels per block when CuPy inputs are split: one block's launches should fill the GPU (an
#: 8192² block is 2**20 threads of 64-pixel row segments), and each block pays a few launches
#: and one copy of its label tables to the host.
GPU_BLOCK_PIXELS = 2**26
#: Labels per piece of the final merge and finalization, and rows per chunk of every result, at
#: most; fewer where a piece's rows would pass dask's ``array.chunk-size`` (:func:`piece_labels`).
#: 10^7 labels, all statistics, 4 channels: pieces of 2**18 labels made 230-300k page faults of
#: fresh temporaries in their tasks (glibc hands a task's freed heaps back to the kernel once its
#: working set passes their 64 MiB), 2**17 almost none, with 0.4-3.4 s less CPU in the
#: finalization and writes of each call (3 alternating pairs); 2**16 took 1.5-1.8x as long to
#: finalize, in 4x as many tasks.
PIECE_LABELS = 2**17
#: Whether a progress bar is shown for a pass that runs inside a call (see :func:`progress`).
_PASS_PROGRESS: ContextVar[bool] = ContextVar("rasteragg_pass_progress", default=False)


@dataclass
class Aggregation:
    """Per-label statistics.

    Attributes
    ----------
    labels
        The label ids, one per row of every result.
    values
        One array per statistic, with one row per label: NumPy arrays, or dask arrays when the
        call was lazy (compute them with :meth:`compute`).
    """

    labels: NDArray[np.integer]
    values: dict[str, Any]

    def compute(self) -> Aggregation:
        """The statistics with NumPy values, computed together: each piece of labels is finalized
        once and, on the local schedulers, written into its place in the results as soon as it is
        computed (:func:`xr_rasteragg.in_memory.compute`: the table is in memory once, where
        ``dask.compute`` holds it twice at the end).

        Examples
        --------
        >>> import dask.array as da
        >>> labels = da.from_array(np.array([[[1, 1, 2]]]), chunks=1)
        >>> image = da.from_array(np.array([[[[1.0, 3.0, 5.0]]]]), chunks=1)
        >>> aggregate(labels, image, ["mean", "count"]).compute().values
        {'mean': array([[2.],
               [5.]]), 'count': array([2, 1])}
        """
        return Aggregation(self.labels, compute(self.values))


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
    wholes: Mapping[str, WholeLabel] | None = None,
    space: Space | None = None,
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
        Return NumPy arrays for dask inputs too (for callers that need the values at once).
    wholes
        Further statistics of each label's pixels taken whole, by name (quantiles, user
        functions: :mod:`xr_rasteragg.whole_label`); with them (or a ``median`` in ``stats``),
        ``stats`` may be empty. Their values have shape ``(k, C, *spec.shape)``. Whole-label
        statistics run through :func:`xr_rasteragg.gather.aggregate`: the labels are surveyed
        when the call is made, and the rest is one lazy graph (dask inputs) that reads the image
        once when its arrays are computed together, for the other statistics of ``stats`` (shape
        features included) as well.
    space
        Which of the (z, y, x) axes the caller's labels have, and their pixel spacing, for the
        shape features (:mod:`xr_rasteragg.shape`); None: all three, spacing 1.

    Returns
    -------
    Aggregation
        The labels and one array per statistic. With dask inputs (and not ``eager``) the arrays
        are dask arrays of one graph, chunked by :func:`piece_labels` rows: with an ``index``
        nothing has been computed yet; without one the pass has run and its merged partials are
        kept (on the cluster's workers, under ``dask.distributed``), so computing any of the
        arrays, together or one by one, only finalizes them. Compute them together
        (:meth:`Aggregation.compute`) to finalize each piece of labels once.
        NumPy and CuPy inputs give NumPy arrays.
    """
    stats = () if wholes and not stats else validate_stats(stats)
    space = space or Space()
    check_space(stats, space)
    if split_every < 2:
        raise ValueError(f"'split_every' must be at least 2 partials per merge; got {split_every}")
    if wholes or any(STATISTICS[name].whole is not None for name in stats):
        from .gather import aggregate as gather_aggregate

        return gather_aggregate(
            labels, image, stats, wholes or {}, index=index, background=background, skipna=skipna,
            split_every=split_every, eager=eager, space=space,
        )  # fmt: skip
    check_background(background)
    lazy = not eager and (isinstance(labels, da.Array) or isinstance(image, da.Array))
    labels, image = as_dask(labels, "labels"), None if image is None else as_dask(image, "image")
    labels, image = check_inputs(labels, image, stats)
    wanted = None if index is None else prepare_index(index)
    skip = background
    if wanted is not None and background is not None and np.any(wanted == background):
        skip = None
    needs = needs_of(stats, skipna)
    # The tree stops at split_every**2 partials (two levels short of the top): the rest of the
    # merge runs in pieces over the label ids, fused with finalization (see :func:`finalized`),
    # which saves writing every label once more per level.
    parts = _merged_partials(labels, image, needs, skip, split_every, split_every**2)
    nchan = 0 if image is None else int(image.shape[0])
    if not lazy:
        return _eager(parts, wanted, stats, nchan, space)
    if wanted is None:
        parts = parts.persist()
        _show_progress(parts)
        ids = parts.map_blocks(_block_labels, dtype=object, meta=objects(3), name=f"{parts.name}-ids")
        (ids,) = dask.compute(ids)
        wanted = label_union(list(ids.ravel()))
    return Aggregation(wanted, finalized(parts, wanted, stats, nchan, space))


@contextlib.contextmanager
def progress(show: bool = True) -> Iterator[None]:
    """Show dask's progress bars for what runs inside the block, the pass of every call included.

    On the local schedulers this is ``dask.diagnostics.ProgressBar`` (on stderr), for everything
    computed in the block. Under a ``distributed.Client`` it is ``distributed.progress`` (a widget
    in a notebook, text on stderr elsewhere) on the pass that a call without an ``index`` runs on
    the cluster before it returns; what you compute of the results afterwards, watch with
    ``distributed.progress`` on your own futures.

    Examples
    --------
    >>> import xr_rasteragg
    >>> with xr_rasteragg.progress():  # doctest: +SKIP
    ...     table = image.rasteragg.aggregate(labels, ["mean", "var"])
    """
    if not show:
        yield
        return
    token = _PASS_PROGRESS.set(True)
    try:
        if distributed_client() is not None:
            yield
        else:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr, dt=0.2):
                yield
    finally:
        _PASS_PROGRESS.reset(token)


def distributed_client() -> Any | None:
    """The ``distributed.Client`` that dask computes on here, or None on the local schedulers."""
    owner = getattr(dask.base.get_scheduler(), "__self__", None)
    kind = type(owner)
    return owner if kind.__name__ == "Client" and kind.__module__.startswith("distributed") else None


def _show_progress(persisted: da.Array) -> None:
    """``distributed.progress`` on the persisted pass, inside :func:`progress` on a cluster."""
    if not _PASS_PROGRESS.get() or distributed_client() is None:
        return
    from distributed import progress as show

    with contextlib.redirect_stdout(sys.stderr):  # its text bar writes to stdout
        show(persisted)


def _eager(
    parts: da.Array, wanted: NDArray[np.integer] | None, stats: Sequence[str], nchan: int, space: Space
) -> Aggregation:
    """NumPy results: the merged partials computed into this process, then finalized.

    (One computation of the partials, rather than a ``persist`` and two more, saves a few
    scheduler runs per call: 0.2x the read limit of DESIGN's reference dataset.)
    """
    (blocks,) = dask.compute(parts)
    return finalize_blocks(blocks, wanted, stats, nchan, space)


def pass_blocks(labels: Any, image: Any | None, needs: Needs, split_every: int = SPLIT_EVERY) -> NDArray[Any]:
    """Run the pass now, for every label (none left out): the partials left by the tree merge, an
    object array of at most ``split_every**2`` :class:`~xr_rasteragg.partials.Partials`.

    For a caller that finalizes the statistics of several calls from one pass
    (:class:`~xr_rasteragg.aggregator.RasterAggregator`), with :func:`finalize_blocks`.
    """
    labels, image = as_dask(labels, "labels"), None if image is None else as_dask(image, "image")
    labels, image = check_inputs(labels, image, ())
    (blocks,) = dask.compute(_merged_partials(labels, image, needs, None, split_every, split_every**2))
    return np.asarray(blocks)


def finalize_blocks(
    blocks: NDArray[Any],
    wanted: NDArray[np.integer] | None,
    stats: Sequence[str],
    nchan: int,
    space: Space | None = None,
) -> Aggregation:
    """NumPy values of ``stats`` for the labels ``wanted`` (None: every label of the partials),
    from computed partials (an object array, as :func:`pass_blocks` returns).

    A table of up to two pieces of labels is finalized here at once (:func:`_finalize_here`); a
    larger one in parallel pieces by the same graph as lazy results. (Two pieces in parallel cost
    more than the table at once: 200k labels, the nine statistics, through the accessor on
    NumPy-backed arrays took 1.16x as long in pieces of 2**17.)
    """
    space = space or Space()
    found = list(blocks.ravel())
    ids = label_union([part.labels for part in found]) if wanted is None else wanted
    if ids.shape[0] <= 2 * PIECE_LABELS:
        return Aggregation(ids, _finalize_here(blocks, ids, stats, space))
    kept = da.from_array(blocks, chunks=1, name=f"rasteragg-partials-{uuid.uuid4().hex}")
    values = finalized(kept, ids, stats, nchan, space)
    return Aggregation(ids, compute(values))


def _finalize_here(
    blocks: NDArray[Any], ids: NDArray[np.integer], stats: Sequence[str], space: Space
) -> dict[str, Any]:
    """The values of ``stats`` for ``ids`` from computed partials, finalized in this process.

    With shape features beside per-channel statistics, the statistics of the labels alone (the
    shape features among them: the ``"labels"`` group of :func:`stat_groups`) are finalized in
    a thread of their own while this thread finalizes the per-channel ones (the other groups, at
    once), each merging only the families it reads; otherwise everything is merged and
    finalized here, at once (always with dask's synchronous scheduler). One thread is kept for
    that work rather than dask's pool, whose threads ran the pass: the reference dataset's nine
    statistics and every shape feature through the accessor on NumPy-backed arrays, medians of
    11 alternating calls in one process (two runs), took 132.9 and 140.2 ms against 140.6 and
    145.7 ms finalized at once, where both groups in dask's pool made as many more page faults
    as they saved time. (The intensity-weighted centroid goes with this thread's statistics, as
    in :func:`stat_groups`: with the labels' it made this function 1.1-1.3 ms slower, 10.9
    against 9.5-9.7 ms.)
    """
    groups = stat_groups(stats)
    alone, channels = groups.get("labels"), groups.get("channels")
    if (
        alone is None
        or channels is None
        or set(alone[1]) <= {"counts", "valid"}  # count and center of mass: little to do
        or dask.base.get_scheduler() is dask.local.get_sync
    ):
        return dict(_finalize_piece(blocks, ids, stats, space).flat[0])
    shapes = _finalizer().submit(_finalize_parts, blocks, ids, alone[1], alone[0], space)
    values = dict(_finalize_parts(blocks, ids, channels[1], channels[0], space).flat[0])
    values.update(shapes.result().flat[0])
    return {name: values[name] for name in stats}


@functools.cache
def _finalizer() -> ThreadPoolExecutor:
    """The thread that finalizes the shape features of a table made in this process (see
    :func:`_finalize_here`). A process forked from this one makes its own: the parent's thread
    does not run in the child, whose copy of the executor would take work and never do it."""
    return ThreadPoolExecutor(1, thread_name_prefix="rasteragg-finalize")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_finalizer.cache_clear)


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

    Examples
    --------
    >>> locate(np.array([2, 5, 9]), np.array([9, 3, 2, 2**40]))
    (array([2, 1, 0, 2]), array([ True, False,  True, False]))
    """
    if index.dtype == ids.dtype and np.array_equal(index, ids):  # a piece of every label: no search
        return np.arange(ids.shape[0]), np.ones(ids.shape[0], np.bool_)
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
        :data:`BLOCK_PIXELS` pixels (:data:`GPU_BLOCK_PIXELS` for CuPy arrays), whatever its size
        (including zero-sized dims), one channel per chunk (NumPy images whose rows are
        contiguous) or all channels (others; see :func:`_channel_chunks`). On the local
        schedulers its blocks view ``array`` (:func:`~xr_rasteragg.block_views.view_blocks`):
        nothing is copied; under a ``distributed.Client`` they are slices of a copy, in the graph.
    """
    if isinstance(array, da.Array):
        return array
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        array = np.asarray(array)
    chunks: Any = "auto"
    if array.ndim in (3, 4):
        pixels = GPU_BLOCK_PIXELS if array_backend(array) == "cupy" else BLOCK_PIXELS
        chunks = (*_channel_chunks(array), *_spatial_chunks(array.shape[-3:], pixels))
    # A fresh name, not a token of the content: tokenizing reads the whole array (0.6 s for the
    # reference dataset; for device arrays, through a copy to the host).
    if distributed_client() is not None:
        # On a cluster each block travels to its worker alone: dask slices (a copy of) the array
        # into the graph, where the views' one array would travel whole to every worker.
        return da.from_array(array, chunks=chunks, asarray=False, name=f"{name}-{uuid.uuid4().hex}")
    # Locally, blocks that view the array: dask's from_array would copy it whole in every call.
    return view_blocks(array, chunks, name)


def _channel_chunks(array: Any) -> tuple[int, ...]:
    """The chunks of the leading dims of the in-memory ``array`` (see :func:`as_dask`).

    A NumPy image ``(c, z, y, x)`` whose rows are contiguous gets one channel per chunk, as
    dask inputs in DESIGN's reference chunking: the kernels read such chunks in place, and the
    whole-label gather's arrays of the labels' pixels stay one channel of a block (with all
    channels in one chunk they were 8x larger, mapped afresh in every call: the median of the
    reference dataset took 1.2x the CPU time). An image stored channel-last keeps its channels
    in one chunk (a chunk per channel would read the block's memory once per channel), and so
    do CuPy images (one launch per block); labels ``(z, y, x)`` have no leading dims.
    """
    if array.ndim == 4 and array_backend(array) == "numpy" and array.strides[-1] == array.itemsize:
        return (1,)
    return tuple(array.shape[:-3])


def _spatial_chunks(shape: Sequence[int], pixels: int = BLOCK_PIXELS) -> tuple[int, ...]:
    """Blocks of about ``pixels`` pixels, whole rows first."""
    if len(shape) != 3:
        return tuple(shape)
    nz, ny, nx = shape
    side = max(1, int(pixels**0.5))
    cy, cx = min(ny, side), min(nx, side)
    cz = max(1, min(nz, pixels // max(1, cy * cx)))
    return cz, cy, cx


def check_inputs(
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
class LabelStage:
    """A label block as the channel tasks of its spatial block receive it (see :func:`_label_task`).

    Attributes
    ----------
    backend
        The array backend of the block (``numpy``, ``cupy``).
    kernel
        The kernel chosen for the block's type.
    block
        The kernel's encoding of the labels for a kernel that runs in two stages, and the labels
        block itself for a kernel that takes whole blocks.
    offset
        The global (z, y, x) index of the block's first pixel.
    skip
        The label whose pixels are left out (the background), or None.
    """

    backend: str
    kernel: BlockKernel
    block: Any
    offset: tuple[int, int, int]
    skip: int | None


def _label_task(
    labels: Any,
    offset: tuple[int, int, int],
    skip: int | None,
    families: tuple[Family, ...] = (),
    frame: Frame | None = None,
) -> LabelStage:
    """The label stage of one spatial block (a dask task); ``families``: those of the labels
    alone, filled here by a staged kernel (once per block, whatever the number of channel
    groups); ``frame``: the pixels around the block, for a family whose kernel code reads a
    label's neighbourhood (staged kernels only)."""
    kernel = kernel_for(labels)
    if frame is not None:
        if not isinstance(kernel, FrameReader):
            raise TypeError(
                f"the kernel for {array_backend(labels)} blocks cannot read a label's neighbourhood"
            )
        block = kernel.encode_framed(labels, offset, skip, frame, families)
    elif isinstance(kernel, StagedKernel):
        block = kernel.encode(labels, offset, skip, families)
    else:
        block = labels
    return LabelStage(array_backend(labels), kernel, block, offset, skip)


def channel_partials(stage: LabelStage, image: list[Any] | None, needs: Needs) -> Partials:
    """Partials of one spatial block over a group of channel chunks, or of its labels alone."""
    backends = {stage.backend, *(array_backend(chunk) for chunk in image or [])}
    if len(backends) > 1:
        raise TypeError(f"a block mixes arrays from {sorted(backends)}; put labels and image on one device")
    if isinstance(stage.kernel, StagedKernel):
        return stage.kernel.channels(stage.block, image or None, needs)
    return stage.kernel(stage.block, image or None, stage.offset, needs, stage.skip)


def channel_groups(image: da.Array | None) -> list[tuple[int, int]]:
    """Channel ranges ``(start, stop)`` of whole channel chunks, grouped so that one task reads at
    most :data:`GROUP_BYTES` (or one chunk)."""
    if image is None:
        return [(0, 0)]
    block_bytes = image.dtype.itemsize * int(np.prod([max(c) for c in image.chunks[1:]]))
    groups = [(0, 0)]
    for channels in image.chunks[0]:
        start, stop = groups[-1]
        if stop > start and block_bytes * (stop - start + channels) > GROUP_BYTES:
            groups.append((stop, stop + channels))
        else:
            groups[-1] = (start, stop + channels)
    return groups


def _label_block(
    labels: Any, offset: NDArray[Any], *, skip: int | None, families: tuple[Family, ...]
) -> NDArray[Any]:
    """The label stage of one spatial block, at the offset that ``offset`` holds (a ``blockwise``
    task)."""
    return holding(_label_task(labels, offset.flat[0], skip, families), 3)


def _framed_label_block(
    labels: Any,
    offset: NDArray[Any],
    around: Any,
    *,
    cut: FrameCut,
    skip: int | None,
    families: tuple[Family, ...],
    shape: tuple[int, int, int],
    family: Family,
) -> NDArray[Any]:
    """The label stage of one spatial block with the pixels around it, its
    :class:`~xr_rasteragg.frames.Frame`, which ``cut`` cuts from ``around`` (the rings of the
    blocks around it, or every block of a small grid: see :func:`label_stages`), at the offset
    that ``offset`` holds (a ``blockwise`` task)."""
    at = offset.flat[0]
    frame = cut(labels, at, around, shape, family)
    return holding(_label_task(labels, at, skip, families, frame), 3)


def _channel_block(stage: NDArray[Any], image: list[Any] | None = None, *, needs: Needs) -> NDArray[Any]:
    """Partials of one spatial block over a group of channel chunks, or of its labels alone (a
    ``blockwise`` task)."""
    return holding(channel_partials(stage.flat[0], image, needs), 3)


def _join_block(*groups: NDArray[Any]) -> NDArray[Any]:
    """The partials of a spatial block's channel groups side by side (a ``map_blocks`` task)."""
    return holding(concat_channels([group.flat[0] for group in groups]), 3)


def _merge_block(block: NDArray[Any]) -> NDArray[Any]:
    """The merge of the partials in one block of the tree (a ``map_blocks`` task)."""
    return holding(merge(list(block.ravel())), block.ndim)


def _block_labels(block: NDArray[Any]) -> NDArray[Any]:
    """The label ids of the partials in one block (all that leaves the workers before finalization)."""
    return holding(block.flat[0].labels, block.ndim)


def _piece_rows(block: NDArray[Any], ids: NDArray[np.integer], families: tuple[str, ...]) -> NDArray[Any]:
    """One partial's rows of a piece of label ids (a ``blockwise`` task; see :func:`_rows_of`)."""
    return holding(_rows_of(block.flat[0], *_sorted_piece(ids), families), block.ndim + 1)


def _sorted_piece(ids: NDArray[np.integer]) -> tuple[NDArray[np.integer], bool]:
    """A piece's ids sorted and unique (for :func:`_rows_of`), and whether they came so: the
    ids of every label do, an ``index`` as the user gave it may not. Checked once per piece,
    not once per partial."""
    ordered = bool(np.all(ids[1:] > ids[:-1]))
    return (ids if ordered else np.unique(ids)), ordered


def _rows_of(part: Partials, ids: NDArray[np.integer], ordered: bool, families: tuple[str, ...]) -> Partials:
    """The rows of the labels ``ids`` (a piece of the result, sorted and unique: see
    :func:`_sorted_piece`) in the partial ``part``, in label order, with the fields of the named
    ``families`` only (those that the piece's statistics read).

    Ids that came ``ordered`` take the partial's rows between the first and the last id (a view);
    others (an ``index`` as the user gave it) take exactly the rows of their ids.
    """
    part = part.with_families(families)
    if ordered and ids.shape[0]:
        return part.rows(*rows_between(part.labels, int(ids[0]), int(ids[-1])))
    where, found = locate(part.labels, ids)
    return part.take(where[found])


def rows_between(ids: NDArray[np.integer], low: int, high: int) -> tuple[int, int]:
    """The rows of the sorted ``ids`` from ``low`` to ``high`` (Python ints, any range)."""
    info = np.iinfo(ids.dtype)
    low, high = max(low, int(info.min)), min(high, int(info.max))
    if low > high:
        return 0, 0
    start = int(np.searchsorted(ids, ids.dtype.type(low)))
    return start, int(np.searchsorted(ids, ids.dtype.type(high), side="right"))


def _finalize_piece(
    block: NDArray[Any], ids: NDArray[np.integer], stats: Sequence[str], space: Space
) -> NDArray[Any]:
    """Merge every partial's rows of a piece of label ids and finalize them (a ``blockwise`` task).

    ``block`` holds each partial's rows for the piece (see :func:`_piece_rows`) and ``ids`` the
    ids of the piece; the result is a dict of one array per statistic, one row per id.
    """
    merged = merge(final_parts(list(block.ravel()), space))
    return holding(finalize(merged, stats, *locate(merged.labels, ids), space), 1)


def final_parts(parts: list[Partials], space: Space) -> list[Partials]:
    """Partials for the last merge before finalization: for labels in (y, x), whose solidity
    reads the vertices only of the labels whose pixels no block counted, their hulls merge lean
    (:attr:`~xr_rasteragg.families.Hull.lean`)."""
    if space.axes != (1, 2):
        return parts
    return [part.with_family(Hull(lean=True)) for part in parts]


def _finalize_parts(
    block: NDArray[Any],
    ids: NDArray[np.integer],
    families: tuple[str, ...],
    stats: Sequence[str],
    space: Space,
) -> NDArray[Any]:
    """:func:`_finalize_piece` of the partials themselves (all of them, in ``block``): each one's
    rows of the piece are taken here (a ``blockwise`` task, on the local schedulers)."""
    rows = np.empty(block.size, dtype=object)
    piece = _sorted_piece(ids)
    rows[:] = [_rows_of(part, *piece, families) for part in block.ravel()]
    return _finalize_piece(rows, ids, stats=stats, space=space)


def label_stages(labels: da.Array, skip: int | None, needs: Needs | None = None) -> da.Array:
    """The label stage of every spatial block (:class:`LabelStage`), an object array of one per block.

    Its tasks (``rasteragg-labels-…``, under dask's array query planning as well) are named
    after the labels, ``skip`` and the families of the labels alone in ``needs`` (the shape
    features', which the stage fills once per block, whatever the number of channel groups),
    each reading its block's offset from :func:`~xr_rasteragg.frames.offset_array`, so that
    graphs built on the same labels (the moment statistics' pass and the whole-label gather of
    one call) share them: computed together, each label block is encoded once. When a family
    of ``needs`` reads a label's neighbourhood (the perimeter's), each block's stage gets the
    frame of pixels around it, cut from the rings (the pixels near the edges) of the blocks
    around it; on the local schedulers, a small grid's label tasks
    (:func:`~xr_rasteragg.frames.gathers`) get every label block instead, and cut the frame
    from the blocks around theirs.
    """
    families = tuple(f for f in needs.more if not f.channel) if needs is not None else ()
    halo = [f for f in families if f.halo] if labels.size else []
    offsets = offset_array(labels)
    common = {
        "skip": skip, "families": families, "token": "rasteragg-labels", "dtype": object, "meta": objects(3),
        "concatenate": False, "align_arrays": False, "adjust_chunks": {"z": 1, "y": 1, "x": 1},
    }  # fmt: skip
    if not halo:
        return da.blockwise(_label_block, "zyx", labels, "zyx", offsets, "zyx", **common)
    (family,) = halo
    shape = tuple(int(n) for n in labels.shape)
    if gathers(labels) and distributed_client() is None:
        # The blocks are in this process, where handing a task every block costs nothing. The
        # rings' tasks ran before any label task: without them, the reference dataset's shape
        # call on NumPy-backed arrays starts its label tasks 3 ms sooner (7.0 against 10.0 ms
        # into the call). On a cluster only the rings travel.
        return da.blockwise(
            _framed_label_block, "zyx", labels, "zyx", offsets, "zyx", labels, "ZYX",
            cut=frame_in_grid, shape=shape, family=family, **common,
        )  # fmt: skip
    return da.blockwise(
        _framed_label_block, "zyx", labels, "zyx", offsets, "zyx", frame_arrays(labels, family.halo), "zyx",
        cut=frame_from_rings, shape=shape, family=family, **common,
    )  # fmt: skip


def _merged_partials(
    labels: da.Array, image: da.Array | None, needs: Needs, skip: int | None, split_every: int, left: int
) -> da.Array:
    """The graph of the pass: label and channel tasks per spatial block, and a tree merge.

    Each spatial block has a label task, one task per group of channel chunks (the block's
    partials for those channels) and, with several groups, a join of their channels. The tree
    merges the blocks' partials along the most divided axis, ``split_every`` at a time, until at
    most ``left`` are left. The result is an object array with one :class:`Partials` per block.
    Task names say what the task does (``rasteragg-labels-…``, ``channel_block-…``,
    ``rasteragg-merge-…``), so that the dask dashboard shows the stages apart. (``blockwise`` tasks
    keep dask's names, after their function: a ``name=`` breaks them under query planning.)
    """
    token = dask.base.tokenize(labels.name, None if image is None else image.name, needs, skip, split_every)
    stage = label_stages(labels, skip, needs)
    groups = []
    for start, stop in channel_groups(image):
        pixels = [] if image is None else [image[start:stop], "czyx"]
        groups.append(
            da.blockwise(
                _channel_block,
                "zyx",
                stage,
                "zyx",
                *pixels,
                needs=needs,
                dtype=object,
                meta=objects(3),
                concatenate=False,
                align_arrays=False,
            )
        )
    return merge_tree(groups, split_every, left, token)


def merge_tree(groups: Sequence[da.Array], split_every: int, left: int, token: str) -> da.Array:
    """The tree merge of a pass's partials (see :func:`_merged_partials`).

    ``groups`` are object arrays of one :class:`Partials` per spatial block, one per group of
    channel chunks (see :func:`channel_groups`); a spatial block's groups are joined side by
    side, then merged along the most divided axis, ``split_every`` at a time, until at most
    ``left`` are left (:func:`~xr_rasteragg.object_arrays.tree_reduce`). ``token`` names the
    tasks.
    """
    parts = groups[0]
    if len(groups) > 1:
        parts = da.map_blocks(
            _join_block, *groups, dtype=object, meta=objects(3), name=f"rasteragg-join-{token}"
        )
    return tree_reduce(parts, _merge_block, split_every, left=left, name="rasteragg-merge", token=token)


def row_bytes(stats: Sequence[str], nchan: int, ndim: int = 3) -> int:
    """Bytes of one label in a piece of finalization, for ``nchan`` channels and ``ndim``-D labels:
    the larger of its partials (which the piece merges; fields of the image dtype counted as
    float64, the widest) and its values of these statistics."""
    specs = [STATISTICS[name] for name in stats]
    values = sum(spec.dtype.itemsize * int(np.prod(spec.row_shape(nchan, ndim))) for spec in specs)
    fields = [field for family in needs_of(stats).families for field in family.fields()]
    widths = [1 if f.width is None else nchan if f.width == "c" else int(f.width) for f in fields]
    partials = sum(f.dtype(np.dtype(np.float64)).itemsize * w for f, w in zip(fields, widths, strict=True))
    return max(values, partials)


def piece_labels(row: int) -> int:
    """Labels per piece of finalization (and rows per chunk of the results) for rows of ``row`` bytes.

    :data:`PIECE_LABELS`, or fewer, so that one piece's rows (its partials, and its values of
    every statistic: :func:`row_bytes`) stay within dask's ``array.chunk-size`` (128 MiB by
    default): with 60 channels and the nine statistics, a piece of :data:`PIECE_LABELS` labels
    would merge almost 0.5 GiB of partials in each task, and hand as much of values to the client
    for each chunk that it computes.

    Examples
    --------
    >>> piece_labels(row_bytes(["mean"], nchan=4))
    131072
    >>> with dask.config.set({"array.chunk-size": "1 MiB"}):
    ...     piece_labels(row_bytes(["mean", "max"], nchan=64))
    504
    """
    budget = dask.utils.parse_bytes(dask.config.get("array.chunk-size"))
    return int(max(1, min(PIECE_LABELS, budget // max(row, 1))))


def stat_groups(stats: Sequence[str]) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """``stats`` in the groups that are finalized apart, by the families they read: their names,
    and the names of those families (the counts always, and the valid counts where NaNs are
    skipped).

    The groups are ``"channels"``, the statistics that read per-channel sums (the intensity
    moments, extrema and weighted sums: the intensity statistics and the intensity-weighted
    centroid), and ``"labels"``, those of the labels alone (count, center of mass, the other
    shape features). Computing the second (as the SpatialData adapter does for the table's
    ``obs`` and ``obsm``) does not finalize the intensity statistics, which are computed once,
    when the table is written; and neither group merges the other's families (the shape
    features' hulls, the moments). (The weighted centroid in a third group of its own, as it
    was, made the reference dataset's shape call on dask arrays 3-4.5 ms slower, medians of 15
    alternating calls: dask ordered its lone task after every other.)

    Examples
    --------
    >>> groups = stat_groups(["mean", "area", "count", "centroid_weighted"])
    >>> groups["channels"]
    (('mean', 'centroid_weighted'), ('counts', 'moments', 'valid', 'weighted'))
    >>> groups["labels"]
    (('area', 'count'), ('counts', 'geometry', 'valid'))
    """
    groups: dict[str, list[str]] = {}
    for name in stats:
        channel = any(f.channel for f in STATISTICS[name].needs.families)
        groups.setdefault("channels" if channel else "labels", []).append(name)
    read = {key: {"counts", "valid"} for key in groups}
    for key, names in groups.items():
        read[key].update(f.name for name in names for f in STATISTICS[name].needs.families)
    return {key: (tuple(names), tuple(sorted(read[key]))) for key, names in groups.items()}


def finalized(
    parts: da.Array,
    ids: NDArray[np.integer],
    stats: Sequence[str],
    nchan: int,
    space: Space | None = None,
    step: int | None = None,
) -> dict[str, da.Array]:
    """Dask arrays of the statistics for ``ids``, one task per piece of ``step`` ids (by default
    :func:`piece_labels` of the statistics' rows).

    One task per piece and group of statistics (:func:`stat_groups`) merges every partial's rows
    of the piece's ids and finalizes the group's statistics; each statistic takes its rows from
    the pieces. Under a ``distributed.Client`` the rows are cut
    where each partial is, by a task per partial and piece, so that a piece's task receives only
    its rows; on the local schedulers the piece's task cuts them itself. Nothing but the ids goes
    through the client.
    """
    k = int(ids.shape[0])
    space = space or Space()
    step = step or piece_labels(row_bytes(stats, nchan, space.ndim))
    sizes = tuple(min(step, k - start) for start in range(0, k, step)) or (0,)
    token = uuid.uuid4().hex  # not a token of the ids, which would read them all
    # On a cluster, a task per partial and piece sends each piece's task only its rows; locally
    # (where every task sees every partial) those 2 x 64 x 39 tasks of the 10^7-label table
    # cost more to schedule than to run.
    local = distributed_client() is None
    pieces_of_ids = da.from_array(ids, chunks=(sizes,), name=f"rasteragg-ids-{token}")
    # Each group of statistics (:func:`stat_groups`) is finalized in pieces of its own.
    values = {}
    for names, families in stat_groups(stats).values():
        if local:
            # Blockwise over the pieces with the partials' axes contracted: each piece's task gets
            # every partial (in this process's memory: nothing moves) and takes its rows itself.
            pieces = da.blockwise(
                _finalize_parts, "p", parts, "zyx", pieces_of_ids, "p", families,  None,
                stats=tuple(names), space=space, dtype=object, meta=objects(1), concatenate=True,
                align_arrays=False, adjust_chunks={"p": 1},
            )  # fmt: skip
        else:
            rows = da.blockwise(
                _piece_rows, "zyxp", parts, "zyx", pieces_of_ids, "p", families,  None,
                dtype=object, meta=objects(4), align_arrays=False, adjust_chunks={"p": 1},
            )  # fmt: skip
            # As above, but each piece's task gets only its rows of every partial: a task per
            # partial and piece cuts them where the partial is.
            pieces = da.blockwise(
                _finalize_piece, "p", rows, "zyxp", pieces_of_ids, "p",
                stats=tuple(names), space=space, dtype=object, meta=objects(1), concatenate=True,
                align_arrays=False, adjust_chunks={"p": 1},
            )  # fmt: skip
        for name in names:
            width, dtype = STATISTICS[name].row_shape(nchan, space.ndim), STATISTICS[name].dtype
            trailing = list(range(1, 1 + len(width)))
            values[name] = pieces.map_blocks(
                pick, name, dtype=dtype, chunks=(sizes, *((w,) for w in width)), new_axis=trailing or None,
                meta=np.empty((0,) * (1 + len(width)), dtype), name=f"rasteragg-{name}-{token}",
            )  # fmt: skip
    return {name: values[name] for name in stats}


def aggregate_masks(
    masks: Mapping[str, tuple[Any, Any]],
    stats: str | Iterable[str],
    *,
    background: int | None = None,
    skipna: bool = False,
    split_every: int = SPLIT_EVERY,
    eager: bool = False,
    spaces: Mapping[str, Space] | None = None,
) -> dict[str, Aggregation]:
    """Per-label statistics over several label masks, with one read of the image for all of them.

    Each mask's pass is built as in :func:`aggregate`, and the passes run in one computation:
    dask runs a task that several graphs share once, so each block of an image that the masks
    share (one dask array, or crops of one) is read once and handed to every mask's kernel.

    Parameters
    ----------
    masks
        For each name, ``(labels, image)`` as :func:`aggregate` takes them. Give the masks one
        image (the same dask array, crops of it, or the same NumPy array) to read it once; a
        NumPy image given for several masks is split into blocks once.
    stats, background, skipna, split_every, eager
        As in :func:`aggregate`, the same for every mask.
    spaces
        For each name, ``space`` as in :func:`aggregate` (for the shape features); a name that is
        not there (or None for all) gets all three axes, spacing 1.

    Returns
    -------
    dict
        One :class:`Aggregation` per name, in the order of ``masks``; lazy or NumPy as
        :func:`aggregate` returns it (without an ``index``: every label present, sorted).
    """
    stats = validate_stats(stats)
    if split_every < 2:
        raise ValueError(f"'split_every' must be at least 2 partials per merge; got {split_every}")
    check_background(background)
    if not isinstance(masks, Mapping) or not masks:
        raise TypeError(f"'masks' must be a non-empty mapping of names to (labels, image); got {masks!r}")
    space = {name: (spaces or {}).get(name) or Space() for name in masks}
    for one in space.values():
        check_space(stats, one)
    lazy = not eager and any(isinstance(array, da.Array) for pair in masks.values() for array in pair)
    blocked: dict[int, da.Array] = {}  # one dask array per in-memory image, shared by its masks
    inputs = {}
    for name, (labels, image) in masks.items():
        if image is not None and not isinstance(image, da.Array):
            image = blocked.setdefault(id(image), as_dask(image, "image"))
        inputs[name] = (as_dask(labels, f"labels-{name}"), image)
    if any(STATISTICS[name].whole is not None for name in stats):
        return _gathered_masks(inputs, stats, background, skipna, split_every, lazy, space)
    needs = needs_of(stats, skipna)
    parts, nchan = {}, {}
    for name, (labels, image) in inputs.items():
        checked, pixels = check_inputs(labels, image, stats)
        parts[name] = _merged_partials(checked, pixels, needs, background, split_every, split_every**2)
        nchan[name] = 0 if pixels is None else int(pixels.shape[0])
    kept = dict(zip(parts, dask.persist(*parts.values()), strict=True))
    for part in kept.values():
        _show_progress(part)
    if not lazy:
        return {name: _eager(part, None, stats, nchan[name], space[name]) for name, part in kept.items()}
    blocks = [
        part.map_blocks(_block_labels, dtype=object, meta=objects(3), name=f"{part.name}-ids")
        for part in kept.values()
    ]
    found = dask.compute(*blocks)
    out = {}
    for (name, part), ids in zip(kept.items(), found, strict=True):
        wanted = label_union(list(ids.ravel()))
        out[name] = Aggregation(wanted, finalized(part, wanted, stats, nchan[name], space[name]))
    return out


def _gathered_masks(
    inputs: Mapping[str, tuple[da.Array, da.Array | None]],
    stats: Sequence[str],
    background: int | None,
    skipna: bool,
    split_every: int,
    lazy: bool,
    space: Mapping[str, Space],
) -> dict[str, Aggregation]:
    """:func:`aggregate_masks` with whole-label statistics: each mask's labels are surveyed now
    (:func:`xr_rasteragg.gather.aggregate`), and its image pass is left as a graph; the masks'
    graphs, computed together, read the image's blocks once."""
    out = {
        name: aggregate(
            labels,
            image,
            stats,
            background=background,
            skipna=skipna,
            split_every=split_every,
            space=space[name],
        )
        for name, (labels, image) in inputs.items()
    }
    if lazy:
        return out
    (values,) = dask.compute({name: result.values for name, result in out.items()})
    return {name: Aggregation(result.labels, values[name]) for name, result in out.items()}
