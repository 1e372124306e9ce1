"""A text progress bar for the pass when it runs on a ``dask.distributed`` cluster.

dask's ``ProgressBar`` sees the local schedulers only. On a cluster the pass's tasks (their keys
start with ``rasteragg-``) are counted on the scheduler, state by state, a few times a second.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

__all__ = ["distributed_progress"]

_DONE = ("memory", "released", "forgotten", "erred")


def _task_counts(dask_scheduler: Any, skip: frozenset[str] = frozenset()) -> tuple[int, int]:
    """(done, total) over the scheduler's ``rasteragg-`` task groups not in ``skip`` (runs there)."""
    done = total = 0
    for name, group in dask_scheduler.task_groups.items():
        if str(name).startswith("rasteragg-") and name not in skip:
            done += sum(group.states.get(state, 0) for state in _DONE)
            total += sum(group.states.values())
    return done, total


def _group_names(dask_scheduler: Any) -> frozenset[str]:
    return frozenset(str(name) for name in dask_scheduler.task_groups)


def _bar(fraction: float, elapsed: float, width: int = 40) -> str:
    filled = int(width * fraction)
    return f"\r[{'#' * filled}{' ' * (width - filled)}] | {fraction:4.0%} Completed | {elapsed:5.1f}s"


@contextlib.contextmanager
def distributed_progress(out: TextIO, interval: float = 0.25) -> Iterator[None]:
    """Draw a bar on ``out`` while the block runs, from the default distributed client's scheduler."""
    from distributed import default_client

    client = default_client()
    before = client.run_on_scheduler(_group_names)
    stop = threading.Event()
    start = time.perf_counter()

    def draw() -> None:
        fraction = 0.0
        while not stop.wait(interval):
            with contextlib.suppress(Exception):  # a slow or lost scheduler must not stop the work
                done, total = client.run_on_scheduler(_task_counts, skip=before)
                fraction = done / total if total else 0.0
            out.write(_bar(fraction, time.perf_counter() - start))
            out.flush()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    finished = False
    try:
        yield
        finished = True
    finally:
        stop.set()
        thread.join()
        out.write((_bar(1.0, time.perf_counter() - start) if finished else "") + "\n")
        out.flush()
