"""Attention over a paged KV cache: in plain XLA (gather by block table, mask by length),
and one-token steps in the Pallas kernels.

PagedAttention (Kwon et al. 2023, arXiv 2309.06180 §4.1): token t of row b lives in
page block_table[b, t // S], slot t % S, of a pool shared by all rows. A step's L
queries of row b attend to the row's cached tokens t < length_b and, causally, to
the step's own L keys (the cache protocol, model/cache.py), in one softmax:

    k_KxBxTxE = k_pages_KxPxSxE[:, block_table_BxM]       (T = M * S, a gather)
    s = q K^T / sqrt(E)  over [cached t < length_b ; the step's own keys (causal)]
    o = softmax(s) [V_cached ; V_new]

This is the semantics of `kernels.paged_attention.paged_attention` (impl='reference',
the reference the Pallas kernels match), extended by the step's own keys: slots at
or past a row's length are zeroed in K and V before any product (their score
-1e30), so stale or NaN entries of free, foreign or half-filled pages never reach
the output, and table entries past a row's pages (NULL_PAGE) are clipped into range
and masked. For one query token this equals the reference over length + 1 tokens
with the step's key written at position length (tests/decode/test_paged_cache.py
checks it); the kernel itself attends to the cache alone and returns o without its
log-sum-exp, which merging the step's own key into the softmax would need, so
`pallas_attend` / `pallas_attend_latent` run after the step's write, over length + 1
tokens (`PagedKVCache.attend_update`, impl.attention='pallas').

Layout: the pool is [K, P, S, E] (the kernels' layout), so the gathered keys come
out [K, B, T, E] with both batch axes leading and no transpose of the cache.

Shape names (README legend): B rows, L tokens per step, H query heads, K kv heads,
G = H / K, E head width, C latent width, R rope width, W = C + R, P pages, S page size,
M pages per row, T = M * S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

from kernels import mla_attention, paged_attention
from model.cache import values

NEG = -1e30  # masked score (as model/attention.py): exp underflows to exactly 0


def gather_pages(pages_KxPxSxE, table_BxM, length_B):
  """[K, B, M * S, E]: each row's pages in table order, zero at slots >= length_b."""
  k, p, s, e = pages_KxPxSxE.shape
  b, m = table_BxM.shape
  x_KxBxTxE = jnp.take(pages_KxPxSxE, jnp.clip(table_BxM, 0, p - 1), axis=1,
                       mode="clip").reshape(k, b, m * s, e)
  valid_BxT = jnp.arange(m * s, dtype=jnp.int32)[None] < length_B[:, None]
  return jnp.where(valid_BxT[None, :, :, None], x_KxBxTxE, jnp.zeros((), x_KxBxTxE.dtype))


def attend_paged(q_BxLxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE, table_BxM, length_B,
                 k_new_BxLxKxE, v_new_BxLxKxE, new_mask_BxLxL):
  """The step's queries over each row's cached tokens < length_B and its own keys.

  Args:
    q_BxLxHxE: queries (rotated); k_new/v_new_BxLxKxE the step's own keys/values.
    k/v_pages_KxPxSxE: the pools; table_BxM the block table (NULL_PAGE past a row's
      pages); length_B the cached tokens each row may read (its first position).
    new_mask_BxLxL: True where query l may attend to the step's key m.
  Returns:
    o_BxLxHxE in q's dtype (softmax in float32).
  """
  b, l, h, e = q_BxLxHxE.shape
  num_kv = k_pages_KxPxSxE.shape[0]
  t = table_BxM.shape[1] * k_pages_KxPxSxE.shape[2]
  # Gathered first, then read as bfloat16 where the pools hold its bits (BF16_BITS).
  k_KxBxTxE = values(gather_pages(k_pages_KxPxSxE, table_BxM, length_B))
  v_KxBxTxE = values(gather_pages(v_pages_KxPxSxE, table_BxM, length_B))
  q_KxBxLxGxE = rearrange(q_BxLxHxE, "b l (k g) e -> k b l g e", k=num_kv)
  s_cache = jnp.einsum("kblge,kbte->kblgt", q_KxBxLxGxE, k_KxBxTxE)
  s_new = jnp.einsum("kblge,bmke->kblgm", q_KxBxLxGxE, k_new_BxLxKxE)
  s = jnp.concatenate([s_cache, s_new], axis=-1).astype(jnp.float32) * e ** -0.5
  valid_BxT = jnp.arange(t, dtype=jnp.int32)[None] < length_B[:, None]
  mask_BxLxTL = jnp.concatenate(
      [jnp.broadcast_to(valid_BxT[:, None], (b, l, t)), new_mask_BxLxL], axis=-1)
  s = jnp.where(mask_BxLxTL[None, :, :, None], s, NEG)
  p = jax.nn.softmax(s, axis=-1).astype(v_KxBxTxE.dtype)
  o = (jnp.einsum("kblgt,kbte->kblge", p[..., :t], v_KxBxTxE)
       + jnp.einsum("kblgm,bmke->kblge", p[..., t:], v_new_BxLxKxE))
  return rearrange(o, "k b l g e -> b l (k g) e").astype(q_BxLxHxE.dtype)


def pallas_attend(q_BxHxE, k_pages_KxPxSxE, v_pages_KxPxSxE, table_BxM, length_B, impl):
  """o_BxHxE of one query token per row over its first length_B tokens, in the Pallas
  kernel impl.attention_kernel (interpreted if impl.interpret); q cast to the pool's
  dtype (the kernel takes one), o back to q's."""
  o_BxHxE = paged_attention.paged_attention(
      q_BxHxE.astype(k_pages_KxPxSxE.dtype), k_pages_KxPxSxE, v_pages_KxPxSxE,
      table_BxM.astype(jnp.int32), length_B.astype(jnp.int32), impl=impl.attention_kernel,
      interpret=impl.interpret)
  return o_BxHxE.astype(q_BxHxE.dtype)


def pallas_attend_latent(q_latent_BxHxC, q_rope_BxHxR, latent_pages_PxSxW, table_BxM,
                         length_B, scale: float, impl):
  """`pallas_attend` for absorbed MLA over [c_kv ; k_rope] pages: o_latent_BxHxC."""
  dt = latent_pages_PxSxW.dtype
  o_BxHxC = mla_attention.mla_decode_attention(
      q_latent_BxHxC.astype(dt), q_rope_BxHxR.astype(dt), latent_pages_PxSxW,
      table_BxM.astype(jnp.int32), length_B.astype(jnp.int32), scale=scale,
      impl=impl.attention_kernel, interpret=impl.interpret)
  return o_BxHxC.astype(q_latent_BxHxC.dtype)


def pallas_error(pools, num_heads: int, rope_width: int, impl) -> str:
  """Why `pallas_attend` over pools = [k_pages, v_pages] (or `pallas_attend_latent` over
  [latent_pages]) of abstract arrays cannot run num_heads query heads ('' if it can):
  the kernels' own checks, traced by jax.eval_shape (nothing compiles)."""
  sds, h, i32 = jax.ShapeDtypeStruct, num_heads, jnp.int32
  table, length = sds((1, 1), i32), sds((1,), i32)
  dt, w = pools[0].dtype, pools[0].shape[-1]
  try:
    if len(pools) == 1:
      jax.eval_shape(lambda *a: pallas_attend_latent(*a, 1.0, impl),
                     sds((1, h, w - rope_width), dt), sds((1, h, rope_width), dt), pools[0],
                     table, length)
    else:
      jax.eval_shape(lambda *a: pallas_attend(*a, impl), sds((1, h, w), dt), *pools, table,
                     length)
  except ValueError as e:
    return str(e)
  return ""
