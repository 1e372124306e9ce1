"""Benchmark suite of xr_rasteragg against the tools a user would pick instead (issue 4).

Run ``python benchmarks/suite.py --help``. Modules: :mod:`benchmarks.datasets` (the reference
dataset and lazy generators), :mod:`benchmarks.peers` (each method under test),
:mod:`benchmarks.measure` (one measurement in a fresh process: time and peak memory),
:mod:`benchmarks.suite` (the command) and :mod:`benchmarks.report` (``docs/benchmarks.md`` and its plot).
"""
