"""The accessor on NumPy-backed ``DataArray`` s, as notebook users call it.

The engine splits NumPy inputs into blocks that view them (:func:`xr_rasteragg.engine.as_dask`:
one channel per chunk, or all channels for an image stored channel-last). Here blocks are made
small (:data:`~xr_rasteragg.engine.BLOCK_PIXELS` of 64: 8 x 8 pixels) so that small images span
several, and for every statistic family (moments, median and quantiles, shape features) the
results are NumPy-backed and identical to those of dask-backed inputs in the same chunks (the
same blocks, so the same order of every sum), and equal to the references of
``tests/test_accessor.py``, ``tests/test_gather.py`` and ``tests/test_shape.py`` (SciPy,
NumPy's quantiles, ``skimage.measure.regionprops_table``). Shapes: 2-D and 3-D, one pixel wide
or high, sizes that are no multiple of the block's sides, one channel, no ``c`` dim, 40
channels in several channel groups, uint16 as in the reference dataset, channel-last storage.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import ALL_STATS, assert_stat
from numpy.typing import NDArray
from test_accessor import expected, make_image, make_labels, present
from test_shape import SHAPE_2D, SHAPE_3D, check
from test_shape import reference as regionprops

import xr_rasteragg.engine
from xr_rasteragg.engine import as_dask

#: Pixels per block of NumPy inputs in these tests (8 x 8 blocks, 1 x 8 x 8 in 3-D).
BLOCK = 64
IMAGE_DIMS, LABEL_DIMS = ("c", "z", "y", "x"), ("z", "y", "x")

#: name: (labels shape, channels (0: no ``c`` dim), image dtype, channels last in memory).
CASES: dict[str, tuple[tuple[int, ...], int, str, bool]] = {
    "2d": ((21, 19), 3, "float64", False),
    "3d": ((3, 11, 9), 2, "float64", False),
    "one-pixel-wide": ((13, 1), 2, "float64", False),
    "one-pixel-high": ((1, 17), 2, "float64", False),
    "3d-one-pixel-wide": ((2, 9, 1), 2, "float64", False),
    "one-channel": ((21, 19), 1, "float64", False),
    "no-c-dim": ((21, 19), 0, "float64", False),
    "many-channels": ((10, 12), 40, "float64", False),
    "uint16": ((21, 19), 3, "uint16", False),
    "channels-last": ((21, 19), 3, "float64", True),
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 8 x 8 pixels, and channel groups of at most 3 float64 channels of a block."""
    monkeypatch.setattr(xr_rasteragg.engine, "BLOCK_PIXELS", BLOCK)
    monkeypatch.setattr(xr_rasteragg.engine, "GROUP_BYTES", 3 * 8 * BLOCK)


def arrays(case: str) -> tuple[xr.DataArray, xr.DataArray]:
    """NumPy-backed image and labels of ``case``."""
    shape, nchan, dtype, last = CASES[case]
    labels = make_labels(shape, seed=len(case))
    values = make_image(labels, max(nchan, 1), seed=len(case) + 1)
    if dtype == "uint16":
        values = np.round(values * 300).astype(np.uint16)  # the CONSTANT label stays constant
    spatial = ("z", "y", "x")[3 - labels.ndim :]
    image = xr.DataArray(values, dims=("c", *spatial)) if nchan else xr.DataArray(values[0], dims=spatial)
    if last:  # stored channel-last, handed over as (c, y, x): a transposed view
        image = xr.DataArray(np.ascontiguousarray(np.moveaxis(values, 0, -1)), dims=(*spatial, "c"))
        image = image.transpose("c", ...)
    return image, xr.DataArray(labels, dims=spatial)


@pytest.mark.parametrize("case", ["2d", "uint16", "3d"])
def test_shape_features_finalized_in_a_thread_of_their_own(case: str, finalizer_work: list[str]) -> None:
    """With per-channel statistics beside them, NumPy-backed results finalize the shape features
    in the engine's finalizer thread while the calling thread finalizes the others; the table is
    the one that dask's synchronous scheduler makes in the calling thread alone, and without
    shape features nothing goes to that thread."""
    names = ["mean", "var", "max", "count", *(SHAPE_2D if case != "3d" else SHAPE_3D), "centroid_weighted"]
    image, labels = arrays(case)
    threaded = image.rasteragg.aggregate(labels, names)
    assert finalizer_work == ["_finalize_parts"]
    with dask.config.set(scheduler="sync"):
        alone = image.rasteragg.aggregate(labels, names)
    xr.testing.assert_identical(threaded, alone)
    assert finalizer_work == ["_finalize_parts"]
    image.rasteragg.aggregate(labels, ["mean", "count", "center_of_mass"])
    labels.rasteragg.aggregate(SHAPE_2D if case != "3d" else SHAPE_3D)
    assert finalizer_work == ["_finalize_parts"]


def _finalize_in_a_child(queue: Any) -> None:
    """Work for the finalizer thread, given in a forked process."""
    queue.put(xr_rasteragg.engine._finalizer().submit(int, "7").result(timeout=30))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_has_a_finalizer_thread_of_its_own() -> None:
    """A process forked after this one finalized shape features (as ``multiprocessing`` forks on
    Linux) has a finalizer thread of its own: the parent's does not run in the child, whose copy
    of the executor would take the work and never do it. (dask's thread pool has the same
    trouble, so the child here gives the thread its work directly, as it would under the
    synchronous scheduler or a ``distributed.Client`` of its own.)"""
    import multiprocessing

    image, labels = arrays("2d")
    image.rasteragg.aggregate(labels, ["mean", *SHAPE_2D])  # the parent's finalizer thread runs
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_finalize_in_a_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == 7
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def twin(array: xr.DataArray, dims: Sequence[str]) -> xr.DataArray:
    """``array`` dask-backed, in the chunks that the engine gives it NumPy-backed."""
    canonical = array.expand_dims([d for d in dims if d not in array.dims]).transpose(*dims).data
    chunks = dict(zip(dims, as_dask(canonical, "twin").chunks, strict=True))
    return array.chunk({d: chunks[d] for d in array.dims})


def both(case: str, call: Any) -> tuple[xr.Dataset, xr.Dataset]:
    """``call(image, labels)`` on NumPy-backed arrays and on their dask-backed twins (computed);
    the first checked to be NumPy-backed."""
    image, labels = arrays(case)
    eager = call(image, labels)
    for variable in eager.data_vars.values():
        assert isinstance(variable.data, np.ndarray), variable.name
    lazy = call(twin(image, IMAGE_DIMS), twin(labels, LABEL_DIMS))
    assert all(isinstance(v.data, da.Array) for v in lazy.data_vars.values())
    return eager, lazy.compute()


def channels_of(image: xr.DataArray) -> NDArray[Any]:
    """The image values ``(c, *spatial)`` (with a ``c`` of one for an image without one)."""
    return image.values if "c" in image.dims else image.values[None]


def test_numpy_blocks_view_the_array_one_channel_per_chunk() -> None:
    image = np.arange(3 * 1 * 21 * 19, dtype=np.float64).reshape(3, 1, 21, 19)
    blocks = as_dask(image, "image")
    assert blocks.chunks == ((1, 1, 1), (1,), (8, 8, 5), (8, 8, 3))
    views = blocks.map_blocks(
        lambda block: np.full((1,) * 4, np.shares_memory(block, image)), chunks=(1,) * 4, dtype=bool
    )
    assert bool(views.all().compute())  # read in place: nothing copied
    channels_last = np.moveaxis(np.ascontiguousarray(np.moveaxis(image, 0, -1)), -1, 0)
    assert as_dask(channels_last, "image").chunks[0] == (3,)  # a chunk per channel would reread it
    assert as_dask(image[0], "labels").chunks == ((1,), (8, 8, 5), (8, 8, 3))


@pytest.mark.parametrize("case", sorted(CASES))
def test_moments_equal_dask_and_scipy(case: str) -> None:
    eager, lazy = both(case, lambda image, labels: image.rasteragg.aggregate(labels, ALL_STATS))
    xr.testing.assert_identical(eager, lazy)
    image, labels = arrays(case)
    ids = present(labels.values)
    reference = expected(labels.values, channels_of(image).astype(np.float64), ids)
    np.testing.assert_array_equal(eager["label"].values, ids)
    for name in ALL_STATS:
        per_channel = name not in ("count", "center_of_mass")
        want = reference[name] if "c" in image.dims or not per_channel else reference[name][:, 0]
        assert_stat(name, eager[name].values, want)


def test_numpy_inputs_read_each_label_block_once(kernel_calls: list[tuple[int, int, int]]) -> None:
    image, labels = arrays("many-channels")  # 10 x 12 px: 2 x 2 blocks, 40 channels in 14 groups
    image.rasteragg.aggregate(labels, ALL_STATS)
    assert sorted(kernel_calls) == [(0, y, x) for y in (0, 8) for x in (0, 8)]


def quantiles(labels: NDArray[Any], values: NDArray[Any], ids: NDArray[Any], q: Any) -> NDArray[np.float64]:
    """``numpy.quantile`` of each label's float64 values per channel: ``(k, C, *q.shape)``."""
    out = np.empty((len(ids), values.shape[0], *np.shape(q)))
    for i, label in enumerate(ids):
        for c in range(values.shape[0]):
            out[i, c] = np.quantile(values[c][labels == label].astype(np.float64), q)
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_median_and_quantiles_equal_dask_and_numpy(case: str) -> None:
    q = [0.1, 0.5, 0.75]
    eager, lazy = both(
        case,
        lambda image, labels: image.rasteragg.aggregate(labels, ["median", "mean"]).assign(
            quantile=image.rasteragg.quantile(labels, q)
        ),
    )
    xr.testing.assert_identical(eager, lazy)
    image, labels = arrays(case)
    ids = present(labels.values)
    want = quantiles(labels.values, channels_of(image), ids, q)
    if "c" not in image.dims:
        want = want[:, 0]
    np.testing.assert_array_equal(eager["median"].values, want[..., 1])
    np.testing.assert_array_equal(eager["quantile"].transpose("label", ..., "quantile").values, want)


@pytest.mark.filterwarnings("ignore:Failed to get convex hull image")  # regionprops on flat labels
@pytest.mark.parametrize("case", sorted(CASES))
def test_shape_features_equal_dask_and_regionprops(case: str) -> None:
    ndim = len(CASES[case][0])
    names = SHAPE_2D if ndim == 2 else SHAPE_3D
    eager, lazy = both(
        case, lambda image, labels: image.rasteragg.aggregate(labels, ["mean", *names, "centroid_weighted"])
    )
    xr.testing.assert_identical(eager, lazy)
    _, labels = arrays(case)
    check(eager, regionprops(labels.values, names), names)
