"""Per-block kernels, dispatched on the type of the block.

A kernel turns one block of labels ``(z, y, x)`` and, optionally, the image over the same pixels
(a list of channel chunks, each ``(c_i, z, y, x)``) into the
:class:`~xr_rasteragg.partials.Partials` of the labels it contains. A kernel may also offer the
work in two stages (:class:`StagedKernel`): the label block once, then each group of channel
chunks on its own; the engine then gives each stage its own task.
Kernels are registered by the top-level module of the array type and imported lazily, so that
CuPy is imported only when CuPy data arrive (as dask-image does).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..partials import Needs, Partials

if TYPE_CHECKING:
    from ..families import Family
    from ..frames import Frame
    from .numba import LabelRuns

__all__ = [
    "BlockKernel",
    "FrameReader",
    "HostRuns",
    "StagedKernel",
    "array_backend",
    "kernel_for",
    "register_kernel",
]


class BlockKernel(Protocol):
    """Signature every block kernel implements."""

    def __call__(
        self,
        labels: Any,
        image: Sequence[Any] | None,
        offset: tuple[int, int, int],
        needs: Needs,
        skip: int | None = None,
    ) -> Partials: ...


@runtime_checkable
class StagedKernel(BlockKernel, Protocol):
    """A block kernel that also runs in two stages: labels first, then groups of channels."""

    def encode(
        self,
        labels: Any,
        offset: tuple[int, int, int],
        skip: int | None = None,
        families: Sequence[Family] = (),
    ) -> Any:
        """What every group of channels of the block needs from its labels.

        ``families`` are families of the labels alone (the shape features') that the block's
        partials need: the kernel fills them here, once per block, whatever the number of groups
        of channels (:meth:`channels` fills the families of its ``needs`` not filled yet).
        """

    def channels(self, encoded: Any, image: Sequence[Any] | None, needs: Needs) -> Partials:
        """Partials of a group of channel chunks over the block encoded by :meth:`encode`."""


@runtime_checkable
class FrameReader(StagedKernel, Protocol):
    """A staged kernel whose label stage can also read the pixels around each block, for families
    whose kernel code reads a label's neighbourhood (``Family.halo``)."""

    def encode_framed(
        self,
        labels: Any,
        offset: tuple[int, int, int],
        skip: int | None,
        frame: Frame,
        families: Sequence[Family] = (),
    ) -> Any:
        """:meth:`encode`, with the block's :class:`~xr_rasteragg.frames.Frame`."""


@runtime_checkable
class HostRuns(Protocol):
    """A label stage's encoding on a device that also gives the compiled CPU kernel's encoding
    of a host copy of its block, for work done on the host (the whole-label gather)."""

    def host_runs(self) -> LabelRuns:
        """The :class:`~xr_rasteragg.kernels.numba.LabelRuns` of the block, copied to the host."""


_KERNELS: dict[str, str] = {
    "numpy": "xr_rasteragg.kernels.numba",
    "cupy": "xr_rasteragg.kernels.cuda",
}
_LOADED: dict[str, BlockKernel] = {}


def array_backend(array: Any) -> str:
    """Name of the array library that holds ``array``'s data (``"numpy"``, ``"cupy"``, ...).

    Dask arrays are looked through to the type of their blocks (``_meta``).
    """
    meta = getattr(array, "_meta", array)
    return type(meta).__module__.split(".")[0]


def register_kernel(backend: str, module: str) -> None:
    """Use the ``block_partials`` function of ``module`` for blocks of ``backend``'s arrays."""
    _KERNELS[backend] = module
    _LOADED.pop(backend, None)


def kernel_for(array: Any) -> BlockKernel:
    """The block kernel for arrays of the type of ``array``.

    Raises
    ------
    TypeError
        If no kernel is registered for the array type.
    """
    backend = array_backend(array)
    if backend not in _LOADED:
        if backend not in _KERNELS:
            raise TypeError(
                f"no kernel for arrays of type {type(array).__name__!r} from {backend!r}; "
                f"expected one of {sorted(_KERNELS)}"
            )
        function: Callable[..., Partials] = importlib.import_module(_KERNELS[backend]).block_partials
        _LOADED[backend] = function
    return _LOADED[backend]
