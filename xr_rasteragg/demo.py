"""``rasteragg demo``: the whole pipeline on a synthetic multiplexed tissue section.

Generates the image and segmentation (:func:`~xr_rasteragg.synthetic.make_tissue`), writes them as
a SpatialData store, computes the per-cell table from the store, writes it back, prints a summary
and draws a figure of the cells painted by their mean intensities.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import xarray as xr

from .accessor import RasterAggAccessor  # noqa: F401  (registers DataArray.rasteragg)
from .synthetic import TISSUE_CHANNELS, make_tissue

__all__ = ["run_demo"]

#: The smallest image side, in pixels, that makes a useful demo.
MIN_SIZE = 64
#: Pixel size of the synthetic image, in micrometres (the 'global' coordinate system's unit).
PIXEL_SIZE = 0.5
STATS = ("mean", "std", "max")
#: Channels painted in the figure, with their colour maps.
PAINTED = {"panCK": "Greens", "CD3": "Reds", "CD20": "Blues", "CD68": "Purples"}


def run_demo(out: Path, *, size: int = 1024, seed: int = 0) -> dict[str, Path]:
    """Run the demo, print its summary, and return the paths written (``store``, ``figure``)."""
    import spatialdata
    from spatialdata.models import Image2DModel, Labels2DModel
    from spatialdata.transformations import Scale

    from .spatialdata import compute_table, plan, store_table

    if size < MIN_SIZE:
        raise ValueError(f"'size' must be at least {MIN_SIZE} pixels for a useful demo; got {size}")
    out.mkdir(parents=True, exist_ok=True)
    store, figure = out / "demo.zarr", out / "demo.png"

    start = time.perf_counter()
    tissue = make_tissue((size, size), seed=seed)
    to_microns = {"global": Scale([PIXEL_SIZE, PIXEL_SIZE], axes=("x", "y"))}
    image = Image2DModel.parse(
        tissue.image,
        dims=("c", "y", "x"),
        c_coords=list(tissue.channels),
        scale_factors=[2, 2],
        chunks=(1, 512, 512),
        transformations=to_microns,
    )
    labels = Labels2DModel.parse(
        tissue.labels, dims=("y", "x"), chunks=(512, 512), transformations=to_microns
    )
    spatialdata.SpatialData(images={"tissue": image}, labels={"cells": labels}).write(store, overwrite=True)
    generated = time.perf_counter() - start

    sdata = spatialdata.read_zarr(store)
    resolved = plan(sdata, "tissue", "cells", STATS)
    start = time.perf_counter()
    _load_kernels(resolved.image.dtype, resolved.labels.dtype)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    table = compute_table(resolved)
    aggregated = time.perf_counter() - start
    ids = table.obs["instance_id"].to_numpy()
    table.obs["true_cell_type"] = pd.Categorical(tissue.cell_types[ids])
    store_table(sdata, "cells_stats", table, overwrite=True)
    # X and the layers are dask arrays (the elements are): bring them here for the summary.
    table.X, *layers = dask.compute(table.X, *table.layers.values())
    table.layers.update(zip(table.layers, layers, strict=True))

    _print_summary(table, tissue.channels, size, (generated, loaded, aggregated), store)
    _draw(figure, table, tissue.labels, tissue.image, tissue.channels)
    print(f"\nwrote {store} (image 'tissue', labels 'cells', table 'cells_stats') and {figure}")
    return {"store": store, "figure": figure}


def _load_kernels(image: np.dtype, labels: np.dtype) -> None:
    """Load (or compile) the kernels for these dtypes on a few pixels, so the pass is timed alone."""
    pixels = xr.DataArray(np.zeros((1, 2, 2), image), dims=("c", "y", "x"))
    pixels.rasteragg.aggregate(xr.DataArray(np.ones((2, 2), labels), dims=("y", "x")), STATS)


def _print_summary(
    table: Any, channels: tuple[str, ...], size: int, seconds: tuple[float, float, float], store: Path
) -> None:
    generated, loaded, aggregated = seconds
    n_cells = table.n_obs
    values = size * size * len(channels)
    print(
        f"rasteragg demo: synthetic tumour section, {size} x {size} px at {PIXEL_SIZE} µm, "
        f"{len(channels)} channels (uint16), {n_cells:,} segmented cells"
    )
    print(f"  generated and written to {store} in {generated:.1f} s")
    print(f"  compiled kernels ready in {loaded:.1f} s (compiled on the first run, then loaded from a cache)")
    print(
        f"  one pass over {values / 1e6:.1f} M pixel values for {', '.join(STATS)} per cell and channel "
        f"(+ area, centroid): {aggregated:.2f} s"
    )
    print(f"\ntable 'cells_stats' (AnnData, {n_cells} cells x {table.n_vars} channels), in the store too:")
    print(f"  X       {STATS[0]} intensity of each cell in each channel")
    print(f"  layers  {', '.join(table.layers)}")
    print(f"  obs     {', '.join(table.obs.columns)}")
    print("  obsm    spatial: centroids (x, y) in µm")
    print(f"  var     {', '.join(table.var_names)}")

    mean = pd.DataFrame(table.X, columns=table.var_names, index=table.obs_names)
    by_type = mean.groupby(table.obs["true_cell_type"].to_numpy()).median()
    by_type.insert(0, "cells", table.obs["true_cell_type"].value_counts())
    by_type.index.name = "cell type"
    print("\nmedian of the per-cell mean intensities, by the true cell type of the synthetic cells:")
    with pd.option_context(
        "display.width", 160, "display.max_columns", 20, "display.float_format", "{:.0f}".format
    ):
        print(by_type.to_string())
        first = table.obs[["instance_id", "area"]].copy()
        first[["x µm", "y µm"]] = table.obsm["spatial"]
        for name in ("DAPI", "panCK", "CD3", "CD20", "CD68"):
            first[f"mean {name}"] = mean[name]
        rows = first.head(6).to_string(index=False, float_format="{:.1f}".format)
        print(f"\nfirst cells of the table:\n{rows}")


def _draw(path: Path, table: Any, labels: np.ndarray, image: np.ndarray, channels: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = xr.DataArray(
        np.asarray(table.X),
        dims=("label", "c"),
        coords={"label": table.obs["instance_id"].to_numpy(), "c": list(table.var_names)},
    )
    painted = xr.DataArray(labels, dims=("y", "x")).rasteragg.paint(mean.sel(c=list(PAINTED)))

    fig = plt.figure(figsize=(15, 13.2), layout="constrained")
    grid = fig.add_gridspec(3, 3, height_ratios=(1, 1, 0.75))
    ny, nx = labels.shape
    extent = (0, nx * PIXEL_SIZE, ny * PIXEL_SIZE, 0)
    picture = _composite(image, channels, ("CD3", "panCK", "DAPI"))
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(picture, extent=extent)
    side = min(ny, nx) // 6
    ax.add_patch(plt.Rectangle((0, 0), side * PIXEL_SIZE, side * PIXEL_SIZE, fill=False, ec="white", lw=1.5))
    ax.set_title("image: CD3 (red), panCK (green), DAPI (blue)")
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")

    ax = fig.add_subplot(grid[0, 1])
    zoom = labels[:side, :side]
    border = np.zeros(zoom.shape, bool)
    border[:-1] |= zoom[:-1] != zoom[1:]
    border[:, :-1] |= zoom[:, :-1] != zoom[:, 1:]
    overlay = picture[:side, :side].copy()
    overlay[border] = (1.0, 1.0, 0.3)
    ax.imshow(overlay, extent=(0, side * PIXEL_SIZE, side * PIXEL_SIZE, 0), interpolation="nearest")
    ax.set_title("zoom (white box) with the segmentation")
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")

    panels = [fig.add_subplot(grid[0, 2]), *(fig.add_subplot(grid[1, col]) for col in range(3))]
    for ax, name in zip(panels, PAINTED, strict=True):
        values = painted.sel(c=name).values
        top = np.nanpercentile(values, 99)
        cmap = plt.get_cmap(PAINTED[name]).copy()
        cmap.set_bad("#111111")  # background
        shown = ax.imshow(values, cmap=cmap, vmin=0, vmax=top, extent=extent, interpolation="nearest")
        ax.set_title(f"cells painted by mean {name}")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(shown, ax=ax, shrink=0.8, pad=0.02, label="mean intensity")

    ax = fig.add_subplot(grid[2, :])
    data = [np.log10(np.maximum(mean.sel(c=name).values, 1.0)) for name in channels]
    parts = ax.violinplot(data, showmedians=True, widths=0.85)
    colours = plt.get_cmap("tab10")(np.arange(len(channels)) % 10)
    for body, colour in zip(parts["bodies"], colours, strict=True):  # type: ignore[call-overload]
        body.set_facecolor(colour)
        body.set_alpha(0.6)
    ax.set_xticks(
        np.arange(1, len(channels) + 1), [f"{n}\n{TISSUE_CHANNELS[n]}" for n in channels], fontsize=9
    )
    ticks = np.array([100, 300, 1000, 3000, 10000, 30000])
    ax.set_yticks(np.log10(ticks), [f"{t:,}" for t in ticks])
    ax.set_ylim(min(map(np.min, data)) - 0.1, max(map(np.max, data)) + 0.1)
    ax.set_ylabel("per-cell mean intensity (log scale)")
    ax.set_title(f"per-cell means of {table.n_obs:,} cells, per channel")
    ax.grid(axis="y", alpha=0.3)

    fig.suptitle("xr_rasteragg: per-cell statistics of a synthetic multiplexed tissue image", fontsize=14)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _composite(image: np.ndarray, channels: tuple[str, ...], rgb: tuple[str, str, str]) -> np.ndarray:
    """An RGB picture of three channels, each scaled to its 99.5th percentile."""
    planes = []
    for name in rgb:
        plane = image[channels.index(name)].astype(np.float64)
        low, high = np.percentile(plane, (1, 99.5))
        planes.append(np.clip((plane - low) / max(high - low, 1.0), 0, 1))
    return np.stack(planes, axis=-1)
