"""csv_tables.write_csv against pandas' own ``to_csv(index=False)``, byte for byte."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from xr_rasteragg.csv_tables import write_csv

pytest.importorskip("pyarrow")

#: Values where pyarrow's text and Python's differ, and around each switch of layout.
EDGES = [1e-5, 1.5e-7, 9.9999e-5, 1e-4, 0.0001234, 1 / 3, 0.1 + 0.2, 884.0, -884.0, 0.0, -0.0, 9999999999.5,
         1e10, 10000000000.5, 1e15, 1e15 + 0.5, 1e16, 1.2345e20, 5e-324, 1.7976931348623157e308,
         np.nan, np.inf, -np.inf]  # fmt: skip


def _table(rng: np.random.Generator, rows: int) -> pd.DataFrame:
    magnitudes = 10 ** rng.uniform(-8, 18, rows) * rng.choice([-1, 1], rows)
    whole = np.round(magnitudes)
    return pd.DataFrame(
        {
            "CellID": np.arange(1, rows + 1, dtype=np.int32),
            "big ids": rng.integers(0, 2**63, rows, dtype=np.uint64),
            "float64": magnitudes,
            "whole": whole,
            "float32": magnitudes.astype(np.float32),
            "DNA, cycle 1": rng.random(rows),  # a name that pandas quotes
            'say "hi"': rng.random(rows).astype(np.float32),
        }
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edges_as_pandas_writes_them(tmp_path: Path, dtype: Any) -> None:
    with np.errstate(over="ignore"):
        values = np.array(EDGES, dtype=dtype)
    bounds = np.array([1e-4, 1e6, 1e10], dtype=dtype)
    values = np.concatenate([values, np.nextafter(bounds, 0), np.nextafter(bounds, np.inf)])
    table = pd.DataFrame({"a": values, "b": values[::-1]})
    write_csv(table, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == table.to_csv(index=False)


def test_random_table_as_pandas_writes_it(tmp_path: Path) -> None:
    table = _table(np.random.default_rng(0), 20_000)
    write_csv(table, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == table.to_csv(index=False)


def test_other_columns_and_no_pyarrow_go_through_pandas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labelled = pd.DataFrame({"name": ["a", "b,c"], "flag": [True, False], "x": [0.5, np.nan]})
    single = pd.DataFrame({"x": [0.5, np.nan]})  # pandas writes its NaN as ""
    for table in (labelled, single):
        write_csv(table, tmp_path / "other.csv")
        assert (tmp_path / "other.csv").read_text() == table.to_csv(index=False)

    real_import = builtins.__import__

    def no_pyarrow(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    table = _table(np.random.default_rng(1), 100)
    write_csv(table, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text() == table.to_csv(index=False)
