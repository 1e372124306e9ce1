"""What the benchmarks ran on: CPU, cores, memory, load, library versions and date."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["LIBRARIES", "describe_machine"]

#: Distributions whose versions the results record (missing ones are recorded as such).
LIBRARIES = (
    "xr_rasteragg",
    "numpy",
    "numba",
    "dask",
    "xarray",
    "scipy",
    "scikit-image",
    "flox",
    "numbagg",
    "xarray-spatial",
    "harpy-analysis",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict[str, Any]:
    """CPU model, usable cores, RAM, load average now, Python and library versions, UTC date."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gib": round(_memory_gib(), 1),
        "load_before": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
