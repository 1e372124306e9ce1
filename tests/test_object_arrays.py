"""The tree reduction of object arrays that the engine's merge and the gather's survey share."""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest

from xr_rasteragg.object_arrays import holding, tree_reduce


def _union(block: np.ndarray) -> np.ndarray:
    """The sorted union of the blocks' lists (a combine task)."""
    return holding(sorted(set().union(*block.ravel())), block.ndim)


def _items(numblocks: tuple[int, int, int]) -> tuple[da.Array, list[Any]]:
    """An object array of one list per block, and the lists in order."""
    cells = np.empty(numblocks, dtype=object)
    lists = [[i, 10_000 + i] for i in range(int(np.prod(numblocks)))]
    for where, items in zip(np.ndindex(numblocks), lists, strict=True):
        cells[where] = items
    return da.from_array(cells, chunks=1, name=False), lists


@pytest.mark.parametrize("numblocks", [(1, 1, 1), (1, 3, 7), (2, 9, 4), (3, 17, 1)])
@pytest.mark.parametrize("split_every", [2, 3, 8])
@pytest.mark.parametrize("left", [1, 4, 9])
def test_tree_reduce_combines_every_item(
    numblocks: tuple[int, int, int], split_every: int, left: int
) -> None:
    items, lists = _items(numblocks)
    reduced = tree_reduce(items, _union, split_every, left=left, name="test-union", token="t")
    assert reduced.dtype == object
    assert reduced.ndim == 3
    assert int(np.prod(reduced.numblocks)) <= left
    if int(np.prod(numblocks)) <= left:  # nothing to combine
        assert reduced.name == items.name
    else:
        assert reduced.name.startswith("test-union-")  # array-expr appends a token of its own
    (found,) = dask.compute(reduced)
    assert sorted(x for block in found.ravel() for x in block) == sorted(x for one in lists for x in one)
