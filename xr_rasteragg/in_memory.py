"""Lazy results computed into this process's memory: each result allocated once, on ordinary pages.

``dask.compute`` of a result chunked in pieces of labels keeps every piece until the end and then
copies them into one new array (dask's ``concatenate3``): the table is in memory twice at the peak,
and both copies are fresh memory that NumPy asks the kernel to back with huge pages
(``madvise(MADV_HUGEPAGE)`` for arrays of 4 MiB and more). Where the kernel's transparent huge
pages are set to ``defrag=madvise`` and no huge page is free, every first write to such memory
waits for the kernel to compact memory (`numpy#31590`_). On the machine of the benchmarks that
made the first write of 320 MB take 0.5-1.1 s against 0.1-0.3 s on ordinary pages, and computing
the 2.9 GB table of 10^7 labels (all statistics, 4 channels) 1.4-1.8x slower than finalizing it
into one array on ordinary pages.

On the local schedulers (threads, sync), where tasks write into this process's memory,
:func:`compute` allocates each result once, on an anonymous memory map for large ones (ordinary
pages, zeroed by the kernel as they are first written), and each task writes its piece into
place as soon as it is computed, so the pieces are freed as the computation goes on. Elsewhere
(``dask.distributed``, the processes scheduler) it is ``dask.compute``.

.. _numpy#31590: https://github.com/numpy/numpy/issues/31590
"""

from __future__ import annotations

import mmap
import uuid
from collections.abc import Mapping
from typing import Any, TypeVar, overload

import dask
import dask.array as da
import dask.local
import dask.threaded
import numpy as np
import xarray as xr
from numpy.typing import DTypeLike, NDArray

from .block_views import Held

__all__ = ["MAPPED_BYTES", "compute", "empty"]

#: Results of at least this many bytes are allocated on an anonymous memory map (NumPy advises
#: huge pages from 4 MiB on).
MAPPED_BYTES = 4 * 2**20

Table = TypeVar("Table", xr.Dataset, xr.DataArray)


def empty(shape: tuple[int, ...], dtype: DTypeLike) -> NDArray[Any]:
    """An uninitialised array; one of :data:`MAPPED_BYTES` or more on an anonymous memory map.

    Examples
    --------
    >>> a = empty((2**20, 4), np.float64)
    >>> a.shape, a.dtype, a.flags.writeable
    ((1048576, 4), dtype('float64'), True)
    """
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize < MAPPED_BYTES:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, count * dtype.itemsize), dtype, count).reshape(shape)


@overload
def compute(values: Table) -> Table: ...


@overload
def compute(values: Mapping[str, Any]) -> dict[str, Any]: ...


def compute(values: Mapping[str, Any] | xr.Dataset | xr.DataArray) -> Any:
    """Lazy results computed together into memory, each array allocated once.

    An xarray table (what the ``.rasteragg`` accessor returns) gives a new table like its
    ``.compute()``, with every dask-backed variable computed; a mapping of arrays gives a dict of
    them computed, by name. NumPy and other computed arrays are kept as they are. On the local
    schedulers, dask arrays of NumPy chunks are written piece by piece into arrays of
    :func:`empty`, so that a large table is in memory once rather than twice at the end; elsewhere
    (``dask.distributed``, the processes scheduler, non-NumPy chunks) this is ``dask.compute``.

    Examples
    --------
    >>> values = {"a": da.arange(10, chunks=4) * 2, "b": np.ones(3)}
    >>> out = compute(values)
    >>> out["a"], out["b"]
    (array([ 0,  2,  4,  6,  8, 10, 12, 14, 16, 18]), array([1., 1., 1.]))
    >>> table = xr.Dataset({"mean": ("label", da.ones(4, chunks=2))}, coords={"label": [1, 2, 3, 5]})
    >>> compute(table)["mean"].values
    array([1., 1., 1., 1.])
    """
    if isinstance(values, xr.Dataset | xr.DataArray):
        return _computed_table(values)
    lazy = {name: value for name, value in values.items() if isinstance(value, da.Array)}
    in_place = _writes_here() and all(type(v._meta) is np.ndarray for v in lazy.values())
    if not in_place:
        done = dict(zip(lazy, dask.compute(*lazy.values()), strict=True))
    else:
        done = {name: empty(tuple(int(n) for n in value.shape), value.dtype) for name, value in lazy.items()}
        dask.compute(*(_writes(value, done[name]) for name, value in lazy.items()))
    return {name: done.get(name, value) for name, value in values.items()}


def _computed_table(table: xr.Dataset | xr.DataArray) -> xr.Dataset | xr.DataArray:
    """A copy of ``table`` whose variables (coordinates included) hold :func:`compute` of their data."""
    out = table.copy(deep=False)
    variables = out.variables if isinstance(out, xr.Dataset) else {**out.coords.variables, None: out.variable}
    lazy = [variable for variable in variables.values() if isinstance(variable.data, da.Array)]
    done = compute({str(i): variable.data for i, variable in enumerate(lazy)})
    for i, variable in enumerate(lazy):
        variable.data = done[str(i)]
    return out


def _writes_here() -> bool:
    """Whether dask computes arrays here in threads of this process (the local schedulers)."""
    return dask.base.get_scheduler(cls=da.Array) in (dask.threaded.get, dask.local.get_sync)


def _writes(value: da.Array, target: NDArray[Any]) -> da.Array:
    """Tasks that write each chunk of ``value`` into its place in ``target``."""
    return da.map_blocks(
        _write_block,
        value,
        target=Held(target, f"rasteragg-target-{uuid.uuid4().hex}"),
        dtype=np.int8,
        chunks=tuple((1,) * n for n in value.numblocks),
        meta=np.empty((0,) * value.ndim, np.int8),
    )


def _write_block(block: NDArray[Any], target: Held, block_info: Any = None) -> NDArray[np.int8]:
    """Write one chunk into its place (a ``map_blocks`` task)."""
    target.array[tuple(slice(start, stop) for start, stop in block_info[0]["array-location"])] = block
    return np.zeros((1,) * block.ndim, np.int8)
