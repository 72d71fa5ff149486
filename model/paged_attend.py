"""Attention over a paged KV cache in plain XLA: gather by block table, mask by length.

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
log-sum-exp, which merging the step's own key into the softmax needs, so wiring it
in needs that statistic from the kernel (or a write before the read).

Layout: the pool is [K, P, S, E] (the kernels' layout), so the gathered keys come
out [K, B, T, E] with both batch axes leading and no transpose of the cache.

Shape names (README legend): B rows, L tokens per step, H query heads, K kv heads,
G = H / K, E head width, P pages, S page size, M pages per row, T = M * S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange

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
  k_KxBxTxE = gather_pages(k_pages_KxPxSxE, table_BxM, length_B)
  v_KxBxTxE = gather_pages(v_pages_KxPxSxE, table_BxM, length_B)
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
