"""GPU benchmark (DESIGN §6): ours on the GPU vs ours on the CPU vs ``cupyx.scipy.ndimage``.

Two datasets, both resident on the device before any timing starts:

- the reference dataset: 4096 x 4096 px, 8 channels uint16, about 18.6k cells with background,
  chunks 2048 x 2048 x 1 channel;
- a large one: 16384 x 16384 px x 8 channels uint16 (the reference cells tiled 4 x 4 with
  distinct ids, about 300k cells), chunks 4096 x 4096 x 8 channels.

For each it prints wall times (best of ``--repeat``) of

- ours on the GPU (CuPy blocks, the fused kernel of ``xr_rasteragg.kernels.cuda``) and ours on
  the CPU (the same data as NumPy blocks): the mean, the five statistics below in one pass, and
  all statistics in one pass, and with them the shape features that the GPU kernel computes
  (all but perimeter and solidity, with centroid_weighted); on the GPU also all statistics in
  GPU-sized blocks (the whole reference image in one block; 8192² px blocks of the large one);
- ``RasterAggregator(..., run_on_gpu=True)`` against ``run_on_gpu=False`` on dask arrays of
  NumPy chunks (the harpy default: every block is copied to the device inside the timing),
  ``aggregate_stats`` of harpy's six statistics;
- ``cupyx.scipy.ndimage`` per channel: ``sum_labels``, ``mean``, ``variance``, ``minimum`` and
  ``maximum`` over every label (one call per statistic and channel, as it works);

the ratios between them, and the achieved input bandwidth (image + label bytes read, per
second) as a fraction of the device's copy bandwidth, measured here with a device-to-device
copy (bytes read + bytes written, per second). Every result is checked against the others
before it is timed.

Run ``python benchmarks/gpu.py`` on a machine with an NVIDIA GPU and CuPy (``--quick`` for a
small smoke run). Without a usable GPU it exits with a message and measures nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import dask
import dask.array as da
import numpy as np

from xr_rasteragg import RasterAggregator
from xr_rasteragg.engine import aggregate
from xr_rasteragg.gpu import probe_cupy
from xr_rasteragg.stats import Space
from xr_rasteragg.synthetic import make_cells

FIVE = ("sum", "mean", "var", "min", "max")
ALL_STATS = ("count", "sum", "mean", "var", "std", "skew", "kurtosis", "min", "max", "center_of_mass")
#: The shape features that the GPU kernel computes (all but perimeter and solidity), 2-D.
SHAPE = (
    "area", "bbox", "centroid", "axis_major_length", "axis_minor_length", "eccentricity", "orientation",
    "inertia_tensor", "inertia_tensor_eigvals", "extent", "equivalent_diameter_area", "centroid_weighted",
)  # fmt: skip
#: The labels' axes: y and x of the (z, y, x) blocks (the 2-D shape features need them).
PLANE = Space((1, 2), (1.0, 1.0))
#: ``cupyx.scipy.ndimage`` (or ``scipy.ndimage``) function for each of the five statistics.
NDIMAGE = {"sum": "sum_labels", "mean": "mean", "var": "variance", "min": "minimum", "max": "maximum"}


def reference_dataset(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(1, size, size)`` int32 and image ``(8, 1, size, size)`` uint16, as the CPU benchmark."""
    labels, image = make_cells((size, size), n_channels=8, cell_diameter=30.0, seed=0)
    return labels[None].astype(np.int32), image[:, None]


def tiled_labels(labels: np.ndarray, factor: int) -> np.ndarray:
    """``labels`` tiled ``factor`` x ``factor`` times along (y, x), each tile with its own ids
    (background 0 stays 0)."""
    top = int(labels.max()) + 1
    rows = []
    for i in range(factor):
        row = []
        for j in range(factor):
            shift = (i * factor + j) * top
            row.append(np.where(labels != 0, labels + shift, 0).astype(labels.dtype))
        rows.append(np.concatenate(row, axis=-1))
    return np.concatenate(rows, axis=-2)


def ndimage_stats(
    ndi: ModuleType, xp: ModuleType, labels: Any, image: Any, index: Any, stats: Sequence[str] = FIVE
) -> dict[str, Any]:
    """The statistics as ``scipy.ndimage`` computes them: one call per statistic and channel.

    ``ndi`` and ``xp`` are ``cupyx.scipy.ndimage`` and ``cupy`` on the GPU, ``scipy.ndimage`` and
    ``numpy`` on the CPU. Returns ``{stat: (n_labels, C) array}``.
    """
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):  # scipy.ndimage divides by zero counts of absent ids
        for name in stats:
            function = getattr(ndi, NDIMAGE[name])
            columns = [
                xp.asarray(function(image[c], labels, index), dtype=xp.float64) for c in range(len(image))
            ]
            out[name] = xp.stack(columns, axis=1)
    return out


def ours(
    labels: Any, image: Any, stats: Sequence[str], chunks: tuple[int, int], space: Space | None = None
) -> dict[str, np.ndarray]:
    """Our statistics for every label but the background, with (spatial, channel) ``chunks``
    (``space``: the labels' axes, as :func:`~xr_rasteragg.engine.aggregate` takes them)."""
    spatial, channel = chunks
    # name=False: no token from the contents, which would copy device arrays to the host.
    dlabels = da.from_array(labels, chunks=(1, spatial, spatial), asarray=False, name=False)
    dimage = da.from_array(image, chunks=(channel, 1, spatial, spatial), asarray=False, name=False)
    result = aggregate(dlabels, dimage, stats, background=0, space=space)
    return {"labels": result.labels, **result.values}


def through_aggregator(
    labels: np.ndarray, image: np.ndarray, chunks: tuple[int, int], run_on_gpu: bool
) -> list[Any]:
    """harpy's six statistics through ``RasterAggregator`` on dask arrays of NumPy chunks."""
    spatial, channel = chunks
    mask = da.from_array(labels, chunks=(1, spatial, spatial))
    pixels = da.from_array(image, chunks=(channel, 1, spatial, spatial))
    return RasterAggregator(mask, pixels, run_on_gpu=run_on_gpu).aggregate_stats()


def assert_agree(got: dict[str, np.ndarray], expected: dict[str, np.ndarray], names: Sequence[str]) -> None:
    """Two sets of results agree (extrema exactly, sums and moments to 1e-9)."""
    for name in names:
        a, b = np.asarray(got[name], dtype=np.float64), np.asarray(expected[name], dtype=np.float64)
        if name in ("min", "max", "bbox"):
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9, err_msg=name)


def best_of(repeat: int, function: Callable[[], object], synchronize: Callable[[], None]) -> float:
    """Shortest wall time of ``repeat`` calls, each followed by ``synchronize``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def bandwidth_line(name: str, seconds: float, nbytes: int, copy_bandwidth: float) -> str:
    """One line of the report: time, achieved input bandwidth, and its share of the copy bandwidth."""
    achieved = nbytes / seconds
    share = achieved / copy_bandwidth
    return f"  {name:<34} {seconds * 1e3:9.1f} ms  {achieved / 1e9:8.1f} GB/s  {share:7.1%} of copy bandwidth"


def copy_bandwidth(cupy: ModuleType, nbytes: int, repeat: int) -> float:
    """Device-to-device copy bandwidth: (bytes read + bytes written) per second, best of ``repeat``."""
    source = cupy.ones(nbytes, dtype=cupy.uint8)
    target = cupy.empty_like(source)
    target[...] = source
    sync = cupy.cuda.Device().synchronize
    seconds = best_of(repeat, lambda: cupy.copyto(target, source), sync)
    return 2 * nbytes / seconds


def run_dataset(
    name: str,
    labels: np.ndarray,
    image: np.ndarray,
    chunks: tuple[int, int],
    cupy: ModuleType,
    repeat: int,
    cpu: bool,
    bandwidth: float,
    gpu_chunks: tuple[int, int],
) -> None:
    """Check, time and report one dataset (``gpu_chunks``: the GPU-sized blocks)."""
    import cupyx.scipy.ndimage as cndi

    sync = cupy.cuda.Device().synchronize
    glabels, gimage = cupy.asarray(labels), cupy.asarray(image)
    sync()
    nbytes = labels.nbytes + image.nbytes
    ids = np.unique(labels)
    ids = ids[ids != 0]
    gids = cupy.asarray(ids)
    plane_labels, plane_image = glabels[0], gimage[:, 0]

    on_gpu = ours(glabels, gimage, ALL_STATS, chunks)
    theirs = {
        k: cupy.asnumpy(v) for k, v in ndimage_stats(cndi, cupy, plane_labels, plane_image, gids).items()
    }
    np.testing.assert_array_equal(on_gpu["labels"], ids)
    assert_agree(on_gpu, theirs, FIVE)
    assert_agree(ours(glabels, gimage, ALL_STATS, gpu_chunks), on_gpu, ALL_STATS)

    print(f"{name}: {labels.shape[-1]}x{labels.shape[-2]} px, {image.shape[0]} channels {image.dtype}")
    chunking = f"chunks {chunks[0]}x{chunks[0]} px x {chunks[1]} channels"
    print(f"  {ids.size} cells, {chunking}, {nbytes / 2**30:.2f} GiB")
    timings = {
        "ours GPU: mean": best_of(repeat, lambda: ours(glabels, gimage, ("mean",), chunks), sync),
        "ours GPU: 5 stats, one pass": best_of(repeat, lambda: ours(glabels, gimage, FIVE, chunks), sync),
        "ours GPU: all 10 stats, one pass": best_of(
            repeat, lambda: ours(glabels, gimage, ALL_STATS, chunks), sync
        ),
        "ours GPU: all 10 stats, GPU-sized blocks": best_of(
            repeat, lambda: ours(glabels, gimage, ALL_STATS, gpu_chunks), sync
        ),
        "ours GPU: 10 stats + shape, one pass": best_of(
            repeat, lambda: ours(glabels, gimage, ALL_STATS + SHAPE, chunks, PLANE), sync
        ),
        "cupyx.ndimage: mean": best_of(
            repeat, lambda: ndimage_stats(cndi, cupy, plane_labels, plane_image, gids, ("mean",)), sync
        ),
        "cupyx.ndimage: 5 stats": best_of(
            repeat, lambda: ndimage_stats(cndi, cupy, plane_labels, plane_image, gids), sync
        ),
    }
    if cpu:
        on_cpu = ours(labels, image, ALL_STATS, chunks)
        assert_agree(on_gpu, on_cpu, ALL_STATS)
        with_shape = ALL_STATS + SHAPE
        shape_gpu = ours(glabels, gimage, with_shape, chunks, PLANE)
        assert_agree(shape_gpu, ours(labels, image, with_shape, chunks, PLANE), with_shape)
        frames = zip(
            through_aggregator(labels, image, chunks, True),
            through_aggregator(labels, image, chunks, False),
            strict=True,
        )
        for got, expected in frames:
            np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), rtol=1e-9, atol=1e-6)
        timings["RasterAggregator run_on_gpu=True (host data)"] = best_of(
            repeat, lambda: through_aggregator(labels, image, chunks, True), sync
        )
        timings["RasterAggregator run_on_gpu=False"] = best_of(
            repeat, lambda: through_aggregator(labels, image, chunks, False), _nothing
        )
        with dask.config.set(scheduler="threads"):
            timings["ours CPU: mean"] = best_of(
                repeat, lambda: ours(labels, image, ("mean",), chunks), _nothing
            )
            timings["ours CPU: 5 stats, one pass"] = best_of(
                repeat, lambda: ours(labels, image, FIVE, chunks), _nothing
            )
            timings["ours CPU: all 10 stats, one pass"] = best_of(
                repeat, lambda: ours(labels, image, ALL_STATS, chunks), _nothing
            )
            timings["ours CPU: 10 stats + shape, one pass"] = best_of(
                repeat, lambda: ours(labels, image, with_shape, chunks, PLANE), _nothing
            )
    for label, seconds in timings.items():
        print(bandwidth_line(label, seconds, nbytes, bandwidth))
    print("  ratios of wall times (above 1: ours on the GPU is faster)")
    for work, ours_name in (("mean", "mean"), ("5 stats", "5 stats, one pass")):
        gpu = timings[f"ours GPU: {ours_name}"]
        line = f"    {work}: cupyx.scipy.ndimage / ours GPU = {timings[f'cupyx.ndimage: {work}'] / gpu:.1f}"
        if cpu:
            line += f", ours CPU / ours GPU = {timings[f'ours CPU: {ours_name}'] / gpu:.1f}"
        print(line)
    extra = timings["ours GPU: 10 stats + shape, one pass"] / timings["ours GPU: all 10 stats, one pass"]
    print(f"    ours GPU: (10 stats + shape) / 10 stats = {extra:.2f} (DESIGN's CPU target: at most 1.3)")
    if cpu:
        cpu_all = timings["ours CPU: all 10 stats, one pass"]
        every = cpu_all / timings["ours GPU: all 10 stats, one pass"]
        sized = cpu_all / timings["ours GPU: all 10 stats, GPU-sized blocks"]
        print(f"    all 10 stats: ours CPU / ours GPU = {every:.1f} (GPU-sized blocks: {sized:.1f})")
        shape = (
            timings["ours CPU: 10 stats + shape, one pass"] / timings["ours GPU: 10 stats + shape, one pass"]
        )
        print(f"    10 stats + shape: ours CPU / ours GPU = {shape:.1f}")
        host = (
            timings["RasterAggregator run_on_gpu=False"]
            / timings["RasterAggregator run_on_gpu=True (host data)"]
        )
        print(f"    RasterAggregator, host data: run_on_gpu=False / run_on_gpu=True = {host:.1f}")


def _nothing() -> None:
    return None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1024 x 1024 and 2048 x 2048 px smoke run")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-cpu-large", action="store_true", help="skip our CPU path on the large dataset")
    args = parser.parse_args(argv)
    cupy, reason = probe_cupy()
    if cupy is None:
        sys.exit(f"benchmarks/gpu.py: no usable GPU here ({reason}); nothing was measured.")
    logging.getLogger("xr_rasteragg").setLevel(logging.ERROR)

    device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    bandwidth = copy_bandwidth(cupy, (64 if args.quick else 1024) * 2**20, args.repeat)
    print(f"device: {device['name'].decode()}")
    print(f"device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")

    size, factor = (1024, 2) if args.quick else (4096, 4)
    labels, image = reference_dataset(size)
    small_chunks = (size // 2, 1)
    ours(
        cupy.asarray(labels[:, :64, :64]), cupy.asarray(image[:, :, :64, :64]), ALL_STATS, (64, 8)
    )  # warm-up
    run_dataset("reference", labels, image, small_chunks, cupy, args.repeat, True, bandwidth, (size, 8))

    big_labels = tiled_labels(labels, factor)
    big_image = cupy.random.RandomState(1).randint(0, 2**16, size=(8, *big_labels.shape), dtype=cupy.uint16)
    run_dataset(
        "large",
        big_labels,
        cupy.asnumpy(big_image),
        (size, 8),
        cupy,
        args.repeat,
        not args.no_cpu_large,
        bandwidth,
        (min(size * factor, 8192), 8),
    )


if __name__ == "__main__":
    main()
