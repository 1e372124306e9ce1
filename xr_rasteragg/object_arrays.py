"""Object arrays of per-block items in dask graphs, and their tree reduction.

The engine's pass and the whole-label gather carry what their tasks make (label stages,
partials, lists of ids) as dask arrays of dtype object with one item per block: each block is
a NumPy object array of shape ``(1,) * ndim`` (:func:`holding`), so that ``map_blocks``,
``blockwise`` and ``rechunk`` move them like any array, on the legacy graph and under dask's
array query planning alike. :func:`tree_reduce` combines such items a few at a time until few
are left (the merge of the partials, the survey's union of label ids).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np
from numpy.typing import NDArray

__all__ = ["holding", "objects", "pick", "tree_reduce"]


def objects(ndim: int) -> NDArray[Any]:
    """The ``meta`` of an object array of per-block items (partials, stages) with ``ndim`` dims."""
    return np.empty((0,) * ndim, dtype=object)


def holding(item: Any, ndim: int) -> NDArray[Any]:
    """An object array of shape ``(1,) * ndim`` holding ``item``: one block of an array of items."""
    out = np.empty((1,) * ndim, dtype=object)
    out.flat[0] = item
    return out


def pick(piece: NDArray[Any], name: str) -> Any:
    """One statistic's rows of a finalized piece, a dict by statistic (a ``map_blocks`` task)."""
    return piece.flat[0][name]


def tree_reduce(
    items: da.Array,
    combine: Callable[[NDArray[Any]], NDArray[Any]],
    split_every: int,
    *,
    left: int = 1,
    name: str,
    token: str,
) -> da.Array:
    """Combine the items of an object array, ``split_every`` blocks at a time, until at most
    ``left`` blocks are left.

    Each level rechunks the most divided axis to ``split_every`` blocks per chunk and combines
    each chunk into one block with ``combine`` (a ``map_blocks`` task that gets the chunk's
    items as an object array and returns :func:`holding` of one item, with the chunk's number
    of dims). The tasks of a level are named ``{name}-{level}-{token}``.

    Parameters
    ----------
    items
        An object array with one item per block.
    combine
        Combines the items of one chunk into one.
    split_every
        How many blocks one ``combine`` task gets, at least 2.
    left
        Stop when at most this many blocks are left (1: one item).
    name, token
        The start and end of the tasks' names.

    Returns
    -------
    dask.array.Array
        The combined items, one per block, with the dims of ``items``.
    """
    level = 0
    while int(np.prod(items.numblocks)) > left:
        axis = int(np.argmax(items.numblocks))
        items = items.rechunk({axis: split_every})
        chunks = list(items.chunks)
        chunks[axis] = (1,) * items.numblocks[axis]
        items = da.map_blocks(
            combine,
            items,
            dtype=object,
            chunks=tuple(chunks),
            meta=objects(items.ndim),
            name=f"{name}-{level}-{token}",
        )
        level += 1
    return items
