"""The synthetic data: the vectorised tessellation against a pixel-row loop, determinism, tissue."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from xr_rasteragg.synthetic import TISSUE_CHANNELS, make_cells, make_tissue


def loop_labels(shape: tuple[int, int], cell_diameter: float, seed: int) -> NDArray[np.int32]:
    """The segmentation of ``make_cells``, one pixel row at a time (its first implementation)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    step = float(cell_diameter)
    gy, gx = int(np.ceil(ny / step)) + 1, int(np.ceil(nx / step)) + 1
    seeds = (np.stack(np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij"), -1) + 0.5) * step
    seeds = seeds + rng.uniform(-0.35, 0.35, seeds.shape) * step
    ids = rng.permutation(gy * gx).reshape(gy, gx).astype(np.int32) + 1
    radius = rng.uniform(0.45, 0.7, (gy, gx)) * step
    labels = np.zeros(shape, np.int32)
    xs = np.arange(nx)
    cx = np.minimum((xs // step).astype(np.intp), gx - 1)
    for y in range(ny):
        cy = min(int(y // step), gy - 1)
        best = np.full(nx, np.inf)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                sy, sx = np.clip(cy + dy, 0, gy - 1), np.clip(cx + dx, 0, gx - 1)
                d2 = (seeds[sy, sx, 0] - y) ** 2 + (seeds[sy, sx, 1] - xs) ** 2
                closer = (d2 < best) & (d2 < radius[sy, sx] ** 2)
                best = np.where(closer, d2, best)
                labels[y] = np.where(closer, ids[sy, sx], labels[y])
    return labels


@pytest.mark.parametrize(
    ("shape", "diameter", "seed"), [((64, 80), 30.0, 0), ((97, 61), 7.3, 4), ((50, 50), 60.0, 1)]
)
def test_labels_match_the_row_loop(shape: tuple[int, int], diameter: float, seed: int) -> None:
    labels, _ = make_cells(shape, n_channels=1, cell_diameter=diameter, seed=seed)
    np.testing.assert_array_equal(labels, loop_labels(shape, diameter, seed))


def test_make_cells_is_deterministic_and_looks_like_cells() -> None:
    labels, image = make_cells((128, 96), n_channels=3, cell_diameter=20.0, seed=3)
    again = make_cells((128, 96), n_channels=3, cell_diameter=20.0, seed=3)
    np.testing.assert_array_equal(labels, again[0])
    np.testing.assert_array_equal(image, again[1])
    assert not np.array_equal(image, make_cells((128, 96), n_channels=3, cell_diameter=20.0, seed=4)[1])
    assert image.shape == (3, 128, 96)
    assert image.dtype == np.uint16
    assert labels.dtype == np.int32
    ids = np.unique(labels)
    assert ids[0] == 0  # background between the cells
    assert 0.05 < (labels == 0).mean() < 0.6
    assert ids.shape[0] > 20
    # each cell has its own level: cell means spread far more than the noise of a cell mean
    pixels = [image[0][labels == i].astype(float) for i in ids[1:]]
    noise = np.median([p.std() / np.sqrt(p.size) for p in pixels])
    assert np.std([p.mean() for p in pixels]) > 10 * noise


def test_make_tissue() -> None:
    tissue = make_tissue((160, 128), seed=2)
    assert tissue.channels == tuple(TISSUE_CHANNELS)
    assert tissue.image.shape == (len(TISSUE_CHANNELS), 160, 128)
    assert tissue.image.dtype == np.uint16
    ids = np.unique(tissue.labels)[1:]
    assert tissue.cell_types[0] == ""
    assert set(tissue.cell_types[ids]) <= {
        "tumour",
        "stroma",
        "T helper",
        "T cytotoxic",
        "B cell",
        "macrophage",
    }
    panck = tissue.image[tissue.channels.index("panCK")]
    tumour = ids[tissue.cell_types[ids] == "tumour"]
    other = ids[tissue.cell_types[ids] != "tumour"]
    assert tumour.size
    assert other.size
    in_tumour = np.median([panck[tissue.labels == i].mean() for i in tumour])
    elsewhere = np.median([panck[tissue.labels == i].mean() for i in other])
    assert in_tumour > 5 * elsewhere
    dapi = tissue.image[tissue.channels.index("DAPI")].astype(float)
    assert dapi[tissue.labels > 0].mean() > 2 * dapi[tissue.labels == 0].mean()
    np.testing.assert_array_equal(make_tissue((160, 128), seed=2).image, tissue.image)
