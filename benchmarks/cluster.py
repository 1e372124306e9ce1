"""The whole table on a LocalCluster, written to zarr by the workers: the client's memory (issue 15).

A lazily generated image (``CellGrid`` cells of about 4 x 4 px, hashed uint16 pixels: see
:mod:`benchmarks.datasets`) on a ``LocalCluster`` of worker processes; every intensity statistic of
the pass (the nine of the reference dataset, with std) from ``image.rasteragg.aggregate(labels,
ALL)``, then ``.to_zarr(path)``. Reported: the wall time of the call (the pass; its merged partials
stay on the workers) and of the write (finalization and writing, on the workers), the table's size,
the client process's peak resident memory above what it held before the call (psutil, sampled in a
thread), and each worker's peak resident memory during the run (Linux's ``VmHWM``, reset before the
run).

Run ``python benchmarks/cluster.py`` (10**6 labels x 16 channels, 2 workers); ``--quick`` is a
small smoke run. The target of issue 15: the client grows by less than 300 MiB. The suite's
``cluster`` section (``python benchmarks/suite.py --only cluster``) runs :func:`run` in a fresh
process and puts the figures on the benchmarks page.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
import xarray as xr

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import xr_rasteragg  # noqa: F401  (registers the accessor)
from benchmarks.datasets import lazy_image, lazy_labels

MiB = 2**20
#: Every intensity statistic of the pass, as the issue's LocalCluster row asks (the shape features
#: and whole-label statistics, added since, have rows of their own in the suite).
ALL = ("count", "sum", "mean", "var", "std", "skew", "kurtosis", "min", "max", "center_of_mass")
#: Target of issue 15 for the client's growth.
CLIENT_TARGET = 300 * MiB
#: The arguments of :func:`run` for the full run (issue 15's row) and for ``--quick``.
FULL: dict[str, Any] = {
    "n_labels": 10**6,
    "channels": 16,
    "chunk": 2048,
    "cell": 4,
    "workers": 2,
    "memory": "6GiB",
}
QUICK: dict[str, Any] = {**FULL, "n_labels": 10**4, "channels": 4, "chunk": 256}


class PeakSampler:
    """The peak resident memory of this process while running, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.process = psutil.Process()
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def reset_peak_rss() -> int:
    """Forget this process's peak resident memory (Linux); return its resident memory now."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """This process's peak resident memory since :func:`reset_peak_rss`, in bytes (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def inputs(n_labels: int, channels: int, chunk: int, cell: int) -> tuple[xr.DataArray, xr.DataArray]:
    """Lazy labels ``(z, y, x)`` of ``n_labels`` cells of about ``cell`` x ``cell`` px, and a
    ``(c, z, y, x)`` uint16 image over them."""
    side = math.ceil(math.sqrt(n_labels) * cell)
    labels = xr.DataArray(lazy_labels(side, side, n_labels, chunk=chunk), dims=("z", "y", "x"))
    image = xr.DataArray(lazy_image(channels, side, side, chunk=chunk), dims=("c", "z", "y", "x"))
    return labels, image


def run(n_labels: int, channels: int, chunk: int, cell: int, workers: int, memory: str) -> dict[str, Any]:
    """One measured run; returns the figures."""
    import distributed

    labels, image = inputs(n_labels, channels, chunk, cell)
    with (
        # zarr's notices on writing fixed-width strings (the axis names) and consolidated metadata
        warnings.catch_warnings(),
        distributed.LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory,
            dashboard_address=":0",
            silence_logs=40,
        ) as cluster,
        distributed.Client(cluster) as client,
        tempfile.TemporaryDirectory(prefix="rasteragg-cluster-") as tmp,
    ):
        warnings.filterwarnings("ignore", module=r"zarr\.")
        # Load (or compile) the kernels on the workers, outside the measurement.
        small_labels, small_image = inputs(16, channels, 64, 4)
        small_image.rasteragg.aggregate(small_labels, ALL).to_zarr(Path(tmp) / "warm.zarr")
        worker_base = client.run(reset_peak_rss)
        client_base = psutil.Process().memory_info().rss
        with PeakSampler() as sampler:
            start = time.perf_counter()
            table = image.rasteragg.aggregate(labels, ALL)
            called = time.perf_counter() - start
            table.to_zarr(Path(tmp) / "table.zarr")
            total = time.perf_counter() - start
        worker_peaks = client.run(peak_rss)
        written = xr.open_zarr(Path(tmp) / "table.zarr")
        assert written.sizes["label"] == n_labels, written.sizes
        assert int(written["count"].sum()) == int((labels > 0).sum().compute())
    return {
        "pixels": int(labels.size),
        "table_bytes": int(sum(v.nbytes for v in table.data_vars.values())),
        "call_s": called,
        "write_s": total - called,
        "client_growth": sampler.peak - client_base,
        "worker_peaks": [worker_peaks[w] for w in sorted(worker_peaks)],
        "worker_bases": [worker_base[w] for w in sorted(worker_base)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", type=int, default=FULL["n_labels"], help="number of cells")
    parser.add_argument("--channels", type=int, default=FULL["channels"])
    parser.add_argument("--cell", type=int, default=FULL["cell"], help="cell side in px (about)")
    parser.add_argument("--chunk", type=int, default=FULL["chunk"], help="spatial chunk side in px")
    parser.add_argument(
        "--workers", type=int, default=FULL["workers"], help="worker processes (1 thread each)"
    )
    parser.add_argument("--memory", default=FULL["memory"], help="memory limit per worker")
    parser.add_argument("--quick", action="store_true", help="10**4 labels x 4 channels smoke run")
    args = parser.parse_args()
    if args.quick:
        args.labels, args.channels, args.chunk = QUICK["n_labels"], QUICK["channels"], QUICK["chunk"]

    figures = run(args.labels, args.channels, args.chunk, args.cell, args.workers, args.memory)
    growth = figures["client_growth"]
    print(
        f"LocalCluster, {args.workers} worker processes x 1 thread; {args.labels:,} labels x "
        f"{args.channels} channels uint16, {figures['pixels'] / 1e6:.1f} M px, chunks {args.chunk}²; "
        f"statistics: {', '.join(ALL)}"
    )
    print(f"table: {figures['table_bytes'] / MiB:.0f} MiB")
    print(
        f"aggregate (the pass): {figures['call_s']:.1f} s; "
        f"to_zarr (finalize + write): {figures['write_s']:.1f} s"
    )
    verdict = "meets" if growth < CLIENT_TARGET else "MISSES"
    print(
        f"client peak RSS growth: {growth / MiB:.0f} MiB "
        f"({verdict} the target of < {CLIENT_TARGET // MiB} MiB)"
    )
    peaks = ", ".join(
        f"{peak / MiB:.0f} MiB (from {base / MiB:.0f})"
        for peak, base in zip(figures["worker_peaks"], figures["worker_bases"], strict=True)
    )
    print(f"worker peak RSS: {peaks}")


if __name__ == "__main__":
    main()
