"""Many small labels (issue 4's scale series): our time as a ratio to generating and reading the data.

Labels are square cells of ``cell`` x ``cell`` px on a grid, with sparse int64 ids
(``2**40 + 7 k``); the image is random uint16. Both are generated lazily block by block with
``da.map_blocks``, so nothing is stored: the baseline is the wall time of generating both and
summing them, measured in the same run. Statistics: mean, var, min, max and center of mass.

Run ``python benchmarks/many_labels.py`` (4096² px, 2**20 labels of 4 x 4 px, 2 channels,
chunks 1024²); ``--size 12800 --cell 4`` gives 10**7 labels; ``--quick`` is a small smoke run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import best_of
from xr_rasteragg.engine import aggregate

STATS = ("mean", "var", "min", "max", "center_of_mass")


def cell_labels(size: int, cell: int, chunk: int) -> da.Array:
    """Lazy ``(1, size, size)`` int64 mask of square cells with sparse ids ``2**40 + 7 k``."""
    per_row = -(-size // cell)

    def block(block_info: dict[Any, Any] | None = None) -> np.ndarray:
        assert block_info is not None
        (_, _), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        y = np.arange(y0, y1)[:, None] // cell
        x = np.arange(x0, x1)[None, :] // cell
        return (2**40 + 7 * (y * per_row + x))[None].astype(np.int64)

    chunks = ((1,), *(da.core.normalize_chunks(chunk, (size,))[0],) * 2)
    return da.map_blocks(block, chunks=chunks, dtype=np.int64, meta=np.empty((0, 0, 0), np.int64))


def random_image(size: int, channels: int, chunk: int) -> da.Array:
    """Lazy ``(channels, 1, size, size)`` uint16 image, random with a seed per block."""

    def block(block_info: dict[Any, Any] | None = None) -> np.ndarray:
        assert block_info is not None
        location = block_info[None]["chunk-location"]
        shape = block_info[None]["chunk-shape"]
        rng = np.random.default_rng(location)
        return rng.integers(0, 2**16, size=shape, dtype=np.uint16)

    spatial = da.core.normalize_chunks(chunk, (size,))[0]
    chunks = ((channels,), (1,), spatial, spatial)
    return da.map_blocks(block, chunks=chunks, dtype=np.uint16, meta=np.empty((0, 0, 0, 0), np.uint16))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=4096, help="image side in px")
    parser.add_argument("--cell", type=int, default=4, help="cell side in px")
    parser.add_argument("--chunk", type=int, default=1024, help="spatial chunk side in px")
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1024² px smoke run")
    args = parser.parse_args()
    if args.quick:
        args.size, args.chunk, args.repeat = 1024, 256, 1

    labels = cell_labels(args.size, args.cell, args.chunk)
    image = random_image(args.size, args.channels, args.chunk)
    aggregate(labels[:, :64, :64], image[:, :, :64, :64], STATS)  # compile the kernels

    with dask.config.set(scheduler="threads"):
        read = best_of(args.repeat, lambda: dask.compute(labels.sum(), image.sum()))[0]
        # The table computed (dask inputs give dask results).
        ours = best_of(args.repeat, lambda: dask.compute(aggregate(labels, image, STATS).values))[0]
    corner = 4 * args.cell
    result = aggregate(labels[:, :corner, :corner], image[:, :, :corner, :corner], STATS)
    assert result.labels.shape[0] == 16
    cells = (-(-args.size // args.cell)) ** 2
    print(
        f"{args.size}² px, {cells} labels of {args.cell}x{args.cell} px (int64 ids from 2**40), "
        f"{args.channels} channels uint16, chunks {args.chunk}²"
    )
    print(f"generate and read: {read * 1e3:.0f} ms")
    print(f"{', '.join(STATS)}: {ours * 1e3:.0f} ms = {ours / read:.2f} x generate-and-read  (target <= 1.5)")


if __name__ == "__main__":
    main()
