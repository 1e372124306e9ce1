"""The ``.rasteragg`` accessor on ``xarray.DataArray``.

Thin by design (as ``flox.xarray``): it finds the dims by name, aligns image and labels on their
coordinates, puts them in the engine's canonical ``(c, z, y, x)`` / ``(z, y, x)`` layout, and wraps
the engine's arrays back into xarray objects. No statistics are computed here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray

from .engine import aggregate as run_engine
from .kernels.xp import namespace, to_numpy
from .stats import STATISTICS, validate_stats
from .validation import check_labels_dtype, integral_ids

__all__ = ["RasterAggAccessor"]

SPATIAL = ("z", "y", "x")
IMAGE_DIMS = ("c", *SPATIAL)
#: Positions on two coordinate grids closer than this fraction of a pixel (beyond the rounding of
#: the coordinates' dtypes) are the same pixel.
GRID_TOLERANCE = 1e-3


def _statistic(name: str, summary: str) -> Callable[..., xr.DataArray]:
    """A method of :class:`RasterAggAccessor` for one statistic of an image over labels."""

    def method(
        self: RasterAggAccessor,
        labels: xr.DataArray,
        *,
        index: ArrayLike | None = None,
        background: int | None = 0,
        skipna: bool = False,
    ) -> xr.DataArray:
        dataset = self.aggregate(labels, (name,), index=index, background=background, skipna=skipna)
        return dataset[name]

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"""{summary}

        Parameters and result as in :meth:`RasterAggAccessor.aggregate`, for ``{name}`` alone: a
        ``DataArray`` named ``{name}`` with dims ``("label", "c")``, or ``"label"`` only when the
        image has no ``c`` dim{" (always for count)" if name == "count" else ""}.
        """
    return method


@xr.register_dataarray_accessor("rasteragg")
class RasterAggAccessor:
    """Per-label statistics of an image ``DataArray`` over a labels ``DataArray``.

    On an image (dims ⊆ ``{c, z, y, x}``, in any order): :meth:`sum`, :meth:`mean`,
    :meth:`count`, :meth:`var`, :meth:`std`, :meth:`skew`, :meth:`kurtosis`, :meth:`min`,
    :meth:`max` and :meth:`aggregate` (several statistics in one pass). On labels (dims ⊆
    ``{z, y, x}``): :meth:`area`, :meth:`center_of_mass` and :meth:`paint`.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> import xr_rasteragg  # registers the accessor
    >>> labels = xr.DataArray(np.array([[0, 1, 1], [2, 2, 0]]), dims=("y", "x"))
    >>> image = xr.DataArray(
    ...     np.arange(12.0).reshape(2, 2, 3), dims=("c", "y", "x"), coords={"c": ["DAPI", "CD3"]}
    ... )
    >>> image.rasteragg.mean(labels).values
    array([[1.5, 7.5],
           [3.5, 9.5]])
    >>> image.rasteragg.mean(labels).c.values
    array(['DAPI', 'CD3'], dtype='<U4')
    """

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    # -- statistics of an image over labels --------------------------------------------------

    def aggregate(
        self,
        labels: xr.DataArray,
        stats: str | Iterable[str] = ("mean",),
        *,
        index: ArrayLike | None = None,
        background: int | None = 0,
        skipna: bool = False,
    ) -> xr.Dataset:
        """Several statistics per label and channel, all from one pass over the data.

        Parameters
        ----------
        labels
            Integer label mask with dims ⊆ ``{z, y, x}``, over the same pixels as the image (or a
            crop of them, when both carry coordinates).
        stats
            Names of the statistics: ``count``, ``sum``, ``mean``, ``var``, ``std``, ``skew``,
            ``kurtosis``, ``min``, ``max``, ``center_of_mass``.
        index
            Label ids to report, in this order; absent ids get count 0, sum 0 and NaN otherwise.
            None reports every label present, sorted. With dask inputs and an ``index``, the
            result is lazy.
        background
            A label to leave out when ``index`` is None; None keeps every label.
        skipna
            Ignore NaN pixels; by default a NaN pixel makes its label's statistics NaN for that
            channel.

        Returns
        -------
        xarray.Dataset
            One variable per statistic, with dims ``("label", "c")`` (``"label"`` only for
            ``count``; ``("label", "axis")`` for ``center_of_mass``). The ``c`` coordinate holds
            the image's channel coordinate.

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> labels = xr.DataArray(np.array([[1, 1, 2, 2]]), dims=("y", "x"))
        >>> image = xr.DataArray(np.array([[1.0, 3.0, 5.0, 9.0]]), dims=("y", "x"))
        >>> ds = image.rasteragg.aggregate(labels, ["mean", "var", "count"])
        >>> ds["mean"].values, ds["var"].values, ds["count"].values
        (array([2., 7.]), array([1., 4.]), array([2, 2]))
        """
        names = validate_stats(stats)
        image, labels = _prepare(self._obj, labels)
        return _run(image, labels, names, index=index, background=background, skipna=skipna)

    sum = _statistic("sum", "Sum of the pixel values of each label, per channel.")
    mean = _statistic("mean", "Mean of the pixel values of each label, per channel.")
    count = _statistic("count", "Number of pixels of each label, with dim ``label`` only.")
    var = _statistic("var", "Population variance (ddof=0) of the pixel values of each label, per channel.")
    std = _statistic("std", "Population standard deviation of the pixel values of each label, per channel.")
    skew = _statistic("skew", "Skewness (biased) of each label, per channel; NaN for a constant label.")
    kurtosis = _statistic(
        "kurtosis", "Excess kurtosis (Fisher, biased) of each label, per channel; NaN for a constant label."
    )
    min = _statistic("min", "Smallest pixel value of each label, per channel.")
    max = _statistic("max", "Largest pixel value of each label, per channel.")

    # -- statistics of labels ------------------------------------------------------------------

    def area(self, *, index: ArrayLike | None = None, background: int | None = 0) -> xr.DataArray:
        """Number of pixels of each label, with dim ``label``.

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> labels = xr.DataArray(np.array([[0, 1, 1], [2, 2, 2]]), dims=("y", "x"))
        >>> labels.rasteragg.area().to_series().to_dict()
        {1: 2, 2: 3}
        """
        _, labels = _prepare(None, self._obj)
        return _run(None, labels, ("count",), index=index, background=background, skipna=False)["count"]

    def center_of_mass(self, *, index: ArrayLike | None = None, background: int | None = 0) -> xr.DataArray:
        """Mean position of the pixels of each label, with dims ``("label", "axis")``.

        The ``axis`` coordinate names the spatial dims present; positions are in the labels'
        coordinate values where they carry coordinates, in pixel indices otherwise.

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> labels = xr.DataArray(
        ...     np.array([[1, 1, 0], [0, 2, 2]]), dims=("y", "x"), coords={"x": [0.0, 0.5, 1.0]}
        ... )
        >>> labels.rasteragg.center_of_mass().values
        array([[0.  , 0.25],
               [1.  , 0.75]])
        """
        _, labels = _prepare(None, self._obj)
        return _run(None, labels, ("center_of_mass",), index=index, background=background, skipna=False)[
            "center_of_mass"
        ]

    def paint(self, values: xr.DataArray) -> xr.DataArray:
        """Map a per-label result back onto the pixels of these labels, lazily.

        Parameters
        ----------
        values
            A ``DataArray`` with dim ``label`` (and optionally ``c``), such as a statistic from
            this accessor.

        Returns
        -------
        xarray.DataArray
            Float64 array with the labels' dims (``c`` first when ``values`` has it) holding, at
            each pixel, the value of its label; NaN where the label is not in ``values``. Dask
            backed when the labels are, and on the labels' device (CuPy labels give a CuPy image).

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> labels = xr.DataArray(np.array([[0, 1], [2, 2]]), dims=("y", "x"))
        >>> values = xr.DataArray([10.0, 20.0], dims="label", coords={"label": [1, 2]})
        >>> labels.rasteragg.paint(values).values
        array([[nan, 10.],
               [20., 20.]])
        """
        labels = self._obj
        _check_dims(labels, SPATIAL, "labels")
        check_labels_dtype(labels.dtype)
        if not isinstance(values, xr.DataArray):
            # A bare array does not say which label each row belongs to (results leave out the
            # background, so row i is rarely label i): ask for the ids rather than guess them.
            raise TypeError(
                f"'values' must be an xarray.DataArray with a 'label' dim whose coordinate holds the "
                f"label ids (such as a statistic from this accessor); got {type(values).__name__} "
                "(wrap it: xr.DataArray(values, dims='label', coords={'label': ids}))"
            )
        if "label" not in values.dims:
            raise ValueError(f"'values' must have a 'label' dim; got dims {values.dims}")
        extra = [d for d in values.dims if d not in ("label", "c")]
        if extra:
            raise ValueError(f"'values' may only have dims 'label' and 'c'; got extra dims {extra}")
        table = values.transpose("label", ...)
        ids = np.asarray(
            integral_ids(table["label"].values, "the 'label' coordinate of 'values'")
            if "label" in table.coords
            else np.arange(table.sizes["label"])
        )
        check_labels_dtype(ids.dtype, "the 'label' coordinate of 'values'")
        # Ids are compared in the labels' dtype, exactly (NumPy compares uint64 with int64 through
        # float64, which merges ids beyond 2**53); ids that dtype cannot hold paint no pixel.
        info = np.iinfo(labels.dtype)
        fits = np.flatnonzero((ids >= info.min) & (ids <= info.max))
        order = fits[np.argsort(ids[fits].astype(labels.dtype), kind="stable")]
        ids = ids[order].astype(labels.dtype)
        has_c = "c" in table.dims
        rows = table.data if has_c else table.data[:, None]
        rows = rows[order]  # lazy when the values are
        data = labels.data
        if isinstance(data, da.Array) or isinstance(rows, da.Array):
            # Labels blockwise; the whole table (its label axis concatenated) goes to every block.
            spatial = tuple(labels.dims)
            painted = da.blockwise(
                _paint_block,
                (("c",) if has_c else ()) + spatial,
                da.asarray(data),
                spatial,
                ids,
                None,
                da.asarray(rows),
                ("label", "c" if has_c else "one"),
                has_c,
                None,
                concatenate=True,
                dtype=np.float64,
            )
        else:
            painted = _paint_block(data, ids, rows, has_c)
        dims = (("c",) if has_c else ()) + tuple(labels.dims)
        coords = {name: coord for name, coord in labels.coords.items() if set(coord.dims) <= set(labels.dims)}
        if has_c and "c" in table.coords:
            coords["c"] = table["c"]
        return xr.DataArray(painted, dims=dims, coords=coords, name=values.name)


def _paint_block(block: np.ndarray, ids: np.ndarray, rows: np.ndarray, has_c: bool) -> np.ndarray:
    """Value of each pixel's label (NaN for labels not in the sorted ``ids``), channels first.

    ``rows`` holds one row of values per id, shape ``(k, C)``; without ``has_c``, ``C`` is 1 and
    the channel axis is dropped.
    """
    xp = namespace(block)  # painted on the device that holds the labels
    rows = xp.asarray(to_numpy(rows), dtype=np.float64)
    shape = ((rows.shape[1],) if has_c else ()) + block.shape
    if ids.shape[0] == 0:
        return xp.full(shape, np.nan)
    ids = xp.asarray(ids)
    pos = xp.minimum(xp.searchsorted(ids, block), ids.shape[0] - 1)
    found = ids[pos] == block
    values = xp.moveaxis(rows[pos], -1, 0)  # (c, *block.shape)
    out = xp.where(found[None], values, np.nan)
    return out if has_c else out[0]


# -- preparation: dims, alignment --------------------------------------------------------------


def _check_dims(array: xr.DataArray, allowed: Sequence[str], name: str) -> None:
    unknown = [d for d in array.dims if d not in allowed]
    if unknown:
        raise ValueError(
            f"'{name}' has dim(s) {unknown} that xr_rasteragg does not know; expected dims from "
            f"{list(allowed)} (rename or select them first); got dims {list(array.dims)}"
        )
    if not any(d in array.dims for d in SPATIAL):
        raise ValueError(
            f"'{name}' needs at least one spatial dim of {list(SPATIAL)}; got dims {list(array.dims)}"
        )


def _prepare(image: xr.DataArray | None, labels: xr.DataArray) -> tuple[xr.DataArray | None, xr.DataArray]:
    """Check dims, align on coordinates, and give both the same spatial dims."""
    if not isinstance(labels, xr.DataArray):
        raise TypeError(f"'labels' must be an xarray.DataArray; got {type(labels).__name__}")
    _check_dims(labels, SPATIAL, "labels")
    check_labels_dtype(labels.dtype)
    if image is None:
        return None, labels
    _check_dims(image, IMAGE_DIMS, "image")
    image_spatial = [d for d in SPATIAL if d in image.dims]
    label_spatial = [d for d in SPATIAL if d in labels.dims]
    if image_spatial != label_spatial:
        raise ValueError(
            f"'labels' and the image must have the same spatial dims; got labels {label_spatial} "
            f"and image {image_spatial}"
        )
    for dim in label_spatial:
        image, labels = _align_dim(image, labels, dim)
    return image, labels


def _align_dim(image: xr.DataArray, labels: xr.DataArray, dim: str) -> tuple[xr.DataArray, xr.DataArray]:
    """Cut image and labels to their common extent along ``dim``, by coordinates if both have them.

    Coordinates may ascend or descend; labels that run the other way than the image are flipped
    onto the image's direction first (statistics do not depend on pixel order, and the center of
    mass is reported in coordinate values).
    """
    if dim not in image.coords or dim not in labels.coords:
        if image.sizes[dim] != labels.sizes[dim]:
            raise ValueError(
                f"'labels' and the image must have the same shape when they carry no coordinates; got "
                f"labels {dict(labels.sizes)} and image {dict(image.sizes)} (they differ along {dim!r})"
            )
        return image, labels
    if image.sizes[dim] == labels.sizes[dim] and np.array_equal(image[dim].values, labels[dim].values):
        return image, labels
    a, step_a, res_a = _grid(image, "image", dim)
    b, step_b, res_b = _grid(labels, "labels", dim)
    if step_a is not None and step_b is not None and (step_a > 0) != (step_b > 0):
        labels = labels.isel({dim: slice(None, None, -1)})
        b, step_b = b[::-1], -step_b
    step = step_a if step_a is not None else step_b
    if step is None:  # both single-pixel
        if abs(a[0] - b[0]) > res_a + res_b:
            raise ValueError(f"'labels' and the image do not overlap along {dim!r}: {b[0]} vs {a[0]}")
        return image, labels
    # How far apart (in pixels) two positions may be and still be the same pixel: a fraction of a
    # pixel, plus the rounding of the coordinates' own dtype (float32 coordinates of a float64 grid).
    slack = GRID_TOLERANCE + (res_a + res_b) / abs(step)
    if slack >= 0.5:
        raise ValueError(
            f"the coordinates along {dim!r} are too coarse to tell pixels apart (their dtype resolves "
            f"{res_a + res_b:.3g} at a step of {abs(step):.3g}); use float64 coordinates"
        )
    if step_a is not None and step_b is not None:
        drift = abs(step_a - step_b) * max(a.shape[0], b.shape[0]) / abs(step)
        if drift > slack:
            raise ValueError(
                f"'labels' and the image have different pixel spacing along {dim!r}: {step_b} vs "
                f"{step_a}; resample one of them onto the other's grid first"
            )
    offset = (b[0] - a[0]) / step
    shift = round(offset)
    if abs(offset - shift) > slack:
        raise ValueError(
            f"'labels' and the image sit on different pixel grids along {dim!r}: the labels start "
            f"{offset:.6g} pixels into the image, not a whole number"
        )
    start, stop = max(0, shift), min(a.shape[0], shift + b.shape[0])
    if stop <= start:
        raise ValueError(
            f"'labels' and the image do not overlap along {dim!r}: labels cover {b[0]}..{b[-1]}, "
            f"image covers {a[0]}..{a[-1]}"
        )
    image = image.isel({dim: slice(start, stop)})
    labels = labels.isel({dim: slice(start - shift, stop - shift)})
    return image, labels.assign_coords({dim: image[dim].values})


def _grid(array: xr.DataArray, name: str, dim: str) -> tuple[np.ndarray, float | None, float]:
    """The coordinate ``dim`` of ``array`` as a regular grid.

    Returns
    -------
    values
        The coordinate as float64.
    step
        Its step, end to end (None for a single value).
    resolution
        How finely its dtype resolves values of its size (0 for integers).

    Raises
    ------
    ValueError
        If the coordinate is not numeric, not finite, too coarse for its dtype to tell its pixels
        apart, or not evenly spaced (to within :data:`GRID_TOLERANCE` of a pixel, beyond the
        rounding of its dtype).
    """
    raw = np.asarray(array[dim].values)
    if raw.dtype.kind not in "iuf":
        raise ValueError(
            f"the coordinate {dim!r} of '{name}' must be numeric to align on it; got dtype {raw.dtype} "
            "(drop or replace the coordinate to match pixels by position)"
        )
    values = raw.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(
            f"the coordinate {dim!r} of '{name}' must be finite to align on it; it holds NaN or inf"
        )
    resolution = float(np.finfo(raw.dtype).eps * np.abs(values).max()) if raw.dtype.kind == "f" else 0.0
    n = values.shape[0]
    if n < 2:
        return values, None, resolution
    step = float(values[-1] - values[0]) / (n - 1)
    if resolution >= 0.5 * abs(step) > 0 or (step == 0 and resolution > 0):
        raise ValueError(
            f"the coordinate {dim!r} of '{name}' is too coarse to tell pixels apart: its dtype "
            f"{raw.dtype} resolves {resolution:.3g} at values of this size, with pixels {abs(step):.3g} "
            "apart; use float64 coordinates"
        )
    deviation = float(np.abs(values - (values[0] + step * np.arange(n))).max())
    if step == 0 or deviation > GRID_TOLERANCE * abs(step) + resolution:
        steps = np.diff(values)
        raise ValueError(
            f"the coordinate {dim!r} of '{name}' must be evenly spaced to align on it; got steps from "
            f"{steps.min()} to {steps.max()}"
        )
    return values, step, resolution


# -- running the engine and wrapping the result -------------------------------------------------


def _canonical(array: xr.DataArray, dims: Sequence[str]) -> Any:
    """The data of ``array`` with exactly ``dims``, in order; missing ones become size 1."""
    missing = [d for d in dims if d not in array.dims]
    if missing:
        array = array.expand_dims(missing)
    return array.transpose(*dims).data


def _run(
    image: xr.DataArray | None,
    labels: xr.DataArray,
    names: Sequence[str],
    *,
    index: ArrayLike | None,
    background: int | None,
    skipna: bool,
) -> xr.Dataset:
    image_data = None if image is None else _canonical(image, IMAGE_DIMS)
    result = run_engine(
        _canonical(labels, SPATIAL), image_data, names, index=index, background=background, skipna=skipna
    )
    axes = [d for d in SPATIAL if d in labels.dims]
    coords: dict[Hashable, Any] = {"label": result.labels}
    if image is not None and "c" in image.coords and "c" in image.dims:
        coords["c"] = image["c"].values
    variables = {}
    for name in names:
        value = result.values[name]
        if name == "center_of_mass":
            keep = [SPATIAL.index(d) for d in axes]
            value = _to_coordinates(value[:, keep], labels, axes)
            variables[name] = xr.Variable(("label", "axis"), value)
            coords["axis"] = axes
        elif not STATISTICS[name].per_channel:
            variables[name] = xr.Variable(("label",), value)
        elif image is not None and "c" in image.dims:
            variables[name] = xr.Variable(("label", "c"), value)
        else:
            variables[name] = xr.Variable(("label",), value[:, 0])
    return xr.Dataset(variables, coords=coords)


def _pixel_to_coordinate(x: NDArray[np.float64], values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Positions in pixel indices as coordinate values, interpolated between the pixels' ``values``.

    NaN (a label without pixels) stays NaN, and so does every position on a zero-length dim:
    :func:`numpy.interp` would clamp NaN to the only coordinate of a one-pixel dim, and fails on
    an empty one.
    """
    out = np.full(x.shape, np.nan)
    known = ~np.isnan(x)
    if values.shape[0] and known.any():
        out[known] = np.interp(x[known], np.arange(values.shape[0], dtype=np.float64), values)
    return out


def _to_coordinates(positions: Any, labels: xr.DataArray, axes: Sequence[str]) -> Any:
    """Pixel indices turned into the labels' coordinate values, on the dims that have them."""
    columns = []
    for j, dim in enumerate(axes):
        column = positions[:, j]
        if dim in labels.coords:
            values = np.asarray(labels[dim].values, dtype=np.float64)
            if isinstance(column, da.Array):
                column = da.map_blocks(_pixel_to_coordinate, column, values, dtype=np.float64)
            else:
                column = _pixel_to_coordinate(column, values)
        columns.append(column)
    stack = da.stack if isinstance(positions, da.Array) else np.stack
    return stack(columns, axis=1)
