"""The contiguous KV cache: `[B, T, K, E]` buffers per block (kind 'contiguous').

The first implementation of the cache protocol (model/cache.py). Position p
of row b lives in slot p of that row:

    k_BxTxKxE[b, p] = RoPE(x_p W_k, p)      for every p < written_b

so rows need no left padding and every row has its own write position. A
step's L new tokens of row b attend to the slots t < positions_BxL[b, 0]
of the cache as it was before the step plus the step's own keys, causally
(`attention.attend_cached`); then the new keys/values are written at their
positions with one per-row `lax.dynamic_update_slice` (`update_rows`).
Reading before writing leaves the write as the buffer's only consumer, which
XLA performs in place (no copy of the cache per step).

Growing windows (`ContiguousSpec.windows`): a step reads every slot of the
buffer it is given, so a loop over T slots pays for T from its first step.
The loops therefore run in phases over growing buffers,

    windows = (w_0 < w_1 < ... < w_m = T)
    w_0 = max(MIN_WINDOW, the smallest power of two > P)     (P = prompt width)
    w_{i+1} = min(T, ceil(growth * w_i))

and `grow` zero-pads every buffer between phases (one copy per phase, not
per step; decode/cache_windows.py runs the phases). docs/performance.md has
the measured gains.

For attention='mla' the same kind stores the latent instead
(model/latent_cache.py: [c_kv ; k_rope] per token, impl.mla='absorbed'),
or per-head K and V of different widths (impl.mla='expanded'); users keep
`GenerationConfig.kv_cache='contiguous'` either way.

Shape names (README legend): B rows, T slots, L new tokens, K kv heads,
H query heads, E head width.
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from kernels import paged_attention_cpu
from model.attention import attend_cached
from model.cache import BF16_BITS, register, stored, values
from model.config import ModelConfig
from model.impl import resolve_mla

MIN_WINDOW = 128  # smaller windows save little attention and cost a compile each


def update_rows(buf_BxTx, new_BxLx, start_B):
  """buf[b, start_b : start_b + L] = new[b] for every row (functional).

  One `lax.dynamic_update_slice` per row (vmapped: a single scatter), so in a
  loop carry XLA updates the buffer in place. As in dynamic_update_slice, a
  start past T - L is clamped to T - L.
  """
  def one(buf_Tx, new_Lx, start):
    idx = (start,) + (0,) * (buf_Tx.ndim - 1)
    return jax.lax.dynamic_update_slice(buf_Tx, stored(new_Lx, buf_Tx.dtype), idx)
  return jax.vmap(one)(buf_BxTx, new_BxLx, start_B.astype(jnp.int32))


@flax.struct.dataclass
class LayerKV:
  """One block's contiguous cache: k/v_BxTxKxE (slot p holds position p)."""

  k_BxTxKxE: jax.Array
  v_BxTxKxE: jax.Array


@flax.struct.dataclass
class KVCache:
  """The decoder's contiguous cache: `layers[i]` is block i's LayerKV."""

  layers: tuple

  @property
  def batch(self) -> int:
    return self.layers[0].k_BxTxKxE.shape[0]

  @property
  def max_len(self) -> int:
    return self.layers[0].k_BxTxKxE.shape[1]

  def replace_layers(self, layers) -> "KVCache":
    return self.replace(layers=tuple(layers))

  def reserve(self, positions_BxL) -> "KVCache":
    """Every position up to max_len already has its slot."""
    del positions_BxL
    return self

  def attend(self, layer: int, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL,
             impl: str = "xla"):
    """The step's queries over slots < positions_BxL[b, 0] and the step's own keys.

    impl 'cpu' (decode/backend.py's choice on CPU): one-token steps over a float32
    or BF16_BITS cache run the C++ kernel (kernels/paged_attention_cpu.py, the cache
    read as one page per row) when it builds; other steps `attention.attend_cached`.
    """
    kv = self.layers[layer]
    if (impl == "cpu" and positions_BxL.shape[1] == 1
        and kv.k_BxTxKxE.dtype in (jnp.float32, BF16_BITS) and paged_attention_cpu.available()):
      length_B = jnp.clip(positions_BxL[:, 0], 0, self.max_len)
      return paged_attention_cpu.contiguous_decode_attention(
          q_BxLxHxE[:, 0], kv.k_BxTxKxE, kv.v_BxTxKxE, length_B, k_BxLxKxE[:, 0],
          v_BxLxKxE[:, 0])[:, None]
    start_Bx1x1 = positions_BxL[:, :1, None]
    slot_1x1xT = jnp.arange(self.max_len, dtype=jnp.int32)[None, None]
    cache_mask_BxLxT = jnp.broadcast_to(slot_1x1xT < start_Bx1x1,
                                        positions_BxL.shape + (self.max_len,))
    new_mask_BxLxL = positions_BxL[:, None, :] <= positions_BxL[:, :, None]
    return attend_cached(q_BxLxHxE, values(kv.k_BxTxKxE), values(kv.v_BxTxKxE),
                         cache_mask_BxLxT, k_BxLxKxE, v_BxLxKxE, new_mask_BxLxL, impl)

  def update(self, layer: int, k_BxLxKxE, v_BxLxKxE, positions_BxL) -> "KVCache":
    """Writes block `layer`'s new entries of row b at positions_BxL[b, 0] ... (contiguous)."""
    kv = self.layers[layer]
    start_B = positions_BxL[:, 0]
    new = LayerKV(update_rows(kv.k_BxTxKxE, k_BxLxKxE, start_B),
                  update_rows(kv.v_BxTxKxE, v_BxLxKxE, start_B))
    return self.replace_layers(self.layers[:layer] + (new,) + self.layers[layer + 1:])

  def repeat(self, n: int) -> "KVCache":
    """Each row repeated n times consecutively (prompt -> beams / samples)."""
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)

  def reorder(self, rows_B) -> "KVCache":
    """Row b of the result is row rows_B[b] of this cache (beam search).

    A gather of every buffer: the contiguous layout shares nothing between
    rows. `rows_B` are in range (beam parents), so mode='clip' clamps instead
    of `jnp.take`'s default 'fill', which adds a select over every gathered
    buffer.
    """
    return jax.tree.map(lambda x: jnp.take(x, rows_B, axis=0, mode="clip"), self)

  def grow(self, max_len: int) -> "KVCache":
    """Every buffer zero-padded to `max_len` (>= its length) slots, entries kept."""
    pad = ((0, 0), (0, max_len - self.max_len), (0, 0), (0, 0))
    return jax.tree.map(lambda x: jnp.pad(x, pad), self)

  def release(self, rows_B) -> "KVCache":
    """Nothing to return: every row keeps its own slots."""
    del rows_B
    return self


def growing_windows(prompt_width: int, total: int, growth: float = 2.0) -> tuple[int, ...]:
  """The phases' cache sizes (w_0, ..., total) for a prompt of `prompt_width` slots.

  growth <= 1 disables growing: one window of `total` slots.
  """
  if total <= prompt_width:
    raise ValueError(f"cache length {total} leaves no room after {prompt_width} prompt slots")
  if growth <= 1:
    return (total,)
  w = max(MIN_WINDOW, 1 << prompt_width.bit_length())  # smallest power of two > P
  windows = []
  while w < total:
    windows.append(w)
    w = math.ceil(growth * w)
  return tuple(windows) + (total,)


@register("contiguous")
@dataclasses.dataclass(frozen=True)
class ContiguousSpec:
  """Builds `KVCache`s; `growth` sets the growing windows (<= 1: off).

  For attention='mla' the layout follows `mla` (GenerationConfig.mla_impl, as
  impl.mla): 'absorbed' builds the latent cache of model/latent_cache.py
  ([c_kv ; k_rope] per token), 'expanded' a KVCache of per-head K
  [B, T, H, nope + R] and V [B, T, H, v].
  """

  growth: float = 2.0
  mla: str = "absorbed"

  @classmethod
  def from_config(cls, gen) -> "ContiguousSpec":
    return cls(growth=gen.cache_growth, mla=resolve_mla(gen.mla_impl))

  def init(self, cfg: ModelConfig, rows: int, max_len: int, dtype=None):
    """Zero cache for `rows` rows of up to `max_len` positions."""
    dt = jnp.dtype(dtype or cfg.dtype)
    if cfg.attention == "mla":
      if self.mla == "absorbed":
        from model.latent_cache import LatentCache  # noqa: PLC0415 (it imports this module)
        return LatentCache.zeros(cfg, rows, max_len, dt)
      k_shape = (rows, max_len, cfg.num_heads, cfg.mla_nope_dim + cfg.rope_head_dim)
      v_shape = (rows, max_len, cfg.num_heads, cfg.mla_v_dim)
      return KVCache(tuple(LayerKV(jnp.zeros(k_shape, dt), jnp.zeros(v_shape, dt))
                           for _ in range(cfg.num_layers)))
    shape = (rows, max_len, cfg.num_kv_heads, cfg.dim_per_head)
    return KVCache(tuple(LayerKV(jnp.zeros(shape, dt), jnp.zeros(shape, dt))
                         for _ in range(cfg.num_layers)))

  def check(self, cfg: ModelConfig, rows: int, max_len: int) -> None:
    del cfg, rows, max_len  # `init` allocates every slot up front: it cannot run out

  def windows(self, prompt_width: int, total: int) -> tuple[int, ...]:
    return growing_windows(prompt_width, total, self.growth)

  def split(self, num_devices: int) -> "ContiguousSpec":
    del num_devices  # rows are independent: each device's cache holds its own rows
    return self
