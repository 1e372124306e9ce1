"""The methods under test: ours (class and accessor), the read limit and each peer.

Each method takes the in-memory reference dataset (``labels`` ``(y, x)``, ``image`` ``(c, y, x)``)
and a piece of work — ``"mean"``, ``"all"`` (the nine statistics of DESIGN §6), a median work or
``"shape"`` (the nine and every shape feature, where a method has them) — and returns a call that
does that work up to a finished result table, the way a user of that library would
write it. Methods that take dask arrays get them built beforehand, untimed (as a user's arrays
would come from zarr; ``name=False`` so that dask does not hash the data): the call times the
work, not dask's tokenizing of in-memory arrays. Peers that cannot compute some statistics are
run for those they can, and say which.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
from numpy.typing import NDArray

from xr_rasteragg.stats import SHAPE_FEATURES

__all__ = ["ALL_STATS", "MEDIAN_WORKS", "METHODS", "SHAPE", "Data", "Method", "Work"]

Work = Literal["mean", "all", "median", "median-all", "shape"]
ALL_STATS = ("sum", "mean", "count", "var", "skew", "kurtosis", "min", "max", "center_of_mass")
#: Whole-label work: the median of every channel, and the median with the nine statistics in one call.
MEDIAN_WORKS: tuple[Work, ...] = ("median", "median-all")
#: Every shape feature of 2-D labels, named as in ``skimage.measure.regionprops`` (the library's
#: list, less harpy's radii and principal axes, which skimage does not have).
SHAPE = tuple(name for name in SHAPE_FEATURES if name not in ("radii", "principal_axes"))
#: The shape features of the labels alone (all but the intensity-weighted centroid).
LABEL_SHAPE = tuple(name for name in SHAPE if name != "centroid_weighted")


@dataclass(frozen=True)
class Data:
    """The in-memory dataset and the dask chunking that chunked methods use."""

    labels: NDArray[np.integer]
    image: NDArray[np.integer]
    spatial_chunk: int
    channel_chunk: int

    def crop(self, size: int) -> Data:
        """The top-left ``size`` x ``size`` pixels (for warming up compilers and caches)."""
        return Data(
            np.ascontiguousarray(self.labels[:size, :size]),
            np.ascontiguousarray(self.image[:, :size, :size]),
            min(self.spatial_chunk, size),
            self.channel_chunk,
        )

    def dask_mask(self) -> da.Array:
        """Labels as a ``(1, y, x)`` dask array (the RasterAggregator layout)."""
        s = self.spatial_chunk
        return da.from_array(self.labels[None], chunks=(1, s, s), name=False)

    def dask_image(self) -> da.Array:
        """Image as a ``(c, 1, y, x)`` dask array (the RasterAggregator layout)."""
        s = self.spatial_chunk
        return da.from_array(self.image[:, None], chunks=(self.channel_chunk, 1, s, s), name=False)

    def xarray_image(self) -> Any:
        """Image as a dask-backed ``DataArray`` with dims ``(c, y, x)``."""
        import xarray as xr

        s, cc = self.spatial_chunk, self.channel_chunk
        return xr.DataArray(da.from_array(self.image, chunks=(cc, s, s), name=False), dims=("c", "y", "x"))


@dataclass(frozen=True)
class Method:
    """One way of computing per-label statistics.

    Attributes
    ----------
    name
        Short key used on the command line and in results.
    title
        What the tables print.
    requires
        Modules that must be importable, else the method is skipped.
    computes
        The statistics each piece of work produces (``()`` for the read limit).
    build
        ``build(data, work)`` → a call that does the work.
    """

    name: str
    title: str
    requires: tuple[str, ...]
    computes: dict[str, tuple[str, ...]]
    build: Callable[[Data, Work], Callable[[], Any]]

    def missing(self) -> list[str]:
        """The required modules that are not installed."""
        return [module for module in self.requires if importlib.util.find_spec(module) is None]


def _read_limit(data: Data, work: Work) -> Callable[[], Any]:
    return lambda: (data.image.sum(), data.labels.sum())


def _through_class(
    data: Data, work: Work, with_index: bool, call: Callable[[Any, Any], Any]
) -> Callable[[], Any]:
    """Ours through ``RasterAggregator``: ``aggregate_mean`` for "mean", else ``call(aggregator, index)``."""
    from xr_rasteragg import RasterAggregator

    mask, image = data.dask_mask(), data.dask_image()
    index = (
        np.unique(data.labels) if with_index else None
    )  # the user's list of ids, made beforehand (untimed)

    def run() -> Any:
        aggregator = RasterAggregator(mask, image, run_on_gpu=False)
        with dask.config.set(scheduler="threads"):
            if work == "mean":
                return aggregator.aggregate_mean(index=index)
            if work == "median":
                return aggregator.aggregate_median(index=index)
            if work == "median-all":
                return aggregator.aggregate_stats((*ALL_STATS, "median"), index=index)
            return call(aggregator, index)

    return run


def _ours_class(data: Data, work: Work) -> Callable[[], Any]:
    return _through_class(data, work, False, lambda aggregator, _: aggregator.aggregate_stats(ALL_STATS))


def _ours_index(data: Data, work: Work) -> Callable[[], Any]:
    return _through_class(
        data, work, True, lambda aggregator, index: aggregator.aggregate_stats(ALL_STATS, index=index)
    )


def _harpy_script(aggregator: Any, index: Any) -> Any:
    """harpy's four calls, each with the index."""
    return (
        aggregator.aggregate_stats(("sum", "mean", "count", "var", "kurtosis", "skew"), index=index),
        aggregator.aggregate_min(index=index),
        aggregator.aggregate_max(index=index),
        aggregator.center_of_mass(index=index),
    )


def _ours_script(data: Data, work: Work) -> Callable[[], Any]:
    return _through_class(data, work, True, _harpy_script)


def _accessor_work(image: Any, labels: Any, work: Work) -> Any:
    """The accessor call that does ``work`` (lazy for dask-backed arrays, NumPy-backed otherwise)."""
    if work == "mean":
        return image.rasteragg.mean(labels)
    if work == "median":
        return image.rasteragg.median(labels)
    stats = {"median-all": (*ALL_STATS, "median"), "shape": ALL_STATS + SHAPE}.get(work, ALL_STATS)
    return image.rasteragg.aggregate(labels, stats)


def _ours_accessor(data: Data, work: Work) -> Callable[[], Any]:
    import xarray as xr

    import xr_rasteragg  # noqa: F401  (registers the accessor)

    s = data.spatial_chunk
    image = data.xarray_image()
    labels = xr.DataArray(da.from_array(data.labels, chunks=(s, s), name=False), dims=("y", "x"))

    def run() -> Any:  # dask-backed inputs give dask-backed results: the table computed, as users do
        with dask.config.set(scheduler="threads"):
            return _accessor_work(image, labels, work).compute()

    return run


def _ours_accessor_numpy(data: Data, work: Work) -> Callable[[], Any]:
    """Ours through the accessor on NumPy-backed ``DataArray`` s, as in a notebook: the engine
    chooses the blocks (the dataset's chunking is not used), and the results are NumPy-backed."""
    import xarray as xr

    import xr_rasteragg  # noqa: F401  (registers the accessor)

    image = xr.DataArray(data.image, dims=("c", "y", "x"))
    labels = xr.DataArray(data.labels, dims=("y", "x"))

    def run() -> Any:
        with dask.config.set(scheduler="threads"):
            return _accessor_work(image, labels, work)

    return run


def _ours_labels_shape(data: Data, work: Work) -> Callable[[], Any]:
    """Ours: the shape features of the labels alone (``labels.rasteragg.aggregate``)."""
    import xarray as xr

    import xr_rasteragg  # noqa: F401  (registers the accessor)

    s = data.spatial_chunk
    labels = xr.DataArray(da.from_array(data.labels, chunks=(s, s), name=False), dims=("y", "x"))

    def run() -> Any:
        with dask.config.set(scheduler="threads"):
            return labels.rasteragg.aggregate(LABEL_SHAPE).compute()

    return run


def _bincount(data: Data, work: Work) -> Callable[[], Any]:
    def run() -> dict[str, Any]:
        flat = data.labels.ravel()
        count = np.bincount(flat)
        out: dict[str, Any] = {"count": count}
        with np.errstate(invalid="ignore", divide="ignore"):
            sums = [
                np.bincount(flat, weights=channel.ravel(), minlength=len(count)) for channel in data.image
            ]
            out["mean"] = np.stack(sums, -1) / count[:, None]
            if work == "mean":
                return out
            out["sum"] = np.stack(sums, -1)
            moments: dict[int, list[NDArray[np.float64]]] = {2: [], 3: [], 4: []}
            lows, highs = [], []
            for c, channel in enumerate(data.image):
                x = channel.ravel()
                deviation = x - out["mean"][flat, c]
                power = deviation * deviation
                for k in (2, 3, 4):
                    moments[k].append(np.bincount(flat, weights=power, minlength=len(count)) / count)
                    power = power * deviation
                low = np.full(len(count), np.iinfo(x.dtype).max, x.dtype)
                high = np.zeros(len(count), x.dtype)
                np.minimum.at(low, flat, x)
                np.maximum.at(high, flat, x)
                lows.append(low)
                highs.append(high)
            m2, m3, m4 = (np.stack(moments[k], -1) for k in (2, 3, 4))
            out.update(var=m2, skew=m3 / m2**1.5, kurtosis=m4 / m2**2 - 3, min=np.stack(lows, -1))
            out["max"] = np.stack(highs, -1)
            ys, xs = np.indices(data.labels.shape)
            out["center_of_mass"] = np.stack(
                [np.bincount(flat, weights=axis.ravel(), minlength=len(count)) / count for axis in (ys, xs)],
                -1,
            )
        return out

    return run


def _scipy(data: Data, work: Work) -> Callable[[], Any]:
    import scipy.ndimage as ndi

    def run() -> dict[str, Any]:
        ids = np.unique(data.labels)
        if work == "mean":
            return {"mean": np.stack([ndi.mean(channel, data.labels, ids) for channel in data.image], -1)}
        ones = np.ones(data.labels.shape, np.float64)
        out: dict[str, Any] = {
            "count": ndi.sum_labels(ones, data.labels, ids),
            "center_of_mass": np.asarray(ndi.center_of_mass(ones, data.labels, ids)),
        }
        for name, function in (
            ("sum", ndi.sum_labels),
            ("mean", ndi.mean),
            ("var", ndi.variance),
            ("min", ndi.minimum),
            ("max", ndi.maximum),
        ):
            out[name] = np.stack([function(channel, data.labels, ids) for channel in data.image], -1)
        return out

    return run


def _steinbock(data: Data, work: Work) -> Callable[[], Any]:
    """steinbock's intensity measurement with median aggregation (``scipy.ndimage.median`` per
    channel over the whole image in memory), as its ``measure intensities --aggr median`` runs.

    steinbock's dependencies (OpenCV, xtiff, fcswrite, ...) are not in the ``bench`` extra; its
    intensity module needs only NumPy, pandas, SciPy and tifffile, so ``pip install --no-deps
    steinbock`` is enough to measure it.
    """
    from steinbock.measurement.intensities import IntensityAggregation, measure_intensites

    names = [f"c{i}" for i in range(data.image.shape[0])]
    return lambda: measure_intensites(data.image, data.labels, names, IntensityAggregation.MEDIAN)


def _median(mask: NDArray[np.bool_], intensity: NDArray[Any]) -> float:
    """A median extra property, as scikit-image's users write one."""
    return float(np.median(intensity[mask]))


def _skimage(data: Data, work: Work) -> Callable[[], Any]:
    from skimage.measure import regionprops_table

    if work == "median":
        return lambda: regionprops_table(
            data.labels, np.moveaxis(data.image, 0, -1), properties=("label",), extra_properties=(_median,)
        )
    properties = (
        ("label", "intensity_mean")
        if work == "mean"
        else (
            "label",
            "area",
            "centroid",
            "intensity_mean",
            "intensity_std",
            "intensity_min",
            "intensity_max",
        )
    )
    if work == "shape":  # the same properties as ours: the statistics above and every shape feature
        properties = tuple(dict.fromkeys(properties + SHAPE))
    return lambda: regionprops_table(
        data.labels, intensity_image=np.moveaxis(data.image, 0, -1), properties=properties
    )


def _flox(data: Data, work: Work) -> Callable[[], Any]:
    import xarray as xr
    from flox.xarray import xarray_reduce

    functions = ("mean",) if work == "mean" else ("sum", "mean", "count", "var", "min", "max")
    image = data.xarray_image()
    labels = xr.DataArray(data.labels, dims=("y", "x"), name="label")  # in memory: flox finds the groups

    def run() -> Any:
        results = [xarray_reduce(image, labels, func=function) for function in functions]
        with dask.config.set(scheduler="threads"):
            return dask.compute(*results)

    return run


def _xrspatial(data: Data, work: Work) -> Callable[[], Any]:
    import xarray as xr
    from xrspatial import zonal_stats

    functions = ["mean"] if work == "mean" else ["mean", "max", "min", "sum", "var", "count"]

    def run() -> list[Any]:
        zones = xr.DataArray(data.labels, dims=("y", "x"))
        return [
            zonal_stats(zones, xr.DataArray(channel, dims=("y", "x")), stats_funcs=functions)
            for channel in data.image
        ]

    return run


def _harpy(data: Data, work: Work) -> Callable[[], Any]:
    from harpy.utils import RasterAggregator
    from loguru import logger

    logger.disable("harpy")  # its notices on constant-valued labels, once per call
    mask, image = data.dask_mask(), data.dask_image()

    def run() -> Any:
        aggregator = RasterAggregator(mask, image, run_on_gpu=False)
        with dask.config.set(scheduler="threads"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if work == "mean":
                return aggregator.aggregate_mean()
            return (
                aggregator.aggregate_stats(("sum", "mean", "count", "var", "kurtosis", "skew")),
                aggregator.aggregate_min(),
                aggregator.aggregate_max(),
                aggregator.center_of_mass(),
            )

    return run


def _harpy_median(data: Data, work: Work) -> Callable[[], Any]:
    """harpy's Featurizer: the median of each instance's pixels, per channel, in windows of the
    largest cell's diameter (found beforehand, untimed: harpy needs it given)."""
    from harpy.utils import Featurizer
    from loguru import logger
    from scipy import ndimage

    logger.disable("harpy")
    extent = max(max(s.stop - s.start for s in box) for box in ndimage.find_objects(data.labels) if box)
    mask, image = data.dask_mask(), data.dask_image()

    def median(values: NDArray[Any]) -> NDArray[np.float64]:
        return np.median(values, axis=1, keepdims=True)  # (c, N) -> (c, 1)

    def run() -> Any:
        with dask.config.set(scheduler="threads"):
            featurizer = Featurizer(mask, image)
            ids, values = featurizer.calculate_instance_statistics(
                depth=extent // 2 + 1, diameter=extent + 2, statistic_dimension=1, fn=median
            )
            return ids, values.compute()

    return run


def _all(*stats: str) -> dict[str, tuple[str, ...]]:
    return {"mean": ("mean",), "all": stats}


def _with_median(computes: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    return {**computes, "median": ("median",), "median-all": (*ALL_STATS, "median")}


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("read", "read limit (NumPy sum of image and mask)", (), {"mean": (), "all": ()}, _read_limit),
        Method("ours", "xr_rasteragg RasterAggregator", (), _with_median(_all(*ALL_STATS)), _ours_class),
        Method(
            "ours-index",
            "xr_rasteragg RasterAggregator, index=np.unique(mask)",
            (),
            _all(*ALL_STATS),
            _ours_index,
        ),
        Method(
            "ours-script",
            "xr_rasteragg RasterAggregator, harpy's four-call script with an index",
            (),
            _all(*ALL_STATS),
            _ours_script,
        ),
        Method(
            "accessor",
            "xr_rasteragg .rasteragg accessor",
            (),
            {**_with_median(_all(*ALL_STATS)), "shape": ALL_STATS + SHAPE},
            _ours_accessor,
        ),
        Method(
            "accessor-numpy",
            "xr_rasteragg .rasteragg accessor, NumPy-backed arrays",
            (),
            {**_with_median(_all(*ALL_STATS)), "shape": ALL_STATS + SHAPE},
            _ours_accessor_numpy,
        ),
        Method(
            "labels-shape",
            "xr_rasteragg labels.rasteragg.aggregate (shape features of the labels alone)",
            (),
            {"shape": LABEL_SHAPE},
            _ours_labels_shape,
        ),
        Method("bincount", "NumPy bincount (+ ufunc.at for min/max)", (), _all(*ALL_STATS), _bincount),
        Method(
            "scipy",
            "scipy.ndimage",
            ("scipy",),
            _all("sum", "mean", "count", "var", "min", "max", "center_of_mass"),
            _scipy,
        ),
        Method(
            "skimage",
            "scikit-image regionprops_table",
            ("skimage",),
            {
                **_all("mean", "count", "var", "min", "max", "center_of_mass"),
                "median": ("median",),
                "shape": ("mean", "count", "var", "min", "max", "center_of_mass", *SHAPE),
            },
            _skimage,
        ),
        Method(
            "flox", "flox xarray_reduce", ("flox",), _all("sum", "mean", "count", "var", "min", "max"), _flox
        ),
        Method(
            "xrspatial",
            "xarray-spatial zonal_stats",
            ("xrspatial",),
            _all("sum", "mean", "count", "var", "min", "max"),
            _xrspatial,
        ),
        Method(
            "steinbock",
            "steinbock measure_intensites, median aggregation",
            ("steinbock",),
            {"median": ("median",)},
            _steinbock,
        ),
        Method("harpy", "harpy RasterAggregator", ("harpy",), _all(*ALL_STATS), _harpy),
        Method(
            "harpy-featurizer",
            "harpy Featurizer (median per instance; depth from the largest cell)",
            ("harpy",),
            {"median": ("median",)},
            _harpy_median,
        ),
    )
}
