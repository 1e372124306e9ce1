"""Per-label statistics of multi-channel images over label masks, in one pass.

Importing it registers the ``.rasteragg`` accessor on ``xarray.DataArray``. ``xr_rasteragg``
turns a segmentation mask and a multiplexed image into per-label, per-channel
statistics (count, sum, mean, var, std, skew, kurtosis, min, max, center of mass), lazily and
chunk by chunk with dask, on NumPy or CuPy blocks.
"""

from __future__ import annotations

from .accessor import RasterAggAccessor  # importing it registers DataArray.rasteragg
from .aggregator import RasterAggregator
from .engine import Aggregation, aggregate, progress
from .in_memory import compute
from .stats import STATISTICS, StatName

__all__ = [
    "STATISTICS",
    "Aggregation",
    "RasterAggAccessor",
    "RasterAggregator",
    "StatName",
    "aggregate",
    "compute",
    "progress",
]
__version__ = "0.1.0.dev0"
