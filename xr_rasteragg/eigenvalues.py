"""Eigenvalues of many symmetric 2 × 2 matrices, bit for bit as :func:`numpy.linalg.eigvalsh`.

``eigvalsh`` hands each matrix of a stack to LAPACK's ``dsyevd`` in turn: for the 2 × 2 inertia
tensors of 10^4 labels that is a few milliseconds of per-call overhead, most of the shape
features' finalization. A 2 × 2 matrix is already tridiagonal, so ``dsyevd`` reduces to
``dsterf``, which deflates a negligible off-diagonal term and otherwise takes the eigenvalues
from ``dlae2``; :func:`eigvalsh_2x2` runs those same steps in one compiled loop, with the same
floating-point operations in the same order, and so returns the same bits. Matrices whose
entries are not finite, or so large or small that LAPACK would rescale them first, are left to
``eigvalsh``.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numpy.typing import NDArray

__all__ = ["eigvalsh_2x2"]

#: LAPACK's ``dlamch('E')``: the relative machine precision (half a unit in the last place of 1).
_EPS = 2.0**-53
#: Entries beyond which ``dsyevd`` or ``dsterf`` would scale the matrix first (their thresholds
#: are about 1e-122 and 1e145; these leave a wide margin).
_TINY, _HUGE = 1e-100, 1e100


def eigvalsh_2x2(matrices: NDArray[np.float64]) -> NDArray[np.float64]:
    """Eigenvalues of symmetric 2 × 2 matrices, ascending, as ``np.linalg.eigvalsh(matrices)``.

    Parameters
    ----------
    matrices
        Shape ``(k, 2, 2)``; only the lower triangle is read, as by ``eigvalsh``.

    Returns
    -------
    numpy.ndarray
        Shape ``(k, 2)``, each row ascending, equal bit for bit to ``eigvalsh``'s.
    """
    values, unsure = _dsterf_2x2(np.asarray(matrices, dtype=np.float64))
    if unsure.any():
        values[unsure] = np.linalg.eigvalsh(matrices[unsure])
    return values


@nb.njit(nogil=True, cache=True)
def _dsterf_2x2(t):  # type: ignore[no-untyped-def]
    """LAPACK's ``dsterf`` (and its ``dlae2``) on each matrix ``[[a, b], [b, c]]`` of ``t``.

    Returns the eigenvalues, ascending, and where they were not computed (entries not finite, or
    outside the range where LAPACK computes without scaling).
    """
    k = t.shape[0]
    out = np.empty((k, 2))
    unsure = np.zeros(k, np.bool_)
    eps2 = _EPS * _EPS
    for i in range(k):
        a = t[i, 0, 0]
        b = t[i, 1, 0]
        c = t[i, 1, 1]
        top = max(abs(a), abs(b), abs(c))
        if not top <= _HUGE or (top != 0.0 and top < _TINY):  # also true for NaN
            unsure[i] = True
            continue
        low, high = a, c
        # dsterf: an off-diagonal term below eps sqrt|a| sqrt|c| is dropped, and so is one whose
        # square is below eps² |a c| (the test of its QL and QR iterations); a zero matrix is
        # left as it is.
        if top != 0.0 and not abs(b) <= (np.sqrt(abs(a)) * np.sqrt(abs(c))) * _EPS:
            e = b * b
            if not abs(e) <= eps2 * abs(a * c):
                low, high = _dlae2(a, np.sqrt(e), c)
        if low > high:
            low, high = high, low
        out[i, 0] = low
        out[i, 1] = high
    return out, unsure


@nb.njit(nogil=True, cache=True, inline="always")
def _dlae2(a, b, c):  # type: ignore[no-untyped-def]
    """LAPACK's ``dlae2``: the eigenvalues ``(rt1, rt2)`` of ``[[a, b], [b, c]]``, ``|rt1| >= |rt2|``.

    ``dsterf`` calls it with ``(a, b, c)``, or ``(c, b, a)`` when ``|c| < |a|`` (a QR iteration);
    both give these bits: the sum and the absolute difference do not depend on the order, and
    the entry of larger magnitude is ``acmx`` either way (``c`` on a tie, as in the QL iteration
    that ``dsterf`` then runs). The caller sorts the pair.
    """
    sm = a + c
    adf = abs(a - c)
    ab = abs(b + b)
    if abs(a) > abs(c):
        acmx, acmn = a, c
    else:
        acmx, acmn = c, a
    if adf > ab:
        rt = adf * np.sqrt(1.0 + (ab / adf) ** 2)
    elif adf < ab:
        rt = ab * np.sqrt(1.0 + (adf / ab) ** 2)
    else:
        rt = ab * np.sqrt(2.0)
    if sm < 0:
        rt1 = 0.5 * (sm - rt)
    elif sm > 0:
        rt1 = 0.5 * (sm + rt)
    else:
        return 0.5 * rt, -0.5 * rt
    return rt1, (acmx / rt1) * acmn - (b / rt1) * b
