"""Causal self-attention with grouped K/V heads (MHA / GQA / MQA).

Vaswani et al. 2017 scaled dot-product attention, eq. 1:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V

with K/V shared by groups of G = H / H_kv query heads (GQA, Ainslie et al.
2023): H_kv == H is MHA, H_kv == 1 is MQA (Shazeer 2019). Q and K are rotated
by RoPE (model/rope.py) before the product.

The Q, K and V projections are one fused matrix `w_qkv` (D x (H + 2 H_kv) x
d_head): one matmul per layer instead of three, which matters for small-batch
decode on CPU where per-op overhead dominates.

Shape names (README legend): B batch, L query length, T key length, H query
heads, K kv heads, G = H/K query heads per kv head, D model width, E head width.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from model.cache import attend_update
from model.config import ModelConfig
from model.ffn import fan_in_init
from model.impl import ModelImpl
from model.linear import einsum_f32, project_km
from model.rope import apply_rope


def attend(q_BxLxHxE, k_BxTxKxE, v_BxTxKxE, mask_BxLxT):
  """Grouped scaled dot-product attention; scores and softmax in float32.

  The q.k product returns its float32 accumulator (`linear.einsum_f32`):
  rounding the scores to a bf16 model's dtype first would cost their low bits.

  Args:
    q_BxLxHxE: queries (already rotated).
    k_BxTxKxE, v_BxTxKxE: keys/values with K kv heads, K divides H.
    mask_BxLxT: True where query l may attend to key t.
  Returns:
    out_BxLxHxE.
  """
  num_kv = k_BxTxKxE.shape[2]
  q = rearrange(q_BxLxHxE, "b l (k g) e -> b k g l e", k=num_kv)
  scale = q_BxLxHxE.shape[-1] ** -0.5
  s_BxKxGxLxT = einsum_f32("bkgle,btke->bkglt", q, k_BxTxKxE) * scale
  s_BxKxGxLxT = jnp.where(mask_BxLxT[:, None, None], s_BxKxGxLxT, -1e30)
  p = jax.nn.softmax(s_BxKxGxLxT, axis=-1).astype(v_BxTxKxE.dtype)
  out = jnp.einsum("bkglt,btke->blkge", p, v_BxTxKxE)
  return rearrange(out, "b l k g e -> b l (k g) e")


def attend_cached(q_BxLxHxE, k_BxTxKxE, v_BxTxKxE, cache_mask_BxLxT,
                  k_new_BxLxKxE, v_new_BxLxKxE, new_mask_BxLxL, impl: str = "xla"):
  """`attend` over cached keys plus the step's own L new keys: one softmax.

      Attention = softmax([q K_cache^T, q K_new^T] / sqrt(E) + M) [V_cache; V_new]

  The decode step reads the cache *before* its own write (model/kv_cache.py),
  so the cache write has one consumer (the loop carry) and XLA performs it
  in place; the new keys/values come straight from the projection.

  impl: 'xla' the grouped products of `attend`, for every backend; 'cpu' the
  block-diagonal form of `_attend_cached_cpu` (same result), faster on XLA:CPU.

  Args:
    q_BxLxHxE: queries (rotated).
    k_BxTxKxE, v_BxTxKxE: the cache; cache_mask_BxLxT True where readable.
    k_new_BxLxKxE, v_new_BxLxKxE: the step's new keys/values; new_mask_BxLxL.
  Returns:
    out_BxLxHxE.
  """
  if impl == "cpu":
    return _attend_cached_cpu(q_BxLxHxE, k_BxTxKxE, v_BxTxKxE, cache_mask_BxLxT,
                              k_new_BxLxKxE, v_new_BxLxKxE, new_mask_BxLxL)
  if impl != "xla":
    raise ValueError(f"attend_cached: impl must be 'xla' or 'cpu' (got {impl!r})")
  num_kv, t = k_BxTxKxE.shape[2], k_BxTxKxE.shape[1]
  q = rearrange(q_BxLxHxE, "b l (k g) e -> b k g l e", k=num_kv)
  scale = q_BxLxHxE.shape[-1] ** -0.5
  s_cache = jnp.einsum("bkgle,btke->bkglt", q, k_BxTxKxE)
  s_new = jnp.einsum("bkgle,bmke->bkglm", q, k_new_BxLxKxE)
  s_BxKxGxLxT = jnp.concatenate([s_cache, s_new], axis=-1).astype(jnp.float32) * scale
  mask = jnp.concatenate([cache_mask_BxLxT, new_mask_BxLxL], axis=-1)[:, None, None]
  p = jax.nn.softmax(jnp.where(mask, s_BxKxGxLxT, -1e30), axis=-1).astype(v_BxTxKxE.dtype)
  o = (jnp.einsum("bkglt,btke->blkge", p[..., :t], v_BxTxKxE)
       + jnp.einsum("bkglm,bmke->blkge", p[..., t:], v_new_BxLxKxE))
  return rearrange(o, "b l k g e -> b l (k g) e")


def _attend_cached_cpu(q_BxLxHxE, k_BxTxKxE, v_BxTxKxE, cache_mask_BxLxT,
                       k_new_BxLxKxE, v_new_BxLxKxE, new_mask_BxLxL):
  """`attend_cached` in a layout XLA:CPU runs without transposing the cache.

  The grouped products put the kv-head axis K beside B as a batch dimension,
  which makes XLA:CPU transpose the whole [B, T, K, E] cache of every layer
  on every step. Here the queries are expanded block-diagonally over the K
  kv heads (elementwise, fused),

      q'[b, (l k g), (j e)] = q[b, l, (k g), e] * [j == k]
      s[b, (l h), t] = q' . k[b, t, (j e)]              (K x the score FLOPs)
      o'[b, (l h), (j e)] = p . v[b, t, (j e)];  o = diagonal blocks j == k

  so both products contract the cache in its stored layout (a free reshape
  of [B, T, K, E] to [B, T, K*E]); docs/performance.md has the measurements.
  """
  b, l, h, e = q_BxLxHxE.shape
  num_kv = k_BxTxKxE.shape[2]
  scale = e ** -0.5
  # Expansion and extraction are elementwise (fused): as dots with an identity
  # matrix they cost transposes.
  eye_KxK = jnp.eye(num_kv, dtype=q_BxLxHxE.dtype)
  q = rearrange(q_BxLxHxE, "b l (k g) e -> b l k g 1 e", k=num_kv)
  q_BxQxC = rearrange(q * eye_KxK[:, None, :, None], "b l k g j e -> b (l k g) (j e)")
  k_BxTxC = rearrange(k_BxTxKxE, "b t k e -> b t (k e)")
  v_BxTxC = rearrange(v_BxTxKxE, "b t k e -> b t (k e)")
  # The cache is the left operand: XLA:CPU's dot packs the small query operand
  # instead of the whole cache.
  s_cache = rearrange(jnp.einsum("btc,bqc->btq", k_BxTxC, q_BxQxC), "b t (l h) -> b l h t", l=l)
  s_new = rearrange(jnp.einsum("blkge,bmke->blkgm", q[:, :, :, :, 0], k_new_BxLxKxE),
                    "b l k g m -> b l (k g) m")
  mask = jnp.concatenate([cache_mask_BxLxT, new_mask_BxLxL], axis=-1)[:, :, None, :]
  s_BxLxHxTL = jnp.concatenate([s_cache, s_new], axis=-1).astype(jnp.float32) * scale
  p = jax.nn.softmax(jnp.where(mask, s_BxLxHxTL, -1e30), axis=-1).astype(v_BxTxKxE.dtype)
  p_cache, p_new = p[..., : k_BxTxKxE.shape[1]], p[..., k_BxTxKxE.shape[1]:]
  o = jnp.einsum("bqt,btc->bqc", rearrange(p_cache, "b l h t -> b (l h) t"), v_BxTxC)
  o = rearrange(o, "b (l k g) (j e) -> b l k g j e", l=l, k=num_kv, j=num_kv)
  o_cache = jnp.stack([o[:, :, j, :, j] for j in range(num_kv)], axis=2)  # blocks j == k
  o_new = jnp.einsum("blkgm,bmke->blkge",
                     rearrange(p_new, "b l (k g) m -> b l k g m", k=num_kv), v_new_BxLxKxE)
  return rearrange(o_cache + o_new, "b l k g e -> b l (k g) e")


def causal_mask(q_pos_BxL, k_pos_BxT):
  """mask[b, l, t] = k_pos[b, t] <= q_pos[b, l]."""
  return k_pos_BxT[:, None, :] <= q_pos_BxL[:, :, None]


class Attention(nn.Module):
  """x_BxLxD, positions_BxL[, cache] -> (y_BxLxD, cache).

  Params: w_qkv (D, H + 2K, E), w_o (H, E, D).
  With cache=None the layer attends causally within x and returns (y, None).
  With a cache (the protocol of model/cache.py), the queries attend to the
  cached positions before the step and to the step's own keys (causally),
  then the new keys and values are written into block `layer` at
  `positions_BxL`; returns (y, updated cache). `fresh=True` says the cache
  holds nothing before this step (a prefill from position 0): the queries
  then attend within the step only, as without a cache, and skip reading the
  T empty slots.
  """

  cfg: ModelConfig
  impl: ModelImpl = ModelImpl()

  def setup(self):
    cfg = self.cfg
    h, kv, e = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
    self.w_qkv = self.param("w_qkv", fan_in_init(), (cfg.d_model, h + 2 * kv, e), jnp.float32)
    self.w_o = self.param("w_o", nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2),
        (h, e, cfg.d_model), jnp.float32)

  def qkv(self, x_BxLxD, positions_BxL):
    """Projects and rotates: returns q_BxLxHxE, k_BxLxKxE, v_BxLxKxE."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    h, kv = cfg.num_heads, cfg.num_kv_heads
    qkv_BxLx_H_2K_xE = project_km(self, "w_qkv", x_BxLxD,
                                  rearrange(self.w_qkv, "d n e -> d (n e)"),
                                  dt).reshape(*x_BxLxD.shape[:2], h + 2 * kv, -1)
    # One rotation for q and k together (shared cos/sin, fewer ops per step).
    qk_BxLx_H_K_xE = apply_rope(qkv_BxLx_H_2K_xE[:, :, : h + kv], positions_BxL, cfg.rope_theta,
                                table_len=cfg.max_seq_len if self.impl.rope_table else None)
    return qk_BxLx_H_K_xE[:, :, :h], qk_BxLx_H_K_xE[:, :, h:], qkv_BxLx_H_2K_xE[:, :, h + kv:]

  def out(self, o_BxLxHxE):
    """Output projection: o_BxLxHxE -> y_BxLxD."""
    dt = jnp.dtype(self.cfg.dtype)
    # One (H*E) contraction: with two contracting axes XLA may pick the (E, H)
    # order and transpose all of w_o on every decode step.
    return project_km(self, "w_o", rearrange(o_BxLxHxE, "b l h e -> b l (h e)"),
                      rearrange(self.w_o, "h e d -> (h e) d"), dt)

  def __call__(self, x_BxLxD, positions_BxL, cache: Optional[Any] = None, layer: int = 0,
               fresh: bool = False):
    q, k, v = self.qkv(x_BxLxD, positions_BxL)
    if cache is not None and not fresh:  # attend (reading the cache) and write
      o, cache = attend_update(cache, layer, q, k, v, positions_BxL, self.impl)
      return self.out(o), cache
    o = attend(q, k, v, causal_mask(positions_BxL, positions_BxL))
    if cache is not None:
      cache = cache.update(layer, k, v, positions_BxL)
    return self.out(o), cache
