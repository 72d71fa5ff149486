"""The decode-cache protocol: everything the model and the decode loops ask of a cache.

A cache maps (row b, position p) to what attention needs of token p of row b
in every block: K and V (`model/kv_cache.py`), or a latent for MLA. The
model (model/attention.py, model/transformer.py) and the loops (decode/)
use a cache only through the methods below, so a new layout (pages and a
block table, a latent store) is a new class, not a change to the loops.

Step semantics (prefill, one-token steps and multi-token speculative steps
alike). A step feeds row b the L tokens at positions `positions_BxL[b]`, a
contiguous run starting at `positions_BxL[b, 0]`; rows may be at different
positions and may advance by different amounts from step to step. Block
i's queries attend to the cached positions < positions_BxL[b, 0] and,
causally, to the step's own L keys; then the step's entries are written at
their positions. An entry at or past a row's next position is never read,
so a rejected draft token, a right-padded prompt tail or a finished row's
idle write needs no clean-up: the next step at that position overwrites it.

Cache (a pytree carried by the loops):

    cache = cache.reserve(positions_BxL)          # room for this step's writes, once per
                                                  # step before block 0 (a paged cache
                                                  # claims pages here; `Decoder.decode`)
    o_BxLxHxE = cache.attend(i, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL, impl)
    cache = cache.update(i, k_BxLxKxE, v_BxLxKxE, positions_BxL)    # block i's write
    cache = cache.repeat(n)        # row r -> rows r*n .. r*n+n-1 (a prompt's beams/samples)
    cache = cache.reorder(rows_B)  # row b <- row rows_B[b] (beam search parents)
    cache = cache.grow(max_len)    # room for max_len positions per row (growing windows)
    cache = cache.release(rows_B)  # rows_B (bool [B]) are finished: a paged cache returns
                                   # their pages (model/paged_cache.py); a no-op elsewhere
    cache.max_len                  # positions per row it can hold now

`impl` names the attention implementation (model/impl.py) chosen by
decode/backend.py. `attend` must read before `update` writes: the write is
then the buffer's only consumer and XLA does it in place. The model makes
both calls through `attend_update(cache, ...)` below, so a cache may define
`attend_update` (and `attend_update_latent`) to do both its own way: the paged
cache's Pallas decode step writes first and then reads the pages in place
(model/paged_cache.py); these take the whole `ModelImpl`.

CacheSpec (static and hashable: part of what a decode loop compiles for):

    spec = CACHE_KINDS[gen.kv_cache].from_config(gen)   # GenerationConfig fields
    cache = spec.init(cfg, rows, max_len, dtype)        # empty
    spec.check(cfg, rows, max_len)      # ValueError naming the field when `init(cfg, rows,
                                        # max_len)` could run out of room (decode/generate.py
                                        # calls it before tracing)
    spec.windows(prompt_width, total)   # cache sizes of the loop's phases (decode/cache_windows.py)
    spec.split(num_devices)             # the spec each device uses when the rows are split
                                        # over devices (decode/data_parallel.py): each device
                                        # builds its own cache for its rows

A new kind registers its spec with `@register("name")`; `GenerationConfig`
accepts every registered name as `kv_cache`.

The latent variant (multi-head latent attention, model/mla.py; DeepSeek-V2
arXiv 2405.04434 sec. 2.1.2). An MLA model decoding with impl.mla='absorbed'
caches, per token and block, only w_BxLxW = [c_kv ; k_rope] (W = C + R:
the normalised KV latent and the rotated RoPE key every head shares), and
calls instead of attend/update:

    o_BxLxHxC = cache.attend_latent(i, q_latent_BxLxHxC, q_rope_BxLxHxR, w_BxLxW,
                                    positions_BxL, scale, impl)
    cache = cache.update_latent(i, w_BxLxW, positions_BxL)

with the step semantics above: softmax over the cached positions < the
step's first and, causally, the step's own L entries of
scale * (q_latent . c_kv + q_rope . k_rope), and o the softmax-weighted sum of
c_kv (still in latent space; the model applies W_UV). `scale` is the model's
(1 / sqrt(nope + R)). reserve/repeat/reorder/grow/max_len are unchanged; a
kind's spec builds this layout when `cfg.attention == 'mla'` (the contiguous
kind does: model/latent_cache.py), and with impl.mla='expanded' a K/V cache
of per-head keys [B, T, H, nope + R] and values [B, T, H, v].
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp


# Storage. A uint16 buffer holds bfloat16 values as their bits (a spec's
# `init(dtype=BF16_BITS)`, decode/backend.py's choice on CPU): XLA:CPU updates a bfloat16
# buffer through a float32 copy of all of it, a uint16 one in place, and the CPU
# attention kernel reads the bits. Caches write with `stored` and read with `values`.
BF16_BITS = jnp.uint16


def stored(x, dtype):
  """x as the elements of a `dtype` buffer (bfloat16 bits for BF16_BITS)."""
  if dtype == BF16_BITS:
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
  return x.astype(dtype)


def values(buf):
  """A buffer's values: bfloat16 for BF16_BITS, else the buffer itself."""
  return jax.lax.bitcast_convert_type(buf, jnp.bfloat16) if buf.dtype == BF16_BITS else buf


CACHE_KINDS: dict[str, type] = {}


def attend_update(cache, layer: int, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL, impl):
  """(o_BxLxHxE, cache after block `layer`'s write): the cache's own `attend_update`
  where it has one, else `attend` then `update`. impl: the ModelImpl."""
  if hasattr(type(cache), "attend_update"):
    return cache.attend_update(layer, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL, impl)
  o_BxLxHxE = cache.attend(layer, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL,
                           impl.attention)
  return o_BxLxHxE, cache.update(layer, k_BxLxKxE, v_BxLxKxE, positions_BxL)


def attend_update_latent(cache, layer: int, q_latent_BxLxHxC, q_rope_BxLxHxR, w_BxLxW,
                         positions_BxL, scale: float, impl):
  """`attend_update` for the latent variant: (o_latent_BxLxHxC, cache)."""
  if hasattr(type(cache), "attend_update_latent"):
    return cache.attend_update_latent(layer, q_latent_BxLxHxC, q_rope_BxLxHxR, w_BxLxW,
                                      positions_BxL, scale, impl)
  o_BxLxHxC = cache.attend_latent(layer, q_latent_BxLxHxC, q_rope_BxLxHxR, w_BxLxW,
                                  positions_BxL, scale, impl.attention)
  return o_BxLxHxC, cache.update_latent(layer, w_BxLxW, positions_BxL)


def register(name: str):
  """Class decorator: makes `name` a `GenerationConfig.kv_cache` value."""
  def deco(spec_cls):
    CACHE_KINDS[name] = spec_cls
    return spec_cls
  return deco


class Cache(Protocol):
  """What model/attention.py and decode/ call; see the module docstring."""

  @property
  def max_len(self) -> int: ...

  def reserve(self, positions_BxL) -> "Cache": ...

  def attend(self, layer: int, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL,
             impl: str) -> Any: ...

  def update(self, layer: int, k_BxLxKxE, v_BxLxKxE, positions_BxL) -> "Cache": ...

  def repeat(self, n: int) -> "Cache": ...

  def reorder(self, rows_B) -> "Cache": ...

  def grow(self, max_len: int) -> "Cache": ...

  def release(self, rows_B) -> "Cache": ...


class MLACache(Cache, Protocol):
  """A cache of MLA latents (e.g. model/latent_cache.py); see the module docstring."""

  def attend_latent(self, layer: int, q_latent_BxLxHxC, q_rope_BxLxHxR, w_BxLxW,
                    positions_BxL, scale: float, impl: str) -> Any: ...

  def update_latent(self, layer: int, w_BxLxW, positions_BxL) -> "MLACache": ...


class CacheSpec(Protocol):
  """How to build caches of one kind; see the module docstring."""

  @classmethod
  def from_config(cls, gen) -> "CacheSpec": ...

  def init(self, cfg, rows: int, max_len: int, dtype=None) -> Cache: ...

  def check(self, cfg, rows: int, max_len: int) -> None: ...

  def windows(self, prompt_width: int, total: int) -> tuple[int, ...]: ...

  def split(self, num_devices: int) -> "CacheSpec": ...
