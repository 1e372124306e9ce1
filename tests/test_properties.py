"""Property tests: chunking never changes a result, the kernels agree, merging splits is exact."""

from __future__ import annotations

import itertools
from typing import Any

import dask.array as da
import numpy as np
from conftest import ALL_STATS, KERNELS, assert_partials_close
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

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
