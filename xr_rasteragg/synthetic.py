"""Synthetic multiplexed images and cell segmentations, for the demo, tests and benchmarks.

Cells are Voronoi regions of jittered grid seeds, cut to a disc around each seed so that gaps of
background (label 0) separate them, as in a real segmentation. :func:`make_cells` gives each cell
its own expression level per channel with Poisson-like noise on top; :func:`make_tissue` draws a
multiplexed tissue section: nuclei, membranes, and marker channels expressed by cell type.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["TISSUE_CHANNELS", "Tissue", "make_cells", "make_tissue"]


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
    cells = _tessellate(shape, cell_diameter, rng)
    labels = cells.labels
    info = np.iinfo(dtype)
    level = rng.lognormal(mean=np.log(info.max / 40), sigma=1.0, size=(n_channels, cells.n_cells + 1))
    level[:, 0] = info.max / 200  # background autofluorescence
    spread = np.sqrt(level) + 1.0  # Poisson-like: the noise grows as the square root of the level
    image = np.empty((n_channels, *shape), dtype)
    for c in range(n_channels):
        noise = rng.standard_normal(shape, dtype=np.float32)
        pixels = level[c].astype(np.float32)[labels] + spread[c].astype(np.float32)[labels] * noise
        image[c] = np.clip(pixels, 0, info.max)
    return labels, image


@dataclass(frozen=True)
class _Cells:
    labels: NDArray[np.int32]  # (y, x): cell id, 0 for background
    seeds: NDArray[np.float64]  # (gy, gx, 2): (y, x) of each cell's seed, by grid position
    ids: NDArray[np.int32]  # (gy, gx): id of the cell of each seed
    distance: NDArray[np.float64] | None  # (y, x): to the pixel's own seed
    edge: NDArray[np.float64] | None  # (y, x): to the nearest cell border (disc or Voronoi edge)

    @property
    def n_cells(self) -> int:
        return int(self.ids.size)


def _tessellate(
    shape: tuple[int, int], cell_diameter: float, rng: np.random.Generator, *, geometry: bool = False
) -> _Cells:
    """Voronoi cells of jittered grid seeds cut to discs; with ``geometry``, distances too."""
    ny, nx = shape
    step = float(cell_diameter)
    gy, gx = int(np.ceil(ny / step)) + 1, int(np.ceil(nx / step)) + 1
    seeds = (np.stack(np.meshgrid(np.arange(gy), np.arange(gx), indexing="ij"), -1) + 0.5) * step
    seeds = seeds + rng.uniform(-0.35, 0.35, seeds.shape) * step
    ids = rng.permutation(gy * gx).reshape(gy, gx).astype(np.int32) + 1
    radius2 = (rng.uniform(0.45, 0.7, (gy, gx)) * step) ** 2

    labels = np.zeros(shape, np.int32)
    distance = np.full(shape, np.inf) if geometry else None
    edge = np.full(shape, np.inf) if geometry else None
    xs = np.arange(nx)
    cx = np.minimum((xs // step).astype(np.intp), gx - 1)
    rows = np.arange(ny)
    cy = np.minimum((rows // step).astype(np.intp), gy - 1)
    # One strip of image rows per row of seeds: the candidate seeds of a pixel then depend on its
    # column only, so each is a 1-D gather broadcast over the strip.
    for strip in np.split(rows, np.flatnonzero(np.diff(cy)) + 1):
        top, ys, row = strip[0], strip[:, None], cy[strip[0]]
        best = np.full((strip.shape[0], nx), np.inf)  # squared distance to the nearest covering seed
        nearest = np.full((strip.shape[0], nx), np.inf)  # ... to the nearest seed, covering or not
        second = np.full((strip.shape[0], nx), np.inf)  # ... to the second nearest seed
        owner = np.zeros((strip.shape[0], nx), np.int32)
        band = labels[top : top + strip.shape[0]]
        for dy in (-1, 0, 1):
            sy = min(max(row + dy, 0), gy - 1)
            for dx in (-1, 0, 1):
                sx = np.clip(cx + dx, 0, gx - 1)
                d2 = (seeds[sy, sx, 0] - ys) ** 2 + (seeds[sy, sx, 1] - xs) ** 2
                closer = (d2 < best) & (d2 < radius2[sy, sx])
                best = np.where(closer, d2, best)
                band[...] = np.where(closer, ids[sy, sx], band)
                if geometry:
                    seed_id = ids[sy, sx]
                    fresh = seed_id != owner  # clipped neighbours repeat seeds at the image border
                    is_first = d2 < nearest
                    second = np.where(is_first, nearest, np.where(fresh & (d2 < second), d2, second))
                    nearest = np.where(is_first, d2, nearest)
                    owner = np.where(is_first, seed_id, owner)
        if geometry:
            assert distance is not None
            assert edge is not None
            inside = band > 0
            own = np.sqrt(np.where(inside, best, nearest))
            voronoi = (np.sqrt(second) - np.sqrt(nearest)) / 2
            disc = np.sqrt(_radius2_of(band, ids, radius2)) - own
            distance[top : top + strip.shape[0]] = own
            edge[top : top + strip.shape[0]] = np.where(inside, np.minimum(voronoi, disc), 0.0)
    return _Cells(labels, seeds, ids, distance, edge)


def _radius2_of(labels: NDArray[np.int32], ids: NDArray[np.int32], radius2: NDArray[np.float64]) -> NDArray:
    """Squared disc radius of each pixel's cell (0 for background)."""
    by_id = np.zeros(ids.size + 1)
    by_id[ids.ravel()] = radius2.ravel()
    return by_id[labels]


#: Channels of :func:`make_tissue`: name → where in the cell it is seen.
TISSUE_CHANNELS: dict[str, str] = {
    "DAPI": "nucleus",
    "NaKATPase": "membrane",
    "panCK": "cytoplasm",
    "Vimentin": "cytoplasm",
    "CD3": "membrane",
    "CD8": "membrane",
    "CD20": "membrane",
    "CD68": "cytoplasm",
    "Ki67": "nucleus",
}

#: Mean expression (relative to a bright marker) of each channel by cell type; Ki67 is per cell.
_EXPRESSION: dict[str, dict[str, float]] = {
    "tumour": {"panCK": 1.0, "Vimentin": 0.05},
    "stroma": {"Vimentin": 0.9, "panCK": 0.02},
    "T helper": {"CD3": 0.9, "Vimentin": 0.15},
    "T cytotoxic": {"CD3": 0.9, "CD8": 0.8, "Vimentin": 0.15},
    "B cell": {"CD20": 1.0, "Vimentin": 0.1},
    "macrophage": {"CD68": 1.0, "Vimentin": 0.3},
}


@dataclass(frozen=True)
class Tissue:
    """A synthetic multiplexed tissue section (see :func:`make_tissue`).

    Attributes
    ----------
    labels
        ``(y, x)`` int32 segmentation, 0 for background.
    image
        ``(c, y, x)`` uint16 image.
    channels
        Channel names, one per image plane.
    cell_types
        Cell type of each label id (index ``id``; entry 0, the background, is ``""``).
    """

    labels: NDArray[np.int32]
    image: NDArray[np.uint16]
    channels: tuple[str, ...]
    cell_types: NDArray[np.str_]


def make_tissue(
    shape: tuple[int, int] = (1024, 1024), cell_diameter: float = 22.0, *, seed: int = 0
) -> Tissue:
    """Make a multiplexed image of a tumour section and its cell segmentation.

    Tumour nests (panCK) lie in a stroma (Vimentin) infiltrated by T cells (CD3, some CD8),
    B-cell clusters (CD20) and macrophages (CD68); some tumour cells proliferate (Ki67). Every
    cell has a nucleus (DAPI) and a membrane (NaKATPase). Each marker is seen where it sits in
    the cell (nucleus, cytoplasm or membrane), at a cell-to-cell varying level, over
    autofluorescence, a smooth illumination falloff and shot noise.

    Parameters
    ----------
    shape
        ``(y, x)`` size in pixels.
    cell_diameter
        Typical distance between neighbouring cell centres, in pixels.
    seed
        Seed of the random generator; the same seed gives the same data.

    Returns
    -------
    Tissue

    Examples
    --------
    >>> tissue = make_tissue((128, 128))
    >>> tissue.image.shape, tissue.channels[:2]
    ((9, 128, 128), ('DAPI', 'NaKATPase'))
    """
    rng = np.random.default_rng(seed)
    cells = _tessellate(shape, cell_diameter, rng, geometry=True)
    assert cells.distance is not None
    assert cells.edge is not None
    ny, nx = shape

    # Cell types from where the seeds lie: tumour nests where a smooth random field is high.
    centre = cells.seeds.reshape(-1, 2)
    field = _smooth_field(centre, rng, wavelength=min(ny, nx) / 2.5)
    clusters = _smooth_field(centre, rng, wavelength=min(ny, nx) / 6)
    kinds = np.array(list(_EXPRESSION))
    immune = rng.choice(kinds[1:], size=centre.shape[0], p=[0.45, 0.2, 0.12, 0.08, 0.15])
    immune = np.where((clusters > 0.9) & (field < 0.0), "B cell", immune)
    types_by_seed = np.where(field > 0.35, "tumour", immune)
    cell_types = np.full(cells.n_cells + 1, "", dtype=object)
    cell_types[cells.ids.ravel()] = types_by_seed
    cell_types = cell_types.astype(str)

    inside = cells.labels > 0
    nucleus_size = cell_diameter * 0.22
    nucleus = np.where(inside, 1.0 / (1.0 + (cells.distance / nucleus_size) ** 6), 0.0)
    membrane = np.where(inside, np.exp(-0.5 * (cells.edge / 1.2) ** 2), 0.0)
    cytoplasm = np.where(inside, np.clip(1.0 - 0.8 * nucleus, 0.0, 1.0) * (1.0 - 0.5 * membrane), 0.0)
    profiles = {"nucleus": nucleus, "membrane": membrane, "cytoplasm": cytoplasm}

    yy, xx = np.ogrid[:ny, :nx]
    illumination = 1.0 - 0.35 * (((yy - ny / 2) / ny) ** 2 + ((xx - nx / 2) / nx) ** 2)
    proliferating = (cell_types == "tumour") & (rng.random(cells.n_cells + 1) < 0.3)
    bright = 9000.0
    image = np.empty((len(TISSUE_CHANNELS), ny, nx), np.uint16)
    for c, (name, where) in enumerate(TISSUE_CHANNELS.items()):
        if name in ("DAPI", "NaKATPase"):
            level = np.full(cells.n_cells + 1, 0.8)
        elif name == "Ki67":
            level = np.where(proliferating, 0.8, 0.01)
        else:
            level = np.array([_EXPRESSION.get(t, {}).get(name, 0.01) for t in cell_types])
        level = level * rng.lognormal(0.0, 0.35, cells.n_cells + 1) * bright
        level[0] = 0.0
        autofluorescence = rng.uniform(150, 400)
        signal = (autofluorescence + level[cells.labels] * profiles[where]) * illumination
        image[c] = np.clip(rng.normal(signal, np.sqrt(signal) * 3.0 + 20.0), 0, 65535)
    return Tissue(cells.labels, image, tuple(TISSUE_CHANNELS), cell_types)


def _smooth_field(
    points: NDArray[np.float64], rng: np.random.Generator, wavelength: float
) -> NDArray[np.float64]:
    """A smooth random field (a sum of plane waves, unit variance) at ``(y, x)`` points."""
    n = 6
    angle = rng.uniform(0, np.pi, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    k = 2 * np.pi / wavelength * rng.uniform(0.7, 1.3, n)
    waves = np.cos(points[:, :1] * (k * np.sin(angle)) + points[:, 1:] * (k * np.cos(angle)) + phase)
    return np.asarray(waves.sum(axis=1) * np.sqrt(2.0 / n))
