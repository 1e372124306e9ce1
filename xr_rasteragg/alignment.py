"""Where the pixels of an image and of its labels meet: one pixel grid and a whole-pixel offset.

Two things say where a raster's pixels lie, and both are honoured:

- **Coordinates** (plain xarray): image and labels that carry coordinates on a spatial dim are
  aligned on them, cut to the pixels they share.
- **SpatialData transformations**: a SpatialData element carries its placement in
  ``attrs["transform"]``, one transformation per coordinate system, while its coordinates are its
  pixel centres in its own (intrinsic) space and restart at 0.5 in every element. Two elements are
  aligned by mapping both pixel grids into one coordinate system: they must coincide up to a
  whole-pixel offset.

:func:`align` serves the accessor. The SpatialData adapter calls :func:`locate` (which
:func:`align` calls for two elements) so that both check a pixel grid the same way, and
:func:`scale0` and :func:`to_coordinate_system` as the accessor does. ``spatialdata`` is imported
only to recognise a mapping found in ``attrs["transform"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr
from numpy.typing import NDArray

__all__ = ["Aligned", "align", "locate", "scale0", "to_coordinate_system", "transformations"]

SPATIAL = ("z", "y", "x")
#: Positions on two coordinate grids closer than this fraction of a pixel (beyond the rounding of
#: the coordinates' dtypes) are the same pixel.
GRID_TOLERANCE = 1e-3
#: How far (in pixels) two transformed pixel grids may differ and still be one grid.
AFFINE_TOLERANCE = 1e-6
#: The coordinate system chosen among several that both elements share.
DEFAULT_SYSTEM = "global"
#: Names in messages.
IMAGE, LABELS = "the image", "'labels'"


@dataclass(frozen=True)
class Aligned:
    """Image and labels cut to the pixels they share, and where the labels' pixels lie.

    Attributes
    ----------
    image
        The image cut to the shared pixels (None when only labels were given).
    labels
        The labels cut to the same pixels.
    affine
        When the labels carry a SpatialData transformation: the homogeneous matrix from the
        labels' pixel indices ``(x, y[, z])`` (pixel ``i`` spans ``[i, i + 1)``) to the
        coordinate system; None when positions are the labels' coordinate values.
    """

    image: xr.DataArray | None
    labels: xr.DataArray
    affine: NDArray[np.float64] | None = None


def align(image: xr.DataArray | None, labels: xr.DataArray, coordinate_system: str | None = None) -> Aligned:
    """Cut image and labels to the pixels they share, on their transformations or coordinates.

    Parameters
    ----------
    image
        Image with dims ⊆ ``{c, z, y, x}``, or None for labels alone.
    labels
        Labels with the image's spatial dims.
    coordinate_system
        The SpatialData coordinate system to align in; None picks the one both share (of several,
        ``"global"``).

    Returns
    -------
    Aligned
        Both arrays over the same pixels, in the same order.

    Raises
    ------
    ValueError
        When both carry transformations that do not map them onto one pixel grid with a
        whole-pixel offset, or do not overlap there; when only one carries a transformation and
        it is not the identity (the other's placement is unknown); when ``coordinate_system`` is
        not theirs, or they share none or several without ``"global"``; and for the coordinate
        mismatches of plain arrays.
    """
    labels_t = transformations(labels)
    image_t = None if image is None else transformations(image)
    axes = [d for d in SPATIAL if d in labels.dims][::-1]  # spatialdata's (x, y[, z])
    if image_t is None and labels_t is None:
        if coordinate_system is not None:
            which = "'labels' carries" if image is None else "neither the image nor 'labels' carries"
            raise ValueError(
                f"'coordinate_system' {coordinate_system!r} needs SpatialData elements (a transformation "
                f"per coordinate system in attrs['transform']); {which} one"
            )
        return Aligned(*_align_on_coordinates(image, labels))
    if image is None or image_t is None or labels_t is None:
        carrier, found = (LABELS, labels_t) if labels_t is not None else (IMAGE, image_t or {})
        system = choose_coordinate_system(coordinate_system, {carrier: found})
        if image is not None:
            _check_identity(found[system], carrier, system, axes)
            image, labels = _align_on_coordinates(image, labels)
        affine = None if labels_t is None else pixel_affine(labels, labels_t[system], axes, LABELS)
        return Aligned(image, labels, affine)
    system, offset, labels_affine = locate(
        image, labels, coordinate_system, image_name=IMAGE, labels_name=LABELS
    )
    image, labels, start = _overlap(image, labels, dict(zip(axes, offset, strict=True)), system)
    shift = np.eye(len(axes) + 1)
    shift[:-1, -1] = [start[dim] for dim in axes]
    return Aligned(image, labels, labels_affine @ shift)


# -- SpatialData elements ------------------------------------------------------------------


def locate(
    image: xr.DataArray,
    labels: xr.DataArray,
    coordinate_system: str | None,
    *,
    image_name: str,
    labels_name: str,
) -> tuple[str, tuple[int, ...], NDArray[np.float64]]:
    """Where the labels' pixels lie in the image's pixel grid, from both elements' transformations.

    Parameters
    ----------
    image, labels
        SpatialData elements (one level each) with the same spatial dims.
    coordinate_system
        The coordinate system to compare them in; None for the one both share (of several,
        ``"global"``).
    image_name, labels_name
        The elements as messages name them.

    Returns
    -------
    system
        The coordinate system used.
    offset
        The whole-pixel offset of the labels' first pixel in the image's pixel grid, along
        spatialdata's axes ``(x, y[, z])``.
    labels_affine
        The labels' :func:`pixel_affine` to ``system``.

    Raises
    ------
    ValueError
        For a coordinate system that is not both elements' (or none, or several shared without
        ``"global"``), coordinates that are not pixel centres, and pixel grids that differ in
        pixel size, orientation or by a fraction of a pixel; the message names both
        transformations.
    """
    image_t, labels_t = transformations(image) or {}, transformations(labels) or {}
    system = choose_coordinate_system(coordinate_system, {image_name: image_t, labels_name: labels_t})
    axes = [d for d in SPATIAL if d in labels.dims][::-1]  # spatialdata's (x, y[, z])
    labels_affine = pixel_affine(labels, labels_t[system], axes, labels_name)
    offset = grid_offset(
        pixel_affine(image, image_t[system], axes, image_name),
        labels_affine,
        axes,
        where=f"in coordinate system {system!r}",
        image=image_name,
        labels=labels_name,
        transformations=f"image {describe(image_t[system])}, labels {describe(labels_t[system])}",
    )
    return system, offset, labels_affine


def scale0(element: Any, name: str) -> Any:
    """The element itself, or the full-resolution level (``scale0``) of a multiscale ``DataTree``.

    ``name`` names the element in the error raised for a ``DataTree`` without a ``scale0`` level
    holding exactly one array.
    """
    datatree = getattr(xr, "DataTree", None)  # xarray < 2024.10 has no DataTree
    if datatree is None or not isinstance(element, datatree):
        return element
    level = element.children.get("scale0")
    arrays = [] if level is None else list(level.to_dataset().data_vars.values())
    if len(arrays) != 1:
        raise ValueError(
            f"{name} is a DataTree but not a multiscale element with one array in 'scale0'; got levels "
            f"{sorted(element.children)}; pass one level as a DataArray, e.g. "
            "spatialdata.get_pyramid_levels(element, n=0)"
        )
    return arrays[0]


def transformations(array: xr.DataArray) -> dict[str, Any] | None:
    """The SpatialData transformations of ``array`` by coordinate system, or None.

    SpatialData keeps them in ``attrs["transform"]``, a mapping from coordinate system names to
    ``spatialdata.transformations`` objects. Anything else there (a GDAL-style tuple from a raster
    reader, say) is no placement this module knows, and is left alone.
    """
    found = array.attrs.get("transform")
    if not isinstance(found, Mapping) or not found:
        return None
    try:
        from spatialdata.transformations import BaseTransformation
    except ImportError:  # then nothing in it can be a spatialdata transformation
        return None
    if not all(isinstance(t, BaseTransformation) for t in found.values()):
        return None
    return dict(found)


def choose_coordinate_system(requested: str | None, systems: Mapping[str, Mapping[str, Any]]) -> str:
    """The coordinate system to compare elements in.

    Parameters
    ----------
    requested
        The one asked for, or None for the one all elements share (of several, ``"global"``).
    systems
        For each element, named as in messages, its transformations by coordinate system.

    Raises
    ------
    ValueError
        If ``requested`` is not one of an element's systems; without ``requested``, if the
        elements share none, or several without ``"global"``.
    """
    if requested is not None:
        for name, found in systems.items():
            if requested not in found:
                raise ValueError(
                    f"'coordinate_system' {requested!r} is not one of {name}'s coordinate systems "
                    f"{sorted(found)}"
                )
        return requested
    shared = set.intersection(*(set(found) for found in systems.values()))
    if len(shared) == 1:
        return shared.pop()
    if DEFAULT_SYSTEM in shared:
        return DEFAULT_SYSTEM
    names = " and ".join(systems)
    each = ", ".join(f"{name} {sorted(found)}" for name, found in systems.items())
    if not shared:
        raise ValueError(
            f"{names} share no coordinate system ({each}); give them a transformation to a common one "
            "(spatialdata.transformations.set_transformation)"
        )
    raise ValueError(
        f"{names} share several coordinate systems {sorted(shared)}, none of them {DEFAULT_SYSTEM!r}; "
        "choose one with 'coordinate_system='"
    )


def pixel_affine(
    array: xr.DataArray, transformation: Any, axes: Sequence[str], name: str
) -> NDArray[np.float64]:
    """Homogeneous matrix from the pixel indices of ``array`` to a coordinate system.

    Pixel ``i`` spans ``[i, i + 1)`` along each of ``axes``. The transformation maps the element's
    intrinsic pixel space; where ``array`` carries coordinates, they say where its pixels lie in
    that space, so that a slice of an element (``.isel``, ``.sel``) keeps its place: spatialdata
    sets them to the pixel centres, ``(i + 0.5) × f`` for pixel ``i`` of a level downsampled
    ``f`` times. Without a coordinate, pixel ``i`` is intrinsic pixel ``i``.

    Raises
    ------
    ValueError
        For a coordinate that is not such a grid of pixel centres (message naming ``name``).
    """
    n = len(axes)
    intrinsic = np.eye(n + 1)
    for j, dim in enumerate(axes):
        if dim in array.coords and array.sizes[dim] > 0:
            sign, first = _intrinsic_start(array, dim, name)
            intrinsic[j, j] = sign
            intrinsic[j, n] = first + (1 - sign) // 2  # a descending axis starts at its pixel's far edge
    matrix = transformation.to_affine_matrix(input_axes=tuple(axes), output_axes=tuple(axes))
    return np.asarray(matrix, dtype=np.float64) @ intrinsic


def grid_offset(
    image_affine: NDArray[np.float64],
    labels_affine: NDArray[np.float64],
    axes: Sequence[str],
    *,
    where: str,
    image: str,
    labels: str,
    transformations: str,
) -> tuple[int, ...]:
    """Whole-pixel offset of the labels' first pixel in the image's pixel grid, along ``axes``.

    Parameters
    ----------
    image_affine, labels_affine
        Each element's :func:`pixel_affine` to one coordinate system.
    axes
        The axes of the matrices, in order (spatialdata's ``(x, y[, z])``).
    where, image, labels, transformations
        For messages: the coordinate system (``"in coordinate system 'global'"``), the names of
        the two elements, and their transformations in words.

    Raises
    ------
    ValueError
        If the two grids differ in pixel size or orientation, or by a fraction of a pixel.
    """
    n = len(axes)
    try:
        relative = np.linalg.solve(image_affine, labels_affine)  # labels pixel -> image pixel
    except np.linalg.LinAlgError:
        raise ValueError(f"{image} has a singular transformation {where} ({transformations})") from None
    linear, shift = relative[:n, :n], relative[:n, n]
    if not np.allclose(linear, np.eye(n), rtol=0, atol=AFFINE_TOLERANCE):
        image_size = np.linalg.norm(image_affine[:n, :n], axis=0)
        labels_size = np.linalg.norm(labels_affine[:n, :n], axis=0)
        if not np.allclose(image_size, labels_size, rtol=AFFINE_TOLERANCE, atol=0):
            differs = (
                f"their pixel sizes ({', '.join(axes)}) differ: image {_fmt(image_size)}, "
                f"labels {_fmt(labels_size)}"
            )
        else:
            differs = "their pixel axes point in different directions (a rotation, flip or shear differs)"
        raise ValueError(
            f"{image} and {labels} are not on the same pixel grid {where}: {differs} (transformations: "
            f"{transformations}); aggregate the labels against an image level of the same resolution, or "
            "resample one onto the other"
        )
    whole = np.round(shift)
    if not np.allclose(shift, whole, rtol=0, atol=AFFINE_TOLERANCE):
        start = ", ".join(f"{a}={v:.6g}" for a, v in zip(axes, shift, strict=True))
        raise ValueError(
            f"{image} and {labels} are not on the same pixel grid {where}: the labels start at image "
            f"pixel ({start}), not a whole-pixel offset (transformations: {transformations})"
        )
    return tuple(int(v) for v in whole)


def to_coordinate_system(positions: Any, affine: NDArray[np.float64]) -> Any:
    """Mean pixel indices ``([z,] y, x)`` → pixel centres → ``(x, y[, z])`` in a coordinate system.

    ``positions`` has one row per label (NumPy or dask); ``affine`` is a :func:`pixel_affine`.
    """
    n = affine.shape[0] - 1
    intrinsic = positions[:, ::-1] + 0.5  # (x, y[, z]); pixel i spans [i, i + 1)
    return intrinsic @ affine[:n, :n].T + affine[:n, n]


def describe(transformation: Any) -> str:
    """A spatialdata transformation in one line, e.g. ``Sequence(Translation(x=7, y=11), Identity)``."""
    kind = type(transformation).__name__
    if kind == "Sequence":
        return f"Sequence({', '.join(describe(t) for t in transformation.transformations)})"
    if kind in ("Translation", "Scale"):
        values = transformation.translation if kind == "Translation" else transformation.scale
        pairs = ", ".join(f"{a}={v:.6g}" for a, v in zip(transformation.axes, values, strict=True))
        return f"{kind}({pairs})"
    return " ".join(repr(transformation).split())


def _check_identity(transformation: Any, name: str, system: str, axes: Sequence[str]) -> None:
    """Only one of image and labels carries a transformation: the other's placement is unknown.

    Both readings (the other array in ``system``'s space, or in the carrier's pixel space) agree
    only when the transformation is the identity; then plain alignment is right.
    """
    matrix = transformation.to_affine_matrix(input_axes=tuple(axes), output_axes=tuple(axes))
    if np.allclose(matrix, np.eye(len(axes) + 1), rtol=0, atol=AFFINE_TOLERANCE):
        return
    other = LABELS if name == IMAGE else IMAGE
    raise ValueError(
        f"{name} carries a SpatialData transformation to {system!r} ({describe(transformation)}) but "
        f"{other} carries none, so where {other}'s pixels lie there is unknown; give {other} its "
        "transformation (attrs['transform'], e.g. with spatialdata.transformations.set_transformation), "
        f"or remove the transformation of {name} (.attrs.pop('transform')) to align on coordinates alone"
    )


def _intrinsic_start(array: xr.DataArray, dim: str, name: str) -> tuple[int, int]:
    """Direction (±1) and intrinsic pixel index of the first pixel of ``array`` along ``dim``."""
    values, step, _ = _grid(array, name, dim)
    size = 1.0 if step is None else abs(step)
    first = values[0] / size - 0.5
    whole = round(first)
    if abs(first - whole) > GRID_TOLERANCE:
        raise ValueError(
            f"the coordinate {dim!r} of {name} is not a grid of pixel centres as spatialdata sets them "
            f"((i + 0.5) × {size:.6g} for pixel i): it starts at {values[0]:.6g}; drop the coordinate to "
            "place the pixels by their transformation alone"
        )
    return (1 if step is None or step > 0 else -1), int(whole)


def _overlap(
    image: xr.DataArray, labels: xr.DataArray, offset: dict[str, int], system: str
) -> tuple[xr.DataArray, xr.DataArray, dict[str, int]]:
    """Image and labels cut to the pixels they share, and where the labels' cut starts."""
    image_cut, labels_cut, start = {}, {}, {}
    for dim, shift in offset.items():
        first, stop = max(0, shift), min(image.sizes[dim], shift + labels.sizes[dim])
        if stop <= first and image.sizes[dim] and labels.sizes[dim]:
            raise ValueError(
                f"the image and 'labels' do not overlap in coordinate system {system!r}: along {dim!r} the "
                f"labels cover image pixels {shift}..{shift + labels.sizes[dim] - 1}, the image has "
                f"0..{image.sizes[dim] - 1}"
            )
        image_cut[dim] = slice(first, stop)
        labels_cut[dim] = slice(first - shift, stop - shift)
        start[dim] = first - shift
    return image.isel(image_cut), labels.isel(labels_cut), start


def _fmt(values: NDArray[np.float64]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


# -- plain arrays: coordinates ---------------------------------------------------------------


def _align_on_coordinates(
    image: xr.DataArray | None, labels: xr.DataArray
) -> tuple[xr.DataArray | None, xr.DataArray]:
    if image is None:
        return None, labels
    for dim in [d for d in SPATIAL if d in labels.dims]:
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
    a, step_a, res_a = _grid(image, "'image'", dim)
    b, step_b, res_b = _grid(labels, "'labels'", dim)
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
    """The coordinate ``dim`` of ``array`` (``name`` in messages) as a regular grid.

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
            f"the coordinate {dim!r} of {name} must be numeric to align on it; got dtype {raw.dtype} "
            "(drop or replace the coordinate to match pixels by position)"
        )
    values = raw.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(
            f"the coordinate {dim!r} of {name} must be finite to align on it; it holds NaN or inf"
        )
    resolution = float(np.finfo(raw.dtype).eps * np.abs(values).max()) if raw.dtype.kind == "f" else 0.0
    n = values.shape[0]
    if n < 2:
        return values, None, resolution
    step = float(values[-1] - values[0]) / (n - 1)
    if resolution >= 0.5 * abs(step) > 0 or (step == 0 and resolution > 0):
        raise ValueError(
            f"the coordinate {dim!r} of {name} is too coarse to tell pixels apart: its dtype "
            f"{raw.dtype} resolves {resolution:.3g} at values of this size, with pixels {abs(step):.3g} "
            "apart; use float64 coordinates"
        )
    deviation = float(np.abs(values - (values[0] + step * np.arange(n))).max())
    if step == 0 or deviation > GRID_TOLERANCE * abs(step) + resolution:
        steps = np.diff(values)
        raise ValueError(
            f"the coordinate {dim!r} of {name} must be evenly spaced to align on it; got steps from "
            f"{steps.min()} to {steps.max()}"
        )
    return values, step, resolution
