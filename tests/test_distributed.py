"""Runs on a ``dask.distributed`` cluster of worker processes with memory limits.

- the accessor, the class and lazy results give the same answers as the threaded scheduler, bit for
  bit (the merge tree is fixed by the graph, not by the scheduler);
- a worker killed in the middle of a computation (its process exits) costs a retry, not the answer;
- an image larger than all the workers' memory together, generated lazily block by block, completes
  with the right answer, checked against a closed form.

The cluster is small (2 workers × 1 thread, the CI has 2 cores) and shared by the module's tests.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import cloudpickle
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import xr_rasteragg  # importing it registers the accessor
import xr_rasteragg.engine
from xr_rasteragg import RasterAggregator, aggregate
from xr_rasteragg.engine import as_dask
from xr_rasteragg.synthetic import make_cells

distributed = pytest.importorskip("distributed")

#: Memory limit of each worker process. A worker peaks at 400–500 MiB here (interpreter, NumPy, Numba,
#: xarray, 2048² blocks and their temporaries); the nanny kills it at 95% of the limit.
WORKER_MEMORY = 640 * 2**20
#: Worker processes of the test cluster.
WORKERS = 2
#: Spatial block of the generated images: 2048² float32 = 16 MiB per channel.
BLOCK = 2048
STATS = ("count", "sum", "mean", "var", "skew", "kurtosis", "min", "max", "center_of_mass")

# The workers are separate processes: send this module's functions by value, so that they need
# not import the test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    # Compile the kernels for the dtypes used here once, in this process: Numba caches them on
    # disk, and the workers (and a restarted worker) load them instead of compiling them each.
    # Two blocks, so that the merge is compiled too.
    for dtype in (np.uint16, np.float32):
        labels = da.from_array(np.arange(4, dtype=np.int32).reshape(1, 2, 2), chunks=(1, 1, 2))
        aggregate(labels, da.ones((1, 1, 2, 2), dtype, chunks=(1, 1, 1, 2)), STATS)
    with (
        # A worker over its memory limit is killed (at 95%); it never pauses, which could stall
        # both workers. A task may kill its worker up to 3 times before the run fails.
        dask.config.set(
            {"distributed.scheduler.allowed-failures": 3, "distributed.worker.memory.pause": False}
        ),
        distributed.LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            memory_limit=WORKER_MEMORY,
            dashboard_address=":0",  # any free port: other clusters may be running
            silence_logs=40,  # errors only: worker deaths are expected here
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def threaded(function: Any) -> Any:
    with dask.config.set(scheduler="threads"):
        return function()


@pytest.fixture(scope="module")
def cells() -> tuple[xr.DataArray, xr.DataArray]:
    labels, image = make_cells((768, 640), n_channels=3, cell_diameter=24, seed=3)
    xlabels = xr.DataArray(labels, dims=("y", "x")).chunk({"y": 256, "x": 200})
    ximage = xr.DataArray(image, dims=("c", "y", "x"), coords={"c": ["a", "b", "c"]}).chunk(
        {"y": 256, "x": 320}
    )
    return ximage, xlabels


def test_accessor_same_as_threads(client: Any, cells: tuple[xr.DataArray, xr.DataArray]) -> None:
    image, labels = cells
    on_cluster = image.rasteragg.aggregate(labels, STATS)
    local = threaded(lambda: image.rasteragg.aggregate(labels, STATS))
    xr.testing.assert_equal(on_cluster, local)
    assert on_cluster.sizes["label"] > 300


def test_shape_features_same_as_threads(client: Any, cells: tuple[xr.DataArray, xr.DataArray]) -> None:
    """The perimeter reads the pixels around each label block: on a cluster from the rings of the
    blocks around it (only they travel between workers), on the threads of a small grid from the
    blocks themselves. The answers are equal."""
    from xr_rasteragg.engine import label_stages
    from xr_rasteragg.stats import needs_of

    image, labels = cells
    labels = labels.chunk({"y": 384, "x": 320})  # a grid of 2 x 2 blocks
    stats = ["perimeter", "solidity", "area", "centroid_weighted"]
    on_cluster = image.rasteragg.aggregate(labels, stats).compute()
    local = threaded(lambda: image.rasteragg.aggregate(labels, stats).compute())
    xr.testing.assert_equal(on_cluster, local)
    blocks = da.from_array(labels.values[None], chunks=(1, 384, 320))
    stages = label_stages(blocks, 0, needs_of(["perimeter"], False))
    keys = [str(key[0] if isinstance(key, tuple) else key) for key in dict(stages.__dask_graph__())]
    assert sum(key.startswith("rasteragg-rings-") for key in keys) == 4  # (see test_frames)


def test_numpy_backed_inputs_travel_block_by_block(
    client: Any, cells: tuple[xr.DataArray, xr.DataArray]
) -> None:
    """On a cluster, NumPy inputs are sliced into the graph (one entry per block, no array behind
    views that would travel whole to every worker), with the results of the threads."""
    image, labels = (array.compute() for array in cells)
    blocks = as_dask(image.data[:, None], "image")
    assert len(dict(blocks.__dask_graph__())) == blocks.npartitions > 1
    on_cluster = image.rasteragg.aggregate(labels, STATS)
    local = threaded(lambda: image.rasteragg.aggregate(labels, STATS))
    assert isinstance(on_cluster["mean"].data, np.ndarray)
    xr.testing.assert_equal(on_cluster, local)


def test_progress_shows_the_pass_on_the_cluster(
    client: Any, cells: tuple[xr.DataArray, xr.DataArray], capfd: pytest.CaptureFixture[str]
) -> None:
    """Inside xr_rasteragg.progress(), the pass a call runs on the cluster draws
    distributed.progress (text on stderr outside notebooks); outside it, nothing is drawn."""
    image, labels = cells
    image.rasteragg.mean(labels)
    assert "Completed" not in capfd.readouterr().err
    with xr_rasteragg.progress():
        image.rasteragg.mean(labels)
    assert "100% Completed" in capfd.readouterr().err


def test_lazy_result_same_as_threads(client: Any, cells: tuple[xr.DataArray, xr.DataArray]) -> None:
    image, labels = cells
    index = np.array([5, 1, 99999, 17, 3])
    lazy = image.rasteragg.aggregate(labels, STATS, index=index)
    assert isinstance(lazy["mean"].data, da.Array)
    on_cluster = lazy.compute()
    local = threaded(lambda: lazy.compute())
    xr.testing.assert_equal(on_cluster, local)
    assert on_cluster["count"].values[2] == 0


def test_class_same_as_threads(client: Any, cells: tuple[xr.DataArray, xr.DataArray]) -> None:
    image, labels = cells
    mask = labels.data[None].rechunk((1, 256, 320))
    pixels = image.data[:, None]
    names = ("sum", "mean", "count", "var", "kurtosis", "skew")
    on_cluster = RasterAggregator(mask, pixels, run_on_gpu=False).aggregate_stats(names)
    local = threaded(lambda: RasterAggregator(mask, pixels, run_on_gpu=False).aggregate_stats(names))
    for got, expected in zip(on_cluster, local, strict=True):
        pd.testing.assert_frame_equal(got, expected)


def test_aggregation_compute_on_the_cluster(client: Any, cells: tuple[xr.DataArray, xr.DataArray]) -> None:
    """``Aggregation.compute`` under a client gathers the pieces with dask (a task on a worker
    cannot write into the client's memory): the values of the threaded scheduler, bit for bit."""
    image, labels = cells
    with mock.patch.object(xr_rasteragg.engine, "PIECE_LABELS", 64):
        result = aggregate(labels.data[None], image.data[:, None], STATS)
        local = threaded(lambda: aggregate(labels.data[None], image.data[:, None], STATS).compute())
    assert len(result.values["mean"].chunks[0]) > 4
    on_cluster = result.compute()
    for name in STATS:
        assert type(on_cluster.values[name]) is np.ndarray
        np.testing.assert_array_equal(on_cluster.values[name], local.values[name], err_msg=name)


def test_table_compute_on_the_cluster(client: Any, cells: tuple[xr.DataArray, xr.DataArray]) -> None:
    """:func:`xr_rasteragg.compute` of an accessor's table under a client: dask's own gather, the
    values of ``.compute()`` on the threaded scheduler."""
    image, labels = cells
    with mock.patch.object(xr_rasteragg.engine, "PIECE_LABELS", 64):
        table = image.rasteragg.aggregate(labels, STATS)
        local = threaded(lambda: image.rasteragg.aggregate(labels, STATS).compute())
    assert len(table["mean"].chunks[0]) > 4
    on_cluster = xr_rasteragg.compute(table)
    assert not any(isinstance(v.data, da.Array) for v in on_cluster.variables.values())
    xr.testing.assert_identical(on_cluster, local)


# -- lazily generated images with known statistics ---------------------------------------------

#: Labels are square tiles of ``TILE`` pixels, numbered row by row from 1.
TILE = 512


def tile_labels(block_info: Any = None) -> np.ndarray:
    """A block of the tile labels, from its position in the whole array."""
    (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    ncols = block_info[None]["shape"][2] // TILE
    y = np.arange(y0, y1)[:, None] // TILE
    x = np.arange(x0, x1)[None, :] // TILE
    return np.broadcast_to(y * ncols + x + 1, (z1 - z0, y1 - y0, x1 - x0)).astype(np.int32)


def pattern(block_info: Any = None, kill_flag: str | None = None, kill_at: Any = None) -> np.ndarray:
    """A block of the image ``x % 7 + y % 3 + 10 c`` (float32).

    With ``kill_flag``, the task of block ``kill_at`` ends its worker process the first time it
    runs (it leaves the flag file, with the worker's pid, so that it runs normally on the retry).
    """
    location = block_info[None]["array-location"]
    if kill_flag is not None and tuple(block_info[None]["chunk-location"]) == kill_at:
        flag = Path(kill_flag)
        if not flag.exists():
            flag.write_text(str(os.getpid()))
            os._exit(1)  # the worker process dies mid-task, as on a lost node
    (c0, c1), (z0, z1), (y0, y1), (x0, x1) = location
    c = np.arange(c0, c1, dtype=np.float32)[:, None, None, None]
    y = (np.arange(y0, y1) % 3).astype(np.float32)[None, None, :, None]
    x = (np.arange(x0, x1) % 7).astype(np.float32)[None, None, None, :]
    return np.ascontiguousarray(np.broadcast_to(x + y + 10 * c, (c1 - c0, z1 - z0, y1 - y0, x1 - x0)))


def generated(nchan: int, ny: int, nx: int, block: int = BLOCK, **kill: Any) -> tuple[da.Array, da.Array]:
    spatial = ((1,), (block,) * (ny // block), (block,) * (nx // block))
    labels = da.map_blocks(tile_labels, chunks=spatial, dtype=np.int32)
    image = da.map_blocks(pattern, chunks=((1,) * nchan, *spatial), dtype=np.float32, **kill)
    return labels, image


def closed_form(nchan: int, ny: int, nx: int) -> dict[str, np.ndarray]:
    """Count, sum, mean and max of every tile of ``pattern``, from sums over one row and one column."""
    sx = (np.arange(nx) % 7).reshape(-1, TILE).sum(axis=1)  # per tile column
    sy = (np.arange(ny) % 3).reshape(-1, TILE).sum(axis=1)  # per tile row
    c = 10.0 * np.arange(nchan)
    tile_sum = TILE * (sy[:, None] + sx[None, :]).ravel()  # Σ over a tile of x % 7 + y % 3
    count = np.full(tile_sum.shape, TILE * TILE)
    total = tile_sum[:, None] + count[:, None] * c[None, :]
    return {
        "count": count,
        "sum": total,
        "mean": total / count[:, None],
        "max": np.broadcast_to(6 + 2 + c, total.shape),
    }


def test_worker_killed_mid_computation(client: Any, tmp_path: Path) -> None:
    nchan, ny, nx, block = 2, 4096, 4096, 1024
    flag = tmp_path / "killed"
    pids = set(client.run(os.getpid).values())
    labels, image = generated(nchan, ny, nx, block, kill_flag=str(flag), kill_at=(1, 0, 2, 1))
    result = aggregate(labels, image, ["count", "sum", "mean", "max"])
    assert flag.exists(), "the task that kills its worker never ran"
    assert int(flag.read_text()) in pids
    assert int(flag.read_text()) not in set(client.run(os.getpid).values()), "the worker was not replaced"
    expected = closed_form(nchan, ny, nx)
    np.testing.assert_array_equal(result.labels, np.arange(1, expected["count"].size + 1))
    for name, value in expected.items():
        np.testing.assert_allclose(result.values[name], value, rtol=1e-12, err_msg=name)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_image_larger_than_cluster_memory(client: Any) -> None:
    nchan, ny, nx = 4, 3 * BLOCK, 7 * BLOCK  # 1344 MiB of float32
    labels, image = generated(nchan, ny, nx)
    client.wait_for_workers(WORKERS)  # a worker that an earlier test killed may still be starting
    limits = [w["memory_limit"] for w in client.scheduler_info()["workers"].values()]
    assert image.nbytes > sum(limits)
    before = client.run(reset_peak_rss)  # count this run only, not the imports or any compiling before it
    result = aggregate(labels, image, ["count", "sum", "mean", "max"])
    peaks = client.run(peak_rss)
    assert peaks.keys() == before.keys()  # no worker was killed for its memory and replaced
    print(
        f"image {image.nbytes / 2**20:.0f} MiB; worker peak RSS (MiB): {[p / 2**20 for p in peaks.values()]}"
    )
    assert max(peaks.values()) < WORKER_MEMORY
    expected = closed_form(nchan, ny, nx)
    np.testing.assert_array_equal(result.labels, np.arange(1, expected["count"].size + 1))
    for name, value in expected.items():
        np.testing.assert_allclose(result.values[name], value, rtol=1e-12, err_msg=name)


def reset_peak_rss() -> None:
    """Forget this process's peak resident memory so far (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss() -> int:
    """Peak resident memory of this process since :func:`reset_peak_rss`, in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


# -- results that stay on the cluster (issue 15) -------------------------------------------------


def kill_once(block: np.ndarray, flag: str, block_id: Any = None) -> np.ndarray:
    """The identity, except that its task for the second piece of rows ends its worker process the
    first time it runs (leaving ``flag``, with the worker's pid, so that the retry runs normally)."""
    if block_id[0] == 1 and not Path(flag).exists():
        Path(flag).write_text(str(os.getpid()))
        os._exit(1)
    return block


def test_worker_lost_while_finalizing(
    client: Any, cells: tuple[xr.DataArray, xr.DataArray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pass's partials are persisted on the workers; a worker that dies while the pieces of label
    ids are finalized takes its partials and pieces with it, and dask recomputes them."""
    from xr_rasteragg import engine

    image, labels = cells
    monkeypatch.setattr(engine, "PIECE_LABELS", 64)  # several pieces of rows (set in this process)
    client.wait_for_workers(WORKERS)
    pids = set(client.run(os.getpid).values())
    result = image.rasteragg.aggregate(labels, STATS)  # the pass runs; its partials stay on the workers
    assert result["mean"].data.numblocks[0] > 2
    flag = tmp_path / "killed"
    lazy = {name: result[name].data for name in STATS}
    lazy["mean"] = lazy["mean"].map_blocks(kill_once, str(flag), dtype=np.float64)
    values = dict(zip(lazy, dask.compute(*lazy.values()), strict=True))  # each piece finalized once
    assert flag.exists(), "the task that kills its worker never ran"
    assert int(flag.read_text()) in pids
    assert int(flag.read_text()) not in set(client.run(os.getpid).values()), "the worker was not replaced"
    reference = image.compute().rasteragg.aggregate(labels.compute(), STATS)
    for name, value in values.items():  # NumPy inputs are split otherwise, so merge in another order
        np.testing.assert_allclose(value, reference[name].values, rtol=1e-9, atol=1e-12, err_msg=name)


def test_to_zarr_on_the_cluster(
    client: Any, cells: tuple[xr.DataArray, xr.DataArray], tmp_path: Path
) -> None:
    image, labels = cells
    client.wait_for_workers(WORKERS)
    result = image.rasteragg.aggregate(labels, STATS)
    assert all(isinstance(result[name].data, da.Array) for name in STATS)
    with distributed.get_task_stream(client) as stream:
        result.to_zarr(tmp_path / "table.zarr")
    assert stream.data, "nothing ran on the cluster"
    written = xr.open_zarr(tmp_path / "table.zarr").compute()
    reference = image.compute().rasteragg.aggregate(labels.compute(), STATS)
    np.testing.assert_array_equal(written["label"], reference["label"])
    for name in STATS:  # NumPy inputs are split otherwise, so merge in another order
        np.testing.assert_allclose(written[name], reference[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_spatialdata_table_written_by_the_workers(client: Any, tmp_path: Path) -> None:
    """The adapter's table has dask-backed X and layers over the partials on the workers; the store
    write computes them there (anndata's own writer would run them on the client's threads, where
    the persisted partials are not)."""
    spatialdata = pytest.importorskip("spatialdata")
    from spatialdata.models import Image2DModel, Labels2DModel

    from xr_rasteragg.spatialdata import aggregate as sd_aggregate

    labels, image = make_cells((192, 160), n_channels=2, cell_diameter=16, seed=5)
    path = tmp_path / "data.zarr"
    spatialdata.SpatialData(
        images={
            "img": Image2DModel.parse(image, dims=("c", "y", "x"), c_coords=["a", "b"], chunks=(1, 64, 64))
        },
        labels={"cells": Labels2DModel.parse(labels, dims=("y", "x"), chunks=(64, 64))},
    ).write(path)
    sdata = spatialdata.read_zarr(path)
    client.wait_for_workers(WORKERS)
    with distributed.get_task_stream(client) as stream:
        table = sd_aggregate(sdata, "img", "cells", ["mean", "max"], table_name="t", write=True)
    assert isinstance(table.X, da.Array)
    assert isinstance(table.layers["max"], da.Array)
    assert any("store-map" in str(task["key"]) for task in stream.data), "the workers wrote nothing"
    stored = spatialdata.read_zarr(path).tables["t"]
    ids = np.unique(labels)[1:]
    mean = np.array([[plane[labels == i].mean() for plane in image] for i in ids])
    np.testing.assert_array_equal(stored.obs["instance_id"], ids)
    np.testing.assert_allclose(stored.X, mean, rtol=1e-12)
    np.testing.assert_array_equal(
        stored.layers["max"], [[plane[labels == i].max() for plane in image] for i in ids]
    )
    np.testing.assert_array_equal(stored.obs["area"], [(labels == i).sum() for i in ids])
    with pytest.raises(ValueError, match="already exists"):
        sd_aggregate(spatialdata.read_zarr(path), "img", "cells", "mean", table_name="t", write=True)
