"""Checks of user input shared by the entry points, with errors that say what was expected.

Every check names the argument, what it expects and what it got. The bad-input matrix in
``docs/bad-input.md`` lists what each entry point does with each kind of bad input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "InputDataError",
    "InvalidStatisticError",
    "check_background",
    "check_image_dtype",
    "check_known_shape",
    "check_labels_dtype",
    "integral_ids",
]


class InputDataError(ValueError):
    """The data make the request impossible, as found by the pass (labels that hold no cell, ...).

    Neither a mistake in the arguments, which are checked before any pixel is read, nor a bug:
    the command line reports it in one line.
    """


class InvalidStatisticError(ValueError, AssertionError):
    """Unknown statistic names: a ``ValueError``, and the ``AssertionError`` that harpy raises."""


def check_labels_dtype(dtype: np.dtype[Any], argument: str = "labels") -> None:
    """Labels must have an integer dtype (signed or unsigned, any width).

    Raises
    ------
    TypeError
        For float, bool, complex, object or any other non-integer dtype.
    """
    if dtype.kind in "iu":
        return
    hint = ""
    if dtype.kind == "b":
        hint = " (a boolean mask is not a segmentation: convert it with '.astype(np.uint8)' first)"
    elif dtype.kind == "f":
        hint = " (if the values are whole numbers, convert with '.astype(np.int64)' first)"
    raise TypeError(f"'{argument}' must have an integer dtype; got {dtype}{hint}")


def check_image_dtype(dtype: np.dtype[Any], argument: str = "image") -> None:
    """Images must be real numbers: integers, floats, or bools (counted as 0 and 1).

    Raises
    ------
    TypeError
        For complex, object, string, datetime or any other dtype.
    """
    if dtype.kind not in "biuf":
        raise TypeError(f"'{argument}' must have a real numeric dtype (bool, integer or float); got {dtype}")


def check_background(background: Any) -> None:
    """``background`` must be None or one integer label id.

    Raises
    ------
    TypeError
        For a bool, a float, a string or anything else that is not an integer.
    """
    if background is None:
        return
    if isinstance(background, bool | np.bool_) or not isinstance(background, int | np.integer):
        raise TypeError(
            f"'background' must be an integer label id or None; got {background!r} "
            f"of type {type(background).__name__}"
        )


def check_known_shape(shape: tuple[float, ...], argument: str) -> None:
    """Dask arrays with unknown chunk sizes (NaN, as after boolean indexing) cannot be aligned.

    Raises
    ------
    ValueError
        If any size is unknown.
    """
    if any(np.isnan(size) for size in shape):
        raise ValueError(
            f"'{argument}' has unknown chunk sizes (shape {shape}); call '.compute_chunk_sizes()' on it first"
        )


def integral_ids(ids: ArrayLike, argument: str) -> Any:
    """Label ids with float values that are all whole numbers, as integers; other ids unchanged.

    harpy accepts ``index=np.array([1.0, 2.0])``; so does :class:`~xr_rasteragg.RasterAggregator`.
    Whole floats become int64 (uint64 where an id is 2**63 or more).

    Raises
    ------
    TypeError
        For floats that are not whole numbers (or NaN, or infinite).
    ValueError
        For whole floats outside the 64-bit integer range.
    """
    if isinstance(ids, Sequence) and all(isinstance(v, int | np.integer) for v in ids):
        return ids  # Python ints that NumPy would turn into floats (0 next to 2**64 - 1): exact as they are
    values = np.asarray(ids)
    if values.dtype.kind != "f":
        return ids
    whole = np.isfinite(values) & (values == np.round(values))
    if not whole.all():
        wrong = values[~whole].ravel()[:5].tolist()
        raise TypeError(
            f"{argument} must hold integer label ids (whole numbers); got {wrong} (dtype {values.dtype})"
        )
    if values.size == 0:
        return values.astype(np.int64)
    outside = (values < -(2.0**63)) | (values >= 2.0**64)
    if outside.any():
        wrong = values[outside].ravel()[:5].tolist()
        raise ValueError(f"{argument} must hold ids within the 64-bit integer range; got {wrong}")
    if values.max() >= 2.0**63 and values.min() < 0:
        raise ValueError(
            f"{argument} mixes negative ids with ids of 2**63 or more; no integer dtype holds both"
        )
    out: NDArray[np.integer] = values.astype(np.uint64 if values.max() >= 2.0**63 else np.int64)
    return out
