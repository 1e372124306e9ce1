"""The ``.rasteragg`` accessor on ``xarray.DataArray``.

Thin by design (as ``flox.xarray``): it finds the dims by name, has image and labels aligned (on
their coordinates, or on their SpatialData transformations: :mod:`xr_rasteragg.alignment`), puts
them in the engine's canonical ``(c, z, y, x)`` / ``(z, y, x)`` layout, and wraps the engine's
arrays back into xarray objects. No statistics are computed here.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from numpy.typing import ArrayLike, NDArray

from .alignment import SPATIAL, Aligned, align, scale0, to_coordinate_system, transformations
from .engine import Aggregation, aggregate_masks
from .engine import aggregate as run_engine
from .kernels.xp import namespace, to_numpy
from .stats import SHAPE_FEATURES, STATISTICS, Space, validate_stats
from .validation import check_labels_dtype, integral_ids
from .whole_label import LabelFunction, Quantiles, WholeLabel, check_quantiles

__all__ = ["RasterAggAccessor", "aggregate_pairs"]

IMAGE_DIMS = ("c", *SPATIAL)


def _statistic(name: str, summary: str) -> Callable[..., xr.DataArray]:
    """A method of :class:`RasterAggAccessor` for one statistic of an image over labels."""

    def method(
        self: RasterAggAccessor,
        labels: xr.DataArray,
        *,
        index: ArrayLike | None = None,
        background: int | None = 0,
        skipna: bool = False,
        coordinate_system: str | None = None,
    ) -> xr.DataArray:
        dataset = self.aggregate(
            labels,
            (name,),
            index=index,
            background=background,
            skipna=skipna,
            coordinate_system=coordinate_system,
        )
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
    :meth:`max`, :meth:`median` and :meth:`aggregate` (several statistics in one pass);
    :meth:`quantile` and :meth:`apply` (any function of each label's pixels). On labels (dims ⊆
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
        labels: xr.DataArray | str | Iterable[str],
        stats: str | Iterable[str] | None = None,
        *,
        index: ArrayLike | None = None,
        background: int | None = 0,
        skipna: bool = False,
        coordinate_system: str | None = None,
    ) -> xr.Dataset:
        """Several statistics per label and channel, all from one pass over the data.

        On an image: ``image.rasteragg.aggregate(labels, stats)``. On labels, for the statistics
        that need no image (``count``, ``center_of_mass`` and the shape features but
        ``centroid_weighted``): ``labels.rasteragg.aggregate(stats)``.

        Parameters
        ----------
        labels
            Integer label mask with dims ⊆ ``{z, y, x}``, over the same pixels as the image (or a
            crop of them, when both carry coordinates or SpatialData transformations). A
            multiscale SpatialData element (``DataTree``) stands for its ``scale0`` level. On
            labels: the statistics (and ``stats`` is not given).
        stats
            Names of the statistics (default ``mean``): ``count``, ``sum``, ``mean``, ``var``,
            ``std``, ``skew``, ``kurtosis``, ``min``, ``max``, ``center_of_mass``, ``median`` (exact, as
            :func:`numpy.median` of each label's pixels, whatever blocks the label spans), and the shape
            features of :func:`skimage.measure.regionprops`: ``area``, ``bbox``, ``centroid``,
            ``axis_major_length``, ``axis_minor_length``, ``eccentricity`` (2-D),
            ``orientation`` (2-D), ``inertia_tensor``, ``inertia_tensor_eigvals``, ``extent``,
            ``equivalent_diameter_area``, ``perimeter`` (2-D, dims y and x), ``solidity``,
            ``centroid_weighted``, and harpy's ``radii`` and ``principal_axes`` (see
            :doc:`/statistics`). Shape features are in units of the labels' coordinate spacing
            when they carry coordinates (or a SpatialData scale), as regionprops' ``spacing=``;
            positions (centroids) are coordinate values, as for ``center_of_mass``.
        index
            Label ids to report, in this order; absent ids get count 0, sum 0 and NaN otherwise.
            None reports every label present, sorted. With dask inputs and an ``index``, the
            result is lazy.
        background
            A label to leave out when ``index`` is None; None keeps every label.
        skipna
            Ignore NaN pixels; by default a NaN pixel makes its label's statistics NaN for that
            channel.
        coordinate_system
            For SpatialData elements (transformations in ``attrs["transform"]``): the coordinate
            system in which image and labels are aligned and centres of mass are given. None
            picks the one both share (of several, ``"global"``).

        Returns
        -------
        xarray.Dataset
            One variable per statistic, with dims ``("label", "c")`` (``"label"`` only for
            ``count`` and scalar shape features; ``("label", "axis")`` for ``center_of_mass`` and
            ``centroid``; ``("label", "bound")`` for ``bbox``; ``("label", "axis", "axis_j")``
            for ``inertia_tensor``; ``("label", "eig")`` for ``inertia_tensor_eigvals`` and
            ``radii``; ``("label", "eig", "axis")`` for ``principal_axes``; ``("label", "c",
            "axis")`` for ``centroid_weighted``). The ``c`` coordinate holds the image's channel
            coordinate.

        Raises
        ------
        ValueError
            When image and labels do not sit on one pixel grid (coordinates or transformations),
            do not overlap, or share no (or no single) coordinate system; when only one of them
            carries a transformation that is not the identity. The message says which.

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> labels = xr.DataArray(np.array([[1, 1, 2, 2]]), dims=("y", "x"))
        >>> image = xr.DataArray(np.array([[1.0, 3.0, 5.0, 9.0]]), dims=("y", "x"))
        >>> ds = image.rasteragg.aggregate(labels, ["mean", "var", "count"])
        >>> ds["mean"].values, ds["var"].values, ds["count"].values
        (array([2., 7.]), array([1., 4.]), array([2, 2]))
        """
        if _names_statistics(labels):
            if stats is not None:
                raise TypeError(
                    "on labels, 'aggregate' takes the statistics as its first argument and no 'stats'; "
                    f"got {labels!r} and stats={stats!r} (on an image: "
                    "image.rasteragg.aggregate(labels, stats))"
                )
            names = validate_stats(labels)
            aligned = _prepare(None, self._obj, coordinate_system)
        else:
            names = validate_stats(("mean",) if stats is None else stats)
            aligned = _prepare(self._obj, labels, coordinate_system)  # type: ignore[arg-type]
        return _run(aligned, names, index=index, background=background, skipna=skipna)

    def aggregate_masks(
        self,
        masks: Mapping[str, xr.DataArray],
        stats: str | Iterable[str] = ("mean",),
        *,
        background: int | None = 0,
        skipna: bool = False,
        coordinate_system: str | None = None,
    ) -> dict[str, xr.Dataset]:
        """The statistics of :meth:`aggregate` over several label masks, reading the image once.

        For a cell and a nucleus mask, say: each block of a dask-backed image (as read from a
        file, see :mod:`xr_rasteragg.io`) is read once and handed to every mask's pass, where
        one :meth:`aggregate` call per mask would read the image once per mask.

        Parameters
        ----------
        masks
            Label masks by name, each as ``labels`` in :meth:`aggregate` (aligned with the image
            on its own, so masks may cover different crops of the image).
        stats, background, skipna, coordinate_system
            As in :meth:`aggregate`, the same for every mask; every label present is reported.

        Returns
        -------
        dict
            One Dataset per name, in the order of ``masks``, each as :meth:`aggregate` returns it.

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> cells = xr.DataArray(np.array([[1, 1, 2, 2]]), dims=("y", "x"))
        >>> nuclei = xr.DataArray(np.array([[0, 1, 2, 0]]), dims=("y", "x"))
        >>> image = xr.DataArray(np.array([[1.0, 3.0, 5.0, 9.0]]), dims=("y", "x"))
        >>> tables = image.rasteragg.aggregate_masks({"cell": cells, "nucleus": nuclei}, "mean")
        >>> tables["cell"]["mean"].values, tables["nucleus"]["mean"].values
        (array([2., 7.]), array([3., 5.]))
        """
        if not isinstance(masks, Mapping) or not masks:
            raise TypeError(
                "'masks' must be a non-empty mapping of names to labels DataArrays; got "
                f"{type(masks).__name__}"
            )
        pairs = {name: (self._obj, labels) for name, labels in masks.items()}
        return aggregate_pairs(
            pairs, stats, background=background, skipna=skipna, coordinate_system=coordinate_system
        )

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
    median = _statistic(
        "median", "Median of the pixel values of each label, per channel (exact, as numpy.median)."
    )

    def quantile(
        self,
        labels: xr.DataArray,
        q: ArrayLike,
        *,
        index: ArrayLike | None = None,
        background: int | None = 0,
        skipna: bool = False,
        method: str = "linear",
        coordinate_system: str | None = None,
    ) -> xr.DataArray:
        """Quantiles of the pixel values of each label, per channel, as :func:`numpy.quantile`.

        Exact for any label geometry: each label's pixels are gathered whole, whichever blocks
        they lie in (:mod:`xr_rasteragg.gather`); no overlap depth to choose.

        Parameters
        ----------
        labels, index, background, skipna, coordinate_system
            As in :meth:`aggregate`; with ``skipna`` the quantiles are those of
            :func:`numpy.nanquantile` (NaN for a label whose pixels are all NaN).
        q
            A quantile or a 1-D sequence of quantiles, each in [0, 1].
        method
            One of :func:`numpy.quantile`'s methods (``"linear"``, ``"lower"``, ``"higher"``,
            ``"nearest"``, ``"midpoint"``, ``"inverted_cdf"``, ``"hazen"``, ...).

        Returns
        -------
        xarray.DataArray
            Named ``quantile``, with dims ``("quantile", "label", "c")`` as
            :meth:`xarray.DataArray.quantile` gives them (no ``quantile`` dim for a scalar ``q``,
            no ``c`` dim for an image without one), and a ``quantile`` coordinate.

        Raises
        ------
        ValueError
            For ``q`` empty, not 0-D or 1-D, or outside [0, 1], and for an unknown ``method``.
        TypeError
            For a non-numeric ``q``.

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> labels = xr.DataArray(np.array([[1, 1, 1, 2, 2]]), dims=("y", "x"))
        >>> image = xr.DataArray(np.array([[1.0, 2.0, 9.0, 4.0, 6.0]]), dims=("y", "x"))
        >>> image.rasteragg.quantile(labels, [0.5, 1.0]).values
        array([[2., 5.],
               [9., 6.]])
        """
        values, scalar = check_quantiles(q, method)
        spec = Quantiles(values, method, scalar)
        aligned = _prepare(self._obj, labels, coordinate_system)
        result = _run(
            aligned, (), index=index, background=background, skipna=skipna, wholes={"quantile": spec}
        )["quantile"]
        if not scalar:
            result = result.assign_coords(quantile=list(values)).transpose("quantile", ...)
        else:
            result = result.assign_coords(quantile=values[0])
        return result

    def apply(
        self,
        labels: xr.DataArray,
        func: Callable[..., Any],
        *,
        output_size: int = 1,
        on: str = "values",
        name: str = "apply",
        index: ArrayLike | None = None,
        background: int | None = 0,
        skipna: bool = False,
        coordinate_system: str | None = None,
    ) -> xr.DataArray:
        """Any function of each label's pixels, per channel, as if run on the whole image.

        Each label's pixels are gathered whole, whichever blocks they lie in
        (:mod:`xr_rasteragg.gather`), and ``func`` is called once per label and channel.

        Parameters
        ----------
        labels, index, background, coordinate_system
            As in :meth:`aggregate`.
        func
            With ``on="values"``: ``func(values)``, ``values`` the label's pixel values of one
            channel as a 1-D float64 array (in raster order; without NaN when ``skipna``). With
            ``on="crops"``: ``func(mask, intensity)`` as scikit-image's ``extra_properties``:
            ``mask`` the label's boolean mask over its bounding box, ``intensity`` one channel
            there (float64, 0 outside the label), both with the labels' spatial dims.
        output_size
            How many values ``func`` returns: a scalar for 1, a 1-D sequence otherwise.
        on
            ``"values"`` or ``"crops"``.
        name
            Name of the result.
        skipna
            With ``on="values"``, leave NaN pixels out of ``values``.

        Returns
        -------
        xarray.DataArray
            Dims ``("label", "c")``, then ``"output"`` when ``output_size`` > 1 (no ``c`` dim
            for an image without one); float64.

        Raises
        ------
        xr_rasteragg.whole_label.LabelFunctionError
            When ``func`` raises, or returns a value of another size than ``output_size``; the
            message names the label and channel.

        Examples
        --------
        >>> import numpy as np, xarray as xr
        >>> labels = xr.DataArray(np.array([[1, 1, 1, 2, 2]]), dims=("y", "x"))
        >>> image = xr.DataArray(np.array([[1.0, 2.0, 9.0, 4.0, 6.0]]), dims=("y", "x"))
        >>> image.rasteragg.apply(labels, np.ptp).values
        array([8., 2.])
        >>> image.rasteragg.apply(labels, lambda mask, x: mask.shape[1], on="crops").values
        array([3., 2.])
        """
        aligned = _prepare(self._obj, labels, coordinate_system)
        ndim = sum(d in aligned.labels.dims for d in SPATIAL)
        spec = LabelFunction(func, output_size, on, spatial_ndim=ndim)  # type: ignore[arg-type]
        return _run(aligned, (), index=index, background=background, skipna=skipna, wholes={name: spec})[name]

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
        aligned = _prepare(None, self._obj, None)
        return _run(aligned, ("count",), index=index, background=background, skipna=False)["count"]

    def center_of_mass(
        self,
        *,
        index: ArrayLike | None = None,
        background: int | None = 0,
        coordinate_system: str | None = None,
    ) -> xr.DataArray:
        """Mean position of the pixels of each label, with dims ``("label", "axis")``.

        The ``axis`` coordinate names the spatial dims present. Positions are in the labels'
        coordinate values where they carry coordinates, in pixel indices otherwise; for a
        SpatialData labels element (a transformation in ``attrs["transform"]``), they are the
        mean of the pixel centres in ``coordinate_system`` (None: the element's only one, or
        ``"global"``), as :func:`spatialdata.get_centroids` gives them.

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
        aligned = _prepare(None, self._obj, coordinate_system)
        return _run(aligned, ("center_of_mass",), index=index, background=background, skipna=False)[
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
            It keeps the labels' coordinates and SpatialData transformation (``attrs["transform"]``),
            so it lies where the labels lie.

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
        placed = {"transform": labels.attrs["transform"]} if transformations(labels) is not None else {}
        return xr.DataArray(painted, dims=dims, coords=coords, name=values.name, attrs=placed)


def _names_statistics(argument: Any) -> bool:
    """Whether the first argument of ``aggregate`` names statistics (a string or a list or tuple of
    strings) rather than labels."""
    return isinstance(argument, str) or (
        isinstance(argument, list | tuple) and all(isinstance(name, str) for name in argument)
    )


def aggregate_pairs(
    pairs: Mapping[str, tuple[xr.DataArray | None, xr.DataArray]],
    stats: str | Iterable[str] = ("mean",),
    *,
    background: int | None = 0,
    skipna: bool = False,
    coordinate_system: str | None = None,
) -> dict[str, xr.Dataset]:
    """:meth:`RasterAggAccessor.aggregate` for several ``(image, labels)`` pairs in one computation.

    Where the images are one dask array, or crops of one (as the images of a SpatialData store's
    labels elements are), each of its blocks is read once for all pairs (see
    :func:`xr_rasteragg.engine.aggregate_masks`).

    Parameters
    ----------
    pairs
        ``(image, labels)`` by name, each as :meth:`RasterAggAccessor.aggregate` takes them
        (``image`` None for statistics of the labels alone).
    stats, background, skipna, coordinate_system
        As in :meth:`RasterAggAccessor.aggregate`, the same for every pair.

    Returns
    -------
    dict
        One Dataset per name, in the order of ``pairs``.
    """
    names = validate_stats(stats)
    if not isinstance(pairs, Mapping) or not pairs:
        raise TypeError(
            f"'pairs' must be a non-empty mapping of names to (image, labels); got {type(pairs).__name__}"
        )
    aligned = {name: _prepare(image, labels, coordinate_system) for name, (image, labels) in pairs.items()}
    inputs = {name: _engine_inputs(one, names) for name, one in aligned.items()}
    results = aggregate_masks(
        {name: (labels, image) for name, (labels, image, _) in inputs.items()},
        names,
        background=background,
        skipna=skipna,
        spaces={name: space for name, (_, _, space) in inputs.items()},
    )
    return {name: _wrap(aligned[name], names, results[name]) for name in aligned}


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


def _prepare(image: xr.DataArray | None, labels: xr.DataArray, coordinate_system: str | None) -> Aligned:
    """Check dims and dtypes, and align image and labels (coordinates or transformations)."""
    labels = scale0(labels, "'labels'")
    if not isinstance(labels, xr.DataArray):
        raise TypeError(f"'labels' must be an xarray.DataArray; got {type(labels).__name__}")
    _check_dims(labels, SPATIAL, "labels")
    check_labels_dtype(labels.dtype)
    if image is not None:
        _check_dims(image, IMAGE_DIMS, "image")
        image_spatial = [d for d in SPATIAL if d in image.dims]
        label_spatial = [d for d in SPATIAL if d in labels.dims]
        if image_spatial != label_spatial:
            raise ValueError(
                f"'labels' and the image must have the same spatial dims; got labels {label_spatial} "
                f"and image {image_spatial}"
            )
    return align(image, labels, coordinate_system)


# -- running the engine and wrapping the result -------------------------------------------------


def _canonical(array: xr.DataArray, dims: Sequence[str]) -> Any:
    """The data of ``array`` with exactly ``dims``, in order; missing ones become size 1."""
    missing = [d for d in dims if d not in array.dims]
    if missing:
        array = array.expand_dims(missing)
    return array.transpose(*dims).data


def _run(
    aligned: Aligned,
    names: Sequence[str],
    *,
    index: ArrayLike | None,
    background: int | None,
    skipna: bool,
    wholes: dict[str, WholeLabel] | None = None,
) -> xr.Dataset:
    labels_data, image_data, space = _engine_inputs(aligned, names)
    result = run_engine(
        labels_data,
        image_data,
        names,
        index=index,
        background=background,
        skipna=skipna,
        wholes=wholes,
        space=space,
    )
    return _wrap(aligned, names, result, wholes)


def _engine_inputs(aligned: Aligned, names: Sequence[str]) -> tuple[Any, Any, Space]:
    """The labels and image in the engine's ``(z, y, x)`` and ``(c, z, y, x)`` layouts, and the
    labels' axes and spacing (for the shape features among ``names``)."""
    image, labels = aligned.image, aligned.labels
    image_data = None if image is None else _canonical(image, IMAGE_DIMS)
    axes = [d for d in SPATIAL if d in labels.dims]
    shape = any(name in SHAPE_FEATURES for name in names)
    spacing, flipped = _spacing(labels, axes, aligned.affine) if shape else ((1.0,) * len(axes), ())
    space = Space(tuple(SPATIAL.index(d) for d in axes), spacing, flipped)
    return _canonical(labels, SPATIAL), image_data, space


def _wrap(
    aligned: Aligned, names: Sequence[str], result: Aggregation, wholes: dict[str, WholeLabel] | None = None
) -> xr.Dataset:
    """The engine's result as a Dataset: one variable per statistic, ids and channels as coordinates."""
    image, labels = aligned.image, aligned.labels
    axes = [d for d in SPATIAL if d in labels.dims]
    has_c = image is not None and "c" in image.dims
    coords: dict[Hashable, Any] = {"label": result.labels}
    if has_c and image is not None and "c" in image.coords:
        coords["c"] = image["c"].values
    variables = {}
    for name in names:
        value = result.values[name]
        spec = STATISTICS[name]
        if name == "center_of_mass":
            # The axes present are the last ones of (z, y, x): a slice, which dask's array query
            # planning also takes (it has no fancy indexing).
            value = _positions(value[:, SPATIAL.index(axes[0]) :], labels, axes, aligned.affine)
            variables[name] = xr.Variable(("label", "axis"), value)
            coords["axis"] = axes
            continue
        if name == "centroid":
            value = _positions(value, labels, axes, aligned.affine)
        elif name == "centroid_weighted" and not _in_pixels(labels, axes, aligned.affine):
            stack = da.stack if isinstance(value, da.Array) else np.stack
            value = stack(
                [_positions(value[:, c], labels, axes, aligned.affine) for c in range(value.shape[1])], axis=1
            )
        dims = ["label", *(_OUTPUT_DIMS.get(d, d) for d in spec.dims)]
        if "c" in dims and not has_c:
            value = value[:, 0]
            dims.remove("c")
        variables[name] = xr.Variable(tuple(dims), value)
        if "axis" in dims or "axis_j" in dims:
            coords["axis"] = axes
        if "axis_j" in dims:
            coords["axis_j"] = axes
        if "bound" in dims:
            coords["bound"] = [f"min_{d}" for d in axes] + [f"max_{d}" for d in axes]
    for name, whole in (wholes or {}).items():
        extra = {"quantile": ("quantile",)}.get(name, ("output",))[: len(whole.shape)]
        value = result.values[name]
        if image is not None and "c" in image.dims:
            variables[name] = xr.Variable(("label", "c", *extra), value)
        else:
            variables[name] = xr.Variable(("label", *extra), value[:, 0])
    return xr.Dataset(variables, coords=coords)


#: The names of the statistics' trailing dims in the accessor's results.
_OUTPUT_DIMS = {"space": "axis", "space_j": "axis_j"}


def _spacing(
    labels: xr.DataArray, axes: Sequence[str], affine: NDArray[np.float64] | None
) -> tuple[tuple[float, ...], tuple[bool, ...]]:
    """The pixel spacing of the labels on ``axes``, and along which of them the coordinates
    decrease: from a SpatialData scale (its sign), or from the step of their coordinates (1, and
    not flipped, on dims without coordinates, and on a dim of one pixel, whose coordinate has no
    step: the volumes of a stack of one plane are the areas of its plane).

    Raises
    ------
    ValueError
        If the coordinates are not evenly spaced, or the transformation rotates, shears or swaps
        the axes of the pixel grid: shape features then have no unit or no direction.
    """
    if affine is not None:
        n = affine.shape[0] - 1
        linear = affine[:n, :n]  # columns: (x, y[, z])
        if np.any(np.abs(linear[~np.eye(n, dtype=bool)]) > 1e-12 * np.abs(linear).max()):
            raise ValueError(
                "shape features need labels whose transformation scales and translates the pixel grid; "
                f"got a rotation, shear or swap of axes (linear part {linear.tolist()})"
            )
        scale = np.diag(linear)[::-1][-len(axes) :]  # in the order of ``axes``
        return tuple(float(abs(v)) for v in scale), tuple(bool(v < 0) for v in scale)
    spacing, flipped = [], []
    for dim in axes:
        if dim not in labels.coords or labels.sizes[dim] < 2:
            spacing.append(1.0)
            flipped.append(False)
            continue
        values = np.asarray(labels[dim].values, dtype=np.float64)
        steps = np.diff(values)
        if not np.allclose(steps, steps[0], rtol=1e-9, atol=0) or steps[0] == 0:
            raise ValueError(
                f"shape features need evenly spaced coordinates; the labels' {dim!r} coordinate has steps "
                f"from {steps.min():g} to {steps.max():g}"
            )
        spacing.append(abs(float(values[-1] - values[0])) / (values.shape[0] - 1))  # the mean step
        flipped.append(bool(steps[0] < 0))
    return tuple(spacing), tuple(flipped)


def _pixel_to_coordinate(x: NDArray[np.float64], values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Positions in pixel indices as coordinate values, interpolated between the pixels' ``values``
    and extrapolated beyond the first and last pixel along the first and last step.

    A position may lie outside the pixels: the intensity-weighted centroid of a label whose
    pixels have values of both signs (a background-subtracted image) is anywhere on the line
    through them, as in pixel units. :func:`numpy.interp` alone would clamp it to the end
    pixels' coordinates.

    NaN (a label without pixels) stays NaN, and so does every position on a zero-length dim;
    on a one-pixel dim, every position is that pixel's (its index is 0 for every pixel), and
    the coordinate without a step is taken as it is.

    Examples
    --------
    >>> _pixel_to_coordinate(np.array([-1.0, 0.5, 3.0, np.nan]), np.array([10.0, 12.0, 13.0]))
    array([ 8., 11., 14., nan])
    """
    out = np.full(x.shape, np.nan)
    known = ~np.isnan(x)
    n = values.shape[0]
    if not n or not known.any():
        return out
    at = x[known]
    if n == 1:
        out[known] = values[0]
        return out
    with np.errstate(invalid="ignore"):  # an infinite position (weights summing to 0) stays infinite
        below = values[0] + at * (values[1] - values[0])
        above = values[-1] + (at - (n - 1)) * (values[-1] - values[-2])
    inside = np.interp(at, np.arange(n, dtype=np.float64), values)
    out[known] = np.where(at < 0, below, np.where(at > n - 1, above, inside))
    return out


def _in_pixels(labels: xr.DataArray, axes: Sequence[str], affine: NDArray[np.float64] | None) -> bool:
    """Whether positions on ``axes`` stay pixel indices (no transformation, no coordinates)."""
    return affine is None and not any(dim in labels.coords for dim in axes)


def _positions(
    positions: Any, labels: xr.DataArray, axes: Sequence[str], affine: NDArray[np.float64] | None
) -> Any:
    """Mean pixel indices as positions: in the coordinate system of ``affine``, if given.

    Without ``affine``, in the labels' coordinate values on the dims that have them, in pixel
    indices on the others.
    """
    if affine is not None:
        return to_coordinate_system(positions, affine)[:, ::-1]  # back to the order of ``axes``
    if _in_pixels(labels, axes, affine):
        return positions  # no graph steps for the identity
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
