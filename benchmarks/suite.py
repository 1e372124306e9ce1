"""The benchmark suite: xr_rasteragg against its peers, a scale series and chunk-size guidance.

Run from the repository root::

    python benchmarks/suite.py                 # everything but the 65536² point (about 20 min on 2 cores)
    python benchmarks/suite.py --big           # ... and the 32 GiB point (several minutes more)
    python benchmarks/suite.py --write-docs    # ... and regenerate docs/benchmarks.md and its plot
    python benchmarks/suite.py --quick         # smoke run (seconds; CI); skips peers not installed

Sections (``--only`` picks some):

``reference``
    DESIGN §6's dataset (4096² px, 8 channels uint16, ~18.8k cells, chunks 2048² x 1 channel) in
    memory; "mean", all nine statistics, (for the methods that compute it) the median of the
    8 channels, alone and with the nine in one call, and the nine with every shape feature (ours
    through the accessor, with the nine alone timed in the same rounds for the ratio of the two;
    scikit-image's regionprops_table with the same properties) and the
    shape features of the labels alone (ours), by each method of :mod:`benchmarks.peers`
    (``--methods`` picks some), as ratios to the read limit (NumPy summing image and mask once,
    measured in the same process right before) and to ours, with peak memory. Ours runs three ways through the
    class: without an index, with ``index=np.unique(mask)``, and as harpy's four-call script
    (aggregate_stats, aggregate_min, aggregate_max, center_of_mass) with that index; and two
    ways through the accessor: on dask-backed ``DataArray`` s (``accessor``) and on NumPy-backed
    ones (``accessor-numpy``, every piece of work of ``accessor``).
``chunks``
    Ours on the same dataset with spatial chunks 512..4096 and channel chunks 1, 4, all.
``scale``
    Ours on lazily generated data (nothing stored) — 10^3..10^7 labels on 16384² x 4 channels,
    and 4096²..32768² (65536² with ``--big``: 32 GiB of uint16, more than this machine's memory)
    with 10^5 labels — as a ratio to generating and reading the same data, with peak memory.
``quantify``
    ``rasteragg quantify`` against MCQuant's method (:mod:`benchmarks.quantify`) on the reference
    dataset as a tiled OME-TIFF with a cell and a nucleus mask: time and peak memory of each, one
    run per fresh process, the two methods alternating in rounds after a warm-up run of ours.
``cluster``
    The whole table on a ``LocalCluster`` of 2 worker processes, written to zarr
    (:mod:`benchmarks.cluster`, 10^6 labels x 16 channels): wall times, the client's peak growth
    (issue 15's target: under 300 MiB) and the workers' peaks.

Every measurement runs in a fresh process (:mod:`benchmarks.measure`); a method that runs past
``--cap`` seconds is reported as not finished. Results go to ``--json`` (by default
``results.json`` in the temporary directory's ``xr_rasteragg_bench``, beside the cached dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cluster, quantify
from benchmarks.datasets import REFERENCE, reference_files
from benchmarks.machine import describe_machine
from benchmarks.peers import METHODS

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(tempfile.gettempdir()) / "xr_rasteragg_bench"
#: Methods whose failure fails the run.
OWN = ("ours", "ours-index", "ours-script", "accessor", "accessor-numpy", "read")

__all__ = ["main", "plan"]


def plan(quick: bool, big: bool, big_only: bool = False) -> dict[str, Any]:
    """Sizes of each section: the full run, or a smoke run of seconds."""
    if quick:
        return {
            "size": 512,
            "spatial_chunk": 256,
            "repeat": 2,
            "budget": 0.5,
            "chunks": [(128, 1), (512, 8)],
            "labels_series": {"size": 1024, "n_labels": [10**2, 10**4]},
            "size_series": {"n_labels": 10**3, "sizes": [512, 1024]},
            "quantify": {**quantify.QUICK, "rounds": 1},
            "cluster": cluster.QUICK,
        }
    sizes = [65536] if big_only else [4096, 8192, 16384, 32768] + ([65536] if big else [])
    return {
        "size": REFERENCE["size"],
        "spatial_chunk": REFERENCE["spatial_chunk"],
        "repeat": 7,
        "budget": 5.0,
        "chunks": [(s, c) for s in (512, 1024, 2048, 4096) for c in (1, 4, 8)],
        "labels_series": {"size": 16384, "n_labels": [] if big_only else [10**3, 10**4, 10**5, 10**6, 10**7]},
        "size_series": {"n_labels": 10**5, "sizes": sizes},
        "quantify": {**quantify.FULL, "rounds": 2},
        "cluster": cluster.FULL,
    }


def _run_process(spec: dict[str, Any], backstop: float) -> list[dict[str, Any]]:
    """Run ``spec``'s jobs in fresh processes until each has a result."""
    results: list[dict[str, Any]] = []
    pending = list(spec["jobs"])
    while pending:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
            json.dump({**spec, "jobs": pending}, file)
        command = [sys.executable, "-m", "benchmarks.measure", file.name]
        try:
            done = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, timeout=backstop, check=False
            )
            output, error, code = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
            error, code = f"killed after {backstop:g} s", -9
        finally:
            os.unlink(file.name)
        records = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
        for record in records:
            _progress(record)
        results.extend(records)
        pending = pending[len(records) :]
        if pending and (code not in (0, 3) or not records):
            message = (error.strip().splitlines() or [f"exit code {code}"])[-1][:300]
            record = {"job": pending.pop(0), "status": "error", "message": message}
            _progress(record)
            results.append(record)
    return results


def _progress(record: dict[str, Any]) -> None:
    job = record["job"]
    what = " ".join(f"{key}={value}" for key, value in job.items())
    print(f"  {what}: {_outcome(record)}", file=sys.stderr, flush=True)


def _outcome(record: dict[str, Any]) -> str:
    """One job's result in a few words, for the progress lines."""
    if record["status"] != "ok":
        return f"{record['status']}: {record.get('message', '')}"
    if "ratio_read" in record:  # reference, chunks
        return f"{record['seconds']:.3f} s = {record['ratio_read']:.1f} x read"
    if "generate" in record:  # scale
        ratios = ", ".join(f"{w} {record[w]['ratio_generate']:.2f}" for w in ("mean", "all"))
        return f"generate {record['generate']['seconds']:.2f} s; x generate: {ratios}"
    if "client_growth" in record:  # cluster
        return (
            f"call {record['call_s']:.1f} s, to_zarr {record['write_s']:.1f} s; "
            f"client peak growth {record['client_growth'] / 2**20:.0f} MiB"
        )
    return f"{record['seconds']:.2f} s, peak +{record['peak_mib']:.0f} MiB"  # quantify


def _reference_spec(settings: dict[str, Any], cap: float) -> dict[str, Any]:
    """The measurement spec of the reference dataset, without its jobs.

    The dataset is made here once and cached, so that each measurement process only loads it.
    """
    reference_files(settings["size"], REFERENCE["channels"], CACHE)
    return {
        "kind": "reference",
        "cache": str(CACHE),
        "size": settings["size"],
        "channels": REFERENCE["channels"],
        "cap": cap,
        "repeat": settings["repeat"],
        "budget": settings["budget"],
    }


def reference_section(
    settings: dict[str, Any], cap: float, quick: bool, methods: list[str] | None = None
) -> dict[str, Any]:
    size, chunk = settings["size"], settings["spatial_chunk"]
    skipped = {name: f"not installed: {', '.join(m.missing())}" for name, m in METHODS.items() if m.missing()}
    if methods:
        unasked = [name for name in METHODS if name not in {"read", *methods}]
        skipped.update({name: "not asked for (--methods)" for name in unasked})
    spec = _reference_spec(settings, cap)

    def jobs(name: str) -> list[dict[str, Any]]:
        return [
            {
                "method": name,
                "work": work,
                "spatial_chunk": chunk,
                "channel_chunk": REFERENCE["channel_chunk"],
            }
            for work in METHODS[name].computes
        ]

    names = [name for name in METHODS if name not in skipped]
    groups = [[job for name in names for job in jobs(name)]] if quick else [jobs(name) for name in names]
    results = [r for group in groups for r in _run_process({**spec, "jobs": group}, cap * len(group) + 300)]
    return {
        "size": size,
        "channels": REFERENCE["channels"],
        "spatial_chunk": chunk,
        "channel_chunk": REFERENCE["channel_chunk"],
        "methods": {name: {"title": m.title, "computes": m.computes} for name, m in METHODS.items()},
        "skipped": skipped,
        "results": results,
    }


def chunks_section(
    settings: dict[str, Any], cap: float, quick: bool, methods: list[str] | None = None
) -> dict[str, Any]:
    size = settings["size"]
    spec = _reference_spec(settings, cap)
    groups = [
        [{"method": "ours", "work": work, "spatial_chunk": s, "channel_chunk": c} for work in ("mean", "all")]
        for s, c in settings["chunks"]
    ]
    if quick:
        groups = [[job for group in groups for job in group]]
    results = [r for group in groups for r in _run_process({**spec, "jobs": group}, cap * len(group) + 300)]
    return {"size": size, "results": results}


def scale_section(
    settings: dict[str, Any], cap: float, quick: bool, methods: list[str] | None = None
) -> dict[str, Any]:
    channels, chunk = 4, settings["spatial_chunk"]
    by_labels, by_size = settings["labels_series"], settings["size_series"]
    points = [(by_labels["size"], n) for n in by_labels["n_labels"]]
    points += [
        (size, by_size["n_labels"]) for size in by_size["sizes"] if (size, by_size["n_labels"]) not in points
    ]
    spec = {"kind": "scale", "cap": cap, "repeat": settings["repeat"], "budget": settings["budget"]}
    groups = [
        [{"height": s, "width": s, "channels": channels, "n_labels": n, "chunk": chunk, "channel_chunk": 1}]
        for s, n in points
    ]
    if quick:
        groups = [[job for group in groups for job in group]]
    results = [r for group in groups for r in _run_process({**spec, "jobs": group}, 3 * cap + 300)]
    return {
        "channels": channels,
        "chunk": chunk,
        "labels_series": by_labels,
        "size_series": by_size,
        "results": results,
    }


def quantify_section(
    settings: dict[str, Any], cap: float, quick: bool, methods: list[str] | None = None
) -> dict[str, Any]:
    size, channels, rounds = (settings["quantify"][key] for key in ("size", "channels", "rounds"))
    paths = quantify.dataset(size, channels)  # made here once, so that each process only reads it
    spec = {"kind": "quantify", "files": {name: str(path) for name, path in paths.items()}, "cap": cap}
    # Not reported: fills numba's cache of compiled kernels and the page cache with the files, so
    # that every measured run loads the same cached kernels and reads the files from memory.
    _run_process({**spec, "jobs": [{"method": "ours", "warm-up": True}]}, cap + 300)
    groups = [[{"method": method, "round": r}] for r in range(rounds) for method in quantify.METHODS]
    results = [r for group in groups for r in _run_process({**spec, "jobs": group}, cap + 300)]
    return {"size": size, "channels": channels, "rounds": rounds, "results": results}


def cluster_section(
    settings: dict[str, Any], cap: float, quick: bool, methods: list[str] | None = None
) -> dict[str, Any]:
    spec = {"kind": "cluster", "cap": cap, "jobs": [settings["cluster"]]}
    return {"target_mib": cluster.CLIENT_TARGET / 2**20, "results": _run_process(spec, cap + 300)}


SECTIONS = {
    "reference": reference_section,
    "chunks": chunks_section,
    "scale": scale_section,
    "quantify": quantify_section,
    "cluster": cluster_section,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite; return (and save) the results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--big", action="store_true", help="add the 65536² x 4 (32 GiB) scale point")
    parser.add_argument(
        "--big-only", action="store_true", help="only the 65536² point (implies --only scale)"
    )
    parser.add_argument("--note", default="", help="a line for the docs, e.g. how busy the machine was")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="reference section: only these methods (and the read limit)",
    )
    parser.add_argument(
        "--cap", type=float, default=None, help="seconds one measurement may take (600; 60 quick)"
    )
    parser.add_argument("--json", type=Path, default=CACHE / "results.json", help="results file")
    parser.add_argument("--write-docs", action="store_true", help="write docs/benchmarks.md and its plot")
    args = parser.parse_args(argv)
    cap = args.cap if args.cap is not None else (60.0 if args.quick else 600.0)
    settings = plan(args.quick, args.big, args.big_only)
    sections = ["scale"] if args.big_only else args.only or list(SECTIONS)

    started = time.time()
    results: dict[str, Any] = {"quick": args.quick, "note": args.note, "machine": describe_machine()}
    for name in sections:
        print(f"{name}:", file=sys.stderr, flush=True)
        results[name] = SECTIONS[name](settings, cap, args.quick, args.methods)
    results["machine"]["load_after"] = os.getloadavg()
    results["wall_seconds"] = time.time() - started

    from benchmarks.report import tables, write_docs

    print(tables(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=float))
    print(f"results: {args.json}; {results['wall_seconds']:.0f} s in all", file=sys.stderr)
    if args.write_docs:
        for path in write_docs(results, ROOT / "docs"):
            print(f"wrote {path}", file=sys.stderr)
    return results


def failures(results: dict[str, Any]) -> list[str]:
    """Jobs of our own code (ours, accessor, read limit, chunks, scale, quantify's ours, cluster)
    that did not run to the end.

    Peers' failures are results to report; ours fail the run (so that CI's smoke run catches rot).
    """
    own = []
    for name in SECTIONS:
        for record in results.get(name, {}).get("results", []):
            if record["status"] != "ok" and record["job"].get("method", "ours") in OWN:
                own.append(f"{name} {record['job']}: {record['status']}: {record.get('message', '')}")
    return own


if __name__ == "__main__":
    failed = failures(main())
    if failed:
        sys.exit("failed:\n" + "\n".join(failed))
