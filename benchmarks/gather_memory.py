"""Peak memory of the whole-label gather, alone and with the moment statistics, over image sizes.

Run ``python -m benchmarks.gather_memory``. Each case runs in a fresh subprocess on lazily
generated data (:func:`benchmarks.datasets.lazy_labels`, :func:`~benchmarks.datasets.lazy_image`:
chunks 2048, 4 channels of one chunk each, 10^5 labels) on dask's threads, after a warm-up call
on a small image (Numba's compiles), and prints the rise of resident memory over the call (the
peak ``VmHWM``, reset just before the call, minus the resident memory before it). Bounded memory
stays flat as the image grows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from benchmarks.peers import ALL_STATS

#: Statistics per case.
CASES = {"median": ("median",), "median + nine": (*ALL_STATS, "median")}


def measure(size: int, stats: tuple[str, ...], labels: int, channels: int, chunk: int) -> dict[str, Any]:
    """Rise of resident memory (MiB) of one call over a ``size``² image, in this process."""
    import resource
    import time

    import dask

    from benchmarks.datasets import lazy_image, lazy_labels
    from xr_rasteragg import aggregate

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    def peak() -> int:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    def run(side: int) -> None:
        mask = lazy_labels(side, side, min(labels, side * side // 64), chunk=chunk)
        image = lazy_image(channels, side, side, chunk=chunk)
        with dask.config.set(scheduler="threads"):
            aggregate(mask, image, stats, eager=True)

    run(2 * chunk)  # compile the kernels
    before = resident()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    start = time.perf_counter()
    run(size)
    return {"rise_mib": (peak() - before) / 2**20, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--labels", type=int, default=10**5)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--case", choices=sorted(CASES), nargs="+", default=sorted(CASES))
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # size and case, in the subprocess
    args = parser.parse_args(argv)
    if args.one:
        size, case = int(args.one[0]), args.one[1]
        print(json.dumps(measure(size, CASES[case], args.labels, args.channels, args.chunk)))
        return
    for case in args.case:
        for size in args.sizes:
            command = [sys.executable, "-m", "benchmarks.gather_memory", "--one", str(size), case]
            command += [
                "--labels",
                str(args.labels),
                "--channels",
                str(args.channels),
                "--chunk",
                str(args.chunk),
            ]
            out = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(
                f"{case:>14}  {size:>6}²  peak rise {out['rise_mib']:7.0f} MiB  {out['seconds']:6.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
