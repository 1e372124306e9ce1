"""Per-cell statistics of a SpatialData image over a labels element, as an annotating table.

The adapter finds the two elements, takes the full-resolution level of multiscale ones, checks
from their transformations that they sit on one pixel grid (the labels may cover an
integer-aligned crop of the image; the check is :mod:`xr_rasteragg.alignment`'s, shared with the
accessor), hands the pixels to the ``.rasteragg`` accessor, and packs the result into an AnnData
table parsed with spatialdata's ``TableModel``. No statistics are computed here. ``spatialdata``
and ``anndata`` are imported only when a function of this module runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
from numpy.typing import NDArray

from .accessor import RasterAggAccessor  # noqa: F401  (registers DataArray.rasteragg)
from .alignment import locate, scale0, to_coordinate_system
from .engine import distributed_client, stat_groups
from .engine import progress as progress_bars
from .stats import SHAPE_FEATURES, STATISTICS
from .validation import InputDataError

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["Plan", "aggregate", "aggregate_labels", "compute_table", "compute_tables", "plan", "store_table"]

#: Statistics that are always in the table, outside ``X`` and ``layers``.
_ALWAYS = {"count": "obs['area']", "center_of_mass": "obsm['spatial']"}
#: Zarr metadata files that writing a table may rewrite (the store's root and ``tables`` group).
_METADATA = ("zarr.json", ".zgroup", ".zattrs", ".zmetadata")


@dataclass(frozen=True)
class Plan:
    """Everything checked and resolved before any pixel is read.

    Attributes
    ----------
    image, labels
        The pixels: the image with dims ``(c, [z,] y, x)`` cut to the labels' extent, and the
        labels with dims ``([z,] y, x)``, both without spatial coordinates and transformations
        (pixel indices).
    labels_name
        The labels element's name (the table's region).
    stats
        Per-channel statistics, in order; ``X`` holds the first.
    affine
        Homogeneous matrix from the labels' pixel indices ``(x, y[, z])`` to the coordinate
        system (as :func:`xr_rasteragg.alignment.locate` gives it).
    image_name, coordinate_system, region_key, instance_key
        As passed to :func:`aggregate`.
    """

    image: xr.DataArray
    labels: xr.DataArray
    image_name: str
    labels_name: str
    stats: tuple[str, ...]
    affine: NDArray[np.float64]
    coordinate_system: str
    region_key: str
    instance_key: str
    shape: tuple[str, ...] = ()


def aggregate(
    sdata: SpatialData,
    image: str,
    labels: str,
    stats: str | Iterable[str] = ("mean",),
    *,
    table_name: str | None = None,
    coordinate_system: str = "global",
    region_key: str = "region",
    instance_key: str = "instance_id",
    channels: Sequence[Any] | None = None,
    write: bool = False,
    overwrite: bool = False,
) -> AnnData:
    """Per-cell, per-channel statistics of an image element over a labels element.

    Every argument is checked before any pixel is read; the statistics then come from one pass
    over the data.

    Parameters
    ----------
    sdata
        The SpatialData object holding both elements.
    image
        Name of an image element, dims ``(c, y, x)`` or ``(c, z, y, x)``; of a multiscale image,
        the full-resolution level (``scale0``) is used.
    labels
        Name of a labels element, dims ``(y, x)`` or ``(z, y, x)``, 0 for background. It must map
        to the image's pixel grid in ``coordinate_system``: the same pixel size and orientation,
        a whole-pixel offset, and no pixel outside the image.
    stats
        Per-channel statistics: ``sum``, ``mean``, ``var``, ``std``, ``skew``, ``kurtosis``,
        ``min``, ``max``. The first goes to ``X``, each other to ``layers[stat]``. The pixel count
        and centroid are always in the table (``obs["area"]``, ``obsm["spatial"]``). Shape
        features (:doc:`/statistics`) may be named too, in pixel units of the labels element:
        scalar ones go to ``obs[name]``, the others to ``obsm[name]`` (one row per cell, their
        values flattened; ``area`` is ``obs["area"]`` already; ``centroid_weighted``, per
        channel, is dask-backed like ``X`` for dask-backed elements). At least one per-channel
        statistic is needed, for ``X``.
    table_name
        Put the table in ``sdata.tables[table_name]``.
    coordinate_system
        The coordinate system both elements are compared in and the centroids are given in.
    region_key, instance_key
        Columns of ``obs`` holding the labels element's name and the label ids.
    channels
        Channel names to keep, in this order; None keeps every channel.
    write
        Also write the table into the store that backs ``sdata`` (needs ``table_name``). The
        table is written beside the store first and moved into place, so a failure leaves the
        store as it was.
    overwrite
        Replace a table of the same name (in memory and, with ``write``, on disk).

    Returns
    -------
    anndata.AnnData
        One row per label (background 0 left out), sorted by id, indexed by the id as a string;
        one column per channel (``var_names`` = channel names). ``obs`` holds ``instance_key``,
        ``region_key`` (categorical) and ``area`` (pixels); ``obsm["spatial"]`` the centroid of
        each label's pixel centres in ``coordinate_system``, in the ``(x, y[, z])`` order of
        :func:`spatialdata.get_centroids`.

    Raises
    ------
    TypeError
        For ``sdata`` that is not a SpatialData object, ``stats`` that are not names, labels of a
        non-integer dtype (float, bool, complex: spatialdata's ``Labels2DModel`` admits them) or
        an image of a complex or object dtype; before any pixel is read.
    ValueError
        For an unknown element (or one of the other kind), statistic, channel or coordinate
        system, a repeated channel, elements on different pixel grids (the message says what
        differs), or a table that exists without ``overwrite``; all of these before any pixel is
        read. After the pass, for labels that hold no cell (spatialdata's ``TableModel`` admits
        no table without instances).

    Notes
    -----
    Negative ids are cells like any other (only 0 is background); ids keep the labels' dtype,
    ``uint64`` extremes included, in ``obs[instance_key]`` and as text in ``obs_names``, except
    that ``int8`` and ``uint8`` ids are stored as ``int16`` and ``uint16`` (spatialdata's
    ``TableModel`` admits no 8-bit instance ids). A NaN pixel makes that cell's statistic NaN in
    that channel (as NumPy).
    """
    resolved = plan(
        sdata,
        image,
        labels,
        stats,
        table_name=table_name,
        coordinate_system=coordinate_system,
        region_key=region_key,
        instance_key=instance_key,
        channels=channels,
        write=write,
        overwrite=overwrite,
    )
    table = compute_table(resolved)
    if table_name is not None:
        if write:
            store_table(sdata, table_name, table, overwrite=overwrite)
        sdata.tables[table_name] = table
    return table


def plan(
    sdata: SpatialData,
    image: str,
    labels: str,
    stats: str | Iterable[str] = ("mean",),
    *,
    table_name: str | None = None,
    coordinate_system: str = "global",
    region_key: str = "region",
    instance_key: str = "instance_id",
    channels: Sequence[Any] | None = None,
    write: bool = False,
    overwrite: bool = False,
) -> Plan:
    """Check every argument of :func:`aggregate` and resolve the pixels, reading none of them.

    Raises the errors of :func:`aggregate`.
    """
    from spatialdata import SpatialData

    if not isinstance(sdata, SpatialData):
        raise TypeError(f"'sdata' must be a spatialdata.SpatialData; got {type(sdata).__name__}")
    names, shape = _per_channel_stats(stats)
    image_element = _element(sdata, "images", image, "image")
    labels_element = _element(sdata, "labels", labels, "labels")
    if region_key == instance_key or "area" in (region_key, instance_key):
        raise ValueError(
            "'region_key' and 'instance_key' must differ from each other and from 'area' (the column of "
            f"pixel counts); got {region_key!r} and {instance_key!r}"
        )
    _check_table_name(sdata, table_name, write=write, overwrite=overwrite)

    pixels = scale0(image_element, f"image {image!r}")
    mask = scale0(labels_element, f"labels {labels!r}")
    image_axes = [d for d in ("z", "y", "x") if d in pixels.dims]
    label_axes = [d for d in ("z", "y", "x") if d in mask.dims]
    if "c" not in pixels.dims or image_axes != label_axes:
        raise ValueError(
            f"image {image!r} and labels {labels!r} must have the same spatial dims, as (c, y, x) with "
            f"(y, x) or (c, z, y, x) with (z, y, x); got {tuple(pixels.dims)} and {tuple(mask.dims)}"
        )
    if mask.dtype.kind not in "iu":
        raise TypeError(
            f"'labels' element {labels!r} must have an integer dtype (label ids); got {mask.dtype} "
            "(spatialdata's Labels models admit it; convert the element, e.g. with .astype('int32'))"
        )
    if pixels.dtype.kind not in "biuf":
        raise TypeError(
            f"'image' element {image!r} must have a real numeric dtype (bool, integer or float); "
            f"got {pixels.dtype}"
        )
    pixels = pixels.transpose("c", *image_axes)
    mask = mask.transpose(*label_axes)
    if channels is not None:
        pixels = _select_channels(pixels, channels, image)

    axes = image_axes[::-1]  # spatialdata's (x, y[, z])
    _, offset, labels_affine = locate(
        pixels, mask, coordinate_system, image_name=f"image {image!r}", labels_name=f"labels {labels!r}"
    )
    crop = _crop(pixels, mask, dict(zip(axes, offset, strict=True)), image, labels)

    return Plan(
        image=_by_pixel_index(crop, image_axes),
        labels=_by_pixel_index(mask, label_axes),
        image_name=image,
        labels_name=labels,
        stats=names,
        affine=labels_affine,
        coordinate_system=coordinate_system,
        region_key=region_key,
        instance_key=instance_key,
        shape=shape,
    )


def compute_table(resolved: Plan, *, progress: bool = False) -> AnnData:
    """Run the one pass over the planned pixels and build the table.

    With dask-backed elements (as read from a store) the pass runs here and its merged partials
    stay where dask computed them (on the workers, under ``dask.distributed``); ``X``,
    ``layers`` and the per-channel shape feature ``obsm["centroid_weighted"]`` are dask arrays
    over them, computed when the table is written (:func:`store_table`) or when you compute them
    (compute them together, as ``dask.compute(table.X, *table.layers.values())``, to finalize
    each piece of labels once). ``obs`` and the rest of ``obsm`` (one row per label: areas,
    centroids, the shape features of the labels alone) are computed here, in memory. NumPy-backed
    elements give NumPy arrays throughout.

    Parameters
    ----------
    resolved
        The plan made by :func:`plan`.
    progress
        Show dask's progress bar on stderr for what this call computes:
        ``dask.diagnostics.ProgressBar`` on the local schedulers, ``distributed.progress`` under
        a ``distributed.Client`` (for the pass, and then the areas and centroids).

    Raises
    ------
    TypeError
        For ``resolved`` that is not a :class:`Plan`.
    InputDataError
        (a ``ValueError``) for labels that hold no cell.
    """

    if not isinstance(resolved, Plan):
        raise TypeError(f"'resolved' must be a Plan made by plan(); got {type(resolved).__name__}")
    with progress_bars(progress):
        result = resolved.image.rasteragg.aggregate(
            resolved.labels, (*resolved.stats, *resolved.shape, "count", "center_of_mass")
        )
    return _table(resolved, result, progress=progress)


def compute_tables(plans: Sequence[Plan], *, progress: bool = False) -> dict[str, AnnData]:
    """:func:`compute_table` for several labels elements over one image, reading the image once.

    Parameters
    ----------
    plans
        Plans made by :func:`plan` for one image element and several labels elements, with the
        same statistics (as :func:`aggregate_labels` makes them).
    progress
        As in :func:`compute_table`.

    Returns
    -------
    dict
        One table per labels element, by its name, in the order of ``plans``.

    Raises
    ------
    TypeError
        For ``plans`` that are not :class:`Plan` objects.
    ValueError
        For plans of different images or statistics, or two plans of one labels element.
    InputDataError
        (a ``ValueError``) for labels that hold no cell.
    """
    from .accessor import aggregate_pairs

    plans = list(plans)
    if not plans or not all(isinstance(one, Plan) for one in plans):
        raise TypeError(f"'plans' must be a non-empty list of Plans made by plan(); got {plans!r}")
    kinds = {(one.image_name, one.stats) for one in plans}
    if len(kinds) > 1:
        raise ValueError(f"'plans' must share one image and one list of statistics; got {sorted(kinds)}")
    names = [one.labels_name for one in plans]
    if len(set(names)) < len(names):
        raise ValueError(f"'plans' must be of different labels elements; got {names}")
    stats = (*plans[0].stats, "count", "center_of_mass")
    with progress_bars(progress):
        results = aggregate_pairs({one.labels_name: (one.image, one.labels) for one in plans}, stats)
    return {one.labels_name: _table(one, results[one.labels_name], progress=progress) for one in plans}


def aggregate_labels(
    sdata: SpatialData,
    image: str,
    labels: Sequence[str],
    stats: str | Iterable[str] = ("mean",),
    *,
    coordinate_system: str = "global",
    region_key: str = "region",
    instance_key: str = "instance_id",
    channels: Sequence[Any] | None = None,
) -> dict[str, AnnData]:
    """:func:`aggregate` over several labels elements (cells, nuclei, ...), reading the image once.

    Every argument is checked for every labels element before any pixel is read; then one pass
    over the image serves all of them.

    Parameters
    ----------
    sdata, image, stats, coordinate_system, region_key, instance_key, channels
        As in :func:`aggregate`.
    labels
        Names of labels elements, each as ``labels`` in :func:`aggregate`.

    Returns
    -------
    dict
        One table per labels element (as :func:`aggregate` makes it), by its name. Put them into
        the SpatialData object, or into its store with :func:`store_table`.
    """
    if isinstance(labels, str) or not labels:
        raise ValueError(f"'labels' must be a list of labels element names; got {labels!r}")
    plans = [
        plan(
            sdata,
            image,
            name,
            stats,
            coordinate_system=coordinate_system,
            region_key=region_key,
            instance_key=instance_key,
            channels=channels,
        )
        for name in labels
    ]
    return compute_tables(plans)


def _table(resolved: Plan, result: xr.Dataset, *, progress: bool) -> AnnData:
    """The table of one labels element from the accessor's result (the statistics of the plan,
    ``count`` and ``center_of_mass``)."""
    import anndata as ad
    from spatialdata.models import TableModel

    ids = np.asarray(result["label"].values)
    if ids.shape[0] == 0:  # spatialdata's TableModel rejects a table that annotates no instance
        raise InputDataError(
            f"labels {resolved.labels_name!r} hold no cells over image {resolved.image_name!r}: every pixel "
            "is background (0); there is no table to make"
        )
    if ids.dtype.itemsize == 1:  # TableModel admits no 8-bit instance ids; widening keeps every id
        ids = ids.astype(np.int16 if ids.dtype.kind == "i" else np.uint16)
    channels = [str(c) for c in resolved.image["c"].values]
    # The features of the labels alone in one computation, so that each piece of labels is
    # finalized once for them; those per channel (the intensity-weighted centroid) are finalized
    # with X and layers, in the engine's group of theirs (stat_groups), and stay lazy with them.
    per_channel = stat_groups(resolved.shape).get("channels", ((), ()))[0]
    alone = [name for name in resolved.shape if name not in per_channel]
    area, centroids, *shape = _compute(
        result["count"].data,
        result["center_of_mass"].data,
        *(result[name].data for name in alone),
        progress=progress,
    )
    layers = {name: _as_float64(result[name].data) for name in resolved.stats}
    obs = pd.DataFrame(
        {
            resolved.instance_key: ids,
            resolved.region_key: pd.Categorical.from_codes(
                np.zeros(ids.shape[0], np.int8), categories=pd.Index([resolved.labels_name])
            ),
            "area": np.asarray(area, dtype=np.int64),
        },
        index=pd.Index(ids.astype(str)),
    )
    obsm = {"spatial": to_coordinate_system(np.asarray(centroids), resolved.affine)}
    for name, value in zip(alone, shape, strict=True):
        value = np.asarray(value)
        if value.ndim == 1:
            obs[name] = value
        else:
            obsm[name] = value.reshape(value.shape[0], -1)
    for name in per_channel:
        value = result[name].data
        obsm[name] = value.reshape(value.shape[0], -1)
    first, *others = resolved.stats
    table = ad.AnnData(
        X=layers[first],
        obs=obs,
        var=pd.DataFrame(index=pd.Index(channels)),
        layers={name: layers[name] for name in others},
        obsm=obsm,
        uns={
            "rasteragg": {
                "image": resolved.image_name,
                "labels": resolved.labels_name,
                "stats": list(resolved.stats),
                "shape": list(resolved.shape),
                "X": first,
                "coordinate_system": resolved.coordinate_system,
            }
        },
    )
    return TableModel.parse(
        table,
        region=resolved.labels_name,
        region_key=resolved.region_key,
        instance_key=resolved.instance_key,
    )


def store_table(
    sdata: SpatialData, name: str, table: AnnData, *, overwrite: bool = False, progress: bool = False
) -> None:
    """Write ``table`` as ``tables/<name>`` into the store that backs ``sdata``, all or nothing.

    spatialdata writes the table into a staging store beside the backing store (same
    filesystem); it is then renamed into place and the store's consolidated metadata updated.
    Should anything fail, the store's metadata files are restored, a replaced table moved back,
    and the store is byte for byte as before.

    A dask-backed ``X``, ``layers`` and ``obsm`` entries (as :func:`compute_table` makes them
    from dask-backed elements) are computed and written chunk by chunk by whoever runs dask's tasks, in one
    computation: on a ``dask.distributed`` cluster the workers write them (the staging folder
    must then be reachable from the workers at the same path, as the store is), and the client
    never holds them. (anndata writes dask arrays on the local threads whatever the scheduler,
    so these arrays are written here instead; everything else is spatialdata's.)

    Parameters
    ----------
    sdata
        The SpatialData object backed by the store to write into.
    name
        The table's name.
    table
        The table, e.g. from :func:`compute_table`.
    overwrite
        Replace a table of that name in the store; without it an existing table is an error.
    progress
        Show dask's progress bar on stderr for the computation of ``X`` and ``layers``
        (``dask.diagnostics.ProgressBar``, or ``distributed.progress`` under a
        ``distributed.Client``).

    Raises
    ------
    TypeError
        If ``sdata`` is not a SpatialData object or ``table`` not an AnnData.
    ValueError
        If ``name`` is not a valid element name, ``sdata`` is not backed by a store, or the table
        exists and ``overwrite`` is False.
    """
    from anndata import AnnData
    from spatialdata import SpatialData

    if not isinstance(sdata, SpatialData):
        raise TypeError(f"'sdata' must be a spatialdata.SpatialData; got {type(sdata).__name__}")
    if not isinstance(table, AnnData):
        raise TypeError(f"'table' must be an anndata.AnnData; got {type(table).__name__}")
    problem = _name_problem(name)
    if problem:
        raise ValueError(f"'name' {name!r} is not a valid element name: {problem}")
    if sdata.path is None:
        raise ValueError("'sdata' is not backed by a zarr store; write it with sdata.write(path) first")
    store = Path(sdata.path)
    tables = store / "tables"
    target = tables / name
    if target.exists() and not overwrite:
        raise ValueError(
            f"the store {str(store)!r} already has a table {name!r}; pass overwrite=True to replace it"
        )
    with tempfile.TemporaryDirectory(prefix=f".{store.name}.rasteragg-", dir=store.parent) as tmp:
        staging = Path(tmp)
        skeleton, lazy = _without_dask_arrays(table)
        with warnings.catch_warnings():  # the staging store holds the table without its labels
            warnings.filterwarnings("ignore", message="The table is annotating", category=UserWarning)
            staged = SpatialData(tables={name: skeleton})
        staged.write(staging / "staged.zarr")
        staged_tables = staging / "staged.zarr" / "tables"
        _compute(*_stores_of(staged_tables / name, lazy), progress=progress)
        saved = _metadata_snapshot(store)
        had_tables = tables.exists()
        replaced = staging / "replaced"
        made_tables = moved_old = moved_new = False
        try:
            if not had_tables:
                os.rename(staged_tables, tables)
                made_tables = True
            else:
                if target.exists():
                    os.rename(target, replaced)
                    moved_old = True
                os.rename(staged_tables / name, target)
                moved_new = True
            _consolidate(store)
        except BaseException:
            if made_tables:
                shutil.rmtree(tables)
            if moved_new:
                shutil.rmtree(target)
            if moved_old:
                os.rename(replaced, target)
            _restore_metadata(store, saved)
            raise


# -- checks ---------------------------------------------------------------------------------


def _per_channel_stats(stats: str | Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The per-channel statistics (for ``X`` and ``layers``) and the shape features of ``stats``."""
    per_channel = [name for name, spec in STATISTICS.items() if spec.dims == ("c",)]
    names: tuple[Any, ...] | None = (
        (stats,) if isinstance(stats, str) else tuple(stats) if isinstance(stats, Iterable) else None
    )
    if names is None or not all(isinstance(name, str) for name in names):
        raise TypeError(
            f"'stats' must be a statistic name or a sequence of names from {per_channel}; got {stats!r}"
        )
    if not names:
        raise ValueError(f"'stats' must name at least one statistic of {per_channel}; got an empty list")
    unknown = [name for name in names if name not in STATISTICS]
    if unknown:
        raise ValueError(
            f"'stats' holds unknown statistic(s) {unknown}; expected names from {per_channel} or shape "
            f"features from {sorted(SHAPE_FEATURES)}"
        )
    shape = tuple(dict.fromkeys(name for name in names if name in SHAPE_FEATURES and name != "area"))
    names = tuple(name for name in names if name not in SHAPE_FEATURES)
    if not names:
        raise ValueError(f"'stats' must name at least one per-channel statistic (for X) of {per_channel}")
    fixed = [name for name in names if name in _ALWAYS]
    if fixed:
        where = ", ".join(f"{name!r} is always in {_ALWAYS[name]}" for name in fixed)
        raise ValueError(
            f"'stats' must name per-channel statistics only ({where}); got {list(names)}; expected names "
            f"from {per_channel}"
        )
    return tuple(dict.fromkeys(names)), shape


def _element(sdata: SpatialData, kind: str, name: str, argument: str) -> Any:
    elements = getattr(sdata, kind)
    if name not in elements:
        others = [k for k in ("images", "labels", "points", "shapes", "tables") if name in getattr(sdata, k)]
        hint = f" ({name!r} is one of its {others[0]})" if others else ""
        raise ValueError(
            f"'{argument}' must name one of the {kind} elements {sorted(elements)}; got {name!r}{hint}"
        )
    return elements[name]


def _check_table_name(sdata: SpatialData, name: str | None, *, write: bool, overwrite: bool) -> None:
    if name is None:
        if write:
            raise ValueError("'write=True' needs a 'table_name' to write the table under; got None")
        return
    problem = _name_problem(name)
    if problem:
        raise ValueError(f"'table_name' {name!r} is not a valid element name: {problem}")
    taken = [k for k in ("images", "labels", "points", "shapes") if name in getattr(sdata, k)]
    if taken:
        raise ValueError(
            f"'table_name' {name!r} is already the name of one of the {taken[0]}; choose another"
        )
    on_disk = write and sdata.path is not None and (Path(sdata.path) / "tables" / name).exists()
    if (name in sdata.tables or on_disk) and not overwrite:
        raise ValueError(
            f"a table {name!r} already exists; pass overwrite=True (--overwrite on the command line) to "
            "replace it"
        )
    if write and sdata.path is None:
        raise ValueError("'write=True' needs 'sdata' backed by a zarr store; write it with sdata.write(path)")


def _name_problem(name: Any) -> str:
    """Why ``name`` breaks spatialdata's naming rules for elements ("" when it does not)."""
    if not isinstance(name, str):
        return f"it must be a string, not {type(name).__name__}"
    if name in ("", ".", ".."):
        return "it must not be empty, '.' or '..'"
    if name.startswith("__"):
        return "it must not start with '__'"
    if not all(c.isalnum() or c in "_-." for c in name):
        return "it may hold only letters, digits, '_', '-' and '.'"
    return ""


def _select_channels(pixels: xr.DataArray, channels: Sequence[Any], image: str) -> xr.DataArray:
    wanted = [channels] if isinstance(channels, str) else list(channels)
    present = list(pixels["c"].values)
    as_text = {str(c): c for c in present}
    missing = [c for c in wanted if c not in present and str(c) not in as_text]
    if not wanted or missing:
        raise ValueError(
            f"'channels' must name channels of image {image!r} {[str(c) for c in present]}; got "
            f"{[str(c) for c in wanted]}" + (f" ({missing} not there)" if missing else "")
        )
    repeated = sorted({str(c) for c in wanted if wanted.count(c) > 1})
    if repeated:
        raise ValueError(
            f"'channels' must name each channel of image {image!r} once; got {[str(c) for c in wanted]} "
            f"({repeated} repeated)"
        )
    keys = [c if c in present else as_text[str(c)] for c in wanted]
    return pixels.sel(c=keys)


def _crop(
    pixels: xr.DataArray, mask: xr.DataArray, offset: dict[str, int], image: str, labels: str
) -> xr.DataArray:
    """The image cut to the labels' extent; an error when the labels reach outside the image."""
    outside = []
    for dim, start in offset.items():
        stop = start + mask.sizes[dim]
        if start < 0 or stop > pixels.sizes[dim]:
            outside.append(f"{dim} {start}..{stop - 1} (the image has 0..{pixels.sizes[dim] - 1})")
    if outside:
        raise ValueError(
            f"labels {labels!r} reach outside image {image!r}: in image pixels they cover "
            f"{'; '.join(outside)}; crop the labels to the image first"
        )
    return pixels.isel({dim: slice(start, start + mask.sizes[dim]) for dim, start in offset.items()})


def _by_pixel_index(array: xr.DataArray, dims: Sequence[str]) -> xr.DataArray:
    """``array`` stripped of what places it (spatial coordinates, transformations): pixel indices."""
    plain = array.drop_vars([d for d in dims if d in array.coords]).copy(deep=False)
    plain.attrs = {key: value for key, value in plain.attrs.items() if key != "transform"}
    return plain


# -- computing and writing ------------------------------------------------------------------


def _as_float64(values: Any) -> Any:
    """``values`` as float64: a dask array stays a (lazy) dask array."""
    if isinstance(values, da.Array):
        return values if values.dtype == np.float64 else values.astype(np.float64)
    return np.asarray(values, dtype=np.float64)


def _compute(*values: Any, progress: bool) -> tuple[Any, ...]:
    """``dask.compute(*values)``, with dask's own progress bar on stderr when asked for.

    Under a ``distributed.Client`` the bar is ``distributed.progress`` on the futures (it writes
    to stdout, sent to stderr here); on the local schedulers ``dask.diagnostics.ProgressBar``.
    """
    client = distributed_client()
    if not progress or not any(dask.is_dask_collection(v) for v in values):
        return dask.compute(*values)
    if client is None:
        with progress_bars(progress):
            return dask.compute(*values)
    from distributed import progress as show_progress

    futures = client.compute(list(values))
    with contextlib.redirect_stdout(sys.stderr):
        show_progress(futures, notebook=False)
    return tuple(client.gather(futures))


def _without_dask_arrays(table: AnnData) -> tuple[AnnData, dict[str, da.Array]]:
    """``table`` without its dask-backed ``X``, ``layers`` and ``obsm`` entries, and those arrays
    by their path in the table's group (``X``, ``layers/<name>``, ``obsm/<name>``)."""
    import anndata as ad

    lazy: dict[str, da.Array] = {}
    if isinstance(table.X, da.Array):
        lazy["X"] = table.X
    lazy.update({f"layers/{k}": v for k, v in table.layers.items() if isinstance(v, da.Array)})
    lazy.update({f"obsm/{k}": v for k, v in table.obsm.items() if isinstance(v, da.Array)})
    if not lazy:
        return table, lazy
    skeleton = ad.AnnData(
        X=None if "X" in lazy else table.X,
        obs=table.obs,
        var=table.var,
        uns=dict(table.uns),
        obsm={k: v for k, v in table.obsm.items() if f"obsm/{k}" not in lazy},
        varm=dict(table.varm),
        obsp=dict(table.obsp),
        varp=dict(table.varp),
        layers={k: v for k, v in table.layers.items() if f"layers/{k}" not in lazy},
    )
    if table.raw is not None:
        skeleton.raw = table.raw
    return skeleton, lazy


def _stores_of(group: Path, lazy: dict[str, da.Array]) -> list[Any]:
    """Lazy writes of the dask arrays ``lazy`` into the table's zarr ``group``, one zarr chunk per
    dask chunk (no lock needed), each array created and tagged by anndata's own writer."""
    import zarr
    from anndata.experimental import write_dispatched

    root = zarr.open_group(group, mode="r+")
    stores: list[Any] = []

    def write(func: Any, store: Any, key: str, elem: Any, *, iospec: Any, dataset_kwargs: Any) -> None:
        if not isinstance(elem, da.Array):
            func(store, key, elem, dataset_kwargs=dataset_kwargs)
            return
        chunks = tuple(max(1, max(sizes, default=1)) for sizes in elem.chunks)
        if any(len(set(sizes[:-1])) > 1 or (sizes and sizes[-1] > sizes[0]) for sizes in elem.chunks):
            elem = elem.rechunk(chunks)
        target = store.create_array(key, shape=elem.shape, dtype=elem.dtype, chunks=chunks)
        target.attrs.update(
            {"encoding-type": iospec.encoding_type, "encoding-version": iospec.encoding_version}
        )
        stores.append(da.store(elem, target, lock=False, compute=False))

    for path, values in lazy.items():
        parent, _, key = path.rpartition("/")
        write_dispatched(root.require_group(parent) if parent else root, key, values, callback=write)
    return stores


# -- the store's metadata --------------------------------------------------------------------


def _metadata_snapshot(store: Path) -> dict[Path, bytes | None]:
    """Bytes of the metadata files at the store's root and in its ``tables`` group (None: absent)."""
    return {folder / name: _read(folder / name) for folder in (store, store / "tables") for name in _METADATA}


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _restore_metadata(store: Path, saved: dict[Path, bytes | None]) -> None:
    for path, content in saved.items():
        if content is None:
            if path.is_file():
                path.unlink()
        elif _read(path) != content:
            path.write_bytes(content)


def _consolidate(store: Path) -> None:
    """Update the store's consolidated metadata, where it has any (as spatialdata does)."""
    import zarr

    root = zarr.open_group(store, mode="r")
    if root.metadata.consolidated_metadata is None and not (store / ".zmetadata").exists():
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)
        zarr.consolidate_metadata(store)
