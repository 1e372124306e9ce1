"""Dask arrays over in-memory (NumPy, CuPy) arrays whose blocks view the array, never copy it.

:func:`dask.array.from_array` copies an in-memory array whole before it splits it (dask 2026.1:
``x = x.copy()``, on the legacy graph and under array query planning alike), and
under query planning it names the array by a token of its content, which reads it all. For
the engine's NumPy inputs that copy cost as much as reading the data once more in every call
(0.1 s for DESIGN's reference dataset: the image and its labels, into fresh memory, which NumPy
advises the kernel to back with huge pages; see :mod:`xr_rasteragg.in_memory`), and more under
memory pressure.
:func:`view_blocks` hands ``from_array`` the array behind a small wrapper that has no ``copy``
and a token of its own, so each block is a slice of the caller's array (a view, for NumPy and
CuPy), taken when the block's task runs.
"""

from __future__ import annotations

import uuid
from typing import Any

import dask.array as da

__all__ = ["Held", "view_blocks"]


class Held:
    """An in-memory array held in a graph under a token of its own: :func:`dask.array.from_array`
    reads it by slices (it has the ``shape``, ``dtype`` and ``ndim`` that dask looks for and no
    ``copy``), and tasks may write into it (:mod:`xr_rasteragg.in_memory`); dask neither copies
    nor tokenizes the array (which would read it all).
    """

    def __init__(self, array: Any, token: str) -> None:
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = array.dtype
        self.ndim = array.ndim
        self.token = token

    def __getitem__(self, key: Any) -> Any:
        return self.array[key]

    def __dask_tokenize__(self) -> str:
        return self.token


def view_blocks(array: Any, chunks: Any, name: str) -> da.Array:
    """A dask array over the in-memory ``array``, in ``chunks``, whose blocks are views of it.

    Parameters
    ----------
    array
        A NumPy or CuPy array (or any array that slices into views of its own type).
    chunks
        The chunks, as :func:`dask.array.from_array` takes them.
    name
        The start of the graph name; a fresh id follows it, so two calls never share blocks.

    Returns
    -------
    dask.array.Array
        Blocks of ``array``'s type (its ``meta``), read by slicing ``array`` when computed.

    Examples
    --------
    >>> import numpy as np
    >>> data = np.arange(12).reshape(3, 4)
    >>> blocks = view_blocks(data, (2, 2), "data")
    >>> blocks.chunks
    ((2, 1), (2, 2))
    >>> views = blocks.map_blocks(lambda block: np.full((1, 1), np.shares_memory(block, data)), chunks=(1, 1))
    >>> bool(views.all().compute())
    True
    """
    token = f"{name}-{uuid.uuid4().hex}"
    meta = array[(slice(0, 0),) * array.ndim]
    return da.from_array(Held(array, token), chunks=chunks, asarray=False, meta=meta, name=token)
