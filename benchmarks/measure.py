"""Measurements, each run in a fresh Python process: ``python -m benchmarks.measure SPEC.json``.

A process gets a list of jobs of one kind and prints one ``RESULT {json}`` line per job as soon as
the job is done, so that the parent (:mod:`benchmarks.suite`) keeps what finished if a later job
is stopped. Four kinds:

``reference``
    A method of :mod:`benchmarks.peers` on the in-memory reference dataset. Its runs alternate
    with runs of the read limit in the same process, and its best time is reported as a ratio to
    the read limit's best, so that the ratios hold on a busy machine.
``scale``
    Our engine on a lazily generated image (:mod:`benchmarks.datasets`), as a ratio to
    generating and reading the same data (the same generators, summed), in the same process;
    the three (generate, mean, all) run in rounds, so that both sides of a ratio see the same
    state of the machine.
``quantify``
    One method of :mod:`benchmarks.quantify` (``rasteragg quantify`` or MCQuant's method) on
    its files on disk, once (:func:`benchmarks.quantify.measure_one`); the suite runs each in a
    process of its own and alternates them in rounds.
``cluster``
    The whole table on a ``LocalCluster``, written to zarr (:func:`benchmarks.cluster.run`): its
    wall times, the client's peak growth and the workers' peaks.

Time is the best of a few wall-clock runs. Peak memory is the growth of the process's resident
set during a run (for scale jobs, the largest over the rounds): the kernel's high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before the run, in MiB.
It counts every allocation the job touches — NumPy, Numba, dask's threads, the result — and not
the input data that were already resident. A job that runs past the cap is stopped (``SIGALRM``)
and reported as not finished; the process then exits and the parent starts a new one for the jobs
left.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.datasets import lazy_image, lazy_labels, reference_dataset
from benchmarks.peers import ALL_STATS, METHODS, Data

__all__ = ["best_of", "peak_rss", "run_jobs"]

MIB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss(function: Callable[[], Any]) -> tuple[float, float, Any]:
    """Run ``function`` once: wall seconds, peak resident-set growth in MiB (NaN if unknown), result."""
    reset = _reset_peak()
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - before) * 1024 / MIB if reset else float("nan")
    return seconds, peak, result


def best_of(repeat: int, function: Callable[[], Any], budget: float = float("inf")) -> tuple[float, int]:
    """Shortest wall time of up to ``repeat`` calls, fewer once ``budget`` seconds are spent."""
    times: list[float] = []
    spent = 0.0
    while len(times) < repeat and (not times or spent + times[-1] <= budget):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return min(times), len(times)


class _Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: types.FrameType | None) -> None:
    raise _Timeout


def _capped(cap: float, function: Callable[[], Any]) -> Any:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cap)
    try:
        return function()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _reference_job(spec: dict[str, Any], job: dict[str, Any], data: Data) -> dict[str, Any]:
    method = METHODS[job["method"]]
    data = Data(data.labels, data.image, job["spatial_chunk"], job["channel_chunk"])
    # Compile and import before timing, on a crop of 2 x 2 blocks: code that only runs across
    # blocks (merges, the frames between blocks) is compiled too.
    small = data.crop(256)
    warm = Data(small.labels, small.image, min(data.spatial_chunk, 128), data.channel_chunk)
    method.build(warm, job["work"])()
    read_call = METHODS["read"].build(data, job["work"])
    call = method.build(data, job["work"])
    # The shape features' target is a ratio to the nine statistics alone: for our accessor, those
    # are timed in the same rounds, after each run, each behind reads of its own as the run is
    # (a call right after the read limit's runs took 5-6 ms longer, medians of 11 rounds on the
    # reference dataset: with the nine always right after the shape call, the ratio was 1.33
    # against 1.26-1.27 the other way round, and 1.30 with reads before each).
    paired = None
    if job["work"] == "shape" and job["method"] in ("accessor", "accessor-numpy"):
        method.build(warm, "all")()
        paired = method.build(data, "all")
    # Runs alternate with the read limit (best of 3 before each run and after the last), so that
    # a burst of load from other processes hits both sides of the ratio alike.
    reads = [best_of(3, read_call)[0]]
    first, peak, _ = _capped(spec["cap"], lambda: peak_rss(call))
    times, nine = [first], []
    while True:
        if paired is not None:
            reads.append(best_of(3, read_call)[0])
            nine.append(_capped(spec["cap"], lambda: best_of(1, paired)[0]))
        if len(times) >= spec["repeat"] or sum(times) + sum(nine) + first > spec["budget"]:
            break
        reads.append(best_of(3, read_call)[0])
        times.append(_capped(spec["cap"], lambda: best_of(1, call)[0]))
    reads.append(best_of(3, read_call)[0])
    seconds, read, runs = min(times), min(reads), len(times)
    ratio = seconds / read
    record = {"seconds": seconds, "read_seconds": read, "ratio_read": ratio, "peak_mib": peak, "runs": runs}
    if nine:
        record["nine_seconds"] = min(nine)
    return record


def _table(result: Any) -> Any:
    """``result`` with its values computed, as a user of the engine computes the table (dask
    inputs give dask results): :meth:`~xr_rasteragg.engine.Aggregation.compute`."""
    return result.compute()


def _scale_job(spec: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    import dask

    from xr_rasteragg import aggregate

    height, width, chunk = job["height"], job["width"], job["chunk"]
    warm = lazy_labels(512, 512, 1000, 256), lazy_image(job["channels"], 512, 512, 256, job["channel_chunk"])
    aggregate(*warm, ALL_STATS, background=0)  # compile before timing
    labels = lazy_labels(height, width, job["n_labels"], chunk)
    image = lazy_image(job["channels"], height, width, chunk, job["channel_chunk"])
    out: dict[str, Any] = {}
    with dask.config.set(scheduler="threads"):
        calls = {
            "generate": lambda: dask.compute(labels.sum(), image.sum()),
            "mean": lambda: _table(aggregate(labels, image, "mean", background=0)),
            "all": lambda: _table(aggregate(labels, image, ALL_STATS, background=0)),
        }
        # Rounds of generate, mean, all, so that a change in the machine's state (other load, the
        # kernel's memory compaction) hits both sides of the ratios alike; the best of each counts.
        # Each method may take ``budget`` seconds in all.
        spent = last = 0.0
        while not out or (
            out["generate"]["runs"] < spec["repeat"] and spent + last <= len(calls) * spec["budget"]
        ):
            last = 0.0
            for name, call in calls.items():
                seconds, peak, result = _capped(spec["cap"], lambda call=call: peak_rss(call))  # type: ignore[misc]
                last += seconds
                if name != "generate" and len(result.labels) != job["n_labels"]:  # the generator's promise
                    raise AssertionError(f"expected {job['n_labels']} labels, got {len(result.labels)}")
                del result  # before the next call: the results of 10^7 labels take GiBs
                record = out.setdefault(name, {"seconds": seconds, "peak_mib": peak, "runs": 0})
                record.update(seconds=min(record["seconds"], seconds), runs=record["runs"] + 1)
                record["peak_mib"] = max(record["peak_mib"], peak)
            spent += last
    for name in ("mean", "all"):
        out[name]["ratio_generate"] = out[name]["seconds"] / out["generate"]["seconds"]
    # float64 per label: 8 per-channel statistics, 3 coordinates and the count
    out["result_mib"] = 8 * job["n_labels"] * (job["channels"] * 8 + 3 + 1) / MIB
    return out


def _quantify_job(spec: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.quantify import measure_one

    paths = {name: Path(path) for name, path in spec["files"].items()}
    record = _capped(spec["cap"], lambda: measure_one(job["method"], paths))
    del record["method"]  # in the job
    return record


def _cluster_job(spec: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.cluster import run

    return _capped(spec["cap"], lambda: run(**job))


#: The measurement of one job of each kind but ``reference`` (which loads its dataset first).
JOBS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "scale": _scale_job,
    "quantify": _quantify_job,
    "cluster": _cluster_job,
}


def run_jobs(spec: dict[str, Any]) -> None:
    """Run the jobs of ``spec`` in order, printing one ``RESULT`` line per job."""
    logging.getLogger("xr_rasteragg").setLevel(logging.ERROR)  # the constant-label notices
    measure: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
    if spec["kind"] == "reference":
        labels, image = reference_dataset(spec["size"], spec["channels"], Path(spec["cache"]))
        data = Data(labels, image, 0, 0)
        measure = functools.partial(_reference_job, data=data)
    else:
        measure = JOBS[spec["kind"]]
    for job in spec["jobs"]:
        record: dict[str, Any] = {"job": job}
        try:
            record.update(measure(spec, job), status="ok")
        except _Timeout:
            record.update(status="timeout", message=f"did not finish in {spec['cap']:g} s")
        except Exception as error:  # a peer's failure is a result to report, not a crash
            record.update(status="error", message=f"{type(error).__name__}: {error}"[:300])
        print("RESULT " + json.dumps(record, default=float), flush=True)
        if record["status"] == "timeout":
            sys.stdout.flush()
            os._exit(3)  # threads of the stopped job may still run: leave the rest to a new process


if __name__ == "__main__":
    np.seterr(all="ignore")
    run_jobs(json.loads(Path(sys.argv[1]).read_text()))
