"""The MLA latent cache: one `[B, T, C + R]` buffer per block (the contiguous
kind's layout for attention='mla').

Absorbed MLA decode (model/mla.py; DeepSeek-V2 arXiv 2405.04434 sec. 2.1.2)
needs of token p only its latent and its rotated RoPE key, shared by every
head, so slot p of row b holds

    kv_BxTxW[b, p] = [c_kv_p ; k_rope_p]        W = C + R = kv_lora_rank + rope_head_dim

(the page layout of kernels/mla_attention.py): C + R values per token and
layer, against H (nope + R + v) for the expanded per-head K/V. The cache
implements the latent variant of the protocol in model/cache.py
(`attend_latent`, `update_latent`); positions, masks, in-place writes,
`repeat`, `reorder` and the growing windows (`grow`) are those of the
contiguous K/V cache (model/kv_cache.py). `ContiguousSpec.init` builds it for
MLA models, so `GenerationConfig.kv_cache='contiguous'` covers them.

Shape names (README legend): B rows, T slots, L new tokens, H heads,
C kv latent width, R rope width, W = C + R.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.kv_cache import update_rows
from model.mla import attend_latent_cached


def step_masks(positions_BxL, max_len: int):
  """(cache_mask_BxLxT: slots before the step's first position, new_mask_BxLxL: causal)."""
  slot_1x1xT = jnp.arange(max_len, dtype=jnp.int32)[None, None]
  cache_mask_BxLxT = jnp.broadcast_to(slot_1x1xT < positions_BxL[:, :1, None],
                                      positions_BxL.shape + (max_len,))
  return cache_mask_BxLxT, positions_BxL[:, None, :] <= positions_BxL[:, :, None]


@flax.struct.dataclass
class LatentCache:
  """`layers[i]` is block i's kv_BxTxW ([c_kv ; k_rope] of position p in slot p)."""

  layers: tuple

  @classmethod
  def zeros(cls, cfg: ModelConfig, rows: int, max_len: int, dtype) -> "LatentCache":
    shape = (rows, max_len, cfg.kv_lora_rank + cfg.rope_head_dim)
    return cls(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))

  @property
  def batch(self) -> int:
    return self.layers[0].shape[0]

  @property
  def max_len(self) -> int:
    return self.layers[0].shape[1]

  def reserve(self, positions_BxL) -> "LatentCache":
    del positions_BxL  # every position up to max_len already has its slot
    return self

  def attend_latent(self, layer: int, q_latent_BxLxHxC, q_rope_BxLxHxR, kv_BxLxW,
                    positions_BxL, scale: float, impl: str = "xla"):
    """o_latent_BxLxHxC over slots < positions_BxL[b, 0] and the step's own latents.

    One form for every `impl`: the latent has no kv-head axis for XLA:CPU to
    transpose (model/attention.py's reason for the 'cpu' form)."""
    del impl
    cache_mask, new_mask = step_masks(positions_BxL, self.max_len)
    return attend_latent_cached(q_latent_BxLxHxC, q_rope_BxLxHxR, self.layers[layer],
                                cache_mask, kv_BxLxW, new_mask, scale)

  def update_latent(self, layer: int, kv_BxLxW, positions_BxL) -> "LatentCache":
    """Writes block `layer`'s [c_kv ; k_rope] of row b at positions_BxL[b, 0] ..."""
    new = update_rows(self.layers[layer], kv_BxLxW, positions_BxL[:, 0])
    return self.replace(layers=self.layers[:layer] + (new,) + self.layers[layer + 1:])

  def attend(self, layer, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL, impl="xla"):
    raise TypeError("LatentCache holds MLA latents, not per-head K/V: decode with "
                    "impl.mla='absorbed' (GenerationConfig.mla_impl)")

  def update(self, layer, k_BxLxKxE, v_BxLxKxE, positions_BxL):
    raise TypeError("LatentCache holds MLA latents, not per-head K/V: decode with "
                    "impl.mla='absorbed' (GenerationConfig.mla_impl)")

  def repeat(self, n: int) -> "LatentCache":
    """Each row repeated n times consecutively (prompt -> beams / samples)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)

  def reorder(self, rows_B) -> "LatentCache":
    """Row b of the result is row rows_B[b] (beam parents; in range, so mode='clip')."""
    return jax.tree.map(lambda x: jnp.take(x, rows_B, axis=0, mode="clip"), self)

  def release(self, rows_B) -> "LatentCache":
    """Nothing to return: every row keeps its own slots."""
    del rows_B
    return self

  def grow(self, max_len: int) -> "LatentCache":
    """Every buffer zero-padded to `max_len` (>= its length) slots, entries kept."""
    return jax.tree.map(lambda x: jnp.pad(x, ((0, 0), (0, max_len - self.max_len), (0, 0))),
                        self)

  def release(self, rows_B) -> "LatentCache":
    """Nothing to return: every row keeps its own slots (model/cache.py)."""
    del rows_B
    return self
