"""Shared fixtures and an independent reference for the per-label statistics.

The reference computes every statistic label by label with NumPy and SciPy on a boolean mask of
the label's pixels, in float64 with two passes (as ``scipy.ndimage.variance`` and
``scipy.stats.skew`` do). It shares no code with the package.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import numba.core.config
import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.stats
from numpy.typing import NDArray

import xr_rasteragg.engine
import xr_rasteragg.kernels.numba
import xr_rasteragg.kernels.xp
from xr_rasteragg.gpu import probe_cupy
from xr_rasteragg.kernels import StagedKernel
from xr_rasteragg.partials import Needs, Partials

ALL_STATS = ("count", "sum", "mean", "var", "std", "skew", "kurtosis", "min", "max", "center_of_mass")
PER_CHANNEL = ("sum", "mean", "var", "std", "skew", "kurtosis", "min", "max")

#: Tolerances of the statistics contract (DESIGN.md §2): (rtol, atol); (0, 0) is exact.
TOLERANCES: dict[str, tuple[float, float]] = {
    "count": (0.0, 0.0),
    "min": (0.0, 0.0),
    "max": (0.0, 0.0),
    "sum": (1e-9, 0.0),
    "mean": (1e-9, 0.0),
    "var": (1e-9, 0.0),
    "std": (1e-9, 0.0),
    "skew": (0.0, 1e-6),
    "kurtosis": (0.0, 1e-6),
    "center_of_mass": (1e-12, 0.0),
}

KERNELS: dict[str, Callable[..., Any]] = {
    "numba": xr_rasteragg.kernels.numba.block_partials,
    "xp": xr_rasteragg.kernels.xp.block_partials,
}


requires_cupy = pytest.mark.skipif(probe_cupy()[0] is None, reason="needs CuPy and a working CUDA device")

if probe_cupy()[0] is None:
    # No usable GPU: the CUDA kernel (xr_rasteragg.kernels.cuda) runs under Numba's CUDA simulator,
    # which must be switched on before numba.cuda is first imported (nothing above imports it);
    # Numba read its settings when it was imported above, so it reads them again.
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    numba.core.config.reload_config()


@pytest.fixture(params=sorted(KERNELS))
def kernel(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Each block kernel in turn."""
    return KERNELS[request.param]


@pytest.fixture
def engine_kernel(kernel: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Run the engine with each block kernel in turn (for NumPy blocks)."""
    monkeypatch.setattr(xr_rasteragg.engine, "kernel_for", lambda array: kernel)
    return kernel


def tree_hash(path: Path) -> str:
    """A digest of every path and file content under ``path`` (to show that nothing changed)."""
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        digest.update(str(item.relative_to(path)).encode())
        if item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def label_mask(labels: NDArray[np.integer], label: int) -> NDArray[np.bool_]:
    """Pixels of ``label``; none when the labels' dtype cannot hold it."""
    info = np.iinfo(labels.dtype)
    if not info.min <= int(label) <= info.max:
        return np.zeros(labels.shape, bool)
    return labels == labels.dtype.type(int(label))


def vector_stats(x: NDArray[np.float64]) -> dict[str, float]:
    """Per-channel statistics of one label's values with NumPy and SciPy (float64, two-pass)."""
    if x.size == 0:
        return {name: 0.0 if name == "sum" else np.nan for name in PER_CHANNEL}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        var = float(np.mean((x - np.mean(x)) ** 2))
        return {
            "sum": float(np.sum(x)),
            "mean": float(np.mean(x)),
            "var": var,
            "std": float(np.sqrt(var)),
            "skew": float(scipy.stats.skew(x, bias=True)),
            "kurtosis": float(scipy.stats.kurtosis(x, fisher=True, bias=True)),
            "min": float(np.min(x)),
            "max": float(np.max(x)),
        }


def reference(
    labels3d: NDArray[np.integer], image4d: NDArray[np.number] | None, ids: Sequence[int]
) -> dict[str, NDArray[Any]]:
    """Every statistic for each of ``ids``, label by label, with ``scipy.ndimage`` and ``scipy.stats``.

    Returns ``{stat: array}`` with shape ``(n_ids, C)`` per channel, ``(n_ids,)`` for count and
    ``(n_ids, 3)`` for center_of_mass. Absent labels: count 0, sum 0, NaN otherwise.
    """
    nchan = 0 if image4d is None else image4d.shape[0]
    out: dict[str, NDArray[Any]] = {name: np.full((len(ids), nchan), np.nan) for name in PER_CHANNEL}
    out["count"] = np.zeros(len(ids), np.int64)
    out["center_of_mass"] = np.full((len(ids), 3), np.nan)
    for row, label in enumerate(ids):
        mask = label_mask(labels3d, label)
        out["count"][row] = np.count_nonzero(mask)
        if not mask.any():
            out["sum"][row] = 0.0
            continue
        out["center_of_mass"][row] = ndi.center_of_mass(mask.astype(np.float64))
        for c in range(nchan):
            x = image4d[c].astype(np.float64)  # type: ignore[index]
            one = mask.astype(np.int32)
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                out["sum"][row, c] = ndi.sum_labels(x, one, 1)
                out["mean"][row, c] = ndi.mean(x, one, 1)
                out["var"][row, c] = ndi.variance(x, one, 1)
                out["std"][row, c] = np.sqrt(out["var"][row, c])
                out["min"][row, c] = ndi.minimum(x, one, 1)
                out["max"][row, c] = ndi.maximum(x, one, 1)
                out["skew"][row, c] = scipy.stats.skew(x[mask], bias=True)
                out["kurtosis"][row, c] = scipy.stats.kurtosis(x[mask], fisher=True, bias=True)
    return out


def nan_reference(
    labels3d: NDArray[np.integer], image4d: NDArray[np.floating], ids: Sequence[int], skipna: bool
) -> dict[str, NDArray[Any]]:
    """Per-channel statistics with NumPy's NaN semantics: propagate, or drop NaNs when ``skipna``."""
    out = {name: np.full((len(ids), image4d.shape[0]), np.nan) for name in PER_CHANNEL}
    for row, label in enumerate(ids):
        mask = label_mask(labels3d, label)
        for c in range(image4d.shape[0]):
            x = image4d[c][mask].astype(np.float64)
            if skipna:
                x = x[~np.isnan(x)]
            for name, value in vector_stats(x).items():
                out[name][row, c] = value
    return out


def assert_stat(name: str, got: Any, expected: NDArray[Any]) -> None:
    """Compare one statistic against the reference with the contract's tolerance (NaN equal); a
    lazy result is computed first."""
    got = np.asarray(got.compute() if dask.is_dask_collection(got) else got)
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    rtol, atol = TOLERANCES[name]
    if rtol == atol == 0:
        np.testing.assert_array_equal(got, expected, err_msg=name)
    else:
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


def assert_all_stats(values: dict[str, Any], expected: dict[str, NDArray[Any]], stats: Sequence[str]) -> None:
    for name in stats:
        assert_stat(name, values[name], expected[name])


def assert_partials_close(got: Partials, expected: Partials, rtol: float = 1e-9) -> None:
    """Partials agree: ids, counts, coordinates, valid counts and extrema exactly; sums (whatever
    the shifts) and central moments to ``rtol`` of their natural scale (``n * (std + 1e-12 |mean|)
    ** k`` for ``M_k``)."""
    np.testing.assert_array_equal(got.labels, expected.labels)
    assert got.labels.dtype == expected.labels.dtype
    np.testing.assert_array_equal(got.count, expected.count)
    np.testing.assert_array_equal(got.coords, expected.coords)
    for name in ("nvalid", "min", "max"):
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if b is not None:
            np.testing.assert_array_equal(a, b, err_msg=name)
    if expected.shifted is None:
        assert got.shifted is None
        assert got.shift is None
        return
    assert got.shifted is not None
    assert got.shift is not None
    assert expected.shift is not None
    assert got.shift.dtype == expected.shift.dtype
    n = expected.n().astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, expected.means(), 0.0)
        std = (
            np.sqrt(np.maximum(np.where(n > 0, expected.m2 / n, 0.0), 0.0)) if expected.m2 is not None else 0
        )
    scale = n * (np.abs(mean) + std)
    sums = expected.sums()
    _assert_scaled("sum", got.sums(), sums, rtol * np.maximum(scale, np.abs(sums)))
    for k, name in ((2, "m2"), (3, "m3"), (4, "m4")):
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if b is not None:
            tolerance = rtol * (n * (std + 1e-12 * np.abs(mean)) ** k + np.abs(b))
            _assert_scaled(name, a, b, tolerance)


def _assert_scaled(name: str, got: NDArray[Any], expected: NDArray[Any], tolerance: NDArray[Any]) -> None:
    assert got.shape == expected.shape, (name, got.shape, expected.shape)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{name}: NaN positions")
    with np.errstate(invalid="ignore"):
        bad = ~nan & ~(np.abs(got - expected) <= np.nan_to_num(tolerance))
    assert not bad.any(), f"{name}: got {got[bad]}, expected {expected[bad]}, tolerance {tolerance[bad]}"


def counted_updates(
    monkeypatch: pytest.MonkeyPatch, updates: dict[Any, Any], families: Sequence[type]
) -> dict[str, int]:
    """Calls of a kernel's family updates (``updates``: its ``FAMILY_UPDATES``), by family name,
    for the ``families`` types, counted by wrappers put in their place for the test."""
    calls: dict[str, int] = {}
    for family in families:

        def counted(parts: Any, image: Any, runs: Any, one: Any, update: Any = updates[family]) -> Any:
            calls[one.name] = calls.get(one.name, 0) + 1
            return update(parts, image, runs, one)

        monkeypatch.setitem(updates, family, counted)
    return calls


@pytest.fixture
def finalizer_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions given to the engine's finalizer thread, in order (a fresh
    thread for the test, which records what it is given)."""
    sent: list[str] = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            sent.append(fn.__name__)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(xr_rasteragg.engine, "_finalizer", lambda: Recording(1))
    return sent


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """Offsets of the label blocks that the engine's kernels read, in call order.

    A two-stage kernel counts its label stage, which reads the labels; other kernels count
    their calls.
    """
    calls: list[tuple[int, int, int]] = []
    real_kernel_for = xr_rasteragg.engine.kernel_for

    class Counted:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def encode(self, labels: Any, offset: tuple[int, int, int], *args: Any) -> Any:
            calls.append(offset)
            return self.kernel.encode(labels, offset, *args)

        def encode_framed(self, labels: Any, offset: tuple[int, int, int], *args: Any) -> Any:
            calls.append(offset)
            return self.kernel.encode_framed(labels, offset, *args)

        def channels(self, encoded: Any, image: Any, needs: Any) -> Any:
            return self.kernel.channels(encoded, image, needs)

        def __call__(self, labels: Any, image: Any, offset: tuple[int, int, int], *args: Any) -> Any:
            calls.append(offset)
            return self.kernel(labels, image, offset, *args)

    def counting_kernel_for(array: Any) -> Callable[..., Any]:
        kernel = real_kernel_for(array)
        if isinstance(kernel, StagedKernel):
            return Counted(kernel)

        def counted(labels: Any, image: Any, offset: tuple[int, int, int], *args: Any, **kwargs: Any) -> Any:
            calls.append(offset)
            return kernel(labels, image, offset, *args, **kwargs)

        return counted

    monkeypatch.setattr(xr_rasteragg.engine, "kernel_for", counting_kernel_for)
    return calls


def sub_block_partials(
    labels: NDArray[np.integer], image: NDArray[Any], cuts_y: list[int], cuts_x: list[int], needs: Needs
) -> list[Partials]:
    """Partials of the sub-blocks between the cuts, each with its global offset (numba kernel)."""
    kernel = KERNELS["numba"]
    ys = [0, *cuts_y, labels.shape[1]]
    xs = [0, *cuts_x, labels.shape[2]]
    parts = []
    for (y0, y1), (x0, x1) in itertools.product(itertools.pairwise(ys), itertools.pairwise(xs)):
        parts.append(kernel(labels[:, y0:y1, x0:x1], [image[:, :, y0:y1, x0:x1]], (0, y0, x0), needs))
    return parts
