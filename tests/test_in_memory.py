"""Lazy results computed into memory (:mod:`xr_rasteragg.in_memory`, :meth:`Aggregation.compute`):
the same values as ``dask.compute`` on every scheduler, each result allocated once."""

from __future__ import annotations

import mmap
from typing import Any
from unittest import mock

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import ALL_STATS

import xr_rasteragg.engine
from xr_rasteragg import in_memory
from xr_rasteragg.engine import aggregate
from xr_rasteragg.synthetic import make_cells

DTYPES = [np.int8, np.uint16, np.int64, np.uint64, np.float32, np.float64, np.bool_]


def _lazy_values(rng: np.random.Generator) -> dict[str, Any]:
    """Dask arrays of several dtypes, ranks and chunkings (empty and one-chunk ones too), and a
    NumPy array."""
    values: dict[str, Any] = {}
    for i, dtype in enumerate(DTYPES):
        info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
        shape = (97, 3, 2)[: 1 + i % 3]
        if info is not None:
            data = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
        else:
            data = rng.standard_normal(shape).astype(dtype)
        values[f"a{i}"] = da.from_array(data, chunks=(int(rng.integers(1, 50)), *shape[1:]))
    values["empty"] = da.zeros((0, 4), chunks=(1, 4))
    values["one chunk"] = da.arange(5, chunks=5)
    values["derived"] = values["a5"].sum(axis=(1, 2)) * 3
    values["numpy"] = np.arange(6).reshape(2, 3)
    return values


@pytest.mark.parametrize("scheduler", ["threads", "sync", "processes"])
def test_same_values_as_dask_compute(scheduler: str) -> None:
    values = _lazy_values(np.random.default_rng(5))
    expected = dict(zip(values, dask.compute(*values.values()), strict=True))
    with dask.config.set(scheduler=scheduler):
        got = in_memory.compute(values)
    assert list(got) == list(values)
    for name, value in expected.items():
        assert type(got[name]) is np.ndarray, name
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_writes_in_place_only_on_the_local_schedulers() -> None:
    values = {"a": da.ones((2**20, 4), chunks=(2**18, 4))}  # 32 MiB: on a memory map
    with mock.patch.object(in_memory, "empty", wraps=in_memory.empty) as allocate:
        with dask.config.set(scheduler="threads"):
            threads = in_memory.compute(values)["a"]
        assert allocate.call_count == 1
        with dask.config.set(scheduler="processes"):  # tasks in other processes: dask.compute
            in_memory.compute(values)
        assert allocate.call_count == 1
    assert threads.sum() == 2**22
    assert _on_memory_map(threads)


def _on_memory_map(array: np.ndarray) -> bool:
    """Whether ``array`` views an anonymous memory map (see :func:`~xr_rasteragg.in_memory.empty`)."""
    base: Any = array
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


def test_small_results_are_ordinary_arrays() -> None:
    small = in_memory.empty((10, 4), np.float64)
    assert small.base is None
    assert small.flags.c_contiguous
    big = in_memory.empty((in_memory.MAPPED_BYTES // 8,), np.float64)
    big[:] = 1.5
    assert big.sum() == 1.5 * big.size


def test_non_numpy_chunks_go_through_dask() -> None:
    """Chunks that are not NumPy arrays (a sparse or CuPy meta) are computed by dask as they are."""
    value = da.ones(10, chunks=5).map_blocks(np.ma.masked_array, meta=np.ma.masked_array([]))
    with mock.patch.object(in_memory, "empty") as allocate:
        out = in_memory.compute({"m": value})
    allocate.assert_not_called()
    assert isinstance(out["m"], np.ma.MaskedArray)


@pytest.mark.parametrize("index", [None, [7, 3, 10**6, 0, 12]])
@pytest.mark.parametrize("piece", [1, 13, 2**18])
def test_aggregation_compute_equals_dask_compute(index: Any, piece: int) -> None:
    """The engine's lazy results (pieces of ``piece`` labels) computed by the method equal
    ``dask.compute`` of them, whatever the index."""
    labels, image = make_cells((90, 70), n_channels=3, cell_diameter=9, seed=4)
    lazy_labels = da.from_array(labels[None], chunks=(1, 40, 30))
    lazy_image = da.from_array(image[:, None], chunks=(2, 1, 40, 30))
    with mock.patch.object(xr_rasteragg.engine, "PIECE_LABELS", piece):
        result = aggregate(lazy_labels, lazy_image, ALL_STATS, index=index, background=0)
    assert all(isinstance(v, da.Array) for v in result.values.values())
    expected = dict(zip(result.values, dask.compute(*result.values.values()), strict=True))
    got = result.compute()
    np.testing.assert_array_equal(got.labels, result.labels)
    assert list(got.values) == list(ALL_STATS)
    for name in ALL_STATS:
        np.testing.assert_array_equal(got.values[name], expected[name], err_msg=name)


def _accessor_tables() -> dict[str, Any]:
    """Accessor results on dask inputs: a Dataset without and with an index (absent ids and the
    background in it), shape features of several dims among them, and a DataArray."""
    import xarray as xr

    import xr_rasteragg  # noqa: F401  (registers the accessor)

    labels, image = make_cells((90, 70), n_channels=3, cell_diameter=9, seed=8)
    lazy_labels = xr.DataArray(da.from_array(labels, chunks=(40, 30)), dims=("y", "x"))
    lazy_image = xr.DataArray(da.from_array(image, chunks=(2, 40, 30)), dims=("c", "y", "x"))
    stats = (*ALL_STATS, "bbox", "centroid_weighted", "inertia_tensor", "perimeter")
    return {
        "every label": lazy_image.rasteragg.aggregate(lazy_labels, stats),
        "index": lazy_image.rasteragg.aggregate(lazy_labels, ALL_STATS, index=[7, 3, 10**6, 0, 12]),
        "data array": lazy_image.rasteragg.mean(lazy_labels),
    }


@pytest.mark.parametrize("scheduler", ["threads", "sync", "processes"])
def test_xarray_tables_same_as_their_compute(scheduler: str) -> None:
    """An accessor's table computed by :func:`xr_rasteragg.compute` is its ``.compute()``,
    variables, coordinates and attributes, and the table it was given stays lazy."""
    import xarray as xr

    import xr_rasteragg

    with mock.patch.object(xr_rasteragg.engine, "PIECE_LABELS", 16):  # several pieces per result
        tables = _accessor_tables()
    with dask.config.set(scheduler=scheduler):
        for name, table in tables.items():
            lazy = [key for key, v in _variables(table).items() if isinstance(v.data, da.Array)]
            assert lazy, name
            got = xr_rasteragg.compute(table)
            assert type(got) is type(table), name
            xr.testing.assert_identical(got, table.compute())
            assert not any(isinstance(v.data, da.Array) for v in _variables(got).values()), name
            assert all(isinstance(_variables(table)[key].data, da.Array) for key in lazy), name


def _variables(table: Any) -> dict[Any, Any]:
    """The variables of a Dataset, or a DataArray's coordinates and its own (key None)."""
    return (
        dict(table.variables)
        if hasattr(table, "data_vars")
        else {**table.coords.variables, None: table.variable}
    )


def test_xarray_table_written_in_place() -> None:
    """On the threaded scheduler each lazy variable of a table is allocated once and written
    piece by piece (:func:`~xr_rasteragg.in_memory.empty`), large ones on a memory map."""
    import xarray as xr

    table = xr.Dataset(
        {
            "mean": (("label", "c"), da.ones((2**20, 4), chunks=(2**18, 4))),
            "count": ("label", np.ones(2**20)),
        },
        coords={"label": np.arange(2**20), "first": ("label", da.arange(2**20, chunks=2**17))},
    )
    with (
        mock.patch.object(in_memory, "empty", wraps=in_memory.empty) as allocate,
        dask.config.set(scheduler="threads"),
    ):
        got = in_memory.compute(table)
    assert allocate.call_count == 2
    assert _on_memory_map(got["mean"].data)
    np.testing.assert_array_equal(got["first"].values, np.arange(2**20))
    assert got["count"].data is table["count"].data  # computed already: kept as it is


def test_numpy_backed_table_is_kept_as_it_is() -> None:
    """A table of the accessor on NumPy-backed arrays has nothing to compute: a shallow copy of
    it comes back, every variable's data the same array (nothing is copied or computed)."""
    import xarray as xr

    import xr_rasteragg

    labels, image = make_cells((60, 70), n_channels=2, cell_diameter=12, seed=4)
    table = xr.DataArray(image, dims=("c", "y", "x")).rasteragg.aggregate(
        xr.DataArray(labels, dims=("y", "x")), ["mean", "count", "solidity"]
    )
    assert not any(isinstance(v.data, da.Array) for v in table.variables.values())
    got = xr_rasteragg.compute(table)
    assert got is not table
    xr.testing.assert_identical(got, table)
    assert all(got[key].data is table[key].data for key in table.variables)
