"""Adversarial precision (DESIGN.md §2): data where raw power sums cancel catastrophically.

The reference is float64 two-pass NumPy: the mean first, then moments of ``x - mean``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import dask.array as da
import numpy as np
import pytest
import scipy.stats
from conftest import KERNELS, assert_partials_close, label_mask, sub_block_partials
from numpy.typing import NDArray

from xr_rasteragg.engine import aggregate
from xr_rasteragg.partials import Needs, Partials, merge

MOMENT_STATS = ("sum", "mean", "var", "std", "skew", "kurtosis")


def two_pass(x: NDArray[Any]) -> dict[str, float]:
    """Moments of ``x`` in float64 with two passes."""
    x = x.astype(np.float64)
    mean = x.mean()
    d = x - mean
    m2, m3, m4 = (np.mean(d**k) for k in (2, 3, 4))
    return {
        "sum": float(x.sum()),
        "mean": float(mean),
        "var": float(m2),
        "std": float(np.sqrt(m2)),
        "skew": float(m3 / m2**1.5),
        "kurtosis": float(m4 / m2**2 - 3.0),
    }


def assert_moments(values: dict[str, Any], row: int, channel: int, x: NDArray[Any]) -> None:
    """The contract's accuracy: relative 1e-9 for sum/mean/var/std, absolute 1e-6 for skew/kurtosis."""
    expected = two_pass(x)
    for name in ("sum", "mean", "var", "std"):
        assert values[name][row, channel] == pytest.approx(expected[name], rel=1e-9, abs=0), name
    for name in ("skew", "kurtosis"):
        assert values[name][row, channel] == pytest.approx(expected[name], rel=0, abs=1e-6), name


def near_max_uint16(shape: tuple[int, ...], rng: np.random.Generator, p: float = 0.5) -> NDArray[np.uint16]:
    """uint16 values 65533..65535 (a spread of ±1 about 65534); ``p`` < 0.5 skews them."""
    return (65533 + rng.binomial(2, p, size=shape)).astype(np.uint16)


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_near_max_uint16_many_chunks(engine_kernel: Callable[..., Any], p: float) -> None:
    rng = np.random.default_rng(0)
    labels = np.broadcast_to((np.arange(768) // 200 + 1).astype(np.int32), (1, 512, 768)).copy()
    labels[0, ::7, ::5] = 0
    image = near_max_uint16((2, *labels.shape), rng, p)
    dlabels = da.from_array(labels, chunks=(1, 100, 90))
    dimage = da.from_array(image, chunks=(1, 1, 64, 96))
    result = aggregate(dlabels, dimage, MOMENT_STATS, background=0)
    np.testing.assert_array_equal(result.labels, [1, 2, 3, 4])
    for row, label in enumerate(result.labels):
        for channel in range(2):
            assert_moments(result.values, row, channel, image[channel][labels == label])


@pytest.mark.parametrize("layout", ["numpy", "dask"])
def test_ten_million_pixel_label(layout: str) -> None:
    rng = np.random.default_rng(1)
    image = near_max_uint16((1, 1, 2000, 5000), rng, 0.3)
    labels = np.ones((1, 2000, 5000), np.uint8)
    if layout == "dask":
        args: tuple[Any, Any] = (
            da.from_array(labels, chunks=(1, 500, 1000)),
            da.from_array(image, chunks=(1, 1, 500, 1000)),
        )
    else:
        args = (labels, image)
    result = aggregate(*args, (*MOMENT_STATS, "count", "min", "max"))
    assert result.values["count"][0] == 10**7
    assert result.values["min"][0, 0] == 65533
    assert result.values["max"][0, 0] == 65535
    assert_moments(result.values, 0, 0, image[0].ravel())


@pytest.mark.parametrize("dtype", ["uint16", "float64"])
def test_outlier_first_then_tight(engine_kernel: Callable[..., Any], dtype: str) -> None:
    """The first pixel of the label is far away; the rest is a tight distribution far from zero."""
    rng = np.random.default_rng(2)
    labels = np.zeros((1, 300, 400), np.int64)
    labels[0, 20:, 30:] = 9
    if dtype == "uint16":
        image = near_max_uint16((1, *labels.shape), rng, 0.4)
        image[0, 0, 20, 30] = 0
    else:
        image = 1e5 + rng.normal(0.0, 1.0, size=(1, *labels.shape))
        image[0, 0, 20, 30] = -1e7
    result = aggregate(
        da.from_array(labels, chunks=(1, 64, 64)), da.from_array(image, chunks=(1, 1, 50, 70)), MOMENT_STATS
    )
    np.testing.assert_array_equal(result.labels, [0, 9])
    assert_moments(result.values, 1, 0, image[0][labels == 9])
    assert_moments(result.values, 0, 0, image[0][labels == 0])


def test_tight_distribution_far_from_zero_float64(engine_kernel: Callable[..., Any]) -> None:
    """Values 1e6 + noise of spread 1: Σx² and (Σx)²/n agree to 12 digits.

    (Float64 partials that carry sums resolve the mean to about 1e6 · 2**-52, so the error grows
    with offset / spread; 1e6 is already 15 times the offset of uint16 data near 65535.)
    """
    rng = np.random.default_rng(3)
    labels = (np.arange(200 * 300).reshape(1, 200, 300) // 7000).astype(np.uint64) + np.uint64(2**63)
    image = 1e6 + rng.exponential(1.0, size=(1, *labels.shape))
    result = aggregate(
        da.from_array(labels, chunks=(1, 33, 41)), da.from_array(image, chunks=(1, 1, 40, 50)), MOMENT_STATS
    )
    for row, label in enumerate(result.labels):
        assert_moments(result.values, row, 0, image[0][label_mask(labels, int(label))])


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16"])
@pytest.mark.parametrize("stats", [MOMENT_STATS, ("mean", "var")])
def test_small_integer_images_over_their_whole_range(dtype: str, stats: tuple[str, ...]) -> None:
    """Exact integer power sums for 8- and 16-bit images, and the float fallback where they could overflow.

    Values span the whole dtype: for 16 bits the shifted fourth powers of the large labels pass
    2**63, so those labels take the float path; the small ones stay on the integer path. Some
    labels are constant, some have one outlier, some take only the two extreme values.
    """
    rng = np.random.default_rng(4)
    info = np.iinfo(dtype)
    flat = np.arange(120 * 400).reshape(1, 120, 400)
    labels = np.where(
        flat < 4000, 1000 + flat // 7, np.where(flat < 28000, 2 + flat // 900, 100 + flat // 5000)
    )
    image = rng.integers(info.min, int(info.max) + 1, size=(2, *labels.shape)).astype(dtype)
    image[1, labels == 3] = info.max
    image[1, labels == 4] = info.min
    image[1, 0, 0, 30] = info.max
    two_values = labels == 10
    image[0, two_values] = np.where(rng.random(int(two_values.sum())) < 0.5, info.min, info.max)
    result = aggregate(
        da.from_array(labels, chunks=(1, 60, 200)),
        da.from_array(image, chunks=(1, 1, 60, 200)),
        (*stats, "min", "max"),
    )
    for row, label in enumerate(result.labels):
        for channel in range(2):
            x = image[channel][labels == label]
            assert result.values["min"][row, channel] == x.min()
            assert result.values["max"][row, channel] == x.max()
            expected = two_pass(x)
            for name in stats:
                if name in ("skew", "kurtosis"):
                    if expected["var"] <= (1e-15 * expected["mean"]) ** 2 or np.ptp(x) == 0:
                        continue
                    assert result.values[name][row, channel] == pytest.approx(
                        expected[name], rel=0, abs=1e-6
                    ), name
                else:
                    assert result.values[name][row, channel] == pytest.approx(
                        expected[name], rel=1e-9, abs=1e-300
                    ), name


# --- merge ------------------------------------------------------------------------------------


def merge_case(skipna: bool) -> tuple[NDArray[np.integer], NDArray[Any], Needs]:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, size=(1, 40, 60)).astype(np.int16)
    labels[0, 10:30, 20:45] = 7  # a label spread over several sub-blocks
    labels[0, 39, 59] = 11  # a label in one sub-block only
    image = 1e4 + rng.normal(0.0, 1.0, size=(2, *labels.shape))
    if skipna:
        image[0, 0, 12:14, 22:40] = np.nan
    return labels, image, Needs(order=4, extrema=True, skipna=skipna)


@pytest.mark.parametrize("skipna", [False, True])
def test_merge_groupings_and_orders_agree_with_one_block(skipna: bool) -> None:
    labels, image, needs = merge_case(skipna)
    whole = KERNELS["numba"](labels, [image], (0, 0, 0), needs)
    p = sub_block_partials(labels, image, [13, 27], [9, 31, 50], needs)
    assert len(p) == 12
    rng = np.random.default_rng(5)
    shuffled = [p[i] for i in rng.permutation(len(p))]
    groupings = {
        "flat": merge(p),
        "reversed": merge(p[::-1]),
        "pairs": merge([merge(p[i : i + 2]) for i in range(0, len(p), 2)]),
        "left fold": _fold(p, lambda acc, q: merge([acc, q])),
        "right fold": _fold(p[::-1], lambda acc, q: merge([q, acc])),
        "shuffled threes": merge([merge(shuffled[i : i + 3]) for i in range(0, len(p), 3)]),
        "nested": merge([merge([p[0], merge(p[5:9])]), merge([merge(p[1:5]), *p[9:]])]),
    }
    for name, merged in groupings.items():
        try:
            assert_partials_close(merged, whole)
        except AssertionError as error:
            raise AssertionError(f"grouping {name!r}: {error}") from error


def test_merge_commutes_pairwise() -> None:
    labels, image, needs = merge_case(False)
    p = sub_block_partials(labels, image, [20], [30], needs)
    for a, b in itertools.permutations(p, 2):
        assert_partials_close(merge([a, b]), merge([b, a]), rtol=1e-12)


def test_merge_with_empty_partials() -> None:
    labels, image, needs = merge_case(False)
    p = sub_block_partials(labels, image, [20], [30], needs)
    empty = KERNELS["numba"](np.full((1, 1, 1), 3, np.int16), [image[:, :, :1, :1]], (0, 0, 0), needs, skip=3)
    assert empty.size == 0
    assert_partials_close(merge([empty, *p, empty]), merge(p), rtol=0)


def _fold(parts: list[Partials], step: Callable[[Partials, Partials], Partials]) -> Partials:
    acc = parts[0]
    for q in parts[1:]:
        acc = step(acc, q)
    return acc


# --- large means, 64-bit integers and constant labels --------------------------------------------


def exact_variance(x: NDArray[Any]) -> Fraction:
    """The population variance of ``x`` in exact rational arithmetic."""
    values = [Fraction(int(v)) if x.dtype.kind in "iu" else Fraction(float(v)) for v in x.ravel()]
    mean = sum(values, Fraction(0)) / len(values)
    return sum(((v - mean) ** 2 for v in values), Fraction(0)) / len(values)


LARGE_MEANS: dict[str, Callable[[np.random.Generator, tuple[int, ...]], NDArray[Any]]] = {
    "float64 1e8 ± 1": lambda rng, shape: 1e8 + rng.integers(-1, 2, shape).astype(np.float64),
    "float64 1e12 + N(0, 1)": lambda rng, shape: 1e12 + rng.normal(0.0, 1.0, shape),
    "uint32 near 2**32": lambda rng, shape: (2**32 - 1 - rng.integers(0, 3, shape)).astype(np.uint32),
    "int32 near -2**31": lambda rng, shape: (-(2**31) + rng.integers(0, 3, shape)).astype(np.int32),
    "int64 within 500 of 2**62": lambda rng, shape: 2**62 + rng.integers(-500, 500, shape),
    "uint64 within 1000 of 2**64": lambda rng, shape: (
        np.uint64(2**64 - 1) - rng.integers(0, 1000, shape).astype(np.uint64)
    ),
}


@pytest.mark.parametrize("case", sorted(LARGE_MEANS))
def test_large_means_spanning_blocks(engine_kernel: Callable[..., Any], case: str) -> None:
    """Labels whose mean is 1e8 to 1e19 times their spread, each spanning several blocks: the
    variance to 1e-9 of the exact one (the float64 merge of raw sums and of rounded run means
    lost up to 2.6e-4 here, and int64 values converted to float64 before centring lost all)."""
    rng = np.random.default_rng(7)
    labels = (np.arange(60 * 50).reshape(1, 60, 50) // 700).astype(np.int32)
    image = LARGE_MEANS[case](rng, (1, *labels.shape))
    result = aggregate(
        da.from_array(labels, chunks=(1, 25, 20)),
        da.from_array(image, chunks=(1, 1, 25, 20)),
        ("var", "std", "skew", "kurtosis"),
        background=None,
    )
    for row, label in enumerate(result.labels):
        x = image[0][labels == label]
        var = exact_variance(x)
        assert result.values["var"][row, 0] == pytest.approx(float(var), rel=1e-9, abs=0)
        assert result.values["std"][row, 0] == pytest.approx(float(var) ** 0.5, rel=1e-9, abs=0)
        shape = (
            scipy.stats.skew((x - x.min()).astype(np.float64)),
            scipy.stats.kurtosis((x - x.min()).astype(np.float64)),
        )
        assert result.values["skew"][row, 0] == pytest.approx(shape[0], rel=1e-6, abs=1e-6)
        assert result.values["kurtosis"][row, 0] == pytest.approx(shape[1], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(0.1, "float64"), (0.1, "float32"), (1e300, "float64"), (int(1.2e17), "int64"), (2**64 - 7, "uint64"),
     (-(2**31), "int32"), (65535, "uint16"), (-3, "int8")],
)  # fmt: skip
def test_constant_labels_have_no_spread(engine_kernel: Callable[..., Any], value: Any, dtype: str) -> None:
    """All values equal: var and std exactly 0, skew and kurtosis NaN, over any number of blocks
    (0.1 over 1000 px gave var 1.2e-32, skew 1 and kurtosis -2; int64 1.2e17 gave var 95265)."""
    labels = np.zeros((1, 30, 100), np.int16)
    labels[0, 0, :] = 1  # a row of 100 px, in 4 blocks
    labels[0, 1:, 10:40] = 2  # 870 px in 6 blocks
    image = np.full((2, *labels.shape), value, dtype=dtype)
    image[1, 0, 1:, 10:40] = np.array(0, dtype=dtype) if dtype != "uint64" else 5  # constant too
    result = aggregate(
        da.from_array(labels, chunks=(1, 16, 30)),
        da.from_array(image, chunks=(1, 1, 16, 30)),
        ("mean", "var", "std", "skew", "kurtosis"),
    )
    np.testing.assert_array_equal(result.values["var"], 0.0)
    np.testing.assert_array_equal(result.values["std"], 0.0)
    assert np.isnan(result.values["skew"]).all()
    assert np.isnan(result.values["kurtosis"]).all()
    assert result.values["mean"][1, 0] == float(np.array(value, dtype=dtype))
