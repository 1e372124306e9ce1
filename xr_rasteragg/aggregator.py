"""``RasterAggregator``: harpy's documented interface on top of the one-pass engine.

A drop-in for scripts written against ``harpy.utils.RasterAggregator``: the same constructor,
methods, errors and DataFrame layouts. Every call is one pass over the data, whatever it asks for.
Where results differ from harpy's, they are more exact: float64 accumulation with pairwise
moment updates, exact extrema, and NaN (not an arbitrary fill) for labels absent from the mask.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import dask.array as da
import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from .engine import Aggregation, aggregate, as_dask, finalize_blocks, pass_blocks, prepare_index
from .gpu import probe_cupy, to_device, to_host
from .partials import Needs
from .stats import SHAPE_FEATURES, STATISTICS, Space, needs_of, validate_stats
from .validation import InvalidStatisticError, check_image_dtype, integral_ids

__all__ = ["KEEP_BYTES", "RasterAggregator"]

log = logging.getLogger("xr_rasteragg")

_DEFAULT_STATS = ("sum", "mean", "count", "var", "kurtosis", "skew")
#: Statistics that a :class:`RasterAggregator` finalizes from the partials of its last pass, when
#: they hold what the statistics need (harpy's scripts ask for them in several calls).
_FROM_KEPT_PASS = frozenset(
    ("sum", "mean", "count", "var", "std", "kurtosis", "skew", "min", "max", "center_of_mass")
)
#: The most bytes of partials that a :class:`RasterAggregator` keeps between calls.
KEEP_BYTES = 2**30


def _chunksize(array: da.Array) -> tuple[int, ...]:
    """The largest chunk along each axis, as dask's ``Array.chunksize`` (which the arrays of dask's
    query planning lack)."""
    return tuple(max(chunks, default=0) for chunks in array.chunks)


def _per_channel(name: str, summary: str, note: str = "") -> Callable[..., pd.DataFrame]:
    """A method of :class:`RasterAggregator` that computes one per-channel statistic."""

    def method(self: RasterAggregator, index: ArrayLike | None = None) -> pd.DataFrame:
        return self.aggregate_stats((name,), index=index)[0]

    method.__name__ = method.__qualname__ = f"aggregate_{name}"
    method.__doc__ = f"""{summary}

        Parameters
        ----------
        index
            Label ids to report, in this order. None reports every label, including background.

        Returns
        -------
        pandas.DataFrame
            One row per label: columns ``0 .. C-1`` (channels) then ``instance_key``. {note}
        """
    return method


class RasterAggregator:
    """Per-label statistics of a ``(c, z, y, x)`` image over a ``(z, y, x)`` label mask.

    Parameters
    ----------
    mask_dask_array
        3-D dask array of integer labels, ``(z, y, x)``. Every distinct value is one label.
    image_dask_array
        4-D dask array ``(c, z, y, x)`` with the same spatial shape and chunk sizes as the mask,
        or None when only the area and center of mass are needed.
    instance_key
        Name of the column that holds the label ids.
    instance_size_key
        Name of the column that holds the area in :meth:`aggregate_area`.
    run_on_gpu
        Move the blocks to the GPU with CuPy and compute there. Without CuPy, or with CuPy but
        no working CUDA driver or device, a warning is logged and everything runs on the CPU.
        With False, blocks that are on a GPU are moved to the host. Results are NumPy-backed
        DataFrames either way.

    Raises
    ------
    TypeError
        If the mask or image is not an array, the image is not real-valued (complex, object,
        ...), or ``instance_key`` or ``instance_size_key`` is not a string.
    ValueError
        If the mask does not have an integer dtype, or ``instance_key`` equals
        ``instance_size_key``.
    AssertionError
        If the mask is not 3-D, the image is not 4-D, or their spatial shapes or spatial chunk
        sizes differ.

    Notes
    -----
    Results are computed, not lazy: each call reads the data at most once, with or without an
    ``index``. The partials of the last pass (per label: pixel counts and index sums, the
    moments up to the highest order asked for so far, and the extrema, which come along with
    skew and kurtosis) are kept, up to
    :data:`KEEP_BYTES` (1 GiB), so that later calls of ``sum``, ``mean``, ``count``, ``var``,
    ``std``, ``kurtosis``, ``skew``, ``min``, ``max`` and ``center_of_mass`` that they serve
    read nothing: harpy's scripts ask for these in four calls (``aggregate_stats``,
    ``aggregate_min``, ``aggregate_max``, ``center_of_mass``). The arrays are read when the
    calls are made, as dask arrays are: change the data under a NumPy-backed dask array, and
    make a new ``RasterAggregator``.
    ``index=None`` means every label in the mask, including the background 0, sorted. Labels
    named in ``index`` but absent from the mask get area 0, sum 0 and NaN for every other
    statistic. The skewness and kurtosis of a label with constant values are 0.0 (with a logged
    warning), as in harpy.

    Examples
    --------
    >>> import dask.array as da
    >>> import numpy as np
    >>> mask = da.from_array(np.array([[[0, 1, 1], [2, 2, 2]]]), chunks=(1, 1, 3))
    >>> image = da.from_array(np.arange(12.0).reshape(2, 1, 2, 3), chunks=(1, 1, 1, 3))
    >>> aggregator = RasterAggregator(mask, image, run_on_gpu=False)
    >>> aggregator.aggregate_mean()
         0     1  cell_ID
    0  0.0   6.0        0
    1  1.5   7.5        1
    2  4.0  10.0        2
    """

    def __init__(
        self,
        mask_dask_array: da.Array,
        image_dask_array: da.Array | None = None,
        instance_key: str = "cell_ID",
        instance_size_key: str = "shapeSize",
        run_on_gpu: bool = True,
    ) -> None:
        for argument, value in (("mask_dask_array", mask_dask_array), ("image_dask_array", image_dask_array)):
            if value is not None and not (hasattr(value, "dtype") and hasattr(value, "shape")):
                raise TypeError(f"'{argument}' must be a dask (or NumPy) array; got {type(value).__name__}")
        for argument, key in (("instance_key", instance_key), ("instance_size_key", instance_size_key)):
            if not isinstance(key, str):
                raise TypeError(
                    f"'{argument}' must be a string (integer column names hold the channels); "
                    f"got {key!r} of type {type(key).__name__}"
                )
        if instance_key == instance_size_key:
            raise ValueError(f"'instance_key' and 'instance_size_key' must differ; both are {instance_key!r}")
        if not np.issubdtype(mask_dask_array.dtype, np.integer):
            raise ValueError(
                f"'mask_dask_array' should contain integer labels; got dtype {mask_dask_array.dtype}"
            )
        mask = as_dask(mask_dask_array, "mask")
        # harpy raises AssertionError for these; raised explicitly, so that they hold under ``python -O``.
        if mask.ndim != 3:
            raise AssertionError(
                f"Only 3D masks ('z', 'y', 'x') are supported in 'mask_dask_array'; got shape {mask.shape}."
            )
        image = None
        if image_dask_array is not None:
            check_image_dtype(image_dask_array.dtype, "image_dask_array")
            image = as_dask(image_dask_array, "image")
            if image.ndim != 4:
                raise AssertionError(
                    "Only 4D image arrays ('c', 'z', 'y', 'x') are supported in 'image_dask_array'; "
                    f"got shape {image.shape}."
                )
            if image.shape[1:] != mask.shape:
                raise AssertionError(
                    "The mask and the image should have the same spatial dimensions ('z', 'y', 'x'); "
                    f"got mask {mask.shape} and image {image.shape[1:]}."
                )
            if _chunksize(image)[1:] != _chunksize(mask):
                raise AssertionError(
                    "The mask and the image should have the same chunk size in ('z', 'y', 'x'); got "
                    f"mask {_chunksize(mask)} and image {_chunksize(image)[1:]}. Please rechunk."
                )

        cupy = None
        if run_on_gpu:
            cupy, reason = probe_cupy()
            if cupy is None:
                log.warning(
                    "Parameter 'run_on_gpu' was set to True, but CuPy cannot use a GPU here (%s). "
                    "Falling back to CPU execution.",
                    reason,
                )
                run_on_gpu = False
        if cupy is not None:
            mask = to_device(mask, cupy)
            image = None if image is None else to_device(image, cupy)
        else:
            mask = to_host(mask)
            image = None if image is None else to_host(image)
        self._mask = mask
        self._image = image
        self._instance_key = instance_key
        self._instance_size_key = instance_size_key
        self._run_on_gpu = run_on_gpu
        self._kept: tuple[Needs, NDArray[np.object_]] | None = None

    def aggregate_stats(
        self,
        stats_funcs: str | Sequence[str] = _DEFAULT_STATS,
        index: ArrayLike | None = None,
    ) -> list[pd.DataFrame]:
        """Compute several statistics per label and channel in one pass over the data.

        Parameters
        ----------
        stats_funcs
            Names of the statistics, from ``"sum"``, ``"mean"``, ``"count"``, ``"var"``,
            ``"std"``, ``"kurtosis"``, ``"skew"``, ``"min"``, ``"max"`` and
            ``"center_of_mass"``, and the shape features of ``skimage.measure.regionprops``
            (``"area"``, ``"bbox"``, ``"eccentricity"``, ``"solidity"``, ... see
            :doc:`/statistics`); a single string is one statistic. A mask of one z plane is 2-D
            for the shape features (2-D features, (y, x) axes), as regionprops sees a 2-D image.
        index
            Label ids to report, in this order. None reports every label, including background.
            Floats that are whole numbers are taken as integers, as in harpy.

        Returns
        -------
        list of pandas.DataFrame
            One DataFrame per requested name, in the requested order (a repeated name gives an
            equal copy), with one row per label: columns
            ``0 .. C-1`` (one per channel) then ``instance_key``. ``"count"`` has the single column
            ``0``; ``"center_of_mass"`` the columns ``0, 1, 2`` (z, y, x); a shape feature has one
            column per value, flattened in C order (``inertia_tensor``: ``0..d*d-1``;
            ``centroid_weighted``: channel by channel).

        Raises
        ------
        TypeError
            If ``stats_funcs`` is not a string or a sequence of strings, or ``index`` does not
            hold integers (or floats that are whole numbers).
        InvalidStatisticError
            If a name is unknown: a ``ValueError`` and, as harpy raises, an ``AssertionError``,
            with harpy's message first (``"Invalid statistic function(s): ..."``).
        ValueError
            If the list is empty, a per-channel statistic is asked for without an image, or an
            id in ``index`` is outside the 64-bit integer range.

        Examples
        --------
        >>> import dask.array as da
        >>> import numpy as np
        >>> mask = da.from_array(np.array([[[1, 1, 2, 2]]]), chunks=(1, 1, 2))
        >>> image = da.from_array(np.array([[[[1.0, 3.0, 5.0, 5.0]]]]), chunks=(1, 1, 1, 2))
        >>> df_mean, df_count = RasterAggregator(mask, image, run_on_gpu=False).aggregate_stats(
        ...     ("mean", "count")
        ... )
        >>> df_mean
             0  cell_ID
        0  2.0        1
        1  5.0        2
        >>> df_count
           0  cell_ID
        0  2        1
        1  2        2
        """
        if isinstance(stats_funcs, Iterable) and not isinstance(stats_funcs, str):
            stats_funcs = tuple(stats_funcs)  # read once, even if it is an iterator
        requested = (stats_funcs,) if isinstance(stats_funcs, str) else stats_funcs
        if isinstance(requested, tuple):
            unknown = [name for name in requested if isinstance(name, str) and name not in STATISTICS]
            if unknown:
                raise InvalidStatisticError(
                    f"Invalid statistic function(s): {unknown}. 'stats_funcs' must name statistics "
                    f"from {sorted(STATISTICS)}; got {stats_funcs!r}"
                )
        names = validate_stats(stats_funcs, "stats_funcs")
        if self._image is None:
            per_channel = [n for n in names if STATISTICS[n].per_channel]
            if per_channel:
                raise ValueError(
                    f"statistics {per_channel} need an image; this RasterAggregator was made "
                    "without 'image_dask_array'"
                )
        shape_stats = {"skew", "kurtosis"} & set(names)
        helpers = ("count", "var") if shape_stats else ()
        index = None if index is None else integral_ids(index, "'index'")
        flat = self._mask.shape[0] == 1 and any(n in SHAPE_FEATURES for n in names)
        space = Space((1, 2), (1.0, 1.0)) if flat else Space()
        result = self._aggregate((*names, *helpers), index, space)
        values = result.values
        if shape_stats:
            # Constant labels: harpy reports 0.0 where scipy (and the accessor) report NaN.
            # With pixels and a finite variance, a NaN skew or kurtosis means a constant label.
            constant = (values["count"][:, None] > 0) & ~np.isnan(values["var"])
            for name in sorted(shape_stats):
                replace = constant & np.isnan(values[name])
                if replace.any():
                    log.warning(
                        "Replacing NaN values in '%s' with 0 for %d constant instances.", name, replace.sum()
                    )
                    values[name] = np.where(replace, 0.0, values[name])
        ids = np.asarray(result.labels)
        frames = {}
        for name in names:
            value = values[name]
            frame = pd.DataFrame(value.reshape(value.shape[0], int(np.prod(value.shape[1:]))))
            frame[self._instance_key] = ids
            frames[name] = frame
        # One frame per requested name, in the given order; a repeated name gets its own copy.
        out: list[pd.DataFrame] = []
        for name in requested:
            out.append(frames.pop(name) if name in frames else out[requested.index(name)].copy())
        return out

    def _aggregate(
        self, names: tuple[str, ...], index: NDArray[np.integer] | None, space: Space
    ) -> Aggregation:
        """The values of ``names``: from the kept partials where they serve, else from a pass.

        A pass for the moments of order 3 or more (skew, kurtosis) computes the extrema too, and
        every pass at least what the kept partials held (so that it serves every earlier call's
        statistics as well); a pass is kept when its partials take at most :data:`KEEP_BYTES`.
        Other statistics (shape features, the median) run a pass of their own.
        """
        if not set(names) <= _FROM_KEPT_PASS:
            return aggregate(self._mask, self._image, names, index=index, eager=True, space=space)
        needs = needs_of(names)
        wanted = None if index is None else prepare_index(index)
        if self._kept is None or (self._kept[0] | needs) != self._kept[0]:
            if needs.order >= 3:  # the extrema cost 3 % more here (23 % more for a mean alone)
                needs = needs | Needs(extrema=True)
            if self._kept is not None:
                needs = needs | self._kept[0]
            per_channel = needs.order >= 1 or needs.extrema
            blocks = pass_blocks(self._mask, self._image if per_channel else None, needs)
            nbytes = sum(v.nbytes for part in blocks.ravel() for v in part.fields.values())
            self._kept = (needs, blocks) if nbytes <= KEEP_BYTES else None
        else:
            blocks = self._kept[1]
        nchan = 0 if self._image is None else int(self._image.shape[0])
        return finalize_blocks(blocks, wanted, names, nchan, space)

    aggregate_sum = _per_channel("sum", "Sum of the pixel values of each label, per channel.")
    aggregate_mean = _per_channel("mean", "Mean of the pixel values of each label, per channel.")
    aggregate_var = _per_channel(
        "var", "Population variance (ddof=0) of the pixel values of each label, per channel."
    )
    aggregate_skew = _per_channel(
        "skew",
        "Skewness (biased, as ``scipy.stats.skew``) of the pixel values of each label, per channel.",
        "Constant labels get 0.0, with a logged warning.",
    )
    aggregate_kurtosis = _per_channel(
        "kurtosis",
        "Excess kurtosis (Fisher, biased) of the pixel values of each label, per channel.",
        "Constant labels get 0.0, with a logged warning.",
    )
    aggregate_min = _per_channel("min", "Smallest pixel value of each label, per channel (float64).")
    aggregate_max = _per_channel("max", "Largest pixel value of each label, per channel (float64).")
    aggregate_median = _per_channel(
        "median",
        "Median of the pixel values of each label, per channel: exact (as ``numpy.median``), "
        "whatever blocks a label spans.",
    )

    def aggregate_area(self, index: ArrayLike | None = None) -> pd.DataFrame:
        """Number of pixels of each label.

        Parameters
        ----------
        index
            Label ids to report, in this order. None reports every label, including background.

        Returns
        -------
        pandas.DataFrame
            One row per label, with the columns ``instance_key`` and ``instance_size_key``.

        Examples
        --------
        >>> import dask.array as da
        >>> import numpy as np
        >>> mask = da.from_array(np.array([[[0, 1, 1, 7]]]), chunks=(1, 1, 2))
        >>> RasterAggregator(mask, run_on_gpu=False).aggregate_area()
           cell_ID  shapeSize
        0        0          1
        1        1          2
        2        7          1
        """
        (frame,) = self.aggregate_stats(("count",), index=index)
        columns = {self._instance_key: frame[self._instance_key], self._instance_size_key: frame[0]}
        return pd.DataFrame(columns)

    def aggregate_radii_and_axes(self, calculate_axes: bool = True) -> pd.DataFrame:
        """Radii and principal axes of each label, as harpy's method (without its ``depth``: each
        label is measured whole, from the same single pass).

        The radii are the square roots of the eigenvalues of the covariance (``ddof=1``) of the
        label's (z, y, x) pixel indices, largest first, and the axes the eigenvectors, as the PCA
        harpy runs (scikit-learn's, each axis with its largest component positive); a label of
        fewer than 3 pixels has radii 0 and the identity as axes. Values are float64 (harpy's
        are float32).

        Parameters
        ----------
        calculate_axes
            Also return the principal axes.

        Returns
        -------
        pandas.DataFrame
            One row per label but the background 0, sorted by id: columns ``0, 1, 2`` (the
            radii), with ``calculate_axes`` ``3 .. 11`` (the axes, one row of the 3 × 3 matrix
            after the other), then ``instance_key``.
        """
        names = ("radii", "principal_axes") if calculate_axes else ("radii",)
        result = aggregate(self._mask, None, names, background=0, eager=True)
        values = [np.asarray(result.values[n]).reshape(result.labels.shape[0], -1) for n in names]
        frame = pd.DataFrame(np.concatenate(values, axis=1))
        frame[self._instance_key] = np.asarray(result.labels)
        return frame

    def center_of_mass(self, index: ArrayLike | None = None) -> pd.DataFrame:
        """Mean (z, y, x) pixel index of each label (unweighted, as ``scipy.ndimage.center_of_mass``).

        Parameters
        ----------
        index
            Label ids to report, in this order. None reports every label, including background.

        Returns
        -------
        pandas.DataFrame
            One row per label: columns ``0, 1, 2`` (z, y, x) then ``instance_key``.
        """
        return self.aggregate_stats(("center_of_mass",), index=index)[0]
