"""Fused GPU kernel for CuPy blocks, written with Numba's CUDA kernels (``numba-cuda``).

Each CUDA thread owns a segment of :data:`SEGMENT` pixels of one row of the block and walks it
as the CPU kernel walks its rows (:mod:`xr_rasteragg.kernels.numba`): as runs of equal labels.
Every run is reduced in the thread's registers, and each per-label field then takes one atomic
update per run (a run that crosses a segment's end counts as two runs). The work comes in two
stages, as on the CPU (:class:`~xr_rasteragg.kernels.StagedKernel`):

- :meth:`CudaRunKernel.encode`, once per spatial block: the block's labels are discovered in an
  open-addressing hash table on the device (keys claimed with ``atomic.cas``), numbered, and
  their pixel counts and (z, y, x) index sums accumulated in integers (exact). The table is
  sized by a bound on the labels that a first kernel counts (the runs that start below another
  label), so memory follows the labels, never the pixels nor the largest id. The stage ends with
  one copy to the host: the ids, counts and index sums (the ids are sorted there).
- :meth:`CudaRunKernel.channels`, once per group of channel chunks: the runs are walked again
  over the labels and the image. The table from the first stage gives each run its label's
  row, so the labels are never discovered twice. Images of at most 16-bit integers take one
  pass of exact integer power sums ``Σ v**p`` (``v = x - dtype min``, p = 1..4) in 128-bit
  accumulators (two uint64 words, the carry detected from the value the atomic add returns);
  the shifts, shifted sums and central moments follow per label on the device by the binomial
  theorem modulo 2**128, which is exact for every label size (the CPU kernel's modulo-2**64
  sums need a fallback for wide ranges; these do not). Other images take two passes: the
  first claims each label's shift (its first finite value that a run offers, by
  ``atomic.cas`` on the pixel's position), sums the exact differences from it (in int64
  for integers of up to 32 bits) and counts valid pixels; the second sums powers of the
  deviations from the label's mean, corrected for the rounding of that mean, as
  :mod:`xr_rasteragg.kernels.xp` does with array operations. Extrema are atomic minima and
  maxima of unsigned keys that sort as the values do (exact for every dtype; NaN wins).
  The moment-based shape families (label geometry, the intensity-weighted centroid) walk the
  runs in kernels of their own (:mod:`xr_rasteragg.kernels.cuda_shape`), launched in the same
  stage. The perimeter's and the convex hulls' families have no GPU kernel: the CPU kernel's
  code fills them from a host copy of the block (:meth:`DeviceRuns.host_runs`), as it does the
  whole-label gather (:mod:`xr_rasteragg.gather`).

Between its first launch and its closing copy to the host, a stage never waits for the device:
every size it needs is known before it starts (the label bound is the one value ``encode``
reads back in the middle). The per-label tables ``(k, C)`` are the only data that leave the
device, but for the host copies of the label block that the families without GPU kernel and
the whole-label gather ask for.

The kernels run unchanged under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, set before
``numba.cuda`` is first imported) on NumPy arrays: that is how CI tests them without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import cuda
from numpy.typing import NDArray

from ..families import Extrema, Family, Moments, Valid
from ..partials import Needs, Partials, shift_dtype
from .cuda_runs import (
    _EMPTY,
    _FLOAT,
    _INT64,
    _SIGN,
    _SMALL,
    _U0,
    _UINT64,
    SEGMENT,
    THREADS,
    _count_fresh,
    _discover,
    _fill,
    _finish_moments,
    _finish_sums,
    _first_pass,
    _number,
    _power_moments,
    _power_pass,
    _second_pass,
)
from .xp import to_numpy

if TYPE_CHECKING:
    from ..frames import Frame
    from .numba import LabelRuns

__all__ = ["FAMILY_UPDATES", "SEGMENT", "CudaRunKernel", "DeviceRuns", "block_partials"]


def _launch(kernel: Any, threads: int, *args: Any) -> None:
    """Launch ``kernel`` over ``threads`` threads (at least one; fewer than :data:`THREADS` in one block)."""
    per_block = min(THREADS, max(1, threads))
    kernel[-(-max(1, threads) // per_block), per_block](*args)


def _full(shape: tuple[int, ...], dtype: Any, value: Any) -> Any:
    """A device array of ``shape`` filled with ``value`` (by a kernel: nothing crosses the bus)."""
    out = cuda.device_array(int(np.prod(shape)), dtype)
    if out.shape[0]:
        _launch(_fill, out.shape[0], out, np.dtype(dtype).type(value))
    return out.reshape(shape)


def _on_device(array: Any) -> Any:
    """``array`` as the kernels take it: CuPy arrays wrapped without a stream synchronisation, in
    place (any strides); NumPy arrays (which reach the kernels under the simulator only) copied to
    the simulated device."""
    if hasattr(array, "__cuda_array_interface__"):
        return cuda.as_cuda_array(array, sync=False)
    return cuda.to_device(np.ascontiguousarray(array))


def _unsigned_view(labels: Any) -> Any:
    """The label block viewed as unsigned integers of its width (the bits are the hash keys)."""
    return labels.view(np.dtype(f"u{labels.dtype.itemsize}"))


def _address(array: Any) -> int:
    """The address of an array's first element (host or device)."""
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    return int(interface["data"][0])


def _stacked(chunks: Sequence[Any]) -> Any:
    """The channel chunks of a block as one ``(C, z, y, x)`` array: a view where they follow each
    other in one array (dask's blocks of one array do), otherwise a copy on their device."""
    first = chunks[0]
    if len(chunks) == 1:
        return first
    step = first.strides[0]
    nchan = sum(int(chunk.shape[0]) for chunk in chunks)
    follows = all(
        chunk.dtype == first.dtype
        and chunk.strides[1:] == first.strides[1:]
        and chunk.shape[1:] == first.shape[1:]
        and (chunk.shape[0] == 1 or chunk.strides[0] == step)
        and _address(chunk) == _address(first) + step * sum(int(c.shape[0]) for c in chunks[:j])
        for j, chunk in enumerate(chunks)
    )
    shape, strides = (nchan, *first.shape[1:]), (step, *first.strides[1:])
    if type(first).__module__.split(".")[0] == "cupy":
        import cupy

        if follows:
            return cupy.ndarray(shape, first.dtype, memptr=first.data, strides=strides)
        return cupy.concatenate(list(chunks), axis=0)
    if follows:
        return np.lib.stride_tricks.as_strided(first, shape=shape, strides=strides, writeable=False)
    return np.concatenate(list(chunks), axis=0)


def _skip_key(skip: int | None, dtype: np.dtype) -> tuple[bool, np.uint64]:
    """Whether ``skip`` can occur among labels of ``dtype``, and its key (its bits, unsigned)."""
    if skip is None:
        return False, _U0
    info = np.iinfo(dtype)
    if not info.min <= skip <= info.max:
        return False, _U0
    return True, np.uint64(np.array(skip, dtype).view(f"u{dtype.itemsize}"))


def _kind(dtype: np.dtype) -> int:
    if dtype.kind == "f":
        return _FLOAT
    if dtype == np.uint64:
        return _UINT64
    if dtype == np.int64:
        return _INT64
    return _SMALL


def _low(dtype: np.dtype) -> int:
    """The smallest value of an integer dtype (0 for floats)."""
    return int(np.iinfo(dtype).min) if dtype.kind in "iu" else 0


def _float_bits(dtype: np.dtype) -> tuple[np.uint64, np.uint64]:
    """Sign bit and all-ones of the bit width of a dtype."""
    bits = 8 * dtype.itemsize
    return np.uint64(1 << (bits - 1)), np.uint64((1 << bits) - 1)


def order_keys(values: NDArray[Any]) -> NDArray[np.uint64]:
    """The unsigned keys (uint64) that the kernels give values of ``values.dtype`` (on the host).

    Integers of up to 32 bits: ``x - min``; uint64: ``x``; int64: ``x`` with its sign bit flipped;
    floats: their bits with the sign bit flipped when positive and all bits flipped when
    negative. NaN must not occur.
    """
    dtype = values.dtype
    kind = _kind(dtype)
    if kind == _SMALL:
        return (values.astype(np.int64) - _low(dtype)).astype(np.uint64)
    if kind == _UINT64:
        return values.astype(np.uint64)
    if kind == _INT64:
        return values.view(np.uint64) ^ _SIGN
    sign, full = _float_bits(dtype)
    bits = values.view(f"u{dtype.itemsize}").astype(np.uint64)
    return np.where(bits & sign, full - bits, bits | sign)


def from_order_keys(keys: NDArray[np.uint64], dtype: np.dtype) -> NDArray[Any]:
    """The values of ``dtype`` whose :func:`order_keys` are ``keys`` (NaN for the keys of NaN)."""
    kind = _kind(dtype)
    if kind == _SMALL:
        return (keys.astype(np.int64) + _low(dtype)).astype(dtype)
    if kind == _UINT64:
        return keys.astype(dtype)
    if kind == _INT64:
        return (keys ^ _SIGN).view(np.int64)
    sign, full = _float_bits(dtype)
    bits = np.where(keys & sign, keys ^ sign, full - keys)
    return bits.astype(f"u{dtype.itemsize}").view(dtype)


@dataclass(frozen=True)
class DeviceRuns:
    """A label block encoded on the device: what every group of channels of the block starts from.

    Attributes
    ----------
    parts
        The block's label ids, pixel counts and global coordinate sums, in label order (host).
    labels
        The label block on the device, viewed as unsigned integers.
    use_skip, skip
        Whether runs of the label with the key ``skip`` are left out.
    table, mask, ids
        The hash table of label keys (``mask + 1`` slots and one for the key of an empty slot),
        and the row of each slot's label.
    packed
        Per row: key, pixel count, and the sums of z, y and 2 x (device, uint64).
    local
        The row of each label of ``parts`` (label order to rows).
    segment
        Pixels per thread.
    offset
        The global (z, y, x) index of the block's first pixel.
    totals
        The rows of ``packed`` in label order (host).
    source
        The label block as the kernel was given it (a CuPy array; NumPy under the simulator).
    background
        The label whose pixels are left out, as the kernel was given it (``skip``), or None.
    framed
        The compiled CPU kernel's encoding of a host copy of the block with its frame, for the
        perimeter (see :meth:`CudaRunKernel.encode_framed`), or None.
    """

    parts: Partials
    labels: Any
    use_skip: bool
    skip: np.uint64
    table: Any
    mask: np.uint64
    ids: Any
    packed: Any
    local: NDArray[np.intp]
    segment: int
    offset: tuple[int, int, int]
    totals: NDArray[np.uint64]
    source: Any
    background: int | None
    framed: LabelRuns | None = None

    def host_runs(self) -> LabelRuns:
        """The compiled CPU kernel's encoding (:class:`~xr_rasteragg.kernels.numba.LabelRuns`)
        of a host copy of the block, for the work done on the host: the families without GPU
        updates (:mod:`~xr_rasteragg.kernels.cuda_shape`) and the whole-label gather. Made once
        (the frame's when :meth:`CudaRunKernel.encode_framed` made one); its labels are those of
        :attr:`parts`, row by row (both kernels sort them by id and skip the same label)."""
        return self.framed if self.framed is not None else self._host_runs

    @cached_property
    def _host_runs(self) -> LabelRuns:
        from .numba import block_partials as cpu

        return _checked(cpu.encode(to_numpy(self.source), self.offset, self.background), self.parts)

    def walk(self) -> tuple[Any, ...]:
        """The leading arguments of every kernel that walks the runs."""
        return (self.labels, self.segment, self.use_skip, self.skip, self.table, self.mask, self.ids)

    @property
    def threads(self) -> int:
        """Threads that walk the block: one per segment of a row."""
        nz, ny, nx = self.labels.shape
        return int(nz * ny * -(-nx // self.segment))


class CudaRunKernel:
    """The fused GPU kernel, in two stages: the label block once, then each group of channels.

    Parameters
    ----------
    segment
        Pixels of a row that one CUDA thread walks (runs that cross a segment's end are split).
    slots
        The fewest slots of a block's hash table of labels (a power of two; a table grows to at
        least twice the bound on its block's labels).
    """

    def __init__(self, segment: int = SEGMENT, slots: int = 1024) -> None:
        if segment < 1:
            raise ValueError(f"'segment' must be at least 1 pixel; got {segment}")
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"'slots' must be a power of two; got {slots}")
        self.segment = segment
        self.slots = slots

    def encode(
        self,
        labels: Any,
        offset: tuple[int, int, int],
        skip: int | None = None,
        families: Sequence[Family] = (),
    ) -> DeviceRuns:
        """Discover, number and count the labels of a block ``(z, y, x)`` on the device.

        ``offset`` is the global (z, y, x) index of the block's first pixel, and ``skip`` a label
        whose pixels are ignored entirely (the background), or None. The ``families`` of the
        labels alone (the shape features') are filled here, once per block rather than in each
        group of channels: their kernels launched, then their fields copied to the host.
        """
        if labels.size >= 2**32:
            raise ValueError(f"a block of 'labels' must hold fewer than 2**32 pixels; got {labels.size}")
        dtype = np.dtype(labels.dtype)
        use_skip, skip_key = _skip_key(skip, dtype)
        block = _on_device(_unsigned_view(labels))
        walk = (block, self.segment, use_skip, skip_key)
        threads = int(labels.shape[0] * labels.shape[1] * -(-labels.shape[2] // self.segment))
        counter = _full((1,), np.int64, 0)
        if labels.size:
            _launch(_count_fresh, threads, *walk, counter)
        bound = int(counter.copy_to_host()[0])  # the one value read back mid-stage
        size = self.slots
        while size < 2 * bound:
            size *= 2
        mask = np.uint64(size - 1)
        table = _full((size + 1,), np.uint64, _EMPTY)
        sums = _full((size + 1, 4), np.uint64, 0)
        ids = _full((size + 1,), np.int64, -1)
        packed = _full((bound + 1, 5), np.uint64, 0)
        if bound:
            _launch(_discover, threads, *walk, table, mask, sums)
            _launch(_number, size + 1, table, sums, ids, packed)
        host = packed.copy_to_host()
        k = int(host[-1, 0])
        keys = host[:k, 0].astype(f"u{dtype.itemsize}").view(dtype)
        local = np.argsort(keys)
        count = host[local, 1].astype(np.int64)
        coords = np.stack([host[local, 2], host[local, 3], host[local, 4] / 2], axis=1).astype(np.float64)
        coords += np.asarray(offset, dtype=np.float64) * count[:, None]
        parts = Partials(keys[local], count, coords)
        start = (int(offset[0]), int(offset[1]), int(offset[2]))
        runs = DeviceRuns(
            parts,
            block,
            use_skip,
            skip_key,
            table,
            mask,
            ids,
            packed,
            local,
            self.segment,
            start,
            host[local],
            labels,
            skip,
        )
        return _filled(runs, families)

    def encode_framed(
        self,
        labels: Any,
        offset: tuple[int, int, int],
        skip: int | None,
        frame: Frame,
        families: Sequence[Family] = (),
    ) -> DeviceRuns:
        """:meth:`encode`, and the compiled CPU kernel's encoding of a host copy of the block with
        its ``frame`` (:class:`~xr_rasteragg.frames.Frame`, on the host), whose neighbourhood
        counts fill the perimeter's family (:meth:`DeviceRuns.host_runs`): the GPU kernel does
        not read a label's neighbourhood, so this family's work runs on the host."""
        from .numba import block_partials as cpu

        runs = self.encode(labels, offset, skip)
        framed = _checked(cpu.encode_framed(to_numpy(labels), offset, skip, frame), runs.parts)
        return _filled(replace(runs, framed=framed), families)

    def channels(self, runs: DeviceRuns, image: Sequence[Any] | None, needs: Needs) -> Partials:
        """Partials of a group of channel chunks ``(c_i, z, y, x)`` over an encoded label block.

        The kernels of the families beyond the moments and extrema (:data:`FAMILY_UPDATES`) are
        launched first and their fields copied to the host last, so that no launch of the stage
        waits for a copy.
        """
        parts = runs.parts.rows(0, runs.parts.size)
        filled = {f.name for f in parts.families}  # by the label stage
        copies = [
            _update(family)(parts, image, runs, family) for family in needs.more if family.name not in filled
        ]
        if image is not None and (needs.order >= 1 or needs.extrema):
            stacked = _stacked(image)
            dtype = np.dtype(stacked.dtype)
            if parts.size == 0:
                _add_empty(parts, needs, int(stacked.shape[0]), dtype)
            elif dtype.kind in "iu" and dtype.itemsize <= 2:
                _small_integer_partials(parts, runs, stacked, needs)
            else:
                _general_partials(parts, runs, stacked, needs)
        for copy in copies:
            copy()
        return parts

    def __call__(
        self,
        labels: Any,
        image: Sequence[Any] | None,
        offset: tuple[int, int, int],
        needs: Needs,
        skip: int | None = None,
    ) -> Partials:
        """Partials of one block, both stages in turn (as every block kernel is called)."""
        return self.channels(self.encode(labels, offset, skip), image, needs)


def _update(
    family: Family,
) -> Callable[[Partials, Sequence[Any] | None, DeviceRuns, Any], Callable[[], None]]:
    """The device code of ``family`` (:data:`FAMILY_UPDATES`)."""
    if type(family) not in FAMILY_UPDATES:
        raise TypeError(
            f"the CUDA kernel has no update for the family {family.name!r}; compute the "
            "statistics that need it from NumPy blocks (cupy.asnumpy)"
        )
    return FAMILY_UPDATES[type(family)]


def _filled(runs: DeviceRuns, families: Sequence[Family]) -> DeviceRuns:
    """``runs`` with the ``families`` of the labels alone added to its partials: every kernel
    launched first, their fields copied to the host last."""
    copies = [_update(family)(runs.parts, None, runs, family) for family in families]
    for copy in copies:
        copy()
    return runs


#: The kernel for CuPy blocks.
block_partials = CudaRunKernel()


def _checked(host: LabelRuns, parts: Partials) -> LabelRuns:
    """``host``, the CPU kernel's encoding of a block, once its labels are found to be those of
    the GPU kernel's ``parts`` row by row (so that its fields fill the GPU kernel's rows)."""
    if host.parts.labels.dtype != parts.labels.dtype or not np.array_equal(host.parts.labels, parts.labels):
        raise RuntimeError("the CPU and GPU kernels found different labels in one block")
    return host


def _add_empty(parts: Partials, needs: Needs, nchan: int, dtype: np.dtype) -> None:
    """The per-channel families of a block without labels."""
    channel = [f for f in needs.families if f.channel and f.name in ("valid", "moments", "extrema")]
    for family in channel:
        parts.add(family, **family.empty(0, nchan, dtype))


def _extrema_init(k: int, nchan: int, dtype: np.dtype) -> tuple[Any, Any]:
    """Device arrays of the keys of the largest and of the smallest value of ``dtype``."""
    if dtype.kind == "f":
        largest, smallest = np.array([np.inf, -np.inf], dtype)
    else:
        info = np.iinfo(dtype)
        largest, smallest = np.array([info.max, info.min], dtype)
    keys = order_keys(np.array([largest, smallest], dtype))
    return _full((k, nchan), np.uint64, keys[0]), _full((k, nchan), np.uint64, keys[1])


def _small_integer_partials(parts: Partials, runs: DeviceRuns, image: Any, needs: Needs) -> None:
    """Fill ``parts`` for an image of at most 16-bit integers from exact power sums, in place."""
    dtype = np.dtype(image.dtype)
    k, nchan = parts.size, int(image.shape[0])
    order = 4 if needs.order >= 3 else needs.order
    low = np.int64(_low(dtype))
    key_lo, key_hi = _extrema_init(k, nchan, dtype)
    power = _full((k, nchan, 6), np.uint64, 0)
    walk = runs.walk()
    _launch(
        _power_pass, runs.threads, *walk, _on_device(image), low, order, needs.extrema, power, key_lo, key_hi
    )
    moments: list[Any] = []
    if needs.order >= 1:
        moments = [cuda.device_array((k, nchan), np.int64)]
        moments += [cuda.device_array((k, nchan), np.float64) for _ in range(4)]
        _launch(_power_moments, k * nchan, runs.packed, power, low, order, *moments)
    # Every kernel is launched: the copies to the host start here.
    if needs.skipna:
        parts.add(Valid(), nvalid=np.repeat(parts.count[:, None], nchan, axis=1))
    _add_results(parts, runs, needs, dtype, (key_lo, key_hi), moments)


def _general_partials(parts: Partials, runs: DeviceRuns, image: Any, needs: Needs) -> None:
    """Fill ``parts`` for any other image with the two-pass kernels, in place."""
    dtype = np.dtype(image.dtype)
    k, nchan = parts.size, int(image.shape[0])
    kind = _kind(dtype)
    skipna = bool(needs.skipna and dtype.kind == "f")
    sign, full = _float_bits(dtype)
    zero = shift_dtype(dtype).type(0)
    device_image = _on_device(image)
    bits = _on_device(image.view(f"u{dtype.itemsize}")) if kind == _FLOAT else device_image
    key_lo, key_hi = _extrema_init(k, nchan, dtype)
    position = _full((k, nchan), np.int64, -1)
    exact = _full((k, nchan), np.int64, 0)
    total = _full((k, nchan), np.float64, 0)
    nvalid = _full((k, nchan), np.int64, 0)
    _launch(
        _first_pass, runs.threads, *runs.walk(), device_image, bits, kind, zero, np.int64(_low(dtype)),
        sign, full, skipna, needs.order >= 1, needs.extrema, position, exact, total, nvalid, key_lo, key_hi,
    )  # fmt: skip
    moments: list[Any] = []
    if needs.order >= 1:
        shift = cuda.device_array((k, nchan), shift_dtype(dtype))
        shifted = cuda.device_array((k, nchan), np.float64)
        _launch(_finish_sums, k * nchan, device_image, kind, position, exact, total, shift, shifted)
        moments = [shift, shifted]
    if needs.order >= 2:
        central = _full((k, nchan, 4), np.float64, 0)
        _launch(
            _second_pass, runs.threads, *runs.walk(), device_image, kind, skipna, runs.packed, nvalid,
            shift, shifted, needs.order, central,
        )  # fmt: skip
        moments += [cuda.device_array((k, nchan), np.float64) for _ in range(3)]
        _launch(_finish_moments, k * nchan, runs.packed, nvalid, skipna, central, needs.order, *moments[2:])
    # Every kernel is launched: the copies to the host start here.
    if needs.skipna:
        valid = nvalid.copy_to_host()[runs.local] if skipna else np.repeat(parts.count[:, None], nchan, 1)
        parts.add(Valid(), nvalid=valid)
    _add_results(parts, runs, needs, dtype, (key_lo, key_hi), moments)


def _add_results(
    parts: Partials,
    runs: DeviceRuns,
    needs: Needs,
    dtype: np.dtype,
    keys: tuple[Any, Any],
    moments: list[Any],
) -> None:
    """Copy the extrema (from their keys) and the moments (shift, shifted, M2..) to the host, by row."""
    local = runs.local
    if needs.extrema:
        lo, hi = (from_order_keys(key.copy_to_host()[local], dtype) for key in keys)
        parts.add(Extrema(), min=lo, max=hi)
    if needs.order >= 1:
        family = Moments(needs.order)
        host = [m.copy_to_host()[local] for m in moments[: needs.order + 1]]
        parts.add(family, **dict(zip(family.names(), host, strict=True)))


#: Kernel code for the families beyond counts, moments and extrema, by family type: each
#: launches the kernels of its family over the encoded runs (and the image chunks, or None) and
#: returns the step that copies its fields to the host and adds them to the block's partials,
#: the fields of :data:`xr_rasteragg.kernels.numba.FAMILY_UPDATES` on the CPU.
FAMILY_UPDATES: dict[
    type[Family], Callable[[Partials, Sequence[Any] | None, DeviceRuns, Any], Callable[[], None]]
] = {}


def _register_shape_updates() -> None:
    """Add the kernel code of the moment-based shape families (:mod:`~xr_rasteragg.kernels.cuda_shape`)."""
    from .cuda_shape import SHAPE_UPDATES

    FAMILY_UPDATES.update(SHAPE_UPDATES)


_register_shape_updates()
