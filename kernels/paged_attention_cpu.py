"""Paged decode attention on CPU (XLA FFI, C++): one query token per row over its pages.

    o[b, h] = softmax([s_cache ; s_new]) [V_cache ; v_new],   s = scale * q[b, h] . k
    over the row's tokens t < len_b (page table[b, t // S], slot t % S) and its own
    new key/value (the cache protocol's step semantics, model/cache.py)

PagedAttention (Kwon et al. 2023, arXiv 2309.06180 §4.1) on CPU: `paged_decode_attention`
reads each row's valid tokens once, in place in the [K, P, S, E] pools (the layout of
kernels/paged_attention.py), for the G query heads that share a kv head, split over
the threads of XLA's intra-op pool (`kernels/paged_attention_cpu.cc` explains why and
how). Plain XLA gathers every row's full table width into a copy first, a write and
a second read of the cache per step (`paged_decode_attention_reference`, which the
kernel is tested against). Slots at or past a row's length are never read: stale or
NaN entries of free or half-filled pages cannot reach o.

`contiguous_decode_attention` is the same kernel over the contiguous cache
(model/kv_cache.py's [B, T, K, E] buffers), read as one page of T slots per row:
XLA:CPU runs that step as a chain of small products and reductions, each a few
tens of microseconds (docs/performance.md, SmolLM2 batch 8).

Built on first use like the other CPU kernels (kernels/cpu_build.py: the system C++
compiler, jaxlib's FFI headers, `$MOELAB_KERNEL_CACHE`), with -ffast-math added so
the max over a block's scores vectorises; `available()` says whether it built.

Shapes: B rows, H query heads, K kv heads, G = H / K, E head width (Ek keys and
queries, Ev values), P pages, S page size, M pages per row, T = M * S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kernels.cpu_build import FLAGS, CppKernel, cores

TARGET = "moelab_paged_attention_cpu"
_KERNEL = CppKernel("paged_attention_cpu.cc", {TARGET: "PagedAttentionCpu"},
                    flags=FLAGS + ("-ffast-math",))


def build_error() -> str:
  """Why the kernel is not available ('' if it is)."""
  return _KERNEL.build_error()


def available() -> bool:
  """Whether `paged_decode_attention` can run: a CPU backend and a built kernel."""
  return _KERNEL.available()


def paged_decode_attention(q_BxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE, block_tables_BxM,
                           lengths_B, k_new_BxKxE, v_new_BxKxE, *, scale=None, threads=None):
  """o_BxHxE (Ev wide) of one query token per row (see the module docstring).

  The pools are float32, bfloat16, or uint16 holding bfloat16 bits (both the same;
  widened on read; any other dtype is widened to float32 first). q, k_new and v_new are read as bfloat16 when all three
  are (o is then bfloat16, rounded in the kernel), else widened to float32.

  threads: threads of XLA's intra-op pool the (row, kv head) tasks are split over
  (None: this process's cores).
  """
  return _call(q_BxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE, block_tables_BxM, lengths_B,
               k_new_BxKxE, v_new_BxKxE, scale, threads, layout=0)


def contiguous_decode_attention(q_BxHxE, k_BxTxKxE, v_BxTxKxE, lengths_B, k_new_BxKxE,
                                v_new_BxKxE, *, scale=None, threads=None):
  """o_BxHxE (Ev wide, q's dtype): `paged_decode_attention` over a contiguous cache.

  Row b attends to its slots t < lengths_B[b] and its new key/value. The cache is
  float32, bfloat16, or uint16 holding bfloat16 bits (model/cache.py's BF16_BITS),
  read as it is; other dtypes are widened to float32 (q, k_new, v_new as in
  `paged_decode_attention`; o in q's dtype).
  """
  table_Bx1 = jnp.arange(q_BxHxE.shape[0], dtype=jnp.int32)[:, None]
  o = _call(q_BxHxE, k_BxTxKxE, v_BxTxKxE, table_Bx1, lengths_B, k_new_BxKxE, v_new_BxKxE,
            scale, threads, layout=1)
  return o.astype(q_BxHxE.dtype)


def _call(q_BxHxE, k, v, table_BxM, lengths_B, k_new_BxKxE, v_new_BxKxE, scale, threads,
          layout: int):
  if not available():
    raise RuntimeError(f"paged_attention_cpu kernel unavailable: "
                       f"{build_error() or 'not the CPU backend'}")
  b, h, e = q_BxHxE.shape
  scale = e ** -0.5 if scale is None else scale
  # The step's own tensors go in as they are when all bfloat16 (no XLA convert op).
  io = (jnp.bfloat16 if q_BxHxE.dtype == k_new_BxKxE.dtype == v_new_BxKxE.dtype == jnp.bfloat16
        else jnp.float32)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((b, h, v.shape[-1]), io),
                          vmap_method="sequential")
  # float32, bfloat16 or its bits in uint16 go in as they are; the rest widened.
  cache = lambda x: x if x.dtype in (jnp.float32, jnp.bfloat16, jnp.uint16) else x.astype(
      jnp.float32)
  return call(q_BxHxE.astype(io), cache(k), cache(v), table_BxM.astype(jnp.int32),
              lengths_B.astype(jnp.int32), k_new_BxKxE.astype(io), v_new_BxKxE.astype(io),
              threads=np.int64(threads or cores()), scale=np.float32(scale),
              layout=np.int64(layout))


def paged_decode_attention_reference(q_BxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE,
                                     block_tables_BxM, lengths_B, k_new_BxKxE, v_new_BxKxE, *,
                                     scale=None):
  """Plain XLA: gather each row's pages, mask by length, one softmax with the new key."""
  b, h, e = q_BxHxE.shape
  k, p, s, _ = k_pages_KxPxSxE.shape
  t = block_tables_BxM.shape[1] * s
  tables = jnp.clip(block_tables_BxM, 0, p - 1)
  valid_BxT = jnp.arange(t)[None] < jnp.clip(lengths_B, 0, t)[:, None]
  gather = lambda x: jnp.where(valid_BxT[None, :, :, None],
                               x[:, tables].reshape(k, b, t, x.shape[-1]), 0)
  q = q_BxHxE.reshape(b, k, h // k, e).astype(jnp.float32)
  scale = e ** -0.5 if scale is None else scale
  s_cache = jnp.einsum("bkge,kbte->bkgt", q, gather(k_pages_KxPxSxE))
  s_new = jnp.einsum("bkge,bke->bkg", q, k_new_BxKxE)[..., None]
  s_all = jnp.concatenate([jnp.where(valid_BxT[:, None, None], s_cache, -jnp.inf), s_new], -1)
  w = jax.nn.softmax(s_all * scale, axis=-1)
  o = (jnp.einsum("bkgt,kbte->bkge", w[..., :t], gather(v_pages_KxPxSxE))
       + w[..., t:] * v_new_BxKxE[:, :, None])
  return o.reshape(b, h, -1).astype(q_BxHxE.dtype)
