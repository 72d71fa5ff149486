"""Decode-sized products y = x @ W as a CPU kernel (XLA FFI, C++), float32 or bfloat16 W.

    y_NxM = x_NxK @ W_KxM          transpose_w=False
    y_NxM = x_NxK @ W_MxK^T        transpose_w=True  (a tied [V, D] unembedding)
    y_NxM = x_NxK @ W_KxM          packed=True, W given as pack_km(W_KxM)

`matmul` reads W once, in place, for all N rows, split over the threads of
XLA's intra-op pool, widening a bfloat16 W to float32 in registers and
accumulating in float32 (`kernels/matmul_cpu.cc` explains the split).
XLA:CPU widens a bfloat16 weight in a separate pass over all of it before
its dot, and multiplies several rows by a transposed weight far below the
memory read rate without YNNPACK; a decode step, bound by reading its
weights, is what this speeds up. `pack_km` lays a [K, M] W out in 32-column
blocks that a step reads as sequential streams (kernels/matmul_cpu_packed.h;
bfloat16 rows in pairs, as the bfloat16 units take them): once per decode
loop, the same sums. `matmul_reference` is the same product
in plain XLA, the one the kernel is tested against.

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
# amx=None: products of at least this many rows take the AMX tiles. A 1-row product is
# bound by its weight read, which VDPBF16PS keeps up with; the tiles' layout of W costs
# more there (docs/performance.md, SmolLM2 on AMX).
AMX_MIN_ROWS = 2
# pack_km: the columns of W a block holds (kernels/matmul_cpu.cc PACK_COLUMNS).
PACK_COLUMNS = 32
PACK_TARGET = "moelab_pack_km"
_KERNEL = CppKernel("matmul_cpu.cc", {TARGET: "Matmul", PACK_TARGET: "PackKM"})


def available() -> bool:
  """Whether `matmul` can run: a CPU backend and a built kernel."""
  return _KERNEL.available()


def build_error() -> str:
  """Why the kernel is not available ('' if it is)."""
  return _KERNEL.build_error()


def bf16_units() -> tuple[str, ...]:
  """The units this build multiplies bfloat16 pairs on: 'amx' (AMX-BF16 tiles the OS
  granted), 'avx512_bf16' (VDPBF16PS); empty where neither (float32 FMAs)."""
  if not available():
    return ()
  units = _KERNEL.library.MoelabMatmulBf16Units()
  return tuple(name for bit, name in ((2, "amx"), (1, "avx512_bf16")) if units & bit)


def pack_km(w_KxM, threads: int = 1):
  """W [K, M] with its columns in blocks of PACK_COLUMNS, each one contiguous run of K x 32
  elements (the last block narrower), in an array of W's shape: float32 as the [K, 32]
  matrix, bfloat16 with rows 2p and 2p + 1 interleaved into pairs along k (the order
  VDPBF16PS and the AMX tiles take W; an odd last row after them as it is).
  `matmul(..., packed=True)` then reads every block as one sequential stream, which the
  hardware prefetchers follow, where a [K, M] W gives one short run per row and block.
  Copied in row segments by `threads` of XLA's pool (XLA's own transpose,
  `pack_km_reference`, runs ~10x slower on CPU); `unpack_km` inverts it."""
  if not available():
    raise RuntimeError(f"matmul_cpu kernel unavailable: {build_error() or 'not the CPU backend'}")
  if w_KxM.dtype not in WEIGHT_DTYPES or w_KxM.ndim != 2:
    raise ValueError(f"matmul_cpu.pack_km: a float32 or bfloat16 [K, M] weight "
                     f"(got {w_KxM.shape} {w_KxM.dtype})")
  call = jax.ffi.ffi_call(PACK_TARGET, jax.ShapeDtypeStruct(w_KxM.shape, w_KxM.dtype),
                          vmap_method="sequential")
  return call(w_KxM, threads=np.int64(max(1, threads)))


def _block_order(w_KxW):
  """One block's [K, width] elements in pack_km's order, flat."""
  k, width = w_KxW.shape
  if w_KxW.dtype != jnp.bfloat16 or k < 2:
    return w_KxW.reshape(-1)
  even = k // 2 * 2
  pairs = w_KxW[:even].reshape(k // 2, 2, width).transpose(0, 2, 1).reshape(-1)
  return jnp.concatenate([pairs, w_KxW[even:].reshape(-1)])


def _block_from(flat, k: int, width: int, dtype):
  """`_block_order`'s inverse: the [K, width] block."""
  if dtype != jnp.bfloat16 or k < 2:
    return flat.reshape(k, width)
  even = k // 2 * 2
  pairs = flat[:even * width].reshape(k // 2, width, 2).transpose(0, 2, 1).reshape(even, width)
  return jnp.concatenate([pairs, flat[even * width:].reshape(k - even, width)])


def pack_km_reference(w_KxM):
  """`pack_km` in plain XLA."""
  k, m = w_KxM.shape
  cuts = range(0, m, PACK_COLUMNS)
  return jnp.concatenate([_block_order(w_KxM[:, c:c + PACK_COLUMNS]) for c in cuts]).reshape(k, m)


def unpack_km(p_KxM):
  """The [K, M] W that `pack_km` packed into p."""
  k, m = p_KxM.shape
  flat = p_KxM.reshape(-1)
  blocks = [_block_from(flat[c * k:(c + min(PACK_COLUMNS, m - c)) * k], k,
                        min(PACK_COLUMNS, m - c), p_KxM.dtype) for c in range(0, m, PACK_COLUMNS)]
  return jnp.concatenate(blocks, axis=1)


def matmul(x_NxK, w, transpose_w: bool = False, threads: int = 1,
           chunk_bytes: int = CHUNK_BYTES, out_dtype=jnp.float32, amx: bool | None = None,
           packed: bool = False):
  """y_NxM in `out_dtype` (see the module docstring); x is taken as float32 unless bfloat16.

  out_dtype: float32, or bfloat16 (the float32 sums rounded to nearest even in
  the kernel, as `.astype` would: no separate XLA op per product).

  A bfloat16 x with a bfloat16 W multiplies in bfloat16 pairs (VDPBF16PS) where
  the CPU has AVX512-BF16 (kernels/matmul_cpu.cc): the same exact products,
  summed in another fixed order; on the AMX tiles where the CPU has AMX-BF16 and
  `amx` (kernels/matmul_cpu_amx.h, a third fixed order; `bf16_units()` says which
  this build has). amx=None: for products of at least AMX_MIN_ROWS rows.

  packed: W [K, M] is `pack_km(W)` (not with transpose_w).

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
  if packed and transpose_w:
    raise ValueError("matmul_cpu: packed=True takes a pack_km [K, M] weight, not transpose_w")
  if jnp.dtype(out_dtype) not in WEIGHT_DTYPES:
    raise ValueError(f"matmul_cpu: out_dtype must be float32 or bfloat16 (got {out_dtype})")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x_NxK.shape[0], m), out_dtype),
                          vmap_method="sequential")
  x = x_NxK if x_NxK.dtype == jnp.bfloat16 else x_NxK.astype(jnp.float32)
  return call(x, w, transpose_w=bool(transpose_w), threads=np.int64(max(1, threads)),
              chunk_bytes=np.int64(max(1, chunk_bytes)),
              amx=bool(x_NxK.shape[0] >= AMX_MIN_ROWS if amx is None else amx),
              packed=bool(packed))


def matmul_reference(x_NxK, w, transpose_w: bool = False):
  """Plain XLA, float32 accumulation of the float32-widened operands."""
  w = w.astype(jnp.float32)
  return jnp.dot(x_NxK.astype(jnp.float32), w.T if transpose_w else w,
                 precision=jax.lax.Precision.HIGHEST)
