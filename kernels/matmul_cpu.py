"""Decode-sized products y = x @ W as a CPU kernel (XLA FFI, C++), float32 or bfloat16 W.

    y_NxM = x_NxK @ W_KxM          transpose_w=False
    y_NxM = x_NxK @ W_MxK^T        transpose_w=True  (a tied [V, D] unembedding)

`matmul` reads W once, in place, for all N rows, split over the threads of
XLA's intra-op pool, widening a bfloat16 W to float32 in registers and
accumulating in float32 (`kernels/matmul_cpu.cc` explains the split).
XLA:CPU widens a bfloat16 weight in a separate pass over all of it before
its dot, and multiplies several rows by a transposed weight far below the
memory read rate without YNNPACK; a decode step, bound by reading its
weights, is what this speeds up. `matmul_reference` is the same product in
plain XLA, the one the kernel is tested against.

Built on first use and cached (kernels/cpu_build.py); `available()` says
whether that worked, `build_error()` why not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu_build import CppKernel

TARGET = "moelab_matmul"
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)
# Weight bytes per chunk (kernels/matmul_cpu.cc): a product of fewer runs on
# the calling thread alone (a pool task's wake-up costs more than it saves).
CHUNK_BYTES = 1 << 19
_KERNEL = CppKernel("matmul_cpu.cc", {TARGET: "Matmul"})


def available() -> bool:
  """Whether `matmul` can run: a CPU backend and a built kernel."""
  return _KERNEL.available()


def build_error() -> str:
  """Why the kernel is not available ('' if it is)."""
  return _KERNEL.build_error()


def matmul(x_NxK, w, transpose_w: bool = False, threads: int = 1,
           chunk_bytes: int = CHUNK_BYTES, out_dtype=jnp.float32):
  """y_NxM in `out_dtype` (see the module docstring); x is taken as float32 unless bfloat16.

  out_dtype: float32, or bfloat16 (the float32 sums rounded to nearest even in
  the kernel, as `.astype` would: no separate XLA op per product).

  A bfloat16 x with a bfloat16 W multiplies in bfloat16 pairs (VDPBF16PS) where
  the CPU has AVX512-BF16 (kernels/matmul_cpu.cc): the same exact products,
  summed in another fixed order.

  threads: threads of XLA's intra-op pool that share W's read, in chunks
  of about `chunk_bytes` of its output columns (the result depends on
  neither: every sum runs in one order, kernels/matmul_cpu.cc).
  """
  if not available():
    raise RuntimeError(f"matmul_cpu kernel unavailable: {build_error() or 'not the CPU backend'}")
  if w.dtype not in WEIGHT_DTYPES or w.ndim != 2 or x_NxK.ndim != 2:
    raise ValueError(f"matmul_cpu: x [N, K] and a float32 or bfloat16 [K, M] / [M, K] weight "
                     f"(got {x_NxK.shape}, {w.shape} {w.dtype})")
  k_w, m = (w.shape[1], w.shape[0]) if transpose_w else w.shape
  if k_w != x_NxK.shape[1]:
    raise ValueError(f"matmul_cpu: contraction sizes differ: x {x_NxK.shape}, w {w.shape} "
                     f"(transpose_w={transpose_w})")
  if jnp.dtype(out_dtype) not in WEIGHT_DTYPES:
    raise ValueError(f"matmul_cpu: out_dtype must be float32 or bfloat16 (got {out_dtype})")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x_NxK.shape[0], m), out_dtype),
                          vmap_method="sequential")
  x = x_NxK if x_NxK.dtype == jnp.bfloat16 else x_NxK.astype(jnp.float32)
  return call(x, w, transpose_w=bool(transpose_w), threads=np.int64(max(1, threads)),
              chunk_bytes=np.int64(max(1, chunk_bytes)))


def matmul_reference(x_NxK, w, transpose_w: bool = False):
  """Plain XLA, float32 accumulation of the float32-widened operands."""
  w = w.astype(jnp.float32)
  return jnp.dot(x_NxK.astype(jnp.float32), w.T if transpose_w else w,
                 precision=jax.lax.Precision.HIGHEST)
