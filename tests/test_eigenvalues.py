"""The compiled 2 × 2 eigenvalues against :func:`numpy.linalg.eigvalsh`, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from xr_rasteragg.eigenvalues import eigvalsh_2x2


def symmetric(a: NDArray[np.float64], b: NDArray[np.float64], c: NDArray[np.float64]) -> NDArray[np.float64]:
    """The matrices ``[[a, b], [b, c]]``, shape ``(k, 2, 2)``."""
    out = np.empty((a.shape[0], 2, 2))
    out[:, 0, 0], out[:, 1, 1] = a, c
    out[:, 0, 1] = out[:, 1, 0] = b
    return out


def cases(seed: int, k: int = 50_000) -> dict[str, NDArray[np.float64]]:
    """Random symmetric matrices over many magnitudes, and the cases LAPACK treats apart."""
    rng = np.random.default_rng(seed)
    a = rng.random(k) * 10.0 ** rng.uniform(-6, 8, k)
    c = rng.random(k) * 10.0 ** rng.uniform(-6, 8, k)
    b = rng.standard_normal(k) * 10.0 ** rng.uniform(-12, 8, k)
    ratios = rng.integers(-60, 60, (3, k)) / rng.integers(1, 40, (3, k))
    return {
        "any magnitude": symmetric(a, b, c),
        "negative diagonal": symmetric(-a, b, c),
        "equal diagonal": symmetric(a, b, a),
        "opposite diagonal": symmetric(a, b, -a),
        "diagonal": symmetric(a, 0 * b, c),
        # Off-diagonal terms near the thresholds below which dsterf drops them.
        "negligible coupling": symmetric(a, np.sqrt(a * c) * 2.0**-53 * rng.uniform(0.5, 2, k), c),
        "tiny coupling": symmetric(a, 1e-9 * a * rng.standard_normal(k), c),
        "ratios of small integers": symmetric(*ratios),
        "inertia-like": symmetric(np.abs(ratios[0]), ratios[1], np.abs(ratios[2])),
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_eigvalsh_bit_for_bit(seed: int) -> None:
    for name, matrices in cases(seed).items():
        expected = np.linalg.eigvalsh(matrices)
        got = eigvalsh_2x2(matrices)
        assert got.shape == expected.shape, name
        assert np.array_equal(got, expected), (name, np.flatnonzero((got != expected).any(axis=1))[:5])


def test_zero_and_one_pixel_labels() -> None:
    matrices = np.zeros((3, 2, 2))
    matrices[1] = [[0.25, 0.0], [0.0, 0.0]]
    assert np.array_equal(eigvalsh_2x2(matrices), np.linalg.eigvalsh(matrices))


def test_rescaled_and_not_finite_matrices_go_to_lapack() -> None:
    """Entries that LAPACK would rescale first, and NaN or inf, take eigvalsh's own path."""
    matrices = symmetric(
        np.array([1e-130, 3e120, np.nan, 1.0, np.inf, 2.0]),
        np.array([2e-131, 1e119, 1.0, np.nan, 0.0, 1.0]),
        np.array([5e-131, 1e121, 1.0, 1.0, 1.0, 3.0]),
    )
    expected = np.linalg.eigvalsh(matrices)
    got = eigvalsh_2x2(matrices)
    assert np.array_equal(got, expected, equal_nan=True)
