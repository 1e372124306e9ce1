"""Tables and the docs page from the suite's results.

``python -m benchmarks.report RESULTS.json [MORE.json ...]`` rewrites ``docs/benchmarks.md`` and
``docs/_static/benchmarks.png`` from saved results; sections of later files replace those of
earlier ones, and their scale points are added (so a separate ``--big`` run can be merged in).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["merge", "shape_table", "tables", "write_docs"]

WORKS = ("mean", "all")
MIB = 2**20
#: Whole-label work (see :data:`benchmarks.peers.MEDIAN_WORKS`), in a table of its own.
MEDIAN_WORKS = {"median": "median (8 channels)", "median-all": "median + the nine, one call"}


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _by_method(section: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["job"]["method"], r["job"]["work"]): r for r in section["results"]}


def reference_table(section: dict[str, Any]) -> str:
    """Each method, for mean and for all statistics: ratio to the read limit, to ours, peak memory."""
    found = _by_method(section)
    header = ["method", "statistics (all)"]
    for work in WORKS:
        header += [f"{work}: × read", f"{work}: × ours", f"{work}: peak MiB"]
    rows = []
    for name, method in section["methods"].items():
        if not any(work in method["computes"] for work in WORKS):
            continue
        computes = method["computes"]["all"]
        row = [method["title"], ", ".join(computes) if len(computes) < 9 else "all nine" if computes else "–"]
        for work in WORKS:
            record = found.get((name, work))
            ours = found.get(("ours", work))
            if name in section["skipped"]:
                row += [f"skipped ({section['skipped'][name]})", "", ""]
            elif record is None or record["status"] != "ok":
                row += [record["message"] if record else "not run", "", ""]
            else:
                versus = (
                    record["ratio_read"] / ours["ratio_read"] if ours and ours["status"] == "ok" else math.nan
                )
                row += [_fmt(record["ratio_read"]), _fmt(versus), _fmt(record["peak_mib"])]
        rows.append(row)
    return _table(header, rows)


def median_table(section: dict[str, Any]) -> str:
    """The methods that compute a per-label median: ratio to the read limit, to ours, peak memory."""
    found = _by_method(section)
    header = ["method"]
    for title in MEDIAN_WORKS.values():
        header += [f"{title}: × read", f"{title}: × ours", f"{title}: peak MiB"]
    rows = []
    for name, method in section["methods"].items():
        if not any(work in method["computes"] for work in MEDIAN_WORKS):
            continue
        row = [method["title"]]
        for work in MEDIAN_WORKS:
            record = found.get((name, work))
            ours = found.get(("ours", work))
            if work not in method["computes"]:
                row += ["–", "", ""]
            elif name in section["skipped"]:
                row += [f"skipped ({section['skipped'][name]})", "", ""]
            elif record is None or record["status"] != "ok":
                row += [record["message"] if record else "not run", "", ""]
            else:
                versus = (
                    record["ratio_read"] / ours["ratio_read"] if ours and ours["status"] == "ok" else math.nan
                )
                row += [_fmt(record["ratio_read"]), _fmt(versus), _fmt(record["peak_mib"])]
        rows.append(row)
    return _table(header, rows)


#: The rows of :func:`shape_table`: (method, work, what it computes).
SHAPE_ROWS = (
    ("accessor", "all", "ours: the nine statistics"),
    ("accessor", "shape", "ours: the nine statistics and every shape feature, in one call"),
    ("accessor-numpy", "all", "ours on NumPy-backed arrays: the nine statistics"),
    ("accessor-numpy", "shape", "ours on NumPy-backed arrays: the nine and every shape feature"),
    ("labels-shape", "shape", "ours: the shape features of the labels alone"),
    ("skimage", "shape", "scikit-image regionprops_table, the same properties"),
)


def shape_table(section: dict[str, Any]) -> str:
    """The shape features: ours with the nine statistics against the nine alone (DESIGN's target:
    at most 1.3×), the same on NumPy-backed arrays, the labels alone, and regionprops_table with
    the same properties; ratios to ours on dask-backed arrays, and for ours with the nine and the
    shape features, to the nine alone timed in the same rounds (after each run, each behind
    reads of the read limit as the run is, in one process: the ratio that a burst of load on a
    shared machine moves least)."""
    found = _by_method(section)
    nine, both = found.get(("accessor", "all")), found.get(("accessor", "shape"))
    rows = []
    for name, work, title in SHAPE_ROWS:
        record = found.get((name, work))
        if name in section["skipped"]:
            rows.append([title, f"skipped ({section['skipped'][name]})", "", "", "", ""])
            continue
        if record is None or record["status"] != "ok":
            rows.append([title, record["message"] if record else "not run", "", "", "", ""])
            continue
        ratios = [
            record["seconds"] / other["seconds"] if other and other["status"] == "ok" else math.nan
            for other in (nine, both)
        ]
        alongside = record["seconds"] / record["nine_seconds"] if "nine_seconds" in record else None
        rows.append(
            [
                title,
                f"{record['seconds'] * 1e3:,.0f}",
                _fmt(record["ratio_read"]),
                *map(_fmt, ratios),
                "" if alongside is None else _fmt(alongside),
            ]
        )
    header = ["method", "ms", "× read", "× ours nine", "× ours nine + shape", "× its nine, same rounds"]
    return _table(header, rows)


def reference_summary(section: dict[str, Any]) -> str:
    """Read limit and our times in absolute terms."""
    found = _by_method(section)
    reads = sorted(r["read_seconds"] for r in section["results"] if r["status"] == "ok")
    parts = []
    if reads:
        parts.append(f"read limit {reads[len(reads) // 2] * 1e3:.0f} ms (median over the processes)")
    for work, title in (("mean", "mean"), ("all", "all statistics"), ("median", "median")):
        record = found.get(("ours", work))
        if record and record["status"] == "ok":
            parts.append(f"ours {title} {record['seconds'] * 1e3:.0f} ms")
    return "; ".join(parts)


def chunks_table(section: dict[str, Any]) -> str:
    """Ours for each spatial x channel chunking."""
    by_config: dict[tuple[int, int], dict[str, Any]] = {}
    for record in section["results"]:
        job = record["job"]
        by_config.setdefault((job["spatial_chunk"], job["channel_chunk"]), {})[job["work"]] = record
    rows = []
    for (spatial, channel), works in sorted(by_config.items()):
        row = [f"{spatial}²", str(channel)]
        for work in WORKS:
            record = works.get(work)
            if record is not None and record["status"] == "ok":
                row += [_fmt(record["ratio_read"]), _fmt(record["peak_mib"])]
            else:
                row += ["–", "–"]
        rows.append(row)
    header = [
        "spatial chunk",
        "channel chunk",
        "mean: × read",
        "mean: peak MiB",
        "all: × read",
        "all: peak MiB",
    ]
    return _table(header, rows)


def _scale_points(section: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(
        (r for r in section["results"]),
        key=lambda r: (r["job"]["height"] * r["job"]["width"], r["job"]["n_labels"]),
    )


def scale_table(section: dict[str, Any]) -> str:
    """Every scale point: time as a ratio to generate-and-read, peak memory, result size."""
    rows = []
    for record in _scale_points(section):
        job = record["job"]
        gib = job["height"] * job["width"] * job["channels"] * 2 / 2**30
        row = [
            f"{job['height']}² × {job['channels']}",
            f"{gib:.3g}",
            f"{job['n_labels']:.0e}".replace("+0", ""),
        ]
        if record["status"] != "ok":
            rows.append([*row, record.get("message", record["status"]), *[""] * 8])
            continue
        generate = record["generate"]
        row += [_fmt(generate["seconds"]), _fmt(generate["peak_mib"])]
        for work in WORKS:
            row += [_fmt(record[work]["ratio_generate"]), _fmt(record[work]["peak_mib"])]
        row += [
            _fmt(record["result_mib"]),
            _fmt(record["all"]["seconds"] / (job["height"] * job["width"]) * 1e9),
        ]
        rows.append(row)
    header = [
        "image",
        "GiB",
        "labels",
        "generate+read s",
        "generate peak MiB",
        "mean: × generate",
        "mean: peak MiB",
        "all: × generate",
        "all: peak MiB",
        "result MiB",
        "all: ns per px",
    ]
    return _table(header, rows)


#: The methods of the quantify section (:data:`benchmarks.quantify.METHODS`), as the page names them.
QUANTIFY_TITLES = {
    "ours": "`rasteragg quantify`",
    "mcquant": "MCQuant's method (regionprops per channel per mask)",
}


def _quantify_best(section: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method over the rounds: its fastest run, with the largest peak memory of its runs and
    their number; or its first failure where no run finished."""
    best = {}
    for method in QUANTIFY_TITLES:
        records = [r for r in section["results"] if r["job"]["method"] == method]
        ok = [r for r in records if r["status"] == "ok"]
        if ok:
            fastest = min(ok, key=lambda r: r["seconds"])
            best[method] = {**fastest, "peak_mib": max(r["peak_mib"] for r in ok), "runs": len(ok)}
        elif records:
            best[method] = records[0]
    return best


def quantify_summary(section: dict[str, Any]) -> str:
    """The dataset and the tables ours wrote (one CSV file per mask)."""
    ours = _quantify_best(section).get("ours", {})
    tables = ", ".join(f"{name}: {count:,} rows" for name, count in ours.get("rows", {}).items())
    dataset = f"{section['size']}² px, {section['channels']} channels uint16, tiled OME-TIFF, 2 masks"
    return f"{dataset} ({tables})" if tables else dataset


def quantify_table(section: dict[str, Any]) -> str:
    """``rasteragg quantify`` and MCQuant's method: best time, peak memory, each as a ratio to ours."""
    best = _quantify_best(section)
    ours = best.get("ours", {"status": "not run"})
    rows = []
    for method, title in QUANTIFY_TITLES.items():
        record = best.get(method)
        if record is None or record["status"] != "ok":
            rows.append([title, record["message"] if record else "not run", "", "", "", "", ""])
            continue
        same = ours["status"] == "ok"
        rows.append(
            [
                title,
                _fmt(record["seconds"]),
                _fmt(record["seconds"] / ours["seconds"]) if same else "–",
                _fmt(record["peak_mib"]),
                _fmt(record["peak_mib"] / ours["peak_mib"]) if same and ours["peak_mib"] else "–",
                " + ".join(f"{count:,}" for count in record["rows"].values()),
                str(record["runs"]),
            ]
        )
    header = ["method", "seconds (best)", "time × ours", "peak MiB", "peak × ours", "rows written", "runs"]
    return _table(header, rows)


def cluster_table(section: dict[str, Any]) -> str:
    """The whole table on a LocalCluster: wall times, the client's peak growth, the workers' peaks."""
    rows = []
    for record in section["results"]:
        job = record["job"]
        row = [f"{job['n_labels']:.0e}".replace("+0", "") + f" × {job['channels']}"]
        if record["status"] != "ok":
            rows.append([*row, record.get("message", record["status"]), *[""] * 7])
            continue
        workers = ", ".join(
            f"{_fmt(peak / MIB)} (from {_fmt(base / MIB)})"
            for peak, base in zip(record["worker_peaks"], record["worker_bases"], strict=True)
        )
        rows.append(
            [
                *row,
                f"{record['pixels'] / 1e6:,.1f} M px, chunks {job['chunk']}²",
                f"{job['workers']} × 1 thread, {job['memory']}",
                _fmt(record["table_bytes"] / MIB),
                _fmt(record["call_s"]),
                _fmt(record["write_s"]),
                _fmt(record["client_growth"] / MIB),
                workers,
            ]
        )
    header = [
        "labels × channels",
        "image",
        "workers",
        "table MiB",
        "the call s",
        "to_zarr s",
        f"client peak growth MiB (target < {_fmt(section['target_mib'])})",
        "worker peak MiB",
    ]
    return _table(header, rows)


def _loads(values: Sequence[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def _machine_line(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM; "
        f"load average (1, 5, 15 min) {_loads(machine['load_before'])} at the start and "
        f"{_loads(machine.get('load_after', ()))} at the end; Python {machine['python']}; {machine['date']}."
    )


def _runs_lines(results: dict[str, Any]) -> str:
    """One line per merged run: what it measured, when, and how busy the machine was."""
    lines = []
    for run in results["runs"]:
        lines.append(
            f"- {', '.join(run['sections'])}: {run['date']}, {run['wall_seconds'] / 60:.0f} min, load "
            f"average (1, 5, 15 min) {_loads(run['load_before'])} at the start and "
            f"{_loads(run['load_after'])} at the end."
        )
    return "\n".join(lines)


def _versions(machine: dict[str, Any]) -> str:
    return ", ".join(f"{name} {version}" for name, version in machine["libraries"].items())


def tables(results: dict[str, Any]) -> str:
    """All tables as Markdown, with the machine they were measured on."""
    parts = [f"Machine: {_machine_line(results['machine'])}", f"Versions: {_versions(results['machine'])}."]
    if "reference" in results:
        section = results["reference"]
        parts += [
            f"\nReference dataset: {section['size']}² px, {section['channels']} channels uint16, "
            f"chunks {section['spatial_chunk']}² × {section['channel_chunk']} channel; "
            f"{reference_summary(section)}.\n",
            reference_table(section),
            "\nWhole-label statistics (exact per-label median, reference dataset):\n",
            median_table(section),
            "\nShape features (reference dataset):\n",
            shape_table(section),
        ]
    if "chunks" in results:
        parts += ["\nChunk sizes (ours, reference dataset):\n", chunks_table(results["chunks"])]
    if "scale" in results:
        parts += ["\nScale series (ours, lazily generated data):\n", scale_table(results["scale"])]
    if "quantify" in results:
        section = results["quantify"]
        parts += [f"\nMCQuant's method: {quantify_summary(section)}.\n", quantify_table(section)]
    if "cluster" in results:
        parts += ["\nOn a LocalCluster, written to zarr:\n", cluster_table(results["cluster"])]
    return "\n".join(parts)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    if "reference" in results:
        _plot_reference(axes[0, 0], results["reference"])
    if "chunks" in results:
        _plot_chunks(axes[1, 0], results["chunks"])
    if "scale" in results:
        _plot_scale(axes[0, 1:], axes[1, 1:], results["scale"])
    machine = results["machine"]
    figure.suptitle(
        f"xr_rasteragg benchmarks — {machine['cpu']}, {machine['cores']} cores, {machine['date']}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_reference(ax: Any, section: dict[str, Any]) -> None:
    found = _by_method(section)
    names = [
        n
        for n, method in section["methods"].items()
        if n != "read" and n not in section["skipped"] and any(w in method["computes"] for w in WORKS)
    ]
    for offset, work, colour in ((-0.2, "mean", "tab:blue"), (0.2, "all", "tab:orange")):
        values = []
        for name in names:
            record = found.get((name, work))
            values.append(record["ratio_read"] if record and record["status"] == "ok" else math.nan)
        ax.barh([i + offset for i in range(len(names))], values, height=0.4, color=colour, label=work)
        for i, value in enumerate(values):
            x = value if math.isfinite(value) else 1
            ax.text(x, i + offset, f" {_fmt(value, 2)}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), [section["methods"][n]["title"] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(2.5, color="tab:blue", ls=":", lw=1)
    ax.axvline(5, color="tab:orange", ls=":", lw=1)
    ax.set_xlabel("wall time / read limit (log; dotted: targets 2.5× mean, 5× all)")
    ax.set_title(f"Reference dataset {section['size']}² × {section['channels']} uint16")
    ax.legend(fontsize=8, loc="upper right")


def _plot_scale(top: Any, bottom: Any, section: dict[str, Any]) -> None:
    points = [r for r in _scale_points(section) if r["status"] == "ok"]
    n_fixed, size_fixed = section["size_series"]["n_labels"], section["labels_series"]["size"]
    by_size = [r for r in points if r["job"]["n_labels"] == n_fixed]
    by_labels = [r for r in points if r["job"]["height"] == size_fixed]
    pixels = [r["job"]["height"] * r["job"]["width"] for r in by_size]
    counts = [r["job"]["n_labels"] for r in by_labels]
    styles = (
        ("generate", "k--", "generate + read"),
        ("mean", "o-", "ours, mean"),
        ("all", "s-", "ours, all"),
    )
    for key, style, label in styles:
        top[0].plot(pixels, [r[key]["seconds"] for r in by_size], style, label=label)
        top[1].plot(pixels, [r[key]["peak_mib"] for r in by_size], style, label=label)
        bottom[1].plot(counts, [r[key]["peak_mib"] for r in by_labels], style, label=label)
        if key != "generate":
            bottom[0].plot(counts, [r[key]["ratio_generate"] for r in by_labels], style, label=label)
    bottom[1].plot(
        counts, [r["result_mib"] for r in by_labels], "x:", color="grey", label="result table (float64)"
    )
    channels = section["channels"]
    top[0].set(xscale="log", yscale="log", xlabel=f"pixels (× {channels} channels)", ylabel="seconds")
    top[0].set_title(f"Time vs image size ({n_fixed:.0e} labels; linear = slope 1)")
    top[1].set(xscale="log", xlabel=f"pixels (× {channels} channels)", ylabel="peak RSS growth, MiB")
    top[1].set_title(f"Peak memory vs image size ({n_fixed:.0e} labels)")
    bottom[0].set(xscale="log", xlabel="labels", ylabel="time / generate + read")
    bottom[0].set_title(f"Time vs label count ({size_fixed}² × {channels})")
    bottom[1].set(xscale="log", yscale="log", xlabel="labels", ylabel="peak RSS growth, MiB")
    bottom[1].set_title(f"Peak memory vs label count ({size_fixed}² × {channels})")
    for ax in (*top, *bottom):
        ax.legend(fontsize=8)
    top[1].set_ylim(bottom=0)
    bottom[0].set_ylim(bottom=0)


def _plot_chunks(ax: Any, section: dict[str, Any]) -> None:
    series: dict[tuple[int, str], list[tuple[int, float]]] = {}
    for record in section["results"]:
        if record["status"] == "ok":
            job = record["job"]
            key = (job["channel_chunk"], job["work"])
            series.setdefault(key, []).append((job["spatial_chunk"], record["ratio_read"]))
    colours = dict(
        zip(sorted({c for c, _ in series}), ("tab:blue", "tab:green", "tab:red", "tab:purple"), strict=False)
    )
    for (channel, work), values in sorted(series.items()):
        values.sort()
        ax.plot(
            [v[0] for v in values],
            [v[1] for v in values],
            "o-" if work == "mean" else "s--",
            color=colours.get(channel, "grey"),
            label=f"{work}, {channel} channel(s) per chunk",
        )
    spatial = sorted({v[0] for values in series.values() for v in values})
    ax.set_xscale("log", base=2)
    ax.set_xticks(spatial, [str(s) for s in spatial])
    ax.minorticks_off()
    ax.set(xlabel="spatial chunk (px per side)", ylabel="wall time / read limit")
    ax.set_ylim(bottom=0)
    ax.set_title("Chunk size (ours, reference dataset)")
    ax.legend(fontsize=7)


def _chunking(record: dict[str, Any]) -> str:
    job = record["job"]
    return (
        f"{job['spatial_chunk']}² px × {job['channel_chunk']} channel(s) "
        f"({_fmt(record['ratio_read'])}× the read limit, peak {_fmt(record['peak_mib'])} MiB)"
    )


def _findings(results: dict[str, Any]) -> list[str]:
    """Sentences that follow from the numbers of this run."""
    lines = []
    if "chunks" in results:
        ok = [r for r in results["chunks"]["results"] if r["status"] == "ok"]
        for work in WORKS:
            rows = [r for r in ok if r["job"]["work"] == work]
            if rows:
                best = min(rows, key=lambda r: r["ratio_read"])
                near = [r for r in rows if r["ratio_read"] <= 1.1 * best["ratio_read"]]
                lean = min(near, key=lambda r: (r["peak_mib"], r["ratio_read"]))
                lean_text = (
                    "" if lean is best else f"; within 10 % of it with the least memory {_chunking(lean)}"
                )
                lines.append(f"- Chunking for {work}: fastest {_chunking(best)}{lean_text}.")
    if "scale" in results:
        section = results["scale"]
        ok = [r for r in section["results"] if r["status"] == "ok"]
        for work in WORKS:
            if ok:
                worst = max(ok, key=lambda r: r[work]["ratio_generate"])
                low = min(r[work]["ratio_generate"] for r in ok)
                lines.append(
                    f"- Scale series, {work}: {_fmt(low)}–{_fmt(worst[work]['ratio_generate'])}× "
                    f"generate-and-read; the highest at {worst['job']['height']}² px with "
                    f"{worst['job']['n_labels']:.0e} labels."
                )
        by_size = [r for r in ok if r["job"]["n_labels"] == section["size_series"]["n_labels"]]
        if by_size:
            peaks = [r["all"]["peak_mib"] for r in by_size]
            per_px = [r["all"]["seconds"] / (r["job"]["height"] * r["job"]["width"]) * 1e9 for r in by_size]
            lines.append(
                f"- With {section['size_series']['n_labels']:.0e} labels, all statistics took "
                f"{_fmt(min(per_px))}–{_fmt(max(per_px))} ns per pixel (× 4 channels) over "
                f"{len(by_size)} image sizes, peak memory {_fmt(min(peaks))}–{_fmt(max(peaks))} MiB."
            )
    if "quantify" in results:
        best = _quantify_best(results["quantify"])
        ours, mcquant = best.get("ours"), best.get("mcquant")
        if ours and mcquant and ours["status"] == mcquant["status"] == "ok":
            lines.append(
                f"- MCQuant's method took {_fmt(mcquant['seconds'] / ours['seconds'])}× the time of "
                f"`rasteragg quantify` ({_fmt(mcquant['seconds'])} s against {_fmt(ours['seconds'])} s) "
                f"and {_fmt(mcquant['peak_mib'] / ours['peak_mib'])}× its peak memory."
            )
    if "cluster" in results:
        section = results["cluster"]
        for record in section["results"]:
            if record["status"] == "ok":
                growth = record["client_growth"] / MIB
                verdict = "within" if growth < section["target_mib"] else "over"
                lines.append(
                    f"- On the LocalCluster the client grew by {_fmt(growth)} MiB for a table of "
                    f"{_fmt(record['table_bytes'] / MIB)} MiB, {verdict} issue 15's target of "
                    f"{_fmt(section['target_mib'])} MiB."
                )
    return lines


PAGE = """# Benchmarks

Generated by {command} ({minutes:.0f} min in all); do not edit by hand.
{note}
## Machine

{machine}

Versions: {versions}.

## How it is measured

- Every measurement runs in a fresh Python process; compilers (Numba) and imports are warmed
  up on a 256² crop first. Time is the best of up to 7 wall-clock runs (fewer for slow methods).
- **Read limit**: NumPy summing the in-memory image and mask once. In each process the method's
  runs alternate with runs of the read limit (best of 3 before each run and after the last), and
  the ratio is best over best, so that load from other processes hits both sides alike.
- **Peak memory**: growth of the process's resident set during the method's first run (in the
  scale series, the largest over the rounds): the kernel's high-water mark `VmHWM`, reset
  through `/proc/self/clear_refs`, minus the resident set before.
  It counts everything the run allocates (NumPy, Numba, dask's threads, the result), not the
  input data already in memory; memory that the process freed earlier and reuses is not counted,
  so a few MiB are within noise.
- Methods start from the in-memory arrays and end with their result table, written as a user of
  each library would: ours and harpy through `RasterAggregator` on dask arrays (chunks as below),
  ours also with `index=np.unique(mask)` (one `aggregate_stats` call, and harpy's four-call
  script: `aggregate_stats` of its six statistics, `aggregate_min`, `aggregate_max`,
  `center_of_mass`, each with that index, made beforehand and not timed),
  ours through the `.rasteragg` accessor on the same dask arrays and on NumPy-backed
  `DataArray`s (as in a notebook: the engine splits them into blocks itself, and the results
  are NumPy-backed), flox `xarray_reduce` on the dask image (one call per
  statistic, computed together), scipy.ndimage and xarray-spatial per channel, scikit-image
  `regionprops_table` on the channel-last image, NumPy `bincount` (two-pass central moments,
  `ufunc.at` for extrema). A method past the time cap is stopped and marked as not finished.
- Peers that cannot compute a statistic are timed for those they can (column "statistics").
- Peers come from `pip install -e ".[bench]"`; harpy from the `bench-harpy` extra, which pins
  the dask version that every method of the run then used (see versions). A peer that is not
  installed is listed as skipped.
- **Scale series**: labels and image are generated block by block by `da.map_blocks` from the
  pixel coordinates (nothing stored; see `benchmarks/datasets.py`): a grid of rectangular cells
  with background borders, ids scrambled, and a hashed uint16 image of 4 channels, chunks
  {scale_chunk}² × 1 channel. "× generate" is our time over the time to generate the same
  blocks and sum them with dask, in the same process: generate, mean and all run in rounds (up
  to 7), best over best, so that a change in the machine's state hits both sides alike. The
  generators work in bands of rows with small temporaries: with whole-block temporaries their
  speed depended on the state of the machine's memory (huge pages and their compaction) and
  swung the baseline by up to 1.8× between processes. Ours is `xr_rasteragg.aggregate` (the
  engine) with background 0 left out; "result MiB" is the size of the float64 result table of
  all statistics, which necessarily grows with the label count.
- **MCQuant's method** (`benchmarks/quantify.py`): the reference dataset written by tifffile as a
  tiled OME-TIFF (512² tiles), its cell mask and a nucleus mask (each cell less 4 px at its
  edge) as TIFFs, all on disk. `rasteragg quantify` (the command line's entry, in-process: the
  image read by tiles, once for both masks) against MCQuant's `ExtractSingleCells` as its code
  does it (masks and each channel read whole, `regionprops_table` per channel per mask, then its
  mask properties per mask); both write the same CSV tables. Each run is one call in a fresh
  process, its libraries imported before timing; ours' time includes loading the compiled
  kernels from numba's on-disk cache, as every run of the command does. A first run of ours,
  not reported, fills that cache and puts the files in the operating system's page cache, so
  both methods read them from memory. Then the two alternate in rounds ({rounds}): time is
  the best of each method's runs and "× ours" best over best, both from the same run; peak
  memory is the growth of the process's resident set during the call (`VmHWM` as above, the
  largest over the rounds), which here includes all each method reads from the files, since
  the process holds none of it before.
- **LocalCluster** (`benchmarks/cluster.py`): one fresh process starts a `distributed.LocalCluster`
  of worker processes (1 thread each) and runs every intensity statistic of the pass through
  `image.rasteragg.aggregate(labels, ALL).to_zarr(path)` on lazily generated data (cells of about
  4 × 4 px, as in the scale series), after a small warm-up on the same cluster. "The call" is
  the wall time of `aggregate` (the pass; the merged partials stay on the workers), "to_zarr" of
  the write (finalization and writing, on the workers). The client's peak growth is its resident
  set sampled every 10 ms by a thread (psutil) during both, over what it held before; each
  worker's peak is its `VmHWM`, reset before the run, with its resident set at the reset in
  parentheses. The table is read back and its label count and total pixel count checked.

## Reference dataset

{reference}

## Chunk sizes

{chunks}

## Scale series

{scale}

## MCQuant's method

`rasteragg quantify` against MCQuant's method, both writing the same CSV tables (the columns and
options are on [the guide's MCQuant page](guide/mcquant.md)).

{quantify}

## On a cluster

The whole table on a `LocalCluster`, written to zarr by the workers: the client holds the label
ids, not the table (issue 15; see [the scaling guide](guide/scaling.md)).

{cluster}

## Chunk-size guidance

Spatial chunks set the memory per task (the block and the partials of the labels in it) and the
number of tasks; channel chunks only group channels into one task. The table above shows both
on the reference dataset; peak memory grows with the spatial chunk. On whole slides the number
of tasks matters too: a 100k² × 60-channel image in 512² × 1 chunks is 2.3 million tasks, and
dask's per-task overhead (about a millisecond) then dominates. Recommended: **1024²–2048²
spatial chunks**, and as many channels per chunk as the store has (1 is fine); the labels are
rechunked to the image's spatial chunks automatically.

## GPU

Not measured: no run of this page has had a GPU. Ready to run: the fused GPU kernel
(`xr_rasteragg/kernels/cuda.py`, tested in CI under Numba's CUDA simulator),
`benchmarks/gpu.py` (all statistics with the data on the device, as a share of the device's
copy bandwidth and as a ratio to our CPU path on the same data; `RasterAggregator(...,
run_on_gpu=True)` on dask arrays of NumPy chunks, host-to-device copies included, against the
CPU path) and `benchmarks/gpu_device.sh`, which installs what a bare GPU machine lacks, runs
the GPU tests and the benchmark, and writes the logs under `$OUT`:

```bash
bash benchmarks/gpu_device.sh fetch   # where PyPI is reachable: wheels into .whl/
bash benchmarks/gpu_device.sh         # on the GPU machine, about 8 minutes at most
```

The kernel's bandwidth model and what each figure means are in the user guide's GPU page.

## Findings of this run

{findings}

![benchmarks](_static/benchmarks.png)
"""


def write_docs(results: dict[str, Any], docs: Path) -> list[Path]:
    """Write ``docs/benchmarks.md`` and ``docs/_static/benchmarks.png``; return their paths."""
    page, png = docs / "benchmarks.md", docs / "_static" / "benchmarks.png"
    _plot(results, png)
    machine = results["machine"]
    reference = results.get("reference")
    scale = results.get("scale")
    quantify = results.get("quantify")
    big = " --big" if scale and any(r["job"]["height"] >= 65536 for r in scale["results"]) else ""
    text = PAGE.format(
        command=(
            "several `python benchmarks/suite.py` runs (listed under Machine), merged by "
            "`python -m benchmarks.report RUN1.json RUN2.json ...`"
            if results.get("merged")
            else f"`python benchmarks/suite.py --write-docs{big}`"
        ),
        minutes=results.get("wall_seconds", 0) / 60,
        note=f"\n{results['note']}\n" if results.get("note") else "",
        machine=(
            f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM; Python "
            f"{machine['python']}. Runs merged into this page:\n\n{_runs_lines(results)}"
            if results.get("merged")
            else _machine_line(machine)
        ),
        versions=_versions(machine),
        scale_chunk=scale["chunk"] if scale else "–",
        reference=(
            f"{reference['size']}² px, {reference['channels']} channels uint16, ~18.8k Voronoi-like cells "
            f"with background (`xr_rasteragg.synthetic.make_cells`), chunks {reference['spatial_chunk']}² × "
            f"{reference['channel_chunk']} channel; {reference_summary(reference)}.\n\n"
            + reference_table(reference)
            + "\n\nWhole-label statistics: the exact per-label median of the 8 channels, alone and "
            "with the nine statistics in one call.\n\n"
            + median_table(reference)
            + "\n\nShape features (regionprops names, DESIGN §6: all of them with the nine statistics at "
            "most 1.3× the nine alone):\n\n" + shape_table(reference)
            if reference
            else "Not run."
        ),
        chunks=(
            "Ours (`RasterAggregator`) on the reference dataset, as a ratio to the read limit.\n\n"
            + chunks_table(results["chunks"])
            if "chunks" in results
            else "Not run."
        ),
        scale=scale_table(scale) if scale else "Not run.",
        rounds=f"{quantify['rounds']} round{'s' * (quantify['rounds'] != 1)} in this run"
        if quantify
        else "–",
        quantify=f"{quantify_summary(quantify)}.\n\n{quantify_table(quantify)}" if quantify else "Not run.",
        cluster=cluster_table(results["cluster"]) if "cluster" in results else "Not run.",
        findings="\n".join(_findings(results)) or "–",
    )
    page.write_text(text)
    return [page, png]


def _run_summary(results: dict[str, Any]) -> dict[str, Any]:
    sections: list[str] = [name for name in ("reference", "chunks") if name in results]
    if "scale" in results:
        sizes = sorted({r["job"]["height"] for r in results["scale"]["results"]})
        sections.append("scale series (" + ", ".join(f"{size}²" for size in sizes) + ")")
    sections += [name for name in ("quantify", "cluster") if name in results]
    machine = results["machine"]
    return {
        "sections": sections,
        "date": machine["date"],
        "wall_seconds": results.get("wall_seconds", 0.0),
        "load_before": machine["load_before"],
        "load_after": machine.get("load_after", ()),
    }


def merge(files: Sequence[Path]) -> dict[str, Any]:
    """Results of several runs: later sections replace earlier ones; scale points are pooled."""
    merged: dict[str, Any] = {}
    seconds = 0.0
    for path in files:
        results = json.loads(path.read_text())
        seconds += results.get("wall_seconds", 0.0)
        points = merged.get("scale", {}).get("results", [])
        runs = [*merged.get("runs", []), _run_summary(results)]
        note = merged.get("note") or results.get("note", "")
        merged.update(results)
        merged.update(runs=runs, note=note)
        if "scale" in results and points:
            jobs = {json.dumps(r["job"], sort_keys=True) for r in results["scale"]["results"]}
            kept = [r for r in points if json.dumps(r["job"], sort_keys=True) not in jobs]
            merged["scale"] = {**results["scale"], "results": kept + results["scale"]["results"]}
    runs = merged.get("runs", [])
    for i, run in enumerate(runs):  # a section that a later run measured again is not on the page
        later = {name for other in runs[i + 1 :] for name in other["sections"]}
        run["sections"] = [
            f"{name} (replaced by a later run)" if name in later else name for name in run["sections"]
        ]
    merged.update(wall_seconds=seconds, merged=len(files) > 1)
    return merged


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m benchmarks.report RESULTS.json [MORE.json ...]")
    root = Path(__file__).resolve().parents[1]
    for written in write_docs(merge([Path(a) for a in sys.argv[1:]]), root / "docs"):
        print(f"wrote {written}")
