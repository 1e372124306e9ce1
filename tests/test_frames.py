"""The frame of pixels around each label block (:mod:`xr_rasteragg.frames`) against slices of the image."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import pytest

from xr_rasteragg.families import Border
from xr_rasteragg.frames import Frame, frame_arrays

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
    gathered = around.numblocks == (1, 1, 1)  # the rings of every block, for each block
    assert gathered or around.numblocks == array.numblocks  # on the block grid
    everything = around.compute()  # each block's neighbourhood of rings, side by side
    at = [np.cumsum((0, *c)) for c in around.chunks]
    d = 2
    starts = [np.cumsum((0, *c)) for c in array.chunks]
    for k, j, i in np.ndindex(*array.numblocks):
        (z0, z1), (y0, y1), (x0, x1) = ((s[n], s[n + 1]) for s, n in zip(starts, (k, j, i), strict=True))
        block = labels[z0:z1, y0:y1, x0:x1]
        rings = (
            list(everything.ravel())
            if gathered
            else list(
                everything[at[0][k] : at[0][k + 1], at[1][j] : at[1][j + 1], at[2][i] : at[2][i + 1]].ravel()
            )
        )
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


@pytest.mark.parametrize(
    ("chunks", "gathered"),
    [((2, 3, 4), True), ((2, 3, 3), False), ((2, 4, 1), False), ((1, 5, 5), False), ((2, 5, 5), True)],
    ids=str,
)
def test_small_grids_gather_the_rings_in_one_task(chunks: Any, gathered: bool) -> None:
    """A grid of one block in z and at most 3 blocks in y and in x gets every block's ring in
    one block (one task); larger grids, each block's neighbourhood by dask's overlap."""
    from xr_rasteragg.frames import GATHERED

    array = da.from_array(np.ones((2, 9, 11), np.int32), chunks=chunks)
    around = frame_arrays(array, 2)
    assert (around.numblocks == (1, 1, 1)) == gathered
    assert gathered == (array.numblocks[0] == 1 and max(array.numblocks[1:]) <= GATHERED)
    if gathered:
        assert len(around.compute().ravel()) == int(np.prod(array.numblocks))
