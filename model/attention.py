"""Causal self-attention with grouped K/V heads (MHA / GQA / MQA).

Vaswani et al. 2017 scaled dot-product attention, eq. 1:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V

with K/V shared by groups of G = H / H_kv query heads (GQA, Ainslie et al.
2023): H_kv == H is MHA, H_kv == 1 is MQA (Shazeer 2019). Q and K are rotated
by RoPE (model/rope.py) before the product.

The Q, K and V projections are one fused matrix `w_qkv` (D x (H + 2 H_kv) x
d_head): one matmul per layer instead of three, which matters for small-batch
decode on CPU where per-op overhead dominates.

Shape names: B batch, L query length, S key length, H query heads, K kv heads,
G = H/K query heads per kv head, D model width, E head width.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from model.config import ModelConfig
from model.ffn import fan_in_init
from model.rope import apply_rope


def attend(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, mask_BxLxS):
  """Grouped scaled dot-product attention; softmax in float32.

  Args:
    q_BxLxHxE: queries (already rotated).
    k_BxSxKxE, v_BxSxKxE: keys/values with K kv heads, K divides H.
    mask_BxLxS: True where query l may attend to key s.
  Returns:
    out_BxLxHxE.
  """
  num_kv = k_BxSxKxE.shape[2]
  q = rearrange(q_BxLxHxE, "b l (k g) e -> b k g l e", k=num_kv)
  scale = q_BxLxHxE.shape[-1] ** -0.5
  s_BxKxGxLxS = jnp.einsum("bkgle,bske->bkgls", q, k_BxSxKxE).astype(jnp.float32) * scale
  s_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], s_BxKxGxLxS, -1e30)
  p = jax.nn.softmax(s_BxKxGxLxS, axis=-1).astype(v_BxSxKxE.dtype)
  out = jnp.einsum("bkgls,bske->blkge", p, v_BxSxKxE)
  return rearrange(out, "b l k g e -> b l (k g) e")


def attend_cached(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, cache_mask_BxLxS,
                  k_BxMxKxE, v_BxMxKxE, new_mask_BxLxM):
  """`attend` over cached keys plus the step's own M new keys: one softmax.

      Attention = softmax([q K_cache^T, q K_new^T] / sqrt(E) + M) [V_cache; V_new]

  The decode step reads the cache *before* its own write (model/kv_cache.py),
  so the cache write has one consumer (the loop carry) and XLA performs it
  in place; the new keys/values come straight from the projection.

  The cache is stored [B, S, K, E]. The grouped products of `attend` would
  put the kv-head axis K beside B as a batch dimension and transpose the
  whole cache of every layer on every step. Here the queries are expanded
  block-diagonally over the K kv heads (elementwise, fused),

      q'[b, (l k g), (j e)] = q[b, l, (k g), e] * [j == k]
      s[b, (l h), s'] = q' . k[b, s', (j e)]              (K x the score FLOPs)
      o'[b, (l h), (j e)] = p . v[b, s', (j e)];  o = diagonal blocks j == k

  so both products contract the cache in its stored layout (a free reshape
  of [B, S, K, E] to [B, S, K*E]).

  Args:
    q_BxLxHxE: queries (rotated).
    k_BxSxKxE, v_BxSxKxE: the cache; cache_mask_BxLxS True where readable.
    k_BxMxKxE, v_BxMxKxE: the step's new keys/values; new_mask_BxLxM.
  Returns:
    out_BxLxHxE.
  """
  b, l, h, e = q_BxLxHxE.shape
  num_kv = k_BxSxKxE.shape[2]
  scale = e ** -0.5
  # Expansion and extraction are elementwise (fused). As dots with an identity
  # matrix they cost transposes, and XLA:CPU's dot fusion slows down when it
  # absorbs the multiply-by-identity extraction.
  eye_KxK = jnp.eye(num_kv, dtype=q_BxLxHxE.dtype)
  q = rearrange(q_BxLxHxE, "b l (k g) e -> b l k g 1 e", k=num_kv)
  q_BxQxC = rearrange(q * eye_KxK[:, None, :, None], "b l k g j e -> b (l k g) (j e)")
  k_BxSxC = rearrange(k_BxSxKxE, "b s k e -> b s (k e)")
  v_BxSxC = rearrange(v_BxSxKxE, "b s k e -> b s (k e)")
  # The cache is the left operand (S rows contracted over their contiguous
  # minor axis): XLA:CPU's dot packs the small query operand instead of the
  # whole cache, 15-20% faster than q . k^T at B = 1 and 4 on this project's CPU.
  s_cache = rearrange(jnp.einsum("bsc,bqc->bsq", k_BxSxC, q_BxQxC), "b s (l h) -> b l h s", l=l)
  s_new = rearrange(jnp.einsum("blkge,bmke->blkgm", q[:, :, :, :, 0], k_BxMxKxE),
                    "b l k g m -> b l (k g) m")
  mask = jnp.concatenate([cache_mask_BxLxS, new_mask_BxLxM], axis=-1)[:, :, None, :]
  s_BxLxHxSM = jnp.concatenate([s_cache, s_new], axis=-1).astype(jnp.float32) * scale
  p = jax.nn.softmax(jnp.where(mask, s_BxLxHxSM, -1e30), axis=-1).astype(v_BxSxKxE.dtype)
  p_cache, p_new = p[..., : k_BxSxKxE.shape[1]], p[..., k_BxSxKxE.shape[1]:]
  o = jnp.einsum("bqs,bsc->bqc", rearrange(p_cache, "b l h s -> b (l h) s"), v_BxSxC)
  o = rearrange(o, "b (l k g) (j e) -> b l k g j e", l=l, k=num_kv, j=num_kv)
  o_cache = jnp.stack([o[:, :, j, :, j] for j in range(num_kv)], axis=2)  # blocks j == k
  o_new = jnp.einsum("blkgm,bmke->blkge",
                     rearrange(p_new, "b l (k g) m -> b l k g m", k=num_kv), v_BxMxKxE)
  return rearrange(o_cache + o_new, "b l k g e -> b l (k g) e")


def causal_mask(q_pos_BxL, k_pos_BxS):
  """mask[b, l, s] = k_pos[b, s] <= q_pos[b, l]."""
  return k_pos_BxS[:, None, :] <= q_pos_BxL[:, :, None]


class Attention(nn.Module):
  """x_BxLxD, positions_BxL[, cache] -> (y_BxLxD, cache).

  Params: w_qkv (D, H + 2K, E), w_o (H, E, D).
  With cache=None the layer attends causally within x and returns (y, None).
  With a layer cache (model/kv_cache.py: `attend` + `update`), the queries
  attend to the cached positions before the step and to the step's own keys
  (causally), then the new keys and values are written at `positions_BxL`;
  returns (y, updated cache). `fresh=True` says the cache holds nothing
  before this step (a prefill from position 0): the queries then attend
  within the step only, as without a cache, and skip reading the T empty
  slots (for a 64-token prompt in a 320-slot cache, 6x the keys).
  """

  cfg: ModelConfig

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
    qkv_BxLxNxE = jnp.einsum("bld,dne->blne", x_BxLxD.astype(dt), self.w_qkv.astype(dt))
    # One rotation for q and k together (shared cos/sin, fewer ops per step).
    qk_BxLx_H_K_xE = apply_rope(qkv_BxLxNxE[:, :, : h + kv], positions_BxL, cfg.rope_theta)
    return qk_BxLx_H_K_xE[:, :, :h], qk_BxLx_H_K_xE[:, :, h:], qkv_BxLxNxE[:, :, h + kv:]

  def out(self, o_BxLxHxE):
    """Output projection: o_BxLxHxE -> y_BxLxD."""
    dt = jnp.dtype(self.cfg.dtype)
    # One (H*E) contraction: with two contracting axes XLA may pick the (E, H)
    # order and transpose all of w_o on every decode step.
    return jnp.einsum("blc,cd->bld", rearrange(o_BxLxHxE, "b l h e -> b l (h e)"),
                      rearrange(self.w_o.astype(dt), "h e d -> (h e) d"))

  def __call__(self, x_BxLxD, positions_BxL, cache: Optional[Any] = None, fresh: bool = False):
    q, k, v = self.qkv(x_BxLxD, positions_BxL)
    if cache is None or fresh:
      o = attend(q, k, v, causal_mask(positions_BxL, positions_BxL))
    else:
      o = cache.attend(q, k, v, positions_BxL)   # reads the cache before the write
    if cache is not None:
      cache = cache.update(k, v, positions_BxL)
    return self.out(o), cache
