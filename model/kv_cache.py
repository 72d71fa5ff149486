"""Decode-time key/value cache: contiguous `[B, T, K, E]` buffers per layer.

The cache is a map (row b, position p) -> (k, v) for every layer. This
contiguous implementation stores position p of row b in slot p of that row:

    k_BxTxKxE[b, p] = RoPE(x_p W_k, p)      for every p < written_b

so rows need no left padding and every row has its own write position. A
step's L new tokens of row b have positions `positions_BxL[b]`, a
contiguous run starting at `positions_BxL[b, 0]`. Their queries attend to
the slots s < positions_BxL[b, 0] of the cache as it was before the step plus
the step's own keys, causally (`attend`); then the new keys/values are
written at those positions with one per-row `lax.dynamic_update_slice`
(`update_rows`). Slots at or past a row's position are never read, so stale
entries (right-padded prompt tails, rejected speculative tokens, a finished
row's idle writes) need no clearing. Reading before writing leaves the write
as the buffer's only consumer, which XLA performs in place (no copy of the
cache per step; see `LayerKV.attend`).

Interface of a layer cache (what `model.attention.Attention` calls), so other
layouts are additions rather than rewrites:

    o_BxLxHxE = layer.attend(q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL)
    layer = layer.update(k_BxLxKxE, v_BxLxKxE, positions_BxL)   # functional write

A paged cache (vLLM) keeps the same two methods over a page table, an MLA
cache stores the latent instead of K/V and does absorbed attention in
`attend`, and a Pallas decode kernel replaces the body of `attend`.
`KVCache` is the whole model's cache: one layer cache per block plus
`reorder` (beam search), `resize` (growing windows, decode/cache_windows.py)
and `init`.

Shape names: B rows, T max length, L new tokens, K kv heads, H query heads,
E head width.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from model.attention import attend_cached
from model.config import ModelConfig


def update_rows(buf_BxTx, new_BxLx, start_B):
  """buf[b, start_b : start_b + L] = new[b] for every row (functional).

  One `lax.dynamic_update_slice` per row (vmapped: a single scatter), so in a
  loop carry XLA updates the buffer in place. As in dynamic_update_slice, a
  start past T - L is clamped to T - L.
  """
  def one(buf_Tx, new_Lx, start):
    idx = (start,) + (0,) * (buf_Tx.ndim - 1)
    return jax.lax.dynamic_update_slice(buf_Tx, new_Lx.astype(buf_Tx.dtype), idx)
  return jax.vmap(one)(buf_BxTx, new_BxLx, start_B.astype(jnp.int32))


@flax.struct.dataclass
class LayerKV:
  """One layer's contiguous cache: k/v_BxTxKxE (slot p holds position p)."""

  k_BxTxKxE: jax.Array
  v_BxTxKxE: jax.Array

  @property
  def max_len(self) -> int:
    return self.k_BxTxKxE.shape[1]

  def resize(self, max_len: int) -> "LayerKV":
    """The cache grown to `max_len` (>= its length) slots; new slots are zero."""
    pad = ((0, 0), (0, max_len - self.max_len), (0, 0), (0, 0))
    return LayerKV(jnp.pad(self.k_BxTxKxE, pad), jnp.pad(self.v_BxTxKxE, pad))

  def update(self, k_BxLxKxE, v_BxLxKxE, positions_BxL) -> "LayerKV":
    """Writes the new tokens of row b at positions_BxL[b, 0] ... (contiguous)."""
    start_B = positions_BxL[:, 0]
    return LayerKV(update_rows(self.k_BxTxKxE, k_BxLxKxE, start_B),
                   update_rows(self.v_BxTxKxE, v_BxLxKxE, start_B))

  def attend(self, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL):
    """Attention of the step's queries over the cache and the step's own keys.

    Reads the cache before this step's `update`: slots s < positions_BxL[b, 0]
    (every earlier token of the row) plus the L new keys with position <= the
    query's. The write that follows is then the buffer's only consumer, so
    XLA does it in place (a read after the write makes XLA:CPU fuse the write
    into the reader and copy the whole buffer).
    """
    start_Bx1x1 = positions_BxL[:, :1, None]
    slot_1x1xT = jnp.arange(self.max_len, dtype=jnp.int32)[None, None]
    cache_mask_BxLxT = jnp.broadcast_to(slot_1x1xT < start_Bx1x1,
                                        positions_BxL.shape + (self.max_len,))
    new_mask_BxLxL = positions_BxL[:, None, :] <= positions_BxL[:, :, None]
    return attend_cached(q_BxLxHxE, self.k_BxTxKxE, self.v_BxTxKxE, cache_mask_BxLxT,
                         k_BxLxKxE, v_BxLxKxE, new_mask_BxLxL)


@flax.struct.dataclass
class KVCache:
  """The decoder's cache: `layers[i]` is block i's layer cache."""

  layers: tuple

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    """Zero cache for `batch` rows of up to `max_len` positions."""
    dt = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
    return cls(tuple(LayerKV(jnp.zeros(shape, dt), jnp.zeros(shape, dt))
                     for _ in range(cfg.num_layers)))

  @property
  def batch(self) -> int:
    return jax.tree.leaves(self)[0].shape[0]

  @property
  def max_len(self) -> int:
    return self.layers[0].max_len

  def replace_layers(self, layers: Sequence) -> "KVCache":
    return self.replace(layers=tuple(layers))

  def resize(self, max_len: int) -> "KVCache":
    """Every layer cache grown to `max_len` slots, entries kept
    (decode/cache_windows.py grows the cache between loop phases)."""
    return self.replace_layers([layer.resize(max_len) for layer in self.layers])

  def reorder(self, rows_B) -> "KVCache":
    """Row b of the result is row rows_B[b] of this cache (beam search).

    A gather of every buffer: the contiguous layout has no sharing; a paged
    cache implements this by copying page tables only. `rows_B` are in range
    (beam parents): mode='clip' clamps the indices instead of `jnp.take`'s
    default 'fill', which adds a select over the whole gathered buffer
    (llama-like beam 4: 1.11-1.13x faster decode, 168 -> 65 selects).
    """
    return jax.tree.map(lambda x: jnp.take(x, rows_B, axis=0, mode="clip"), self)

  def repeat(self, n: int) -> "KVCache":
    """Each row repeated n times consecutively (prompt -> beams / samples)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)
