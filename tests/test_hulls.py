"""Convex hulls of pixel centres (:mod:`xr_rasteragg.hulls`) and ragged rows (:mod:`xr_rasteragg.ragged`).

The pixel count of the convex hull image is checked against
:func:`skimage.morphology.convex_hull_image` on masks of every kind (single pixels, lines of any
slope, thin diagonals, random blobs, hulls with edges longer than the table of row floors
covers) and, edge by edge, against its definition in exact fractions; hulls and their merges against
:class:`scipy.spatial.ConvexHull` of all the points. The label stage's hulls, and the solidity
and perimeter through the accessor in random chunkings, are checked on adversarial label images
(noise, one-pixel lines and diagonals, ellipses, scattered pixels, single pixels, random walks).
"""

from __future__ import annotations

import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy.spatial import ConvexHull, QhullError
from skimage.morphology import convex_hull_image

from xr_rasteragg.hulls import _chain_floors, convex_pixels_2d, fold_hulls, sorted_hull
from xr_rasteragg.ragged import Ragged


def hull_of(points: NDArray[np.int64]) -> NDArray[np.int64]:
    """Hull vertices of distinct 2-D points, sorted, by :func:`sorted_hull`."""
    points = points[np.lexsort((points[:, 1], points[:, 0]))]
    n = points.shape[0]
    scratch = [np.empty(n + 1, np.int64) for _ in range(4)]
    h = sorted_hull(points[:, 0].copy(), points[:, 1].copy(), n, *scratch)
    return np.stack([scratch[2][:h], scratch[3][:h]], axis=1)


def scipy_vertices(points: NDArray[np.int64]) -> set[tuple[int, int]]:
    """The vertices of the hull of the points by qhull (all points when they are collinear: the ends)."""
    try:
        return {tuple(p) for p in points[ConvexHull(points.astype(float)).vertices].tolist()}
    except QhullError:  # collinear: the two extreme points
        order = np.lexsort((points[:, 1], points[:, 0]))
        return {tuple(points[order[0]].tolist()), tuple(points[order[-1]].tolist())}


def masks() -> list[NDArray[np.bool_]]:
    rng = np.random.default_rng(0)
    out = []
    single = np.zeros((3, 3), bool)
    single[1, 1] = True
    out.append(single)
    out += [np.ones((1, 7), bool), np.ones((6, 1), bool), np.eye(5, dtype=bool), np.eye(6, dtype=bool)[::-1]]
    steep = np.zeros((9, 4), bool)
    steep[np.arange(9), np.arange(9) // 3] = True
    out.append(steep)
    shallow = steep.T.copy()
    out.append(shallow)
    corner = np.zeros((5, 5), bool)
    corner[0, :] = corner[:, 0] = True
    out.append(corner)
    for _ in range(60):
        shape = tuple(rng.integers(1, 14, size=2))
        mask = rng.random(shape) < rng.uniform(0.05, 0.6)
        if mask.any():
            out.append(mask)
    return out


@pytest.mark.parametrize("mask", masks(), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_convex_pixels_equal_skimage(mask: NDArray[np.bool_]) -> None:
    points = np.argwhere(mask).astype(np.int64) + np.array([1000, -50])  # anywhere on the image
    vertices = hull_of(points)
    assert {tuple(p) for p in vertices.tolist()} == scipy_vertices(points)
    expected = int(convex_hull_image(mask).sum())
    other = hull_of(np.argwhere(np.ones((2, 2), bool)).astype(np.int64))
    offsets = np.array([0, len(vertices), len(vertices), len(vertices) + len(other)])
    counts = convex_pixels_2d(offsets, np.concatenate([vertices, other]))
    np.testing.assert_array_equal(counts, [expected, 0, 4])


def long_edge_masks() -> list[NDArray[np.bool_]]:
    """Masks whose hulls have edges of more than 32 rows or columns, beside short ones (the rows
    of an edge of at most 32 rows and columns are looked up, of a longer one counted)."""
    rng = np.random.default_rng(1)
    out = []
    for shape in [(70, 45), (90, 3), (3, 90), (40, 40), (100, 60)]:
        y, x = np.indices(shape)
        out.append(x * shape[0] <= y * shape[1])  # a right triangle: its hypotenuse one edge
    for _ in range(8):  # a few scattered pixels: long edges of every slope
        shape = tuple(rng.integers(33, 120, size=2))
        mask = np.zeros(shape, bool)
        mask[rng.integers(0, shape[0], 6), rng.integers(0, shape[1], 6)] = True
        out.append(mask)
    return out


@pytest.mark.parametrize("mask", long_edge_masks(), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_convex_pixels_of_long_edges_equal_skimage(mask: NDArray[np.bool_]) -> None:
    vertices = hull_of(np.argwhere(mask).astype(np.int64))
    counts = convex_pixels_2d(np.array([0, len(vertices)]), vertices)
    assert counts[0] == int(convex_hull_image(mask).sum())


def test_an_edge_rows_floors_equal_their_definition_in_fractions() -> None:
    """Every edge of up to 40 rows and columns: the ones looked up in the table and the longer ones
    stepped, against ``Σ floor(W(y))`` over the edge's rows computed in exact fractions."""

    def floors(d: int, w: int) -> int:
        ends = [Fraction(w * y, d) for y in range(d + 1)]
        total = 0
        for y, v in enumerate(ends):
            widened = [v + Fraction(1, 2)] + [(v + ends[u]) / 2 for u in (y - 1, y + 1) if 0 <= u <= d]
            total += math.floor(max(widened))
        return total

    for d in range(1, 41):
        for w in range(-40, 41):
            assert _chain_floors(np.array([0, d]), np.array([0, w]), 2) == floors(d, w), (d, w)


def test_fold_hulls_rehulls_each_plane_of_a_union() -> None:
    rng = np.random.default_rng(1)
    slots = [np.array([0, 2, 3])] * 3  # three parts over disjoint pixels, each holding rows 0, 2 and 3
    pixels = [np.unique(rng.integers(0, [2, 40, 40], size=(90, 3)), axis=0) for _ in range(3)]
    owner = [rng.integers(0, 3, size=len(p)) for p in pixels]  # which part holds each pixel
    parts = []
    for j in range(3):
        mine = [p[o == j] for p, o in zip(pixels, owner, strict=True)]  # sorted by (z, y, x)
        parts.append(Ragged(np.cumsum([0] + [len(p) for p in mine]), np.concatenate(mine)))
    # A fourth part holds row 1 alone: its rows are copied (from a view, read in place).
    alone = hull_of(np.argwhere(np.ones((3, 3), bool)).astype(np.int64))
    two = Ragged(
        np.array([0, 2, 2 + len(alone)]),
        np.column_stack([np.full(len(alone) + 2, 5), np.ones((2, 2), np.int64).tolist() + alone.tolist()]),
    )
    parts.append(two[1:2])
    together = Ragged.concatenate(parts)
    rows = np.concatenate([*slots, [1]]).astype(np.int64)
    offsets, values, source = fold_hulls([p.offsets for p in parts], [p.values for p in parts], rows, 5)
    merged = Ragged(offsets, values)
    np.testing.assert_array_equal(merged.row(1), together.row(9))
    np.testing.assert_array_equal(source, [-1, 9, -1, -1, -2])  # several parts, one, none
    assert len(merged.row(4)) == 0
    for slot, row in enumerate([0, 2, 3]):
        got = merged.row(row)
        assert np.all(np.diff(got[:, 0]) >= 0)
        for z in (0, 1):
            plane = got[got[:, 0] == z][:, 1:]
            assert plane.tolist() == sorted(plane.tolist())
            expected = scipy_vertices(pixels[slot][pixels[slot][:, 0] == z][:, 1:])
            assert {tuple(p) for p in plane.tolist()} == expected


def test_ragged_rows() -> None:
    rows = Ragged(np.array([0, 2, 2, 5]), np.arange(15).reshape(5, 3))
    assert len(rows) == 3
    assert rows.shape == (3,)
    np.testing.assert_array_equal(rows.lengths(), [2, 0, 3])
    view = rows[1:3]
    assert view.values is rows.values
    np.testing.assert_array_equal(view.row(1), rows.row(2))
    taken = rows[np.array([2, 0])]
    np.testing.assert_array_equal(taken.offsets, [0, 3, 5])
    np.testing.assert_array_equal(taken.row(0), rows.row(2))
    np.testing.assert_array_equal(rows[np.array([False, True, True])].lengths(), [0, 3])
    stacked = Ragged.concatenate([view, taken])
    np.testing.assert_array_equal(stacked.lengths(), [0, 3, 3, 2])
    np.testing.assert_array_equal(stacked.row(2), rows.row(2))
    again = pickle.loads(pickle.dumps(stacked))
    np.testing.assert_array_equal(again.values, stacked.values)
    np.testing.assert_array_equal(again.offsets, stacked.offsets)
    assert len(Ragged.empty(4)) == 4
    with pytest.raises(ValueError, match="step 1"):
        rows[::2]
    with pytest.raises(ValueError, match="'offsets' must be 1-D"):
        Ragged(np.zeros(0, np.int64), np.zeros((0, 3), np.int64))


def adversarial_labels(rng: np.random.Generator, kind: int) -> NDArray[np.int32]:
    """A small label image (0: background) of one of six kinds: random noise of a few labels;
    thin lines (rows, columns, diagonals) of one pixel; overlapping ellipses; scattered pixels of
    one or two labels (non-contiguous); a single pixel; random walks (thin, non-convex)."""
    ny, nx = (int(n) for n in rng.integers(1, 40, 2))
    labels = np.zeros((ny, nx), np.int32)
    if kind == 0:
        labels[:] = rng.integers(0, 4, (ny, nx))
    elif kind == 1:
        for j in range(int(rng.integers(1, 6))):
            y0, x0 = rng.integers(0, [ny, nx])
            dy, dx = rng.integers(-1, 2, 2)
            steps = np.arange(int(rng.integers(1, 30)))
            ys, xs = y0 + dy * steps, x0 + dx * steps
            inside = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
            labels[ys[inside], xs[inside]] = j + 1
    elif kind == 2:
        yy, xx = np.mgrid[:ny, :nx]
        for j in range(int(rng.integers(1, 5))):
            cy, cx, r = rng.uniform(0, ny), rng.uniform(0, nx), rng.uniform(0.5, 12)
            labels[(yy - cy) ** 2 + rng.uniform(0.2, 3) * (xx - cx) ** 2 < r * r] = j + 1
    elif kind == 3:
        labels[:] = (rng.random((ny, nx)) < rng.uniform(0.02, 0.5)) * rng.integers(1, 3, (ny, nx))
    elif kind == 4:
        labels[rng.integers(0, ny), rng.integers(0, nx)] = 5
    else:
        y, x = (int(n) for n in rng.integers(0, [ny, nx]))
        for _ in range(int(rng.integers(1, 200))):
            labels[y, x] = 1 + (rng.random() < 0.2)
            y, x = (
                min(max(y + int(rng.integers(-1, 2)), 0), ny - 1),
                min(max(x + int(rng.integers(-1, 2)), 0), nx - 1),
            )
    return labels


def test_fold_hulls_keeps_the_rows_of_one_holder_where_asked() -> None:
    """With ``keep``, a row of one holder keeps its points only where its part row says so (the
    lean last merge: rows whose pixels its part did not count); rows of several holders are
    re-hulled either way, and every row's source is noted."""
    square = hull_of(np.argwhere(np.ones((3, 3), bool)).astype(np.int64))
    square = np.column_stack([np.zeros(len(square), np.int64), square])
    line = np.array([[0, 5, 1], [0, 5, 4]], np.int64)
    first = Ragged(np.array([0, len(square), len(square) + 2]), np.concatenate([square, line]))
    second = Ragged(np.array([0, 2, 2]), line + np.array([0, 1, 0]))
    offsets = [first.offsets, second.offsets]
    values = [first.values, second.values]
    rows = np.array([0, 1, 1, 2], np.int64)  # first: rows 0 and 1; second: rows 1 and 2 (empty)
    for keep, kept in (
        (None, True),
        (np.array([True, False, False, False]), True),
        (np.zeros(4, bool), False),
    ):
        new_offsets, new_values, source = fold_hulls(offsets, values, rows, 3, keep=keep)
        merged = Ragged(new_offsets, new_values)
        np.testing.assert_array_equal(source, [0, -1, -2])
        assert len(merged.row(0)) == (len(square) if kept else 0)
        if kept:
            np.testing.assert_array_equal(merged.row(0), square)
        np.testing.assert_array_equal(merged.row(1), [[0, 5, 1], [0, 5, 4], [0, 6, 1], [0, 6, 4]])
        assert len(merged.row(2)) == 0


@pytest.mark.parametrize("seed", range(6))
def test_block_hulls_equal_scipy_and_skimage_on_adversarial_labels(seed: int) -> None:
    """The compiled label stage's hulls (:func:`~xr_rasteragg.kernels.numba_shape._run_hulls`,
    through the Hull family's update) on 50 label images of each kind: per label, its vertices
    are qhull's and its convex pixel count skimage's, as is :func:`convex_pixels_2d`'s from the
    vertices."""
    from xr_rasteragg.families import Hull
    from xr_rasteragg.kernels.numba import block_partials
    from xr_rasteragg.kernels.numba_shape import SHAPE_UPDATES

    rng = np.random.default_rng(seed)
    for _ in range(50):
        labels = adversarial_labels(rng, seed)
        offset = (0, int(rng.integers(0, 40000)), int(rng.integers(0, 40000)))
        runs = block_partials.encode(labels[None], offset, 0)
        parts = runs.parts.rows(0, runs.parts.size)
        SHAPE_UPDATES[Hull](parts, None, runs, Hull())
        hull, convex = parts.hull, parts.convex
        assert isinstance(hull, Ragged)
        assert convex is not None
        np.testing.assert_array_equal(parts.labels, np.unique(labels[labels > 0]))
        for row, label in enumerate(parts.labels):
            mask = labels == label
            vertices = hull.row(row)
            assert np.all(vertices[:, 0] == 0)
            points = np.argwhere(mask) + np.array(offset[1:])
            assert [tuple(p) for p in vertices[:, 1:].tolist()] == sorted(scipy_vertices(points))
            assert convex[row] == int(convex_hull_image(mask).sum())
        np.testing.assert_array_equal(
            convex_pixels_2d(hull.offsets, np.ascontiguousarray(hull.values[:, 1:])), convex
        )


def test_block_hulls_stay_when_the_thread_reuses_its_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread keeps the hull's tables for its next block
    (:func:`~xr_rasteragg.kernels.numba_shape._scratch`): hulls made before stay as they were
    after blocks of other sizes, and equal those made in fresh tables (blocks beyond the kept
    size, here all of them)."""
    import xr_rasteragg.kernels.numba_shape as shape
    from xr_rasteragg.families import Hull
    from xr_rasteragg.kernels.numba import block_partials

    def hulls(labels: NDArray[np.int32]) -> tuple[Ragged, NDArray[np.int64]]:
        runs = block_partials.encode(labels[None], (0, 7, 3), 0)
        parts = runs.parts.rows(0, runs.parts.size)
        shape.SHAPE_UPDATES[Hull](parts, None, runs, Hull())
        assert isinstance(parts.hull, Ragged)
        assert parts.convex is not None
        return parts.hull, parts.convex

    rng = np.random.default_rng(7)
    images = [adversarial_labels(rng, seed) for seed in range(6)]
    images.sort(key=lambda labels: -labels.size)
    images = images[1::2] + images[::2]  # smaller blocks after larger ones, and larger after smaller
    kept = [hulls(labels) for labels in images]
    assert not any(np.shares_memory(hull.values, shape._SCRATCH.points) for hull, _ in kept)
    monkeypatch.setattr(shape, "SCRATCH_BYTES", 0)
    for labels, (hull, convex) in zip(images, kept, strict=True):
        fresh, fresh_convex = hulls(labels)
        np.testing.assert_array_equal(hull.offsets, fresh.offsets)
        np.testing.assert_array_equal(hull.values, fresh.values)
        np.testing.assert_array_equal(convex, fresh_convex)


@pytest.mark.parametrize("seed", range(6))
def test_solidity_and_perimeter_of_adversarial_labels_in_any_chunking(seed: int) -> None:
    """Solidity and perimeter through the accessor equal regionprops_table's on 8 label images of
    each kind, each cut into random chunks (of one pixel up to the whole image): labels in many
    blocks, whose hulls are merged and whose border pixels see their neighbours' blocks."""
    import dask.array as da
    import xarray as xr
    from skimage.measure import regionprops_table

    import xr_rasteragg  # noqa: F401  (registers the accessor)

    rng = np.random.default_rng(100 + seed)
    props = ("perimeter", "solidity")
    for _ in range(8):
        labels = adversarial_labels(rng, seed)
        if not labels.any():
            continue
        chunks = tuple(int(rng.integers(1, n + 1)) for n in labels.shape)
        expected = regionprops_table(labels, properties=("label", *props))
        result = xr.DataArray(da.from_array(labels, chunks=chunks), dims=("y", "x")).rasteragg.aggregate(
            props
        )
        result = result.compute()  # under query planning, a dask-backed variable has no len()
        np.testing.assert_array_equal(result["label"], expected["label"])
        for name in props:
            np.testing.assert_allclose(result[name], expected[name], rtol=1e-9, atol=1e-9, err_msg=name)


def test_no_numba_list_code_compiled_per_process() -> None:
    """The kernels take no numba typed lists, whose code numba compiles in every process (it
    cannot be cached): a fresh process's calls that merge hulls across blocks (solidity) and
    sweep a float image compile none of it."""
    import subprocess
    import sys

    script = """
from numba.core import event
compiled = []
class Listener(event.Listener):
    def on_start(self, ev): pass
    def on_end(self, ev): compiled.append(getattr(ev.data["dispatcher"].py_func, "__module__", ""))
event.register("numba:compile", Listener())
import numpy as np, dask.array as da
from xr_rasteragg.engine import aggregate
from xr_rasteragg.synthetic import make_cells
labels, image = make_cells((120, 100), n_channels=2, cell_diameter=15, seed=2)
lazy = da.from_array(labels[None], chunks=(1, 50, 40))
aggregate(lazy, da.from_array(image[:, None], chunks=(1, 1, 50, 40)), ["mean", "solidity"]).compute()
aggregate(lazy, da.from_array(image[:, None].astype(np.float32), chunks=(1, 1, 50, 40)), ["var"]).compute()
print(sorted({m for m in compiled if m.startswith("numba.typed")}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
