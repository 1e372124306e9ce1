"""MCQuant's single-cell quantification, with the image read once, block by block, for all masks.

:func:`quantify` takes what MCQuant (MCMICRO's ``mcquant``) takes -- label masks, a multi-channel
image and a markers file -- and writes what it writes: per mask, ``<image>_<mask>.csv`` with the
columns ``CellID``, one mean intensity per marker (in marker order), ``<marker>_<prop>`` for each
further intensity property, further mask properties, and then ``X_centroid``, ``Y_centroid``,
``Area``, ``MajorAxisLength``, ``MinorAxisLength``, ``Eccentricity``, ``Solidity``, ``Extent``,
``Orientation`` (scikit-image's ``regionprops`` values). Where MCQuant loads the image channel by
channel and calls ``regionprops`` once per channel per mask, here the files are read lazily
(:mod:`xr_rasteragg.io`), every mask is aggregated in one pass over the image
(:meth:`~xr_rasteragg.accessor.RasterAggAccessor.aggregate_masks`), and memory is set by the
blocks, not by the image.

Everything is checked before any pixel is read (:func:`plan`); the tables are written to
temporary files in the output folder and renamed into place only when all are complete.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import dask
import numpy as np
import pandas as pd
import xarray as xr

from .accessor import RasterAggAccessor  # noqa: F401  (registers DataArray.rasteragg)
from .csv_tables import write_csv
from .engine import progress as progress_bars
from .io import read_image, read_labels
from .stats import STATISTICS

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "DEFAULT_MASK_COLUMNS",
    "INTENSITY_PROPS",
    "Format",
    "Quantification",
    "mask_name",
    "plan",
    "quantify",
    "read_markers",
    "unique_names",
]

Format = Literal["csv", "h5ad", "spatialdata"]

#: MCQuant's intensity properties (scikit-image's names, their old aliases and MCQuant's own
#: extras), and the per-channel statistic that computes each. ``intensity_mean`` is always in the
#: table, as the bare marker columns.
INTENSITY_PROPS = {
    "intensity_mean": "mean",
    "mean_intensity": "mean",
    "intensity_max": "max",
    "max_intensity": "max",
    "intensity_min": "min",
    "min_intensity": "min",
    "intensity_std": "std",
    "std_intensity": "std",
    "intensity_sum": "sum",
    "intensity_median": "median",
    "gini_index": "gini_index",
}

#: MCQuant's mask columns, always in its tables, after every other column: the column, the
#: statistic that computes it and, for statistics of several values, which one (by spatial axis).
DEFAULT_MASK_COLUMNS: dict[str, tuple[str, str | None]] = {
    "X_centroid": ("center_of_mass", "x"),
    "Y_centroid": ("center_of_mass", "y"),
    "Area": ("count", None),
    "MajorAxisLength": ("axis_major_length", None),
    "MinorAxisLength": ("axis_minor_length", None),
    "Eccentricity": ("eccentricity", None),
    "Solidity": ("solidity", None),
    "Extent": ("extent", None),
    "Orientation": ("orientation", None),
}
#: scikit-image's mask properties behind the default columns (MCQuant asks for them by these
#: names); naming one in ``mask_props`` adds no column, as in MCQuant.
_DEFAULT_MASK_PROPS = {
    "label",
    "centroid",
    "area",
    "major_axis_length",
    "axis_major_length",
    "minor_axis_length",
    "axis_minor_length",
    "eccentricity",
    "solidity",
    "extent",
    "orientation",
}
#: scikit-image's old names of mask properties.
_MASK_ALIASES = {
    "bbox_area": "area_bbox",
    "convex_area": "area_convex",
    "filled_area": "area_filled",
    "equivalent_diameter": "equivalent_diameter_area",
}
#: Columns of the table that are not statistics.
_INSTANCE, _REGION = "CellID", "region"


@dataclass(frozen=True)
class Quantification:
    """Everything :func:`plan` checked and resolved, before any pixel is read.

    Attributes
    ----------
    image
        The image, dims ``("c", ["z",] "y", "x")``, channels named by the markers.
    masks
        The masks by name (MCQuant's: the file name up to its first dot), in the given order.
    image_name
        The image's name (the file name without ``.tif``/``.ome.tif``), the start of each table's.
    intensity_props
        The intensity properties after ``intensity_mean``, as given: each adds a column per marker.
    mask_props
        The further mask properties, as given (their statistic's name after the alias).
    outputs
        The file (or store) written for each mask; one store for all masks with ``spatialdata``.
    format, overwrite
        As passed to :func:`plan`.
    """

    image: xr.DataArray
    masks: dict[str, xr.DataArray]
    image_name: str
    intensity_props: tuple[str, ...]
    mask_props: tuple[str, ...]
    outputs: dict[str, Path]
    format: Format
    overwrite: bool

    @property
    def mask_columns(self) -> dict[str, tuple[str, str | None]]:
        """MCQuant's default mask columns that are defined for the masks' number of dims (all in
        2-D; in 3-D, scikit-image defines no eccentricity or orientation)."""
        ndim = len([d for d in self.image.dims if d != "c"])
        return {col: spec for col, spec in DEFAULT_MASK_COLUMNS.items() if ndim in STATISTICS[spec[0]].ndims}

    @property
    def stats(self) -> tuple[str, ...]:
        """The statistics of the one pass, each once."""
        names = ["mean", *(INTENSITY_PROPS.get(p, p) for p in self.intensity_props)]
        names += [stat for stat, _ in self.mask_columns.values()]
        names += [_MASK_ALIASES.get(p, p) for p in self.mask_props]
        return tuple(dict.fromkeys(names))


def read_markers(path: str | Path, *, argument: str = "channel_names") -> list[str]:
    """Marker names from a markers file, as MCQuant reads them.

    Parameters
    ----------
    path
        A CSV file with a ``marker_name`` column (MCMICRO's ``markers.csv``), or a file of one
        name a line (no header).
    argument
        How error messages name the file.

    Returns
    -------
    list of str
        One name per image channel, in order. A name that occurs more than once gets a suffix at
        every occurrence, ``_1``, ``_2``, ... in order (``DNA, DNA`` becomes ``DNA_1, DNA_2``),
        as MCQuant does.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is empty, has several columns but no ``marker_name``, has an empty name, or
        its names collide once suffixed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"'{argument}' {str(path)!r} does not exist (or is not a file)")
    try:
        table = pd.read_csv(path)
        if "marker_name" in table.columns:
            names = list(table["marker_name"])
        elif table.shape[1] == 1:
            names = list(pd.read_csv(path, header=None).iloc[:, 0])
        else:
            raise ValueError(
                f"'{argument}' {str(path)!r} must have a 'marker_name' column or one name a line; got "
                f"columns {list(table.columns)}"
            )
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise ValueError(f"'{argument}' {str(path)!r} is not a markers file: {error}") from error
    blank = [i for i, name in enumerate(names) if pd.isna(name) or not str(name).strip()]
    if blank:
        raise ValueError(f"'{argument}' {str(path)!r} has empty marker names in rows {blank}")
    return unique_names([str(name).strip() for name in names], f"'{argument}' {str(path)!r}")


def unique_names(names: Sequence[str], source: str) -> list[str]:
    """``names`` with each name that occurs more than once suffixed at every occurrence, ``_1``,
    ``_2``, ... in order, as MCQuant does; ``source`` (what named them) is for the error.

    Raises
    ------
    ValueError
        If a suffixed name is another name of the list (``DNA, DNA, DNA_2``).
    """
    suffixed = [f"{n}_{names[:i].count(n) + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    clashes = sorted({n for n in suffixed if suffixed.count(n) > 1})
    if clashes:
        raise ValueError(
            f"{source} gives columns {clashes} twice once repeated names are suffixed (_1, _2, ...); "
            "rename the markers"
        )
    return suffixed


def mask_name(path: str | Path) -> str:
    """A mask's name in the tables' file names, as MCQuant takes it: its file name up to the
    first dot (``cellMask.ome.tif`` gives ``cellMask``)."""
    return Path(path).name.split(".")[0]


def plan(
    masks: Sequence[str | Path],
    image: str | Path,
    output: str | Path,
    *,
    channel_names: str | Path | None = None,
    mask_props: Sequence[str] = (),
    intensity_props: Sequence[str] = (),
    format: Format = "csv",
    overwrite: bool = False,
) -> Quantification:
    """Check every argument of :func:`quantify` and open the files, reading no pixel.

    Raises the errors of :func:`quantify`.
    """
    if format not in get_args(Format):
        raise ValueError(f"'format' must be one of {list(get_args(Format))}; got {format!r}")
    if isinstance(masks, str | Path) or not masks:
        raise ValueError(f"'masks' must be a list of one or more mask files; got {masks!r}")
    names = [mask_name(m) for m in masks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"'masks' must have distinct names (the file name up to the first dot names the table); got "
            f"{[str(m) for m in masks]} ({repeated} repeated)"
        )
    intensity = _intensity_props(intensity_props)
    shape_props = _mask_props(mask_props)

    pixels = read_image(image, argument="image")
    loaded = {name: read_labels(path, argument="masks") for name, path in zip(names, masks, strict=True)}
    spatial = [d for d in ("z", "y", "x") if d in pixels.dims]
    for labels, path in zip(loaded.values(), masks, strict=True):
        if list(labels.dims) != spatial:
            raise ValueError(
                f"'masks' {str(path)!r} is {labels.ndim}-D {tuple(labels.dims)} but 'image' {str(image)!r} "
                f"is {len(spatial)}-D {tuple(spatial)} (plus channels); a mask must have the image's "
                "spatial dims"
            )
        expected = tuple(pixels.sizes[d] for d in spatial)
        if labels.shape != expected:
            raise ValueError(
                f"'masks' {str(path)!r} has shape {labels.shape} but 'image' {str(image)!r} has {spatial} "
                f"shape {expected}; a mask must cover the image's pixels"
            )
    pixels = pixels.assign_coords(c=_channel_names(pixels, channel_names, image))
    undefined = [p for p in shape_props if len(spatial) not in STATISTICS[_MASK_ALIASES.get(p, p)].ndims]
    if undefined:
        raise ValueError(f"'mask_props' {undefined} are not defined for {len(spatial)}-D masks")

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"'output' {str(output)!r} must be a folder; it is a file")
    stem = str(pixels.name)  # MCQuant's: the file name without .tif (and .ome)
    if format == "spatialdata":
        outputs = {name: output / f"{stem}.zarr" for name in names}
    else:
        outputs = {name: output / f"{stem}_{name}.{format}" for name in names}
    existing = sorted({str(path) for path in outputs.values() if path.exists()})
    if existing and not overwrite:
        raise ValueError(f"'output' already holds {existing}; pass overwrite=True (--overwrite) to replace")
    return Quantification(
        image=pixels,
        masks=loaded,
        image_name=stem,
        intensity_props=intensity,
        mask_props=shape_props,
        outputs=outputs,
        format=format,
        overwrite=overwrite,
    )


def quantify(
    masks: Sequence[str | Path],
    image: str | Path,
    output: str | Path,
    *,
    channel_names: str | Path | None = None,
    mask_props: Sequence[str] = (),
    intensity_props: Sequence[str] = (),
    format: Format = "csv",
    overwrite: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Quantify an image over one or more masks, as MCQuant does, reading the image once.

    Parameters
    ----------
    masks
        Label mask files (TIFF, zarr or OME-Zarr; integer ids, 0 for background), of the
        image's spatial shape. Each gives one table, named after the mask's file name up to its
        first dot.
    image
        The image: OME-TIFF, TIFF or (OME-)zarr, see :func:`xr_rasteragg.io.read_image`.
    output
        The folder to write to (made if missing).
    channel_names
        A markers file (see :func:`read_markers`), one name per channel. None takes the channel
        names from the image's OME metadata.
    mask_props
        scikit-image ``regionprops`` names of further mask properties, each one column (or one per
        value, ``<prop>-<i>``), before ``X_centroid``. The default columns' properties add none.
    intensity_props
        Further intensity properties, each giving a column ``<marker>_<prop>`` per marker:
        scikit-image's ``intensity_max``, ``intensity_min``, ``intensity_std``, MCQuant's
        ``intensity_sum`` and ``intensity_median``, or any per-channel statistic of
        :data:`~xr_rasteragg.stats.STATISTICS` by its name (``var``, ``skew``, ...).
    format
        ``csv``: MCQuant's tables, ``<image>_<mask>.csv``. ``h5ad``: the same as AnnData,
        ``<image>_<mask>.h5ad`` (``X`` the mean intensities, a layer per further intensity
        property, the mask columns in ``obs``, the centroids in ``obsm["spatial"]``, parsed with
        spatialdata's ``TableModel``: region ``<mask>``, region key ``region``, instance key
        ``CellID``). ``spatialdata``: one SpatialData store ``<image>.zarr`` with each mask as a
        labels element and its table (the h5ad one) under ``tables/<mask>_table``.
    overwrite
        Replace tables (or a store) that exist; without it they are an error.
    progress
        Show dask's progress bars on stderr (see :func:`xr_rasteragg.progress`).

    Returns
    -------
    list of Path
        The files (or store) written.

    Raises
    ------
    FileNotFoundError
        For a file that does not exist.
    ValueError
        Before any pixel is read: for a file that is not an image, a mask whose dims (2-D, 3-D) or
        shape differ from the image's, a markers file whose count differs from the image's
        channels (or no names at all), an unknown or unavailable property, an output that
        exists (without ``overwrite``).
    TypeError
        For a mask of a non-integer dtype or an image that is not real numbers.
    """
    resolved = plan(
        masks,
        image,
        output,
        channel_names=channel_names,
        mask_props=mask_props,
        intensity_props=intensity_props,
        format=format,
        overwrite=overwrite,
    )
    return write(resolved, compute(resolved, progress=progress))


def compute(resolved: Quantification, *, progress: bool = False) -> dict[str, pd.DataFrame]:
    """MCQuant's table of each mask, from one pass over the image for all masks (the intensity
    properties, ``intensity_median`` included, and the mask properties alike)."""
    with progress_bars(progress):
        results = resolved.image.rasteragg.aggregate_masks(resolved.masks, resolved.stats)
        (computed,) = dask.compute(results)
    return {name: _table(resolved, dataset) for name, dataset in computed.items()}


def write(resolved: Quantification, tables: Mapping[str, pd.DataFrame]) -> list[Path]:
    """Write the tables in :attr:`Quantification.format`, all or nothing.

    Each file is written under a temporary name in the output folder and renamed into place once
    every one is complete; on a failure the temporary files are removed and nothing is replaced.
    """
    folder = next(iter(resolved.outputs.values())).parent
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staged: dict[Path, Path] = {}
    try:
        if resolved.format == "spatialdata":
            target = next(iter(resolved.outputs.values()))
            staged[target] = folder / f".{target.name}.{token}.tmp"
            _write_store(resolved, tables, staged[target])
        else:
            for name, target in resolved.outputs.items():
                staged[target] = folder / f".{target.name}.{token}.tmp"
                if resolved.format == "csv":
                    write_csv(tables[name], staged[target])
                else:
                    _anndata(resolved, name, tables[name]).write_h5ad(staged[target])
        for target, temporary in staged.items():
            _replace(temporary, target)
    finally:
        for temporary in staged.values():
            _remove(temporary)
    return list(dict.fromkeys(resolved.outputs.values()))


# -- checks ------------------------------------------------------------------------------------


def _intensity_props(props: Sequence[str]) -> tuple[str, ...]:
    per_channel = sorted(name for name, spec in STATISTICS.items() if spec.per_channel)
    known = sorted(set(INTENSITY_PROPS) | set(per_channel))
    unknown = [p for p in props if p not in INTENSITY_PROPS and p not in per_channel]
    if unknown:
        raise ValueError(f"'intensity_props' holds unknown properties {unknown}; expected names from {known}")
    missing = [p for p in props if INTENSITY_PROPS.get(p, p) not in STATISTICS]
    if missing:
        raise ValueError(f"'intensity_props' {missing} are not available yet in xr_rasteragg; leave them out")
    return tuple(p for p in dict.fromkeys(props) if INTENSITY_PROPS.get(p) != "mean")


def _mask_props(props: Sequence[str]) -> tuple[str, ...]:
    extra = [p for p in dict.fromkeys(props) if p not in _DEFAULT_MASK_PROPS]
    unknown = [
        p
        for p in extra
        if _MASK_ALIASES.get(p, p) not in STATISTICS or STATISTICS[_MASK_ALIASES.get(p, p)].per_channel
    ]
    if unknown:
        raise ValueError(
            f"'mask_props' {unknown} are not available (yet) in xr_rasteragg; available: "
            f"{sorted(_DEFAULT_MASK_PROPS)} (always in the table)"
        )
    return tuple(extra)


def _channel_names(pixels: xr.DataArray, channel_names: str | Path | None, image: str | Path) -> list[str]:
    nchan = pixels.sizes["c"]
    if channel_names is None:
        if pixels["c"].dtype.kind in "iu":
            raise ValueError(
                f"'channel_names' is needed: 'image' {str(image)!r} names no channels (no OME channel "
                "names); give a markers file"
            )
        return unique_names(
            [str(c) for c in pixels["c"].values], f"the channel names of 'image' {str(image)!r}"
        )
    markers = read_markers(channel_names)
    if len(markers) != nchan:
        raise ValueError(
            f"'channel_names' {str(channel_names)!r} names {len(markers)} markers but 'image' "
            f"{str(image)!r} has {nchan} channels"
        )
    return markers


# -- tables ------------------------------------------------------------------------------------


def _table(resolved: Quantification, dataset: xr.Dataset) -> pd.DataFrame:
    """MCQuant's column layout for one mask's statistics."""
    markers = [str(c) for c in resolved.image["c"].values]
    columns: dict[str, Any] = {_INSTANCE: np.asarray(dataset["label"].values)}
    columns.update(zip(markers, np.asarray(dataset["mean"].values).T, strict=True))
    for prop in resolved.intensity_props:
        values = np.asarray(dataset[INTENSITY_PROPS.get(prop, prop)].values).T
        columns.update(zip([f"{m}_{prop}" for m in markers], values, strict=True))
    for prop in resolved.mask_props:
        values = np.asarray(dataset[_MASK_ALIASES.get(prop, prop)].values)
        if values.ndim == 1:
            columns[prop] = values
        else:
            columns.update({f"{prop}-{i}": column for i, column in enumerate(values.T)})
    for column, (stat, axis) in resolved.mask_columns.items():
        chosen = dataset[stat] if axis is None else dataset[stat].sel(axis=axis)
        # Area as scikit-image gives it (and MCQuant writes it): a float.
        columns[column] = np.asarray(chosen.values, dtype=np.float64)
    if "z" in resolved.image.dims:
        columns["Z_centroid"] = np.asarray(dataset["center_of_mass"].sel(axis="z").values)
    return pd.DataFrame(columns)


def _anndata(resolved: Quantification, mask: str, table: pd.DataFrame) -> AnnData:
    """One mask's table as AnnData with spatialdata's ``TableModel`` conventions."""
    import anndata as ad
    from spatialdata.models import TableModel

    markers = [str(c) for c in resolved.image["c"].values]
    ids = table[_INSTANCE].to_numpy()
    obs_columns = [c for c in table.columns if c not in markers and not _is_marker_column(c, resolved)]
    obs = table[obs_columns].copy()
    obs.insert(1, _REGION, pd.Series(pd.Categorical([mask] * len(obs), categories=[mask]), index=obs.index))
    obs.index = pd.Index(ids.astype(str))
    layers = {
        prop: table[[f"{m}_{prop}" for m in markers]].to_numpy(np.float64)
        for prop in resolved.intensity_props
    }
    centroid_columns = ["X_centroid", "Y_centroid"] + (["Z_centroid"] if "Z_centroid" in table else [])
    adata = ad.AnnData(
        X=table[markers].to_numpy(np.float64),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(markers)),
        layers=layers,
        obsm={"spatial": table[centroid_columns].to_numpy(np.float64)},
        uns={"rasteragg": {"image": resolved.image_name, "mask": mask, "X": "intensity_mean"}},
    )
    return TableModel.parse(adata, region=mask, region_key=_REGION, instance_key=_INSTANCE)


def _is_marker_column(column: str, resolved: Quantification) -> bool:
    markers = [str(c) for c in resolved.image["c"].values]
    return any(column == f"{m}_{p}" for m in markers for p in resolved.intensity_props)


def _write_store(resolved: Quantification, tables: Mapping[str, pd.DataFrame], path: Path) -> None:
    """A SpatialData store at ``path``: each mask as a labels element, annotated by its table."""
    from spatialdata import SpatialData
    from spatialdata.models import Labels2DModel, Labels3DModel

    labels = {}
    for name, mask in resolved.masks.items():
        model = Labels3DModel if "z" in mask.dims else Labels2DModel
        labels[name] = model.parse(mask.data, dims=tuple(mask.dims))
    tables_by_name = {f"{name}_table": _anndata(resolved, name, table) for name, table in tables.items()}
    SpatialData(labels=labels, tables=tables_by_name).write(path)


# -- files -------------------------------------------------------------------------------------


def _replace(temporary: Path, target: Path) -> None:
    """Move ``temporary`` to ``target``, replacing a file or folder there."""
    if target.is_dir():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.rename(target, old)
        os.rename(temporary, target)
        shutil.rmtree(old)
    else:
        os.replace(temporary, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
