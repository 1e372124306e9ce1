"""Numeric tables written as CSV, byte for byte as ``pandas.DataFrame.to_csv(index=False)`` writes
them, several times faster.

pandas turns each float into text with Python's ``repr`` one value at a time, which for a
quantification table (tens of thousands of cells, a few dozen columns) takes longer than the
statistics. pyarrow's CSV writer formats numbers in C++ with the same shortest round-trip digits;
where its layout differs from Python's (scientific notation below 1e-4 and above 1e10 -- 1e6 for
float32 --, no ``.0`` on whole numbers, ``nan`` where pandas writes nothing), those few values are
formatted as pandas formats them. Without pyarrow, or for a table with columns other than integers
and floats, pandas writes the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

__all__ = ["write_csv"]

#: Per float dtype, the magnitudes between which pyarrow's text of a value that is not a whole
#: number is Python's (and so pandas').
_SAME_TEXT = {np.dtype(np.float64): (1e-4, 1e10), np.dtype(np.float32): (1e-4, 1e6)}


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    """Write ``table`` to ``path`` as ``table.to_csv(path, index=False)`` does.

    Parameters
    ----------
    table
        The table; its index is not written.
    path
        The file to write (replaced if it exists).
    """
    try:
        import pyarrow as pa
        import pyarrow.csv as pa_csv
    except ImportError:
        table.to_csv(path, index=False)
        return
    kinds = [table[name].dtype for name in table.columns]
    if table.shape[1] < 2 or not all(kind.kind in "iu" or kind in _SAME_TEXT for kind in kinds):
        # (pandas quotes an empty value of a table of one column, which would be a blank line)
        table.to_csv(path, index=False)
        return
    columns = [_as_text(table.iloc[:, i].to_numpy()) for i in range(table.shape[1])]
    body = pa.table(columns, names=[f"c{i}" for i in range(len(columns))])
    with open(path, "wb") as file:
        # The header as pandas writes it (quoting names that need it), then the values unquoted:
        # the text of a number never holds a separator or a quote.
        file.write(table.iloc[:0].to_csv(index=False).encode())
        options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
        pa_csv.write_csv(body, file, options)


def _as_text(values: NDArray[np.generic]) -> object:
    """One column's values as a pyarrow string array, each as pandas writes it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = pc.cast(pa.array(values), pa.string())
    if values.dtype.kind in "iu":
        return text
    low, high = (values.dtype.type(bound) for bound in _SAME_TEXT[values.dtype])
    magnitude = np.abs(values)
    same = (magnitude > low) & (magnitude < high) & (values != np.trunc(values))
    if same.all():
        return text
    odd = values[~same]
    pandas_text = np.where(np.isnan(odd), "", odd.astype(str))  # pandas' float text, '' for NaN
    return pc.replace_with_mask(text, pa.array(~same), pa.array(pandas_text.tolist(), pa.string()))
