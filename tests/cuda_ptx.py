"""Compile every CUDA kernel of ``xr_rasteragg.kernels.cuda_runs`` and ``cuda_shape`` to PTX for a
Hopper GPU (sm_90).

Run as a script, without Numba's CUDA simulator (which compiles nothing): Numba types and
compiles each kernel for the argument types that ``xr_rasteragg.kernels.cuda`` passes, for
every image dtype, as on a device. It needs NVIDIA's NVVM and NVRTC libraries (the pip packages
of ``cuda-toolkit[nvvm,nvrtc]``), not a GPU. Exits 3 when they are missing; prints the kernels
that failed and exits 1 otherwise.
"""

from __future__ import annotations

import sys

from numba import cuda
from numba.core import types

import xr_rasteragg.kernels.cuda_runs as k
import xr_rasteragg.kernels.cuda_shape as shape


def array(dtype: types.Type, ndim: int, layout: str = "A") -> types.Array:
    return types.Array(dtype, ndim, layout)


U64, I64, F64, B = types.uint64, types.int64, types.float64, types.boolean
WALK = (array(types.uint32, 3), I64, B, U64)
RUNS = (*WALK, array(U64, 1), U64, array(I64, 1))
KERNELS: list[tuple[str, object, tuple[types.Type, ...]]] = [
    ("count_fresh", k._count_fresh, (*WALK, array(I64, 1))),
    ("discover", k._discover, (*WALK, array(U64, 1), U64, array(U64, 2))),
    ("number", k._number, (array(U64, 1), array(U64, 2), array(I64, 1), array(U64, 2))),
    (
        "power_moments",
        k._power_moments,
        (array(U64, 2), array(U64, 3), I64, I64, array(I64, 2), *[array(F64, 2)] * 4),
    ),
    (
        "finish_moments",
        k._finish_moments,
        (array(U64, 2), array(I64, 2), B, array(F64, 3), I64, *[array(F64, 2)] * 3),
    ),
    ("fill", k._fill, (array(U64, 1), U64)),
    ("geometry_pass", shape._geometry_pass, (*RUNS, array(U64, 1), *[array(U64, 2)] * 3)),
]
for small in (types.uint8, types.int8, types.uint16, types.int16):
    KERNELS.append(
        (f"power_pass {small}", k._power_pass,
         (*RUNS, array(small, 4), I64, I64, B, array(U64, 3), array(U64, 2), array(U64, 2)))
    )  # fmt: skip
IMAGES = (types.uint8, types.int8, types.uint16, types.int16, types.int32, types.uint32, types.int64)
for image in (*IMAGES, types.uint64, types.float32, types.float64):
    weighted = (*RUNS, array(image, 4), F64, F64, F64, array(F64, 3))
    KERNELS.append((f"weighted_pass {image}", shape._weighted_pass, weighted))
for image, bits, shift in (
    (types.float32, types.uint32, F64), (types.float64, types.uint64, F64), (types.int32, types.int32, I64),
    (types.uint32, types.uint32, I64), (types.int64, types.int64, I64), (types.uint64, types.uint64, U64),
):  # fmt: skip
    KERNELS += [
        (f"first_pass {image}", k._first_pass,
         (*RUNS, array(image, 4), array(bits, 4), I64, shift, I64, U64, U64, B, B, B, array(I64, 2),
          array(I64, 2), array(F64, 2), array(I64, 2), array(U64, 2), array(U64, 2))),
        (f"finish_sums {image}", k._finish_sums,
         (array(image, 4), I64, array(I64, 2), array(I64, 2), array(F64, 2), array(shift, 2), array(F64, 2))),
        (f"second_pass {image}", k._second_pass,
         (*RUNS, array(image, 4), I64, B, array(U64, 2), array(I64, 2), array(shift, 2), array(F64, 2), I64,
          array(F64, 3))),
    ]  # fmt: skip


def main() -> None:
    """Compile each kernel; exit 0 when all compile, 1 when one fails, 3 without NVVM/NVRTC."""
    failed = []
    for name, kernel, signature in KERNELS:
        try:
            cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))  # type: ignore[attr-defined]
        except Exception as error:
            if "Failure finding" in str(error) or "libnvvm" in str(error).lower():
                print(f"NVVM/NVRTC not found: {error}")
                sys.exit(3)
            failed.append(f"{name}: {type(error).__name__}: {error}")
    print("\n".join(failed) or f"compiled {len(KERNELS)} kernels")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
