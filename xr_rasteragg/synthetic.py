"""Synthetic multiplexed images and cell segmentations, for the demo, tests and benchmarks.

Cells are Voronoi regions of jittered grid seeds, cut to a disc around each seed so that gaps of
background (label 0) separate them, as in a real segmentation. Each cell has its own expression
level per channel; pixels add Poisson-like noise on top.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["make_cells"]


def make_cells(
    shape: tuple[int, int] = (1024, 1024),
    n_channels: int = 8,
    cell_diameter: float = 30.0,
    *,
    seed: int = 0,
    dtype: type[np.integer] = np.uint16,
) -> tuple[NDArray[np.int32], NDArray[np.integer]]:
    """Make a synthetic segmentation and a multi-channel image of the same cells.

    Parameters
    ----------
    shape
        ``(y, x)`` size of the image in pixels.
    n_channels
        Number of image channels.
    cell_diameter
        Typical distance between neighbouring cell centres, in pixels.
    seed
        Seed of the random generator; the same seed gives the same data.
    dtype
        Integer dtype of the image.

    Returns
    -------
    labels
        Array of shape ``(y, x)``, int32: 0 for background, ids ``1..n`` for cells in random order.
    image
        Array of shape ``(c, y, x)`` in ``dtype``.

    Examples
    --------
    >>> labels, image = make_cells((256, 256), n_channels=3)
    >>> labels.shape, image.shape
    ((256, 256), (3, 256, 256))
    """
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
                sy = np.clip(cy + dy, 0, gy - 1)
                sx = np.clip(cx + dx, 0, gx - 1)
                d2 = (seeds[sy, sx, 0] - y) ** 2 + (seeds[sy, sx, 1] - xs) ** 2
                closer = (d2 < best) & (d2 < radius[sy, sx] ** 2)
                best = np.where(closer, d2, best)
                labels[y] = np.where(closer, ids[sy, sx], labels[y])

    info = np.iinfo(dtype)
    level = rng.lognormal(mean=np.log(info.max / 40), sigma=1.0, size=(n_channels, gy * gx + 1))
    level[:, 0] = info.max / 200  # background autofluorescence
    mean = level[:, labels]
    image = rng.normal(mean, np.sqrt(mean) + 1.0)
    return labels, np.clip(image, 0, info.max).astype(dtype)
