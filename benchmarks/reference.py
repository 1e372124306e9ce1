"""Reference benchmark (DESIGN §6): our time as a ratio to the read limit, in one run.

Dataset: 4096 x 4096 px, 8 channels uint16, about 18.6k Voronoi-like cells with background,
dask chunks 2048 (spatial) x 1 (channel). The read limit is the wall time of summing the
in-memory image and mask once with NumPy, measured in the same process.

Run ``python benchmarks/reference.py`` (``--quick`` for a small smoke run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import dask
import dask.array as da
import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import best_of
from xr_rasteragg import RasterAggregator
from xr_rasteragg.synthetic import make_cells

ALL_STATS = ("sum", "mean", "count", "var", "skew", "kurtosis", "min", "max", "center_of_mass")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1024 x 1024 px smoke run")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("xr_rasteragg").setLevel(logging.ERROR)  # harpy's constant-label notices
    size, chunk = (1024, 512) if args.quick else (4096, 2048)

    labels, image = make_cells((size, size), n_channels=8, cell_diameter=30.0, seed=0)
    mask = da.from_array(labels[None], chunks=(1, chunk, chunk))
    pixels = da.from_array(image[:, None], chunks=(1, 1, chunk, chunk))
    aggregator = RasterAggregator(mask, pixels, run_on_gpu=False)
    RasterAggregator(mask[:, :64, :64], pixels[:, :, :64, :64], run_on_gpu=False).aggregate_stats(ALL_STATS)

    read = best_of(args.repeat, lambda: (image.sum(), labels.sum()))[0]
    with dask.config.set(scheduler="threads"):
        mean = best_of(args.repeat, lambda: aggregator.aggregate_mean())[0]
        every = best_of(args.repeat, lambda: aggregator.aggregate_stats(ALL_STATS))[0]
    cells = int(np.count_nonzero(np.unique(labels)))
    print(f"dataset: {size}x{size} px, 8 channels uint16, {cells} cells, chunks {chunk}x{chunk}x1")
    print(f"read limit: {read * 1e3:.1f} ms")
    print(f"mean:            {mean / read:5.2f} x read limit  (target <= 2.5)")
    print(f"all statistics:  {every / read:5.2f} x read limit  (target <= 5)")


if __name__ == "__main__":
    main()
