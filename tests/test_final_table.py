"""The last merge and finalization, run in pieces over the label ids (one task each), and the union of
label ids."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any
from unittest import mock

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import ALL_STATS, KERNELS, assert_all_stats, reference, sub_block_partials
from numpy.typing import NDArray

import xr_rasteragg.engine
import xr_rasteragg.partials
from xr_rasteragg.engine import aggregate, prepare_index
from xr_rasteragg.partials import Needs, Partials, _union, label_union, merge
from xr_rasteragg.stats import finalize, needs_of


def final_table(
    parts: Sequence[Partials], stats: Sequence[str], piece: int, index: Any = None, graph: str = "local"
) -> tuple[NDArray[Any], dict[str, NDArray[Any]]]:
    """The engine's finalization of ``parts`` (the partials left by the merge tree) for ``index``
    (None: every label), in pieces of ``piece`` labels, computed, by the graph that the engine
    builds on the local schedulers or (``graph="cluster"``) under a ``distributed.Client``."""
    holder = np.empty((1, 1, len(parts)), dtype=object)
    holder[0, 0, :] = list(parts)
    ids = label_union([p.labels for p in parts]) if index is None else prepare_index(index)
    nchan = max((value.shape[1] for value in parts[0].channel_arrays().values()), default=0)
    client = None if graph == "local" else object()
    with (
        mock.patch.object(xr_rasteragg.engine, "PIECE_LABELS", piece),
        mock.patch.object(xr_rasteragg.engine, "distributed_client", return_value=client),
    ):
        values = xr_rasteragg.engine.finalized(da.from_array(holder, chunks=1, name=False), ids, stats, nchan)
    for value in values.values():
        assert value.chunks[0] == (tuple(min(piece, ids.size - s) for s in range(0, ids.size, piece)) or (0,))
    return ids, dict(zip(values, dask.compute(*values.values()), strict=True))


def sorted_ids(rng: np.random.Generator, pool: NDArray[Any], size: int) -> NDArray[Any]:
    return np.unique(rng.choice(pool, size=min(size, pool.shape[0]), replace=False))


#: Pools of ids per dtype: dense ranges (the table of marks) and sparse extremes (the merge tree).
POOLS = {
    "int8 dense": np.arange(-128, 128).astype(np.int8),
    "uint16 dense": np.arange(0, 2**16).astype(np.uint16),
    "int32 dense from negative": np.arange(-5000, 5000).astype(np.int32),
    "int64 sparse": np.array([-(2**63), -(2**40), 2**40 + 3, 2**63 - 1, *range(-1, 100)], np.int64),
    "uint64 sparse high": (np.arange(500, dtype=np.uint64) * np.uint64(2**40) + np.uint64(2**63)),
    "uint64 dense high": np.arange(2**64 - 3000, 2**64 - 1, dtype=np.uint64),
}


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("n_parts", [1, 2, 5, 16])
def test_union_of_ids_and_their_rows(pool: str, n_parts: int) -> None:
    rng = np.random.default_rng(n_parts)
    ids = [sorted_ids(rng, POOLS[pool], int(rng.integers(0, 300))) for _ in range(n_parts)]
    expected = np.unique(np.concatenate(ids))
    union = label_union(ids)
    np.testing.assert_array_equal(union, expected)
    assert union.dtype == POOLS[pool].dtype
    nonempty = [a for a in ids if a.shape[0]]
    if nonempty:
        union, rows = _union(nonempty)
        np.testing.assert_array_equal(union, expected)
        for a, r in zip(nonempty, rows, strict=True):
            np.testing.assert_array_equal(union[r], a)


def block_partials(
    labels: NDArray[np.integer], image: NDArray[Any], step: int, needs: Needs
) -> list[Partials]:
    """Partials of the (step x step) blocks of an image, in row-major block order."""
    _, ny, nx = labels.shape
    return sub_block_partials(labels, image, list(range(step, ny, step)), list(range(step, nx, step)), needs)


CASES = {
    "all": (ALL_STATS, False),
    "all skipna": (ALL_STATS, True),
    "mean": (("mean",), False),
    "count and center of mass": (("count", "center_of_mass"), False),
    "min max": (("min", "max"), True),
}


@pytest.mark.parametrize("graph", ["local", "cluster"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("piece", [1, 2, 7, 100, 10**6])
def test_pieces_agree_with_one_merge(case: str, piece: int, graph: str) -> None:
    stats, skipna = CASES[case]
    rng = np.random.default_rng(1)
    labels = rng.integers(-40, 200, size=(1, 48, 64)).astype(np.int32)
    image = 1e3 + rng.normal(0.0, 5.0, size=(3, *labels.shape))
    image[1, 0, :5, :7] = np.nan  # NaN pixels: propagated, or skipped with skipna
    parts = block_partials(labels, image, 16, needs_of(stats, skipna))
    merged = merge(parts)
    every = np.arange(merged.size)
    expected = finalize(merged, stats, every, np.ones(merged.size, bool))
    ids, values = final_table(parts, stats, piece, graph=graph)
    np.testing.assert_array_equal(ids, merged.labels)
    assert set(values) == set(stats)
    for name in stats:
        assert values[name].dtype == expected[name].dtype
        np.testing.assert_allclose(
            values[name], expected[name], rtol=1e-13, atol=0, equal_nan=True, err_msg=name
        )


def test_pieces_with_empty_and_single_parts() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(1, 50, size=(1, 20, 30)).astype(np.uint16)
    labels[:, :10] = 0  # blocks of background only give empty partials
    image = rng.integers(0, 4096, size=(2, *labels.shape)).astype(np.uint16)
    needs = needs_of(ALL_STATS)
    empty = KERNELS["numba"](labels[:, :10], [image[:, :, :10]], (0, 0, 0), needs, 0)
    parts = [empty, empty, *block_partials(labels[:, 10:], image[:, :, 10:], 7, needs)]
    assert parts[0].size == 0
    for subset in (parts, parts[:1], parts[:3]):
        merged = merge(subset)
        expected = finalize(merged, ALL_STATS, np.arange(merged.size), np.ones(merged.size, bool))
        ids, values = final_table(subset, ALL_STATS, 3)
        np.testing.assert_array_equal(ids, merged.labels)
        for name in ALL_STATS:
            assert values[name].shape == expected[name].shape
            np.testing.assert_allclose(values[name], expected[name], rtol=1e-13, equal_nan=True)


@pytest.mark.parametrize("label_dtype", ["int8", "uint16", "int64", "uint64"])
@pytest.mark.parametrize("image_dtype", ["uint16", "float32"])
def test_engine_with_small_pieces_matches_reference(
    monkeypatch: pytest.MonkeyPatch, label_dtype: str, image_dtype: str
) -> None:
    """The whole engine, with the final merge split into pieces of 3 labels."""
    monkeypatch.setattr(xr_rasteragg.engine, "PIECE_LABELS", 3)
    rng = np.random.default_rng(3)
    info = np.iinfo(label_dtype)
    pool = np.unique(np.array([info.min, info.max, 0, 1, 5, 17, 100], dtype=label_dtype))
    labels = rng.choice(pool, size=(2, 30, 40))
    if np.dtype(image_dtype).kind == "u":
        image = rng.integers(0, 2**16, size=(3, *labels.shape)).astype(image_dtype)
    else:
        image = rng.normal(50.0, 3.0, size=(3, *labels.shape)).astype(image_dtype)
    result = aggregate(
        da.from_array(labels, chunks=(1, 11, 13)),
        da.from_array(image, chunks=(2, 1, 7, 40)),
        ALL_STATS,
        split_every=2,
    )
    ids = np.unique(labels)
    np.testing.assert_array_equal(result.labels, ids)
    assert_all_stats(result.values, reference(labels, image, [int(i) for i in ids]), ALL_STATS)


def test_pieces_stay_within_dasks_chunk_size_with_many_channels() -> None:
    """Many channels make pieces of fewer labels (one piece's rows, of the partials it merges or
    of its values, whichever is larger, within ``array.chunk-size``), every result chunked
    alike, with the values of one piece."""
    rng = np.random.default_rng(8)
    labels = rng.permutation(np.repeat(np.arange(400, dtype=np.int32), 8)).reshape(1, 40, 80)
    image = rng.integers(0, 2**16, size=(24, *labels.shape)).astype(np.uint16)
    stats = ("count", "mean", "var", "max", "center_of_mass")
    # Bytes of one label's partials (the pixel count and index sums, the shift, shifted sum and
    # M2 per channel, the extrema as float64), more than its values (8 + 3 * 24 * 8 + 3 * 8).
    row = 8 + 3 * 8 + 3 * 24 * 8 + 2 * 24 * 8
    with dask.config.set({"array.chunk-size": f"{50 * row}B"}):
        result = aggregate(
            da.from_array(labels, chunks=(1, 16, 32)), da.from_array(image, chunks=(8, 1, 16, 32)), stats
        )
    assert xr_rasteragg.engine.piece_labels(2 * row) == 2**27 // (2 * row)  # 128 MiB by default
    assert xr_rasteragg.engine.row_bytes(stats, 24) == row
    assert result.labels.shape[0] == 400
    for value in result.values.values():
        assert value.chunks[0] == (*(50,) * 8,)
    whole = aggregate(labels, image, stats)  # one block: other merges, so equal up to rounding
    for name in stats:
        value = result.values[name].compute()
        np.testing.assert_allclose(value, whole.values[name], rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_merge_of_many_parts_equals_pairwise_merges(case: str) -> None:
    """Many parts folded into one union, part by part, as a chain of pairwise merges."""
    stats, skipna = CASES[case]
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 300, size=(1, 40, 60)).astype(np.uint32)
    image = rng.normal(10.0, 2.0, size=(2, *labels.shape)).astype(np.float32)
    image[0, 0, 3, :9] = np.nan
    parts = block_partials(labels, image, 8, needs_of(stats, skipna))
    assert len(parts) > 2
    stacked = merge(parts)
    by_part = functools.reduce(lambda a, b: merge([a, b]), parts)
    np.testing.assert_array_equal(stacked.labels, by_part.labels)
    np.testing.assert_array_equal(stacked.count, by_part.count)
    np.testing.assert_array_equal(stacked.coords, by_part.coords)
    for name, value in by_part.channel_arrays().items():
        np.testing.assert_allclose(getattr(stacked, name), value, rtol=1e-12, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("graph", ["local", "cluster"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("piece", [1, 3, 50, 10**6])
def test_pieces_for_an_index(case: str, piece: int, graph: str) -> None:
    """Requested ids in any order, repeated, absent, or none at all, from the pieces."""
    stats, skipna = CASES[case]
    rng = np.random.default_rng(6)
    labels = rng.integers(-40, 200, size=(1, 48, 64)).astype(np.int32)
    image = 1e3 + rng.normal(0.0, 5.0, size=(3, *labels.shape))
    image[2, 0, 7:9, :30] = np.nan
    parts = block_partials(labels, image, 16, needs_of(stats, skipna))
    merged = merge(parts)
    present = merged.labels
    indexes = {
        "shuffled with repeats and absent ids": np.concatenate(
            [rng.permutation(present)[:150], present[[5, 5, 77]], np.array([-1000, 10**6, 250], np.int64)]
        ),
        "one id": present[[17]],
        "only absent ids": np.array([-41, 200, 10**9]),
        "empty": np.array([], np.int64),
    }
    for name, index in indexes.items():
        rows, found = xr_rasteragg.engine.locate(present, index)
        expected = finalize(merged, stats, rows, found)
        ids, values = final_table(parts, stats, piece, index, graph)
        np.testing.assert_array_equal(ids, index)
        for stat in stats:
            assert values[stat].shape == expected[stat].shape, (name, stat)
            assert values[stat].dtype == expected[stat].dtype, (name, stat)
            np.testing.assert_allclose(
                values[stat], expected[stat], rtol=1e-13, equal_nan=True, err_msg=f"{name}: {stat}"
            )


@pytest.mark.parametrize("lazy", [False, True])
def test_engine_index_with_small_pieces_matches_reference(
    monkeypatch: pytest.MonkeyPatch, lazy: bool
) -> None:
    """An index, eager or lazy (several row chunks), with the final merge in pieces of 2 labels."""
    monkeypatch.setattr(xr_rasteragg.engine, "PIECE_LABELS", 2)
    rng = np.random.default_rng(7)
    labels = rng.choice(np.array([0, 3, 9, 12, 40, 41, 77], np.uint16), size=(1, 40, 30))
    image = rng.integers(0, 4096, size=(2, *labels.shape)).astype(np.uint16)
    index = [41, 0, 1000, 3, 3, 77]
    dlabels, dimage = da.from_array(labels, chunks=(1, 9, 7)), da.from_array(image, chunks=(1, 1, 40, 30))
    if not lazy:  # NumPy inputs, split into blocks of 64 px
        monkeypatch.setattr(xr_rasteragg.engine, "BLOCK_PIXELS", 64)
        dlabels, dimage = labels, image
    result = aggregate(dlabels, dimage, ALL_STATS, index=index, split_every=2)
    values = result.values
    if lazy:
        assert isinstance(values["mean"], da.Array)
        assert values["mean"].numblocks[0] == 3
        (values,) = dask.compute(values)
    np.testing.assert_array_equal(result.labels, index)
    assert_all_stats(values, reference(labels, image, index), ALL_STATS)
