"""Statistics and partial field families declared as specs, outside the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import dask.array as da
import numba as nb
import numpy as np
import pytest
from numpy.typing import NDArray

import xr_rasteragg.kernels.numba
from xr_rasteragg import stats
from xr_rasteragg.engine import aggregate
from xr_rasteragg.families import Family, Field, Fields
from xr_rasteragg.partials import Needs, Partials
from xr_rasteragg.stats import STATISTICS, Statistic


def _values(result: Any, name: str) -> NDArray[Any]:
    value = result.values[name]
    return np.asarray(value.compute() if isinstance(value, da.Array) else value)


def _labels(rng: np.random.Generator) -> NDArray[np.int32]:
    return rng.integers(1, 6, size=(2, 12, 9)).astype(np.int32)


def test_a_statistic_is_a_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    """A toy statistic (the range, max - min) goes through the engine by its spec alone."""
    spread = Statistic(Needs(0, extrema=True), lambda d: d.p.max.astype(float) - d.p.min, np.nan)
    monkeypatch.setitem(STATISTICS, "range", spread)
    rng = np.random.default_rng(0)
    labels = _labels(rng)
    image = rng.integers(0, 1000, size=(3, *labels.shape)).astype(np.uint16)
    result = aggregate(
        da.from_array(labels, chunks=(1, 5, 4)), da.from_array(image, chunks=(2, 1, 5, 4)), "range"
    )
    ids = np.unique(labels)
    expected = [[np.ptp(image[c][labels == i]) for c in range(3)] for i in ids]
    np.testing.assert_array_equal(np.asarray(result.labels), ids)
    np.testing.assert_array_equal(_values(result, "range"), expected)
    assert spread.row_shape(3) == (3,)


@dataclass(frozen=True)
class RunCounts(Family):
    """A toy family: the number of runs of each label along the rows, added on merge."""

    name: ClassVar[str] = "runs"
    channel: ClassVar[bool] = False
    all_fields: ClassVar[tuple[str, ...]] = ("nruns",)

    def fields(self) -> tuple[Field, ...]:
        return (Field("nruns", lambda _dtype: np.dtype(np.int64), None),)

    def fold(self, merged: Fields, part: Fields, rows: NDArray[np.intp], first: NDArray[np.bool_]) -> None:
        out, add = merged["nruns"], part["nruns"]
        out[rows[first]] = add[first]
        out[rows[~first]] += add[~first]


@nb.njit(cache=True)
def _count_runs(run_id: Any, rank: Any, out: Any) -> None:
    for r in range(run_id.shape[0]):
        out[rank[run_id[r]]] += 1


def _update_runs(parts: Partials, image: Any, runs: Any, family: Family) -> None:
    nruns = np.zeros(parts.size, np.int64)
    _count_runs(runs.runs.id, runs.rank, nruns)
    parts.add(family, nruns=nruns)


def test_a_family_plugs_in_by_spec_and_kernel_update(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new family (fields, merge rule, kernel update) and a statistic that needs it, with no
    change to the engine or to the existing kernel signatures."""
    monkeypatch.setitem(xr_rasteragg.kernels.numba.FAMILY_UPDATES, RunCounts, _update_runs)
    spec = Statistic(Needs(more=(RunCounts(),)), lambda d: d.p.nruns, 0, dims=(), dtype=np.dtype(np.int64))
    monkeypatch.setitem(STATISTICS, "runs", spec)
    rng = np.random.default_rng(1)
    labels = _labels(rng)
    image = rng.random((2, *labels.shape))
    # Blocks split z and y only, so that no run is cut at a block border.
    result = aggregate(
        da.from_array(labels, chunks=(1, 5, 9)), da.from_array(image, chunks=(1, 1, 5, 9)), ["runs", "mean"]
    )
    ids = np.unique(labels)
    starts = np.concatenate([np.ones((*labels.shape[:2], 1), bool), np.diff(labels, axis=2) != 0], axis=2)
    expected = [int(np.sum(starts & (labels == i))) for i in ids]
    np.testing.assert_array_equal(_values(result, "runs"), expected)
    means = [[image[c][labels == i].mean() for c in range(2)] for i in ids]
    np.testing.assert_allclose(_values(result, "mean"), means, rtol=1e-12)
    assert stats.needs_of(["runs", "mean"]).families[-1] == RunCounts()
