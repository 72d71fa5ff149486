"""The model's weight products y = x @ W, with the implementation `impl.matmul` picks.

    project(x_BxLxK, w_KxM, impl, dtype)                   -> y_BxLxM
    project(x_BxLxK, w_MxK, impl, dtype, transpose_w=True) -> y_BxLxM   (tied unembedding)

Both operands are taken in `dtype` (the weight cast at use, as everywhere in
the model), the product accumulated in float32 and returned in `dtype`
(or `out_dtype`: the unembedding returns float32 logits via `einsum_f32`).
With impl.matmul 'cpu_kernel' (decode/backend.py picks it on CPU) a product
of at most DECODE_ROWS rows, a decode step, runs in the C++ kernel of
kernels/matmul_cpu.py, which reads W once for all rows (with impl.matmul_packed
laid out in 32-column blocks first, `matmul_cpu.pack_km`); so does a
bfloat16 product of any size (a prompt's prefill: XLA:CPU widens every bf16
weight in a pass of its own before its dot, docs/performance.md). Other
products (float32 prefill, training) and impl.matmul 'xla' are XLA dots.

A module gives `project` each [K, M] weight's packed layout too
(`project_km`, `packed_km`): from its "packed" variable collection when the caller passed
one (laid out once per set of weights, decode/generate.py `packed_weights`),
else laid out in the graph, which XLA hoists out of a decode loop but redoes
on every call of the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import matmul_cpu
from model.impl import ModelImpl

DECODE_ROWS = 16  # products with at most this many rows (B * L) take the kernel
PACKED = "packed"  # the variable collection of weights laid out by matmul_cpu.pack_km


def einsum_f32(spec: str, x, y):
  """jnp.einsum(spec, x, y) returned as its float32 accumulator (bf16 scores, logits).

  The backward pass casts the float32 cotangent to the operands' dtype, so its
  products run at the bf16 rate like every other (a float32 x bf16 dot would
  run at the float32 rate); float32 operands take the plain einsum.
  """
  if x.dtype == y.dtype == jnp.float32:
    return jnp.einsum(spec, x, y)
  return _einsum_f32(spec, x, y)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_f32(spec, x, y):
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, x, y):
  return _einsum_f32(spec, x, y), (x, y)


def _einsum_f32_bwd(spec, res, g):
  x, y = res
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, y)
  return vjp(g.astype(jnp.result_type(x, y)))


_einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


def kernel_weight(w, dtype):
  """W as the kernel takes it for products in `dtype`: cast, except that a stored bfloat16 W
  stays bfloat16 for float32 products (the kernel widens it in registers, exactly: no pass
  over all of W to cast it)."""
  dt = jnp.dtype(dtype)
  if w.dtype != dt and not (w.dtype == jnp.bfloat16 and dt == jnp.float32):
    return w.astype(dt)
  return w


def packed_km(module, name: str, w_KxM, impl: ModelImpl, dtype):
  """`module`'s [K, M] weight `name` laid out for the kernel (`matmul_cpu.pack_km` of
  `kernel_weight`), or None without impl.matmul_packed: the module's "packed" variable
  where the caller passed that collection, else laid out here (and stored, where the
  collection is mutable: how decode/generate.py `packed_weights` builds it)."""
  if not impl.matmul_packed:
    return None
  if module.has_variable(PACKED, name):
    return module.get_variable(PACKED, name)
  p = matmul_cpu.pack_km(kernel_weight(w_KxM, dtype), impl.matmul_threads)
  if module.is_mutable_collection(PACKED):
    module.put_variable(PACKED, name, p)
  return p


def project_km(module, name: str, x_BxLxK, w_KxM, dtype):
  """x @ W for `module`'s [K, M] weight `name` (its `impl`): `project` with its packed
  layout (`packed_km`), the way every projection of the model calls it."""
  return project(x_BxLxK, w_KxM, module.impl, dtype,
                 packed_w=packed_km(module, name, w_KxM, module.impl, dtype))


def project(x_BxLxK, w, impl: ModelImpl, dtype, transpose_w: bool = False, out_dtype=None,
            packed_w=None):
  """x @ W (W [K, M]) or x @ W^T (W [M, K], `transpose_w`); see the module docstring.

  out_dtype: the result's dtype if not `dtype` (the unembedding of a bf16 model
  returns its float32 accumulator, so the logits are not rounded to bf16).
  packed_w: W laid out for the kernel (`packed_km`): the kernel's products read it
  instead of W; None: they read W.
  """
  dt = jnp.dtype(dtype)
  out = jnp.dtype(out_dtype or dt)
  x = x_BxLxK.astype(dt)
  b, l, k = x.shape
  if impl.matmul == "cpu_kernel" and (b * l <= DECODE_ROWS or dt == jnp.bfloat16):
    packed = packed_w is not None and not transpose_w
    y = matmul_cpu.matmul(x.reshape(b * l, k), packed_w if packed else kernel_weight(w, dt),
                          transpose_w, impl.matmul_threads, out_dtype=out, packed=packed)
    return y.reshape(b, l, -1)
  w = w.astype(dt)
  spec = "blk,mk->blm" if transpose_w else "blk,km->blm"
  return einsum_f32(spec, x, w) if out == jnp.float32 else jnp.einsum(spec, x, w)
