"""Precision of harpy's RasterAggregator and ours against a two-pass float64 reference.

Measures the table in docs/guide/aggregator.md. Needs harpy next to xr_rasteragg
(``pip install harpy-analysis``); run ``python docs/scripts/harpy_precision.py``.
"""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
from harpy.utils import RasterAggregator as HarpyAggregator
from numpy.typing import NDArray
from xr_rasteragg import RasterAggregator

STATS = ("sum", "mean", "count", "var", "kurtosis", "skew")
#: Compared by absolute error; the others by relative error.
SHAPE_STATS = ("skew", "kurtosis")


def data() -> tuple[NDArray[np.int32], NDArray[np.uint16]]:
    """1024² px: 8 bands of labels and background; a near-saturated, a plain channel."""
    rng = np.random.default_rng(0)
    labels = np.broadcast_to(
        (np.arange(1024) // 128 + 1).astype(np.int32), (1, 1024, 1024)
    ).copy()
    labels[0, :, :64] = 0
    labels[0, :, 200:328] = 0
    near_max = (65533 + rng.binomial(2, 0.1, size=labels.shape)).astype(np.uint16)
    plain = rng.integers(0, 1000, size=labels.shape).astype(np.uint16)
    return labels, np.stack([near_max, plain])


def two_pass(x: NDArray[np.generic]) -> dict[str, float]:
    x = x.astype(np.float64)
    d = x - x.mean()
    m2 = np.mean(d**2)
    return {
        "sum": x.sum(),
        "mean": x.mean(),
        "count": x.size,
        "var": m2,
        "skew": np.mean(d**3) / m2**1.5,
        "kurtosis": np.mean(d**4) / m2**2 - 3,
    }


def main() -> None:
    logging.getLogger("xr_rasteragg").setLevel(logging.ERROR)
    labels, image = data()
    mask = da.from_array(labels, chunks=(1, 256, 256))
    pixels = da.from_array(image, chunks=(1, 1, 256, 256))
    results = {
        "harpy": HarpyAggregator(mask, pixels, run_on_gpu=False).aggregate_stats(STATS),
        "xr_rasteragg": RasterAggregator(
            mask, pixels, run_on_gpu=False
        ).aggregate_stats(STATS),
    }
    ids = results["xr_rasteragg"][0]["cell_ID"].to_numpy()
    for channel, name in enumerate(["uint16 65533..65535", "uint16 uniform 0..999"]):
        print(name)
        for i, stat in enumerate(STATS):
            column = 0 if stat == "count" else channel
            ref = np.array(
                [two_pass(image[channel][labels == label])[stat] for label in ids]
            )
            errors = []
            for frames in results.values():
                got = frames[i][column].to_numpy().astype(np.float64)
                error = (
                    np.abs(got - ref)
                    if stat in SHAPE_STATS
                    else np.abs(got - ref) / np.abs(ref)
                )
                errors.append(f"{error.max():.1e}")
            kind = "abs" if stat in SHAPE_STATS else "rel"
            harpy, ours = errors
            print(f"  {stat:9s} max {kind} error: harpy {harpy}, xr_rasteragg {ours}")


if __name__ == "__main__":
    main()
