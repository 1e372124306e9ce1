"""The benchmark suite's own helpers: generators, measurement and tables (nothing is timed here)."""

from __future__ import annotations

import doctest
import inspect
import math

import numpy as np
import pytest

import benchmarks.cluster
import benchmarks.datasets
import benchmarks.quantify
from benchmarks.datasets import CellGrid, image_block, lazy_image, lazy_labels
from benchmarks.measure import best_of, peak_rss
from benchmarks.peers import METHODS, Data
from benchmarks.report import merge, tables, write_docs
from benchmarks.suite import SECTIONS, _progress, failures, plan


def test_datasets_doctests() -> None:
    assert doctest.testmod(benchmarks.datasets).failed == 0


@pytest.mark.parametrize(
    ("height", "width", "n_labels"),
    [(64, 64, 1), (100, 37, 7), (300, 200, 997), (256, 512, 4000), (90, 90, 2025)],
)
def test_cell_grid_makes_the_label_count_asked_for(height: int, width: int, n_labels: int) -> None:
    labels = CellGrid(height, width, n_labels).block(0, height, 0, width)
    ids, counts = np.unique(labels, return_counts=True)
    np.testing.assert_array_equal(ids, np.arange(n_labels + 1))  # background 0 and 1..n, each present
    assert counts.min() >= 1


def test_cell_grid_rejects_cells_smaller_than_two_pixels() -> None:
    with pytest.raises(ValueError, match="n_labels"):
        CellGrid(16, 16, 200)
    with pytest.raises(ValueError, match="n_labels"):
        CellGrid(16, 16, 0)


def test_lazy_labels_do_not_depend_on_chunks_and_repeat() -> None:
    a = lazy_labels(300, 250, 500, chunk=64).compute()
    b = lazy_labels(300, 250, 500, chunk=100).compute()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, lazy_labels(300, 250, 500, chunk=64).compute())
    np.testing.assert_array_equal(a[0], CellGrid(300, 250, 500).block(0, 300, 0, 250))
    assert a.dtype == np.int32
    # neighbouring cells carry unrelated ids, not consecutive ones
    assert np.abs(np.diff(np.unique(a[0, 5, :]))).max() > 1


def test_lazy_image_is_a_function_of_the_pixel() -> None:
    a = lazy_image(3, 130, 70, chunk=32, channel_chunk=2).compute()
    b = lazy_image(3, 130, 70, chunk=50, channel_chunk=1).compute()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, 0], image_block(0, 3, 0, 130, 0, 70, 70))
    assert a.dtype == np.uint16
    assert a.max() <= 4095 + 2
    assert len(np.unique(a[0])) > 1000  # not constant: a hash spreads the values


@pytest.mark.parametrize("band", [1, 90, 10**6])
def test_generators_work_in_bands_of_any_size(band: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of one row, a few rows or the whole block give the values of one whole block."""
    y0, y1, x0, x1, width = 5, 40, 3, 33, 50
    grid = CellGrid(60, width, 37)
    whole = grid.block(0, 60, 0, width)  # one band
    monkeypatch.setattr(benchmarks.datasets, "BAND_PIXELS", band)
    flat = np.arange(y0, y1)[:, None] * width + np.arange(x0, x1)[None, :]
    hashed = (flat * 2654435761 % 2**32) >> 20
    expected = np.stack([hashed + c for c in (2, 3)]).astype(np.uint16)
    np.testing.assert_array_equal(image_block(2, 4, y0, y1, x0, x1, width), expected)
    np.testing.assert_array_equal(grid.block(y0, y1, x0, x1), whole[y0:y1, x0:x1])


def test_lazy_labels_check_the_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        lazy_labels(64, 64, 300, dtype=np.uint8)


def test_quick_and_full_plans_make_valid_grids() -> None:
    for settings in (plan(quick=True, big=False), plan(quick=False, big=True)):
        size = settings["labels_series"]["size"]
        for n in settings["labels_series"]["n_labels"]:
            CellGrid(size, size, n)
        for size in settings["size_series"]["sizes"]:
            CellGrid(size, size, settings["size_series"]["n_labels"])
    assert 65536 in plan(quick=False, big=True)["size_series"]["sizes"]
    assert 65536 not in plan(quick=False, big=False)["size_series"]["sizes"]


def test_best_of_stops_at_the_budget() -> None:
    calls: list[int] = []
    _, runs = best_of(10, lambda: calls.append(1), budget=math.inf)
    assert runs == len(calls) == 10
    _, runs = best_of(10, lambda: sum(range(10**5)), budget=0.0)
    assert runs == 1


def test_peak_rss_sees_an_allocation() -> None:
    _, peak, result = peak_rss(lambda: np.ones(64 * 2**20 // 8).sum())
    if math.isnan(peak):
        pytest.skip("no /proc/self/clear_refs here")
    assert peak >= 48
    assert result == 64 * 2**20 // 8


def _results() -> dict:
    def ref(method: str, work: str, ratio: float, status: str = "ok") -> dict:
        job = {"method": method, "work": work, "spatial_chunk": 2048, "channel_chunk": 1}
        if status != "ok":
            return {"job": job, "status": status, "message": "did not finish in 5 s"}
        return {
            "job": job,
            "status": "ok",
            "seconds": ratio * 0.05,
            "read_seconds": 0.05,
            "ratio_read": ratio,
            "peak_mib": 12.0,
        }

    machine = {
        "cpu": "test CPU",
        "cores": 2,
        "memory_gib": 24.0,
        "load_before": (1.0, 1.0, 1.0),
        "python": "3.11",
        "libraries": {"numpy": "2"},
        "date": "today",
    }
    methods = {
        "read": {"title": "read limit", "computes": {"mean": [], "all": []}},
        "ours": {
            "title": "ours",
            "computes": {"mean": ["mean"], "all": ["sum", "mean"], "median": ["median"], "median-all": []},
        },
        "regionprops": {"title": "median peer", "computes": {"median": ["median"]}},
        "slow": {"title": "slow peer", "computes": {"mean": ["mean"], "all": ["mean"]}},
        "gone": {"title": "absent peer", "computes": {"mean": ["mean"], "all": ["mean"]}},
    }
    results = [
        ref("read", "mean", 1.0),
        ref("ours", "mean", 2.0),
        ref("ours", "all", 4.0),
        ref("slow", "mean", 50.0),
        ref("slow", "all", 0, "timeout"),
        ref("ours", "median", 3.0),
        ref("ours", "median-all", 5.0),
        ref("regionprops", "median", 30.0),
    ]
    scale_job = {
        "height": 4096,
        "width": 4096,
        "channels": 4,
        "n_labels": 1000,
        "chunk": 2048,
        "channel_chunk": 1,
    }
    point = {"seconds": 1.0, "peak_mib": 100.0, "runs": 1, "ratio_generate": 1.2}
    return {
        "machine": machine,
        "reference": {
            "size": 4096,
            "channels": 8,
            "spatial_chunk": 2048,
            "channel_chunk": 1,
            "methods": methods,
            "skipped": {"gone": "not installed: gone"},
            "results": results,
        },
        "scale": {
            "channels": 4,
            "chunk": 2048,
            "labels_series": {"size": 4096, "n_labels": [1000]},
            "size_series": {"n_labels": 1000, "sizes": [4096]},
            "results": [
                {
                    "job": scale_job,
                    "status": "ok",
                    "generate": point,
                    "mean": point,
                    "all": point,
                    "result_mib": 1.0,
                }
            ],
        },
    }


def test_tables_report_ratios_timeouts_and_skips() -> None:
    text = tables(_results())
    row = next(line for line in text.splitlines() if line.startswith("| slow peer"))
    assert "| 50 | 25 | 12 |" in row  # x read, x ours (50 / 2), peak MiB
    assert "did not finish in 5 s" in row
    assert "skipped (not installed: gone)" in text
    assert "4096² × 4" in text


def test_median_table_only_methods_that_compute_it() -> None:
    text = tables(_results())
    peer = next(line for line in text.splitlines() if line.startswith("| median peer"))
    assert "| 30 | 10 | 12 | – |" in peer  # x read, x ours (30 / 3), peak MiB; no median-all
    mine = [line for line in text.splitlines() if line.startswith("| ours")]
    assert any("| 3 | 1 | 12 | 5 | 1 | 12 |" in line for line in mine)
    assert not any(line.startswith("| median peer") and "slow" in line for line in text.splitlines())
    main_rows = text.split("Whole-label")[0]
    assert "median peer" not in main_rows  # not in the table of mean and the nine


def test_shape_table_compares_with_the_nine_alone() -> None:
    results = _results()
    section = results["reference"]
    section["methods"]["accessor"] = {"title": "accessor", "computes": {"all": ["sum"], "shape": ["area"]}}
    section["methods"]["labels-shape"] = {"title": "labels-only title", "computes": {"shape": ["area"]}}
    section["results"] += [
        {
            "job": {"method": "accessor", "work": work},
            "status": "ok",
            "seconds": s,
            "ratio_read": r,
            "read_seconds": 0.05,
            "peak_mib": 1.0,
        }
        for work, s, r in (("all", 0.2, 4.0), ("shape", 0.26, 5.2))
    ] + [{"job": {"method": "skimage", "work": "shape"}, "status": "timeout", "message": "did not finish"}]
    text = tables(results)
    rows = {
        line.split(" | ")[0]: line
        for line in text.splitlines()
        if line.startswith("| ours:") or "regionprops" in line
    }
    assert (
        "| 260 | 5.2 | 1.3 | 1 |" in rows["| ours: the nine statistics and every shape feature, in one call"]
    )
    assert "not run" in rows["| ours: the shape features of the labels alone"]
    assert "did not finish" in rows["| scikit-image regionprops_table, the same properties"]
    assert "| labels-only title |" not in text  # a method of shape features alone: no row in the main table


def test_shape_table_has_the_numpy_backed_accessor_beside_the_dask_backed_one() -> None:
    results = _results()
    section = results["reference"]
    section["methods"]["accessor"] = {"title": "accessor", "computes": {"all": ["sum"], "shape": ["area"]}}
    section["methods"]["accessor-numpy"] = {"title": "numpy", "computes": {"all": ["sum"], "shape": ["area"]}}
    section["results"] += [
        {
            "job": {"method": method, "work": work},
            "status": "ok",
            "seconds": s,
            "ratio_read": s / 0.05,
            "read_seconds": 0.05,
            "peak_mib": 1.0,
        }
        for method, work, s in (
            ("accessor", "all", 0.2),
            ("accessor", "shape", 0.25),
            ("accessor-numpy", "all", 0.1),
            ("accessor-numpy", "shape", 0.2),
        )
    ]
    rows = {line.split(" | ")[0]: line for line in tables(results).splitlines()}
    assert "| 100 | 2 | 0.5 | 0.4 |" in rows["| ours on NumPy-backed arrays: the nine statistics"]
    assert "| 200 | 4 | 1 | 0.8 |" in rows["| ours on NumPy-backed arrays: the nine and every shape feature"]


@pytest.mark.parametrize("work", ["mean", "all", "median", "shape"])
def test_accessor_methods_on_numpy_and_dask_arrays_agree(work: str) -> None:
    """The two accessor methods of the reference section do the same work: the NumPy-backed one
    returns NumPy-backed tables equal to the dask-backed one's (a small dataset of the reference
    kind, in one block both ways, so that the sums are added in the same order)."""
    from xr_rasteragg.synthetic import make_cells

    labels, image = make_cells((96, 80), n_channels=3, cell_diameter=12.0, seed=1)
    data = Data(labels, image, spatial_chunk=128, channel_chunk=1)
    assert METHODS["accessor-numpy"].computes == METHODS["accessor"].computes
    mine, theirs = (METHODS[name].build(data, work)() for name in ("accessor-numpy", "accessor"))
    for name in mine.data_vars if hasattr(mine, "data_vars") else [None]:
        ours = mine if name is None else mine[name]
        assert isinstance(ours.data, np.ndarray)
        np.testing.assert_array_equal(ours.values, (theirs if name is None else theirs[name]).values)


def test_failures_counts_our_jobs_only() -> None:
    results = _results()
    assert failures(results) == []
    results["reference"]["results"][1]["status"] = "error"
    assert len(failures(results)) == 1


def test_merge_pools_scale_points(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    first, second = _results(), _results()
    second["scale"]["results"][0]["job"] = {
        **second["scale"]["results"][0]["job"],
        "height": 8192,
        "width": 8192,
    }
    del second["reference"]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, results in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(results))
    merged = merge(paths)
    assert "reference" in merged
    assert sorted(r["job"]["height"] for r in merged["scale"]["results"]) == [4096, 8192]
    assert merged["merged"]
    assert [run["sections"] for run in merged["runs"]] == [
        ["reference", "scale series (4096²)"],
        ["scale series (8192²)"],
    ]


def _quantify_and_cluster() -> dict:
    """A run of the quantify and cluster sections only: two rounds, MCQuant's second one stopped."""

    def run(method: str, r: int, seconds: float, peak: float) -> dict:
        rows = {"exemplar_cellMask.csv": 18769, "exemplar_nucleiMask.csv": 18768}
        return {
            "job": {"method": method, "round": r},
            "status": "ok",
            "seconds": seconds,
            "peak_mib": peak,
            "rows": rows,
        }

    mib = 2**20
    cluster_job = {**benchmarks.cluster.FULL}
    return {
        "machine": {**_results()["machine"], "date": "later"},
        "quantify": {
            "size": 4096,
            "channels": 8,
            "rounds": 2,
            "results": [
                run("ours", 0, 1.25, 190.0),
                run("mcquant", 0, 40.0, 330.0),
                run("ours", 1, 1.0, 200.0),
                {"job": {"method": "mcquant", "round": 1}, "status": "timeout", "message": "did not finish"},
            ],
        },
        "cluster": {
            "target_mib": 300.0,
            "results": [
                {
                    "job": cluster_job,
                    "status": "ok",
                    "pixels": 16 * 10**6,
                    "table_bytes": 1007 * mib,
                    "call_s": 13.3,
                    "write_s": 8.5,
                    "client_growth": 75 * mib,
                    "worker_peaks": [1239 * mib, 1217 * mib],
                    "worker_bases": [280 * mib, 281 * mib],
                }
            ],
        },
    }


def test_plan_runs_the_scripts_sizes() -> None:
    quick, full = plan(quick=True, big=False), plan(quick=False, big=False)
    assert {"quantify", "cluster"} <= set(SECTIONS)
    assert quick["quantify"] == {**benchmarks.quantify.QUICK, "rounds": 1}
    assert full["quantify"] == {**benchmarks.quantify.FULL, "rounds": 2}
    assert (quick["cluster"], full["cluster"]) == (benchmarks.cluster.QUICK, benchmarks.cluster.FULL)
    assert (full["cluster"]["n_labels"], full["cluster"]["workers"]) == (10**6, 2)  # issue 15's row
    # the job of the cluster section is the keyword arguments of the script's run()
    assert set(inspect.signature(benchmarks.cluster.run).parameters) == set(full["cluster"])


def test_quantify_table_best_of_the_rounds_as_ratios_to_ours() -> None:
    text = tables(_quantify_and_cluster())
    ours = next(line for line in text.splitlines() if line.startswith("| `rasteragg quantify`"))
    mcquant = next(line for line in text.splitlines() if line.startswith("| MCQuant's method"))
    # best time of two rounds, the largest peak of them, rows of both tables, runs that finished
    assert ours == "| `rasteragg quantify` | 1 | 1 | 200 | 1 | 18,769 + 18,768 | 2 |"
    assert mcquant.endswith("| 40 | 40 | 330 | 1.65 | 18,769 + 18,768 | 1 |")
    assert "4096² px, 8 channels uint16" in text
    assert "exemplar_cellMask.csv: 18,769 rows" in text


def test_quantify_table_reports_a_method_that_never_finished() -> None:
    results = _quantify_and_cluster()
    section = results["quantify"]
    section["results"] = [
        r for r in section["results"] if r["status"] != "ok" or r["job"]["method"] == "ours"
    ]
    mcquant = next(line for line in tables(results).splitlines() if line.startswith("| MCQuant's method"))
    assert "did not finish" in mcquant


def test_cluster_table_in_mib_against_the_target() -> None:
    results = _quantify_and_cluster()
    row = next(line for line in tables(results).splitlines() if line.startswith("| 1e6 × 16"))
    assert row == (
        "| 1e6 × 16 | 16.0 M px, chunks 2048² | 2 × 1 thread, 6GiB | 1,007 | 13.3 | 8.5 | 75 "
        "| 1,239 (from 280), 1,217 (from 281) |"
    )
    assert "target < 300" in tables(results)
    results["cluster"]["results"][0] = {"job": benchmarks.cluster.QUICK, "status": "error", "message": "boom"}
    assert "| 1e4 × 4 | boom |" in tables(results)


def test_failures_of_quantify_and_cluster() -> None:
    results = _quantify_and_cluster()
    assert failures(results) == []  # MCQuant's timeout is a peer's result
    results["cluster"]["results"][0]["status"] = "error"
    results["quantify"]["results"][0]["status"] = "error"
    assert [line.split()[0] for line in failures(results)] == ["quantify", "cluster"]


def test_progress_lines_of_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    records = [*_results()["reference"]["results"], *_results()["scale"]["results"]]
    records += [
        *_quantify_and_cluster()["quantify"]["results"],
        *_quantify_and_cluster()["cluster"]["results"],
    ]
    for record in records:
        _progress(record)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(records)
    assert "1.25 s, peak +190 MiB" in lines[-5]
    assert "client peak growth 75 MiB" in lines[-1]


def test_new_sections_merge_with_a_full_run_and_render(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    again = _quantify_and_cluster()
    again["quantify"]["results"][0]["seconds"] = 0.5  # a later run: its rows replace the earlier ones
    del again["cluster"]
    paths = [tmp_path / "full.json", tmp_path / "new.json", tmp_path / "again.json"]
    for path, results in zip(paths, (_results(), _quantify_and_cluster(), again), strict=True):
        path.write_text(json.dumps(results))
    merged = merge(paths)
    assert {"reference", "scale", "quantify", "cluster"} <= set(merged)
    assert [run["sections"] for run in merged["runs"]] == [
        ["reference", "scale series (4096²)"],
        ["quantify (replaced by a later run)", "cluster"],
        ["quantify"],
    ]
    page, _ = write_docs(merged, tmp_path / "docs")
    text = page.read_text()
    assert "| `rasteragg quantify` | 0.5 | 1 | 200 | 1 | 18,769 + 18,768 | 2 |" in text
    assert "| 1e6 × 16 | 16.0 M px" in text
    assert "| slow peer |" in text  # the full run's reference table is still there
    assert "2 rounds in this run" in text
    assert "MCQuant's method took 80× the time" in text
    assert "within issue 15's target of 300 MiB" in text
