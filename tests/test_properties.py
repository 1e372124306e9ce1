"""Property tests: chunking never changes a result (engine, accessor, class), the kernels agree,
merging splits is exact, the merge is associative and commutative, and adversarial precision holds
for any chunking."""

from __future__ import annotations

import itertools
from fractions import Fraction
from typing import Any
from unittest import mock

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from conftest import ALL_STATS, KERNELS, assert_partials_close
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

import xr_rasteragg  # registers the accessor
import xr_rasteragg.engine
from xr_rasteragg import RasterAggregator
from xr_rasteragg.engine import aggregate
from xr_rasteragg.partials import Needs, merge

#: A few ids per label dtype, with the dtype's extremes and negatives where signed.
IDS = {
    "int8": [-128, -1, 0, 3, 127],
    "uint16": [0, 1, 2, 65535],
    "int64": [-(2**63), -5, 0, 2**40 + 1],
    "uint64": [0, 9, 2**63 + 5, 2**64 - 1],
}
IMAGE_DTYPES = ["uint16", "float32", "float64"]

FAST = settings(max_examples=30, deadline=None)


@st.composite
def cases(draw: st.DrawFn, nan: bool = True) -> tuple[NDArray[np.integer], NDArray[Any], list[int]]:
    """Small labels ``(z, y, x)`` with few ids, an image ``(c, z, y, x)`` of integer values (NaN
    pixels in float images), and the ids the labels can hold."""
    label_dtype = draw(st.sampled_from(sorted(IDS)))
    ids = IDS[label_dtype]
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    labels = draw(hnp.arrays(label_dtype, shape, elements=st.sampled_from(ids)))
    image_dtype = draw(st.sampled_from(IMAGE_DTYPES))
    nchan = draw(st.integers(1, 3))
    values = st.integers(0, 1000).map(float)
    if nan and image_dtype != "uint16":
        values = values | st.just(np.nan)
    image = draw(hnp.arrays(np.float64, (nchan, *shape), elements=values)).astype(image_dtype)
    return labels, image, ids


@st.composite
def chunks_for(draw: st.DrawFn, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Irregular chunks: each axis cut into pieces of random sizes."""
    out = []
    for n in shape:
        sizes: list[int] = []
        while sum(sizes) < n:
            sizes.append(draw(st.integers(1, n - sum(sizes))))
        out.append(tuple(sizes))
    return tuple(out)


def assert_results_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name in a:
        np.testing.assert_allclose(
            np.asarray(a[name], dtype=float),
            np.asarray(b[name], dtype=float),
            rtol=1e-9,
            atol=1e-9,
            equal_nan=True,
            err_msg=name,
        )


@FAST
@given(data=st.data(), case=cases())
def test_results_do_not_depend_on_chunking(data: st.DataObject, case: Any) -> None:
    labels, image, ids = case
    skipna = data.draw(st.booleans(), label="skipna")
    background = data.draw(st.sampled_from([None, 0]), label="background")
    index = data.draw(st.none() | st.lists(st.sampled_from([*ids, 77]), max_size=6), label="index")
    results = []
    for _ in range(2):
        label_chunks = data.draw(chunks_for(labels.shape), label="label chunks")
        image_chunks = data.draw(chunks_for(image.shape), label="image chunks")
        dlabels = da.from_array(labels, chunks=label_chunks)
        dimage = da.from_array(image, chunks=image_chunks)
        results.append(
            aggregate(dlabels, dimage, ALL_STATS, index=index, background=background, skipna=skipna)
        )
    whole = aggregate(labels, image, ALL_STATS, index=index, background=background, skipna=skipna)
    for result in results:
        np.testing.assert_array_equal(result.labels, whole.labels)
        (values,) = da.compute(result.values)
        assert_results_equal(values, whole.values)


@st.composite
def needs(draw: st.DrawFn) -> Needs:
    return Needs(order=draw(st.integers(0, 4)), extrema=draw(st.booleans()), skipna=draw(st.booleans()))


def channel_chunks(draw: st.DrawFn, image: NDArray[Any]) -> list[NDArray[Any]]:
    """The image as a list of channel chunks, as the engine passes it to a kernel."""
    cuts = sorted(draw(st.sets(st.integers(1, image.shape[0] - 1), max_size=2))) if image.shape[0] > 1 else []
    return [image[a:b] for a, b in itertools.pairwise([0, *cuts, image.shape[0]])]


@FAST
@given(data=st.data(), case=cases(), needs=needs())
def test_numba_and_xp_kernels_agree(data: st.DataObject, case: Any, needs: Needs) -> None:
    labels, image, ids = case
    skip = data.draw(st.sampled_from([None, *ids]), label="skip")
    offset = data.draw(st.tuples(*[st.integers(0, 10**6)] * 3), label="offset")
    chunks = channel_chunks(data.draw, image)
    fast = KERNELS["numba"](labels, chunks, offset, needs, skip)
    generic = KERNELS["xp"](labels, chunks, offset, needs, skip)
    assert_partials_close(fast, generic)
    if needs.extrema and fast.size:
        assert fast.min is not None
        assert generic.min is not None
        assert fast.min.dtype == generic.min.dtype == image.dtype
    no_image = KERNELS["numba"](labels, None, offset, needs, skip)
    assert_partials_close(no_image, KERNELS["xp"](labels, None, offset, needs, skip))


@FAST
@given(data=st.data(), case=cases(), needs=needs(), kernel=st.sampled_from(sorted(KERNELS)))
def test_merge_of_random_splits_equals_whole(
    data: st.DataObject, case: Any, needs: Needs, kernel: str
) -> None:
    labels, image, _ = case
    block = KERNELS[kernel]
    whole = block(labels, [image], (0, 0, 0), needs)
    edges = []
    for n in labels.shape:
        cuts = data.draw(st.sets(st.integers(1, n - 1), max_size=3), label="cuts") if n > 1 else set()
        edges.append(list(itertools.pairwise([0, *sorted(cuts), n])))
    parts = []
    for (z0, z1), (y0, y1), (x0, x1) in itertools.product(*edges):
        window = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        parts.append(block(labels[window], [image[(slice(None), *window)]], (z0, y0, x0), needs))
    order = data.draw(st.permutations(range(len(parts))), label="order")
    fan_in = data.draw(st.integers(2, 4), label="fan-in")
    shuffled = [parts[i] for i in order]
    while len(shuffled) > 1:
        shuffled = [merge(shuffled[i : i + fan_in]) for i in range(0, len(shuffled), fan_in)]
    assert_partials_close(shuffled[0], whole)


# --- merge algebra ------------------------------------------------------------------------------


def slabs(data: st.DataObject, labels: NDArray[Any], image: NDArray[Any], needs: Needs) -> list[Any]:
    """Partials of three disjoint slabs of the pixels (cut along y or x, some possibly empty)."""
    axis = data.draw(st.sampled_from([1, 2]), label="axis")
    n = labels.shape[axis]
    cuts = sorted(data.draw(st.lists(st.integers(0, n), min_size=2, max_size=2), label="cuts"))
    parts = []
    for start, stop in itertools.pairwise([0, *cuts, n]):
        window = [slice(None)] * 3
        window[axis] = slice(start, stop)
        offset = [0, 0, 0]
        offset[axis] = start
        block = labels[tuple(window)]
        parts.append(KERNELS["numba"](block, [image[(slice(None), *window)]], tuple(offset), needs))
    return parts


@FAST
@given(data=st.data(), case=cases(), needs=needs())
def test_merge_is_associative_and_commutative(data: st.DataObject, case: Any, needs: Needs) -> None:
    labels, image, _ = case
    a, b, c = slabs(data, labels, image, needs)
    left = merge([merge([a, b]), c])
    assert_partials_close(merge([a, merge([b, c])]), left, rtol=1e-12)
    assert_partials_close(merge([merge([c, a]), b]), left, rtol=1e-12)
    assert_partials_close(merge([c, b, a]), left, rtol=1e-12)
    assert_partials_close(merge([b, a]), merge([a, b]), rtol=1e-12)


# --- adversarial precision, any chunking --------------------------------------------------------

MOMENTS = ("sum", "mean", "var", "std", "skew", "kurtosis")


#: Integer image dtypes, every one over its whole range.
INTEGER_DTYPES = ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"]


@st.composite
def adversarial(draw: st.DrawFn) -> tuple[NDArray[np.integer], NDArray[Any]]:
    """Few labels over values where float arithmetic loses the answer.

    Either integers of any dtype (a base anywhere in the dtype's range, its extremes included,
    plus a spread of 0 to 1000, clipped to the range; or values over the whole range), or
    float64 ``offset + spread * k`` with ``|offset| / spread`` up to 1e12 and k in 0..4 (float32
    up to 1e6, the most its 24 bits carry).
    """
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 10)), draw(st.integers(1, 10)))
    labels = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, 3)))
    kind = draw(st.sampled_from(["integer", "float64", "float32"]))
    if kind == "integer":
        dtype = np.dtype(draw(st.sampled_from(INTEGER_DTYPES)))
        info = np.iinfo(dtype)
        if draw(st.booleans()):
            values = draw(hnp.arrays(dtype, (2, *shape), elements=st.integers(int(info.min), int(info.max))))
            return labels, values
        base = draw(
            st.sampled_from([int(info.min), int(info.max), 0, int(info.max) // 3, int(info.min) // 3])
        )
        base = draw(st.integers(int(info.min), int(info.max)) | st.just(base))
        spread = draw(st.sampled_from([0, 1, 2, 1000]))
        steps = draw(hnp.arrays(np.int64, (2, *shape), elements=st.integers(-spread, spread)))
        values = np.clip(base + steps.astype(object), int(info.min), int(info.max))
        return labels, values.astype(dtype)
    spread = draw(st.sampled_from([1.0, 1e-3, 0.37, 1e5]))
    exponent = draw(st.integers(0, 12 if kind == "float64" else 6))
    offset = draw(st.sampled_from([-1.0, 1.0])) * spread * 10.0**exponent
    steps = draw(hnp.arrays(np.float64, (2, *shape), elements=st.integers(0, 4).map(float)))
    return labels, (offset + spread * steps).astype(kind)


def exact_moments(x: NDArray[Any]) -> dict[str, float]:
    """Moments of ``x`` in exact rational arithmetic, rounded once to float64 at the end.

    (A float64 two-pass reference is itself off for labels that are constant up to the rounding
    of their mean: three pixels of 0.1 have a float64 mean of 0.1 + 1 ulp, a variance of 1e-34 and
    a skewness of -1.)
    """
    values = [Fraction(int(v)) if x.dtype.kind in "iu" else Fraction(float(v)) for v in x.ravel()]
    n = len(values)
    mean = sum(values, Fraction(0)) / n
    m2, m3, m4 = (sum(((v - mean) ** k for v in values), Fraction(0)) / n for k in (2, 3, 4))
    shape = {}
    if m2:  # m3 / m2**1.5 as (m3 / m2) / sqrt(m2): one rounding before the square root
        shape = {"skew": float(m3 / m2) / float(m2) ** 0.5, "kurtosis": float(m4 / m2**2) - 3.0}
    return {"sum": float(mean * n), "mean": float(mean), "var": float(m2), "std": float(m2) ** 0.5, **shape}


def assert_contract(got: dict[str, float], x: NDArray[Any], where: Any) -> None:
    """The precision contract of docs/statistics.md against the exact moments of ``x``.

    sum and mean: relative error 1e-9, or for values of both signs that cancel, an error of at
    most 2**-50 · n · max|x| (the rounding of float64 numbers of the size of the values) in the
    sum; var and std: relative 1e-9; skew and kurtosis: 1e-6 relative, absolute below 1; a
    constant label has var and std exactly 0 and skew and kurtosis NaN.
    """
    expected = exact_moments(x)
    n = x.size
    cancel = 2.0**-50 * float(np.max(np.abs(x.astype(np.float64))))
    for name, slack in (("sum", n * cancel), ("mean", cancel), ("var", 0.0), ("std", 0.0)):
        assert abs(got[name] - expected[name]) <= 1e-9 * abs(expected[name]) + slack, (
            name,
            got,
            expected,
            where,
        )
    if "skew" not in expected:  # a constant label: exactly no spread, no shape (NaN, as scipy.stats)
        assert got["var"] == got["std"] == 0.0, where
        assert np.isnan(got["skew"])
        assert np.isnan(got["kurtosis"])
        return
    for name in ("skew", "kurtosis"):
        assert got[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-6), (name, got, expected, where)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), case=adversarial(), kernel=st.sampled_from(sorted(KERNELS)))
def test_adversarial_precision_for_any_chunking(data: st.DataObject, case: Any, kernel: str) -> None:
    """Every kernel, any chunking, lazy or eager: within the contract of the exact moments."""
    labels, image = case
    label_chunks = data.draw(chunks_for(labels.shape), label="label chunks")
    image_chunks = data.draw(chunks_for(image.shape), label="image chunks")
    lazy = data.draw(st.booleans(), label="lazy (with an index)")
    index = np.arange(4) if lazy else None
    with mock.patch.object(xr_rasteragg.engine, "kernel_for", return_value=KERNELS[kernel]):
        result = aggregate(
            da.from_array(labels, chunks=label_chunks),
            da.from_array(image, chunks=image_chunks),
            MOMENTS,
            index=index,
        )
        (values,) = da.compute(result.values)
    for row, label in enumerate(result.labels):
        for channel in range(image.shape[0]):
            x = image[channel][labels == label]
            if x.size:
                got = {name: float(values[name][row, channel]) for name in MOMENTS}
                assert_contract(got, x, (label, channel))


@FAST
@given(data=st.data(), case=adversarial())
def test_adversarial_results_agree_across_kernels_chunkings_and_laziness(
    data: st.DataObject, case: Any
) -> None:
    """The compiled and the array-API kernel, eager and lazy, any chunking: the same statistics.

    They differ only in the order of float64 roundings, so they agree to the contract's
    tolerance wherever it is relative, and to the rounding of the values where they cancel.
    """
    labels, image = case
    runs = []
    for kernel in ("numba", "xp"):
        label_chunks = data.draw(chunks_for(labels.shape), label="label chunks")
        image_chunks = data.draw(chunks_for(image.shape), label="image chunks")
        with mock.patch.object(xr_rasteragg.engine, "kernel_for", return_value=KERNELS[kernel]):
            args = (da.from_array(labels, chunks=label_chunks), da.from_array(image, chunks=image_chunks))
            eager = aggregate(*args, MOMENTS, background=None)
            lazy = aggregate(*args, MOMENTS, index=eager.labels)
            (lazy_values,) = da.compute(lazy.values)
        runs += [eager.values, lazy_values]
    scale = float(np.max(np.abs(image.astype(np.float64)))) if image.size else 0.0
    for values in runs[1:]:
        for name in MOMENTS:
            a, b = np.asarray(runs[0][name]), np.asarray(values[name])
            slack = 2.0**-49 * scale * (labels.size if name == "sum" else 1)
            rtol, atol = (
                (1e-6, 1e-6)
                if name in ("skew", "kurtosis")
                else (2e-9, slack if name in ("sum", "mean") else 0)
            )
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


# --- the accessor and the class, any chunking ---------------------------------------------------


@FAST
@given(data=st.data(), case=cases())
def test_accessor_and_class_do_not_depend_on_chunking(data: st.DataObject, case: Any) -> None:
    labels, image, ids = case
    dims = ("z", "y", "x")
    xlabels = xr.DataArray(labels, dims=dims)
    ximage = xr.DataArray(image, dims=("c", *dims))
    index = data.draw(
        st.none() | st.lists(st.sampled_from([*ids, 77]), min_size=1, max_size=4), label="index"
    )
    whole = ximage.rasteragg.aggregate(xlabels, ALL_STATS, index=index)
    label_chunks = data.draw(chunks_for(labels.shape), label="label chunks")
    image_chunks = data.draw(chunks_for(image.shape), label="image chunks")
    chunked = ximage.chunk(dict(zip(("c", *dims), image_chunks, strict=True))).rasteragg.aggregate(
        xlabels.chunk(dict(zip(dims, label_chunks, strict=True))), ALL_STATS, index=index
    )
    xr.testing.assert_allclose(chunked.compute(), whole, rtol=1e-9, atol=1e-9)

    # The class wants the same spatial chunks for mask and image: those of the labels.
    mask = da.from_array(labels, chunks=label_chunks)
    pixels = da.from_array(image, chunks=(image_chunks[0], *label_chunks))
    names = ("sum", "mean", "count", "var", "min", "max")
    frames = RasterAggregator(mask, pixels, run_on_gpu=False).aggregate_stats(names, index=index)
    reference = RasterAggregator(labels, image, run_on_gpu=False).aggregate_stats(names, index=index)
    for name, got, expected in zip(names, frames, reference, strict=True):
        np.testing.assert_allclose(
            got.to_numpy(float), expected.to_numpy(float), rtol=1e-9, atol=1e-9, equal_nan=True, err_msg=name
        )
