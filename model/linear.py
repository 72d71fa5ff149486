"""The model's weight products y = x @ W, with the implementation `impl.matmul` picks.

    project(x_BxLxK, w_KxM, impl, dtype)                   -> y_BxLxM
    project(x_BxLxK, w_MxK, impl, dtype, transpose_w=True) -> y_BxLxM   (tied unembedding)

Both operands are taken in `dtype` (the weight cast at use, as everywhere in
the model), the product accumulated in float32 and returned in `dtype`.
With impl.matmul 'cpu_kernel' (decode/backend.py picks it on CPU) a product
of at most DECODE_ROWS rows, a decode step, runs in the C++ kernel of
kernels/matmul_cpu.py, which reads W once, in place, for all rows; larger
products (prefill, training) and impl.matmul 'xla' are XLA dots.
"""

from __future__ import annotations

import jax.numpy as jnp

from kernels import matmul_cpu
from model.impl import ModelImpl

DECODE_ROWS = 16  # products with at most this many rows (B * L) take the kernel


def project(x_BxLxK, w, impl: ModelImpl, dtype, transpose_w: bool = False):
  """x @ W (W [K, M]) or x @ W^T (W [M, K], `transpose_w`); see the module docstring."""
  dt = jnp.dtype(dtype)
  x, w = x_BxLxK.astype(dt), w.astype(dt)
  b, l, k = x.shape
  if impl.matmul == "cpu_kernel" and b * l <= DECODE_ROWS:
    y = matmul_cpu.matmul(x.reshape(b * l, k), w, transpose_w, impl.matmul_threads)
    return y.astype(dt).reshape(b, l, -1)
  return jnp.einsum("blk,mk->blm" if transpose_w else "blk,km->blm", x, w)
