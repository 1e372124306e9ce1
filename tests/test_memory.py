"""Peak memory is set by the block size and the number of labels, not by the image size.

A million labels over a lazily generated image, at two image sizes with the same blocks and the
same labels: each run is a fresh subprocess that reports the rise of its resident memory (the
peak ``VmHWM``, reset just before the run, minus the resident memory before it; Numba's
allocations are invisible to ``tracemalloc``). Run this file as a script to print the measurement::

    python tests/test_memory.py SCALE
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

#: Labels form a GRID × GRID grid of square cells: a million labels.
GRID = 1000
#: Spatial block (and dask chunk) of the labels and the image.
BLOCK = 1000
#: Image channels (float32, all in one chunk).
NCHAN = 2
STATS = ["count", "mean", "var"]
#: Threads of the scheduler.
THREADS = 2


def measure(scale: int) -> dict[str, Any]:
    """Aggregate a ``GRID * scale`` square image of cells of ``scale²`` pixels; report memory."""
    import resource

    import dask
    import dask.array as da
    import numpy as np

    from xr_rasteragg import aggregate

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    def peak_resident() -> int:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB

    def reset_peak() -> None:
        # Forget the peak of the imports and of compiling the kernels (Linux >= 4.0).
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def cells(block_info: Any = None) -> Any:
        _, (y0, y1), (x0, x1) = block_info[None]["array-location"]
        y = np.arange(y0, y1, dtype=np.int32)[:, None] // scale
        x = np.arange(x0, x1, dtype=np.int32)[None, :] // scale
        return (y * GRID + x + 1)[None]

    def values(block_info: Any = None) -> Any:
        (c0, c1), (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        x = (np.arange(x0, x1) % 5).astype(np.float32)
        c = np.arange(c0, c1, dtype=np.float32)[:, None, None, None]
        return np.ascontiguousarray(np.broadcast_to(x + c, (c1 - c0, z1 - z0, y1 - y0, x1 - x0)))

    side = GRID * scale
    spatial = ((1,), (BLOCK,) * (side // BLOCK), (BLOCK,) * (side // BLOCK))
    labels = da.map_blocks(cells, chunks=spatial, dtype=np.int32)
    image = da.map_blocks(values, chunks=((NCHAN,), *spatial), dtype=np.float32)

    with dask.config.set(scheduler="threads", num_workers=THREADS):
        # Compile (or load from Numba's cache) the kernels and the merge before measuring: two
        # blocks, so that the merge runs too. Compiling takes hundreds of MB.
        warm = (slice(None), slice(0, BLOCK), slice(0, 2 * BLOCK))
        aggregate(labels[warm], image[(slice(None), *warm)], STATS)
        reset_peak()
        before = resident()
        result = aggregate(labels, image, STATS)
    peak = peak_resident()
    ok = bool(
        result.labels.shape[0] == GRID * GRID
        and (result.values["count"] == scale * scale).all()
        and np.allclose(result.values["mean"][:, 1] - result.values["mean"][:, 0], 1.0)
    )
    block_bytes = BLOCK * BLOCK * (4 + 4 * NCHAN)
    result_bytes = sum(v.nbytes for v in result.values.values()) + result.labels.nbytes
    return {
        "image_bytes": image.nbytes,
        "block_bytes": block_bytes,
        "result_bytes": result_bytes,
        "rise": peak - before,
        "correct": ok,
    }


def run(*scales: int) -> list[dict[str, Any]]:
    """Measure each scale in its own fresh subprocess, all at once."""
    runs = [
        subprocess.Popen(
            [sys.executable, __file__, str(scale)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for scale in scales
    ]
    out = []
    for process in runs:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
        out.append(dict(json.loads(stdout.strip().splitlines()[-1])))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_memory_does_not_grow_with_image_size() -> None:
    small, large = run(4, 8)
    assert small["correct"]
    assert large["correct"]
    assert large["image_bytes"] == 4 * small["image_bytes"]
    # The image grew fourfold; the memory did not grow with it. The slack (a quarter, plus two
    # blocks) absorbs the scheduler's order on a busy machine, which sets how many partials wait
    # for their merge at once; growth with the image would be fourfold.
    assert large["rise"] <= 1.25 * small["rise"] + 2 * small["block_bytes"], (small, large)
    # The bound: a few blocks per thread in flight (the block, the kernel's run encoding and its
    # partials) plus a small multiple of the partials of every label, which the last merges hold
    # (ids, count, coordinate sums, and per channel the sum and M2), sort and reduce with
    # temporaries of the same size. Measured: about 0.3 GB of a 0.6 GB bound, at both sizes.
    partial_bytes = GRID * GRID * (4 + 8 + 24 + 16 * NCHAN)
    bound = 8 * THREADS * small["block_bytes"] + 6 * partial_bytes
    assert max(small["rise"], large["rise"]) <= bound, (small, large, bound)


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]))))
