"""Shape features of labels from their merged partials, as :func:`skimage.measure.regionprops`.

Every feature is a short function of a few shared quantities (the central second moments, the
inertia tensor and its eigenvalues, the bounding box), computed once per call by
:class:`ShapeQuantities`, as regionprops does. Names, units and conventions are regionprops':
bounding boxes with exclusive ends, the orientation's sign, and lengths, areas and moments in
units of the pixel ``spacing`` (:class:`Space`).

The engine always works on (z, y, x) labels; :class:`Space` says which of those axes the
caller's labels have, so that 2-D labels get 2-D features (2 centroid values, 4 bounds, a 2 × 2
inertia tensor) exactly as regionprops gives them for a 2-D label image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from math import sqrt
from typing import cast

import numba as nb
import numpy as np
from numpy.typing import NDArray
from scipy.spatial import ConvexHull, QhullError

from .eigenvalues import eigvalsh_2x2
from .families import PRODUCT_AXES
from .hulls import convex_pixels_2d
from .partials import Partials
from .ragged import Ragged

__all__ = ["ShapeQuantities", "Space"]


@dataclass(frozen=True)
class Space:
    """The spatial axes of the caller's labels and their pixel spacing.

    Attributes
    ----------
    axes
        Which of the engine's (z, y, x) axes the labels have (0 = z, 1 = y, 2 = x), in order.
    spacing
        The pixel spacing along each of ``axes`` (as regionprops' ``spacing=``); spacings that
        agree to 1e-9 are made one, their mean (:func:`_equal_to_rounding`).
    flipped
        Along which of ``axes`` the coordinates decrease as the pixel index grows (a negative
        scale, or descending coordinates); empty for none. The features that depend on the
        direction of the axes (the signs of the inertia tensor's off-diagonal terms, the
        orientation, the principal axes) are then those of regionprops on the labels laid out
        with their coordinates increasing, as a plot in those coordinates shows them.
    """

    axes: tuple[int, ...] = (0, 1, 2)
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    flipped: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if not self.axes or list(self.axes) != sorted(set(self.axes)) or not set(self.axes) <= {0, 1, 2}:
            raise ValueError(f"'axes' must be increasing axes of (z, y, x) (0, 1, 2); got {self.axes}")
        if len(self.spacing) != len(self.axes):
            raise ValueError(
                f"'spacing' must hold one value per axis {self.axes}; got {len(self.spacing)} values"
            )
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise ValueError(f"'spacing' must hold positive, finite values; got {self.spacing}")
        if self.flipped and len(self.flipped) != len(self.axes):
            raise ValueError(
                f"'flipped' must hold one flag per axis {self.axes} (or none); got {len(self.flipped)} flags"
            )
        object.__setattr__(self, "spacing", _equal_to_rounding(self.spacing))

    @property
    def ndim(self) -> int:
        """The number of spatial dims of the labels."""
        return len(self.axes)


def _equal_to_rounding(spacing: Sequence[float]) -> tuple[float, ...]:
    """``spacing`` with the spacings that agree to 1e-9 replaced by their mean.

    The steps of floating-point coordinates differ in their last bits (``1000.25 + 0.3 i`` steps
    by 0.29999999999995, ``0.3 i`` by 0.3), and a label's features read a square grid's
    rounding as an anisotropy: the orientation of a label whose second moments tie (a square,
    a disc) is π/4 on a square grid, 0 on one a hair wider.

    Examples
    --------
    >>> _equal_to_rounding([2.0, 0.30000000000000004, 0.29999999999995453])
    (2.0, 0.2999999999999773, 0.2999999999999773)
    """
    out = list(spacing)
    for i, value in enumerate(spacing):
        same = [j for j, other in enumerate(spacing) if abs(other - value) <= 1e-9 * abs(value)]
        out[i] = float(np.mean([spacing[j] for j in same]))
    return tuple(out)


class ShapeQuantities:
    """The quantities that the shape features share, each computed once.

    Parameters
    ----------
    partials
        Merged partials of labels that have pixels, with the
        :class:`~xr_rasteragg.families.Geometry` family (and the others that the features read).
    space
        The labels' axes and spacing.
    """

    def __init__(self, partials: Partials, space: Space) -> None:
        self.p = partials
        self.space = space
        self.scale = np.asarray(space.spacing, dtype=np.float64)

    @cached_property
    def n(self) -> NDArray[np.float64]:
        """Pixels per label, as float64."""
        return self.p.count.astype(np.float64)

    @cached_property
    def _recentred(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """The offset sums moved, exactly, to the integer pixel ``t`` nearest each centroid:
        ``(t, Σ (p - t), Σ (p - t)_a (p - t)_b)`` (all integers, in float64)."""
        assert self.p.origin is not None
        assert self.p.offsets is not None
        assert self.p.products is not None
        return _recentre(self.n, self.p.origin, self.p.offsets, self.p.products, _PAIRS)

    @cached_property
    def centroid(self) -> NDArray[np.float64]:
        """Mean pixel index of each label on the labels' axes, shape ``(k, ndim)``."""
        base, moved, _ = self._recentred
        return (base + moved / self.n[:, None])[:, list(self.space.axes)]

    @cached_property
    def central(self) -> NDArray[np.float64]:
        """Central second moments ``Σ (p - mean)_a (p - mean)_b`` on the labels' axes, in units of
        the spacing, shape ``(k, ndim, ndim)`` (regionprops' ``moments_central`` of order 2); the
        terms that mix a flipped axis with another change sign (see :class:`Space`)."""
        _, moved, products = self._recentred
        axes = np.asarray(self.space.axes, dtype=np.intp)
        signed = self.scale * np.where(np.asarray(self.space.flipped or [False] * len(axes)), -1.0, 1.0)
        return _central(self.n, moved, products, _PAIRS, axes, signed)

    @cached_property
    def inertia_tensor(self) -> NDArray[np.float64]:
        """The inertia tensor of each label, as :func:`skimage.measure.inertia_tensor`."""
        return _inertia(self.central, self.n)

    @cached_property
    def eigvals(self) -> NDArray[np.float64]:
        """The inertia tensor's eigenvalues, clipped at 0, in descending order."""
        tensor = self.inertia_tensor
        # The 2 x 2 tensors in one compiled loop, with eigvalsh's bits (see eigenvalues.py).
        ascending = eigvalsh_2x2(tensor) if tensor.shape[1] == 2 else np.linalg.eigvalsh(tensor)
        values = np.clip(ascending, 0, None)
        return values[:, ::-1].copy()

    @cached_property
    def area(self) -> NDArray[np.float64]:
        """Pixels times the pixel area (volume)."""
        return self.n * float(np.prod(self.scale))

    @cached_property
    def bbox(self) -> NDArray[np.int64]:
        """Bounding boxes on the labels' axes: all minima, then all (exclusive) maxima."""
        assert self.p.low is not None
        assert self.p.high is not None
        axes = list(self.space.axes)
        return np.concatenate([self.p.low[:, axes], self.p.high[:, axes]], axis=1)

    def extent(self) -> NDArray[np.float64]:
        """Area over the area of the bounding box."""
        d = self.space.ndim
        sides = (self.bbox[:, d:] - self.bbox[:, :d]).astype(np.float64)
        return self.area / (sides.prod(axis=1) * float(np.prod(self.scale)))

    def equivalent_diameter_area(self) -> NDArray[np.float64]:
        """Diameter of the disc (ball) of the same area (volume)."""
        d = self.space.ndim
        return (2 * d * self.area / np.pi) ** (1 / d)

    def axis_length(self, major: bool) -> NDArray[np.float64]:
        """Length of the major or minor axis of the ellipse (ellipsoid) of the same second moments."""
        ev = self.eigvals
        if self.space.ndim == 2:
            return 4 * np.sqrt(ev[:, 0] if major else ev[:, -1])
        if self.space.ndim == 3:
            sign = 1.0 if major else -1.0
            return np.sqrt(np.maximum(0.0, 10 * (sign * ev[:, 0] + ev[:, 1] + -sign * ev[:, 2])))
        raise ValueError(f"axis lengths are defined for 2-D and 3-D labels; got {self.space.ndim}-D labels")

    def eccentricity(self) -> NDArray[np.float64]:
        """Eccentricity of the ellipse of the same second moments (2-D)."""
        l1, l2 = self.eigvals[:, 0], self.eigvals[:, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(l1 == 0, 0.0, np.sqrt(1 - l2 / l1))

    def orientation(self) -> NDArray[np.float64]:
        """Angle between axis 0 (rows) and the major axis, in radians from -π/2 to π/2 (2-D)."""
        t = self.inertia_tensor
        a, b, c = t[:, 0, 0], t[:, 0, 1], t[:, 1, 1]
        tied = np.where(b < 0, np.pi / 4, -np.pi / 4)
        return np.where(a - c == 0, tied, 0.5 * np.arctan2(-2 * b, c - a))

    def perimeter(self) -> NDArray[np.float64]:
        """Perimeter as :func:`skimage.measure.perimeter` with 4-connectivity, in units of the
        (isotropic: the same to 1e-9, see :func:`~xr_rasteragg.stats.check_space`) spacing, that
        of the first axis (2-D)."""
        assert self.p.border is not None
        weights = np.array([1.0, sqrt(2), (1 + sqrt(2)) / 2])
        return (self.p.border.astype(np.float64) @ weights) * float(self.scale[0])

    def solidity(self) -> NDArray[np.float64]:
        """Area over the area of the convex hull image (:func:`skimage.morphology.convex_hull_image`)."""
        hull = cast(Ragged, self.p.hull)
        assert hull is not None
        axes = list(self.space.axes)
        if self.space.ndim == 2:
            # The axis the labels lack has one index: the vertices, sorted by (z, y, x), are
            # sorted on the labels' two axes too. Labels in (y, x) planes counted in their block
            # keep that count.
            assert self.p.convex is not None
            counts = self.p.convex.copy() if self.space.axes == (1, 2) else np.full(len(hull), -1, np.int64)
            unknown = np.flatnonzero(counts < 0)
            rest = hull[unknown]
            counts[unknown] = convex_pixels_2d(rest.offsets, np.ascontiguousarray(rest.values[:, axes]))
            convex = counts.astype(np.float64)
        else:
            low = self.bbox[:, : self.space.ndim]
            high = self.bbox[:, self.space.ndim :]
            convex = np.array(
                [
                    _convex_volume(hull.row(i)[:, axes] - lo, tuple(hi - lo))
                    for i, (lo, hi) in enumerate(zip(low, high, strict=True))
                ],
                dtype=np.float64,
            )
        with np.errstate(divide="ignore"):
            return self.n / convex

    def centroid_weighted(self) -> NDArray[np.float64]:
        """Intensity-weighted mean pixel index per channel, shape ``(k, C, ndim)``."""
        sums = [self.p.weighted_z, self.p.weighted_y, self.p.weighted_x]
        weight = self.p.weight
        assert weight is not None
        return _weighted_centroids(weight, tuple(sums[a] for a in self.space.axes))

    @cached_property
    def principal(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Radii and principal axes as harpy's ``radii_and_principal_axes`` (a PCA of the pixel
        indices, as :class:`sklearn.decomposition.PCA`): the square roots of the eigenvalues of the
        coordinate covariance (``ddof=1``), descending, and the eigenvectors as rows, each with its
        largest component positive; labels of fewer pixels than dims get zeros and the identity."""
        d = self.space.ndim
        with np.errstate(invalid="ignore", divide="ignore"):
            covariance = self.central / (self.n - 1)[:, None, None]
        small = self.n < d
        covariance[small] = 0.0
        values, vectors = np.linalg.eigh(covariance)
        values, vectors = values[:, ::-1], np.swapaxes(vectors[:, :, ::-1], 1, 2)
        largest = np.take_along_axis(vectors, np.argmax(np.abs(vectors), axis=2)[:, :, None], axis=2)
        vectors = vectors * np.where(largest < 0, -1.0, 1.0)
        vectors[small] = np.eye(d)
        return np.sqrt(np.maximum(values, 0.0)), vectors


#: :data:`~xr_rasteragg.families.PRODUCT_AXES` as an array, for the compiled loops.
_PAIRS = np.asarray(PRODUCT_AXES, dtype=np.intp)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _recentre(n, origin, s1, s2, pairs):  # type: ignore[no-untyped-def]
    """:attr:`ShapeQuantities._recentred` in one loop over the labels: each label's integer pixel
    ``t`` nearest its centroid (``origin`` + the rounded mean offset), and its sums of offsets
    ``s1`` and of their ``pairs`` of products ``s2`` moved from ``origin`` to ``t``, exactly
    (all integers in float64), by the same operations, in the same order, as NumPy would."""
    k = n.shape[0]
    base = np.empty((k, 3))
    moved = np.empty((k, 3))
    products = np.empty((k, pairs.shape[0]))
    shift = np.empty(3)
    for i in range(k):
        for a in range(3):
            shift[a] = np.rint(s1[i, a] / n[i])  # np.round: halves to even
            moved[i, a] = s1[i, a] - n[i] * shift[a]
            base[i, a] = origin[i, a] + shift[a]
        for q in range(pairs.shape[0]):
            a, b = pairs[q, 0], pairs[q, 1]
            products[i, q] = s2[i, q] - shift[a] * s1[i, b] - shift[b] * s1[i, a] + n[i] * shift[a] * shift[b]
    return base, moved, products


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _central(n, moved, products, pairs, axes, signed):  # type: ignore[no-untyped-def]
    """:attr:`ShapeQuantities.central` in one loop over the labels: ``Σ (p - mean)_a (p - mean)_b``
    from the recentred sums, on ``axes``, times ``signed[a] signed[b]`` (spacing and direction),
    by NumPy's operations in NumPy's order."""
    k, d = n.shape[0], axes.shape[0]
    full = np.empty((3, 3))
    out = np.empty((k, d, d))
    for i in range(k):
        for q in range(pairs.shape[0]):
            a, b = pairs[q, 0], pairs[q, 1]
            full[a, b] = full[b, a] = products[i, q] - moved[i, a] * moved[i, b] / n[i]
        for u in range(d):
            for v in range(d):
                out[i, u, v] = full[axes[u], axes[v]] * signed[u] * signed[v]
    return out


@nb.njit(nogil=True, cache=True, error_model="numpy")
def _inertia(mu, n):  # type: ignore[no-untyped-def]
    """The inertia tensors from the central moments ``mu`` (``(k, d, d)``), as
    :func:`skimage.measure.inertia_tensor`: ``-mu / n`` off the diagonal, and on it the sum of
    the other axes' moments, ``(trace - mu_aa) / n`` (the trace summed in axis order)."""
    k, d = mu.shape[0], mu.shape[1]
    out = np.empty((k, d, d))
    for i in range(k):
        trace = 0.0
        for a in range(d):
            trace += mu[i, a, a]
        for a in range(d):
            for b in range(d):
                out[i, a, b] = -mu[i, a, b] / n[i]
            out[i, a, a] = (trace - mu[i, a, a]) / n[i]
    return out


@nb.njit(nogil=True, cache=True, error_model="numpy")  # x / 0 gives inf or NaN, as in NumPy
def _weighted_centroids(weight, sums):  # type: ignore[no-untyped-def]
    """``sums[j] / weight`` stacked on a last axis, ``(k, C, len(sums))``, written once (one output
    rather than a quotient per axis and their stack)."""
    k, nchan = weight.shape
    d = len(sums)
    out = np.empty((k, nchan, d))
    for i in range(k):
        for c in range(nchan):
            for j in range(d):
                out[i, c, j] = sums[j][i, c] / weight[i, c]
    return out


def _convex_volume(points: NDArray[np.int64], shape: tuple[int, ...]) -> int:
    """Voxels of :func:`skimage.morphology.convex_hull_image` of a 3-D label whose voxel hull
    vertices, relative to its bounding box of ``shape``, are ``points``: the hull of the voxel
    centres, widened by the centres of their faces, tested on every voxel of the box with its
    tolerance (1e-10). A label whose voxels lie in one plane has no 3-D hull: 0, as there."""
    try:
        centres = ConvexHull(points.astype(np.float64))
        faces = centres.points[centres.vertices]
    except QhullError:
        return 0
    offsets = np.zeros((6, 3))
    for vertex, (axis, step) in enumerate((a, s) for a in range(3) for s in (-0.5, 0.5)):
        offsets[vertex, axis] = step
    widened = np.unique((faces[:, None, :] + offsets).reshape(-1, 3), axis=0)
    try:
        hull = ConvexHull(widened)
    except QhullError:
        return 0
    grid = np.reshape(np.mgrid[tuple(slice(0, s) for s in shape)], (3, -1)).astype(np.float64)
    inside = np.ones(grid.shape[1], dtype=bool)
    for equation in hull.equations:
        inside &= equation[:3] @ grid + equation[3] < 1e-10
    return int(inside.sum())
