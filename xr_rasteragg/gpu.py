"""Finding a usable GPU, and moving dask arrays between the host and the device.

CuPy is imported only here and only when asked for, so that the package imports and runs on
machines without CuPy, without a CUDA driver, or without a GPU.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import dask.array as da
import numpy as np

from .kernels import array_backend
from .kernels.xp import to_numpy

__all__ = ["probe_cupy", "to_device", "to_host"]


def probe_cupy() -> tuple[ModuleType | None, str]:
    """CuPy, if it is installed and can run a kernel on a GPU, and otherwise why not.

    The probe allocates a small array on the current device and runs a reduction on it, so
    that a missing or too old CUDA driver, a missing device, or a broken installation are all
    caught here rather than in the middle of a computation.

    Returns
    -------
    tuple
        ``(cupy, "")`` when the GPU works; ``(None, reason)`` otherwise.
    """
    try:
        import cupy

        probe = cupy.arange(4, dtype=cupy.int64)
        if int((probe * 2).sum()) != 12:
            raise RuntimeError("a test reduction on the GPU returned a wrong result")
    except Exception as error:  # ImportError, CUDA driver and runtime errors alike
        return None, f"{type(error).__name__}: {error}"
    return cupy, ""


def to_device(array: da.Array, cupy: Any) -> da.Array:
    """The same dask array with CuPy blocks (blocks already on the device stay as they are)."""
    if array_backend(array) == "cupy":
        return array
    meta = cupy.empty((0,) * array.ndim, dtype=array.dtype)
    return da.map_blocks(cupy.asarray, array, dtype=array.dtype, meta=meta)


def to_host(array: da.Array) -> da.Array:
    """The same dask array with NumPy blocks."""
    if array_backend(array) == "numpy":
        return array
    meta = np.empty((0,) * array.ndim, dtype=array.dtype)
    return da.map_blocks(to_numpy, array, dtype=array.dtype, meta=meta)
