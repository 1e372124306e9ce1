"""The frame of pixels around each label block (:mod:`xr_rasteragg.frames`) against slices of the image."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import pytest

from xr_rasteragg.families import Border
from xr_rasteragg.frames import Frame, Ring, block_offsets, frame_arrays, frame_in_grid, gathers

CHUNKS = [
    (2, 9, 11),
    (1, 1, 1),
    (2, 2, 3),
    (2, (1, 8), (3, 1, 7)),
    (2, (1, 1, 7), (1, 9, 1)),
    (2, 9, 1),
    (1, 5, 5),
]


@pytest.mark.parametrize("chunks", CHUNKS, ids=str)
def test_each_block_sees_its_neighbourhood(chunks: Any) -> None:
    labels = np.arange(2 * 9 * 11, dtype=np.int32).reshape(2, 9, 11) + 1
    array = da.from_array(labels, chunks=chunks)
    around = frame_arrays(array, 2)
    assert around.numblocks == array.numblocks  # on the block grid
    everything = around.compute()  # each block's neighbourhood of rings, side by side
    at = [np.cumsum((0, *c)) for c in around.chunks]
    d = 2
    starts = [np.cumsum((0, *c)) for c in array.chunks]
    for k, j, i in np.ndindex(*array.numblocks):
        (z0, z1), (y0, y1), (x0, x1) = ((s[n], s[n + 1]) for s, n in zip(starts, (k, j, i), strict=True))
        block = labels[z0:z1, y0:y1, x0:x1]
        near = everything[at[0][k] : at[0][k + 1], at[1][j] : at[1][j + 1], at[2][i] : at[2][i + 1]]
        rings = list(near.ravel())
        frame = Frame.around(block, (z0, y0, x0), rings, labels.shape, Border())
        top, bottom, left, right, top_left, top_right, bottom_left, bottom_right = frame.pieces
        widened = np.block(
            [[top_left, top, top_right], [left, block, right], [bottom_left, bottom, bottom_right]]
        )
        v0, v1, u0, u1 = frame.valid((z0, y0, x0), block.shape)
        expected = labels[z0:z1, max(y0 - d, 0) : y1 + d, max(x0 - d, 0) : x1 + d]
        np.testing.assert_array_equal(widened[:, v0:v1, u0:u1], expected)
        assert (v1 - v0, u1 - u0) == expected.shape[1:]
        assert v0 == d - min(d, y0)
        assert u0 == d - min(d, x0)
        outside = np.ones(widened.shape, bool)
        outside[:, v0:v1, u0:u1] = False
        assert not widened[outside].any()  # pixels beyond the image are 0


class _OnDevice:
    """A stand-in for a block on a device (as CuPy's arrays: sliced lazily, ``get`` copies to the host)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.shape = values.shape

    def __getitem__(self, key: Any) -> _OnDevice:
        return _OnDevice(self.values[key])

    def get(self) -> np.ndarray:
        return self.values.copy()


@pytest.mark.parametrize("device", [False, True], ids=["numpy", "device"])
@pytest.mark.parametrize("chunks", [c for c in CHUNKS if gathers(da.ones((2, 9, 11), chunks=c))], ids=str)
def test_frame_in_grid_equals_the_frame_from_rings(chunks: Any, device: bool) -> None:
    """A small grid's frame cut from the blocks around it (read in place, or a device block's
    ring) equals the frame cut from every block's ring, thin blocks included."""
    labels = np.arange(2 * 9 * 11, dtype=np.int32).reshape(2, 9, 11) + 1
    array = da.from_array(labels, chunks=chunks)
    offsets = block_offsets(array)
    blocks = np.empty(array.numblocks, dtype=object)
    for index in np.ndindex(*array.numblocks):
        where = zip(offsets[index], array.chunks, index, strict=True)
        blocks[index] = labels[tuple(slice(start, start + sizes[i]) for start, sizes, i in where)]
    rings = [Ring.of(blocks[i], offsets[i], 2) for i in np.ndindex(*array.numblocks)]
    grid = [[[_OnDevice(b) if device else b for b in row] for row in plane] for plane in blocks.tolist()]
    for index in np.ndindex(*array.numblocks):
        block, offset = blocks[index], offsets[index]
        assert offset == tuple(int(np.sum(c[:i])) for c, i in zip(array.chunks, index, strict=True))
        expected = Frame.around(block, offset, rings, labels.shape, Border())
        frame = frame_in_grid(block, offset, grid, labels.shape, Border())
        for piece, want in zip(frame.pieces, expected.pieces, strict=True):
            np.testing.assert_array_equal(piece, want)


@pytest.mark.parametrize(
    ("chunks", "stats", "in_grid"),
    [
        ((1, 5, 6), ["perimeter"], True),
        ((1, 9, 11), ["perimeter"], True),
        ((1, 3, 3), ["perimeter"], False),
        ((1, 5, 6), ["area"], False),
    ],
    ids=str,
)
def test_label_tasks_keep_their_name(chunks: Any, stats: list[str], in_grid: bool) -> None:
    """The label tasks are ``rasteragg-labels-…`` (with dask's array query planning too: CI runs
    this file both ways), whether they read no frame, a frame cut from rings, or (on the local
    schedulers, a small grid) a frame cut from every label block: then there are no ring tasks.
    A larger grid's get rings (as every grid's do on a cluster: ``test_distributed``)."""
    from xr_rasteragg.engine import label_stages
    from xr_rasteragg.stats import needs_of

    labels = da.from_array(np.ones((1, 9, 11), np.int32), chunks=chunks)
    stages = label_stages(labels, 0, needs_of(stats, False))
    keys = [key[0] if isinstance(key, tuple) else key for key in dict(stages.__dask_graph__())]
    assert stages.numblocks == labels.numblocks
    assert stages.name.startswith("rasteragg-labels-")
    assert sum(str(key).startswith("rasteragg-labels-") for key in keys) == int(np.prod(labels.numblocks))
    assert any("rasteragg-rings" in str(key) for key in keys) == (stats == ["perimeter"] and not in_grid)
    offsets = [stage.offset for stage in stages.compute().ravel()]
    assert offsets == list(block_offsets(labels).ravel())


@pytest.mark.parametrize("width", [1, 2, 63, 64, 65, 130])
@pytest.mark.parametrize("kind", ["random", "blocky", "one label"])
def test_the_perimeter_reading_counts_the_runs_as_the_encoding_does(width: int, kind: str) -> None:
    """The perimeter's kernel code reads the block and its frame before the block is encoded,
    and gives the encoding its bounds on runs and labels from its own bit masks: the very
    counts of the pass it spares (``_count_runs``), for blocks across 64-pixel words, at every
    position in the image (frames cut at its edges), planes of one row included."""
    from xr_rasteragg.kernels.numba import _count_runs, _flat_rows
    from xr_rasteragg.kernels.numba_shape import border_rows

    rng = np.random.default_rng(width)
    shape = (1, 7, 3 * width)
    if kind == "random":
        labels = rng.integers(0, 4, shape).astype(np.int32)
    elif kind == "blocky":
        labels = np.repeat(np.repeat(rng.integers(0, 5, (1, 3, 3 * width)), 3, axis=1), 1, axis=2)[:, :7]
        labels = np.ascontiguousarray(labels).astype(np.uint16)
    else:
        labels = np.full(shape, 9, np.int64)
    array = da.from_array(labels, chunks=(1, (1, 3, 3), width))
    offsets = block_offsets(array)
    rings = []
    blocks = {}
    for index in np.ndindex(*array.numblocks):
        where = zip(offsets[index], array.chunks, index, strict=True)
        cut = tuple(slice(start, start + sizes[i]) for start, sizes, i in where)
        block = np.ascontiguousarray(labels[cut])
        blocks[index] = block
        rings.append(Ring.of(block, offsets[index], 2))
    for index, block in blocks.items():
        frame = Frame.around(block, offsets[index], rings, labels.shape, Border())
        _, nmax, kmax = border_rows(frame, block, offsets[index])
        flat, starts = _flat_rows(block)
        assert (nmax, kmax) == tuple(int(n) for n in _count_runs(flat, starts, block.shape[2])), index
