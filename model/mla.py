"""Multi-head latent attention (MLA; DeepSeek-V2 arXiv 2405.04434 sec. 2.1, eq. 9-19).

    c_q = RMSNorm(h W_DQ),  q = c_q W_UQ      (q_lora_rank = Q > 0; else q = h W_Q)   eq. 12-13
    q_h = [q_nope_h ; RoPE(q_rope_h)]                                                 eq. 14, 16
    [c_kv ; k_r] = h W_DKV,  c_kv <- RMSNorm(c_kv),  k_rope = RoPE(k_r)   (one head)  eq. 9, 15
    k_h = [c_kv W_UK_h ; k_rope],  v_h = c_kv W_UV_h                                  eq. 10-11, 17
    o_h = softmax(q_h . k_h / sqrt(nope + R)) v_h,   y = [o_1 .. o_H] W_O              eq. 18-19

with C = kv_lora_rank (d_c), R = rope_head_dim (d_r), per-head widths
nope_head_dim and v_head_dim. W_DKV outputs [c_kv ; k_r] in one product (HF's
`kv_a_proj_with_mqa`); the RMSNorm normalises c_kv only.

Training and prefill attend in this expanded form (`attention.attend` with
H kv heads). A decode step (impl.mla='absorbed', the default) instead folds
W_UK into the query and W_UV after the attention (sec. 2.1.2):

    q_latent_h = q_nope_h W_UK_h^T                                    (width C)
    s_h[t] = (q_latent_h . c_kv[t] + q_rope_h . k_rope[t]) / sqrt(nope + R)
    o_h = (sum_t softmax(s_h)[t] c_kv[t]) W_UV_h

so the cache holds [c_kv ; k_rope], C + R values per token and layer
(model/latent_cache.py), the same for every head. impl.mla='expanded' keeps
per-head K and V (H (nope + R + v) values) in the contiguous K/V cache, for
comparison (experiments/bench_decode.py).

Shape names (README legend): B rows, L tokens, T key positions, D width,
H heads, Q query latent, C kv latent, R rope width; nope and v head widths
are named in words.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from model.attention import attend, causal_mask
from model.cache import attend_update, attend_update_latent
from model.config import ModelConfig
from model.ffn import fan_in_init
from model.impl import ModelImpl
from model.linear import project_km
from model.norm import RMSNorm
from model.rope import apply_rope

LATENT_NORM_EPS = 1e-6  # the latent RMSNorms' epsilon in DeepSeek's code and HF's


def attend_latent_cached(q_latent_BxLxHxC, q_rope_BxLxHxR, kv_BxTxW, cache_mask_BxLxT,
                         kv_new_BxLxW, new_mask_BxLxL, scale: float):
  """Absorbed MLA attention over cached latents plus the step's own L: one softmax.

      s = scale * [q_latent ; q_rope] . [c_kv ; k_rope]    over the T cached and L new tokens
      o_latent = softmax(s) c_kv

  kv_*xW holds [c_kv ; k_rope] (W = C + R) per token; all heads share it (one
  kv head, no head axis), so the cache is contracted in its stored layout on
  every backend. The products take all W columns and the first C of the
  result are kept: slicing c_kv out of the cache would copy it every step.
  Returns o_latent_BxLxHxC.
  """
  b, l, h, c = q_latent_BxLxHxC.shape
  t = kv_BxTxW.shape[1]
  q_BxNxW = rearrange(jnp.concatenate([q_latent_BxLxHxC, q_rope_BxLxHxR], axis=-1),
                      "b l h w -> b (l h) w")
  s_cache = jnp.einsum("btw,bnw->bnt", kv_BxTxW, q_BxNxW.astype(kv_BxTxW.dtype))
  s_new = jnp.einsum("bnw,bmw->bnm", q_BxNxW, kv_new_BxLxW.astype(q_BxNxW.dtype))
  s = jnp.concatenate([s_cache.astype(jnp.float32), s_new.astype(jnp.float32)], -1) * scale
  mask_BxNxTL = jnp.repeat(jnp.concatenate([cache_mask_BxLxT, new_mask_BxLxL], -1), h, axis=1)
  p = jax.nn.softmax(jnp.where(mask_BxNxTL, s, -1e30), axis=-1).astype(kv_BxTxW.dtype)
  o_BxNxW = (jnp.einsum("bnt,btw->bnw", p[..., :t], kv_BxTxW)
             + jnp.einsum("bnm,bmw->bnw", p[..., t:], kv_new_BxLxW.astype(p.dtype)))
  return rearrange(o_BxNxW[..., :c], "b (l h) c -> b l h c", l=l)


def _heads_init():
  """Fan-in init of a [in, H, E] projection (fan-in = in)."""
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                          out_axis=(1, 2))


class MLA(nn.Module):
  """x_BxLxD, positions_BxL[, cache] -> (y_BxLxD, cache); the interface of
  model/attention.py's `Attention`.

  Params: w_q (D, H, nope + R) or w_dq (D, Q), q_norm, w_uq (Q, H, nope + R);
  w_dkv (D, C + R), kv_norm (C); w_uk (C, H, nope), w_uv (C, H, v);
  w_o (H, v, D). With a cache, impl.mla picks the absorbed (latent cache,
  `attend_latent` / `update_latent` of model/cache.py) or the expanded
  (per-head K/V, `attend` / `update`) decode step.
  """

  cfg: ModelConfig
  impl: ModelImpl = ModelImpl()

  def setup(self):
    cfg = self.cfg
    d, h, r = cfg.d_model, cfg.num_heads, cfg.rope_head_dim
    nope, v, c = cfg.mla_nope_dim, cfg.mla_v_dim, cfg.kv_lora_rank
    f32 = jnp.float32
    if cfg.q_lora_rank:
      self.w_dq = self.param("w_dq", fan_in_init(), (d, cfg.q_lora_rank), f32)
      self.q_norm = RMSNorm(LATENT_NORM_EPS)
      self.w_uq = self.param("w_uq", _heads_init(), (cfg.q_lora_rank, h, nope + r), f32)
    else:
      self.w_q = self.param("w_q", _heads_init(), (d, h, nope + r), f32)
    self.w_dkv = self.param("w_dkv", fan_in_init(), (d, c + r), f32)
    self.kv_norm = RMSNorm(LATENT_NORM_EPS)
    self.w_uk = self.param("w_uk", _heads_init(), (c, h, nope), f32)
    self.w_uv = self.param("w_uv", _heads_init(), (c, h, v), f32)
    self.w_o = self.param("w_o", nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2), (h, v, d), f32)

  @property
  def scale(self) -> float:
    """1 / sqrt(nope + R): the width of q_h . k_h, not of the latent product."""
    return (self.cfg.mla_nope_dim + self.cfg.rope_head_dim) ** -0.5

  def project(self, x_BxLxD, positions_BxL):
    """Returns q_nope_BxLxHxnope, q_rope_BxLxHxR (rotated), c_kv_BxLxC (normalised),
    k_rope_BxLxR (rotated)."""
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    heads = lambda w: rearrange(w, "i h e -> i (h e)")
    b, l = x_BxLxD.shape[:2]
    if cfg.q_lora_rank:
      c_q_BxLxQ = self.q_norm(project_km(self, "w_dq", x_BxLxD, self.w_dq, dt))
      q_BxLxHxE = project_km(self, "w_uq", c_q_BxLxQ, heads(self.w_uq), dt)
    else:
      q_BxLxHxE = project_km(self, "w_q", x_BxLxD, heads(self.w_q), dt)
    q_BxLxHxE = q_BxLxHxE.reshape(b, l, cfg.num_heads, -1)
    nope, c = cfg.mla_nope_dim, cfg.kv_lora_rank
    table = cfg.max_seq_len if self.impl.rope_table else None
    rope = lambda y: apply_rope(y, positions_BxL, cfg.rope_theta, cfg.rope_interleave, table)
    kv_BxLxW = project_km(self, "w_dkv", x_BxLxD, self.w_dkv, dt)
    c_kv_BxLxC = self.kv_norm(kv_BxLxW[..., :c])
    k_rope_BxLxR = rope(kv_BxLxW[:, :, None, c:])[:, :, 0]
    return q_BxLxHxE[..., :nope], rope(q_BxLxHxE[..., nope:]), c_kv_BxLxC, k_rope_BxLxR

  def expand(self, c_kv_BxTxC, k_rope_BxTxR):
    """Per-head keys [c_kv W_UK ; k_rope] (BxTxHx(nope + R)) and values c_kv W_UV (BxTxHxv)."""
    dt = jnp.dtype(self.cfg.dtype)
    k_nope = jnp.einsum("btc,chn->bthn", c_kv_BxTxC, self.w_uk.astype(dt))
    k_rope = jnp.broadcast_to(k_rope_BxTxR[:, :, None], k_nope.shape[:3] + k_rope_BxTxR.shape[-1:])
    v = jnp.einsum("btc,chv->bthv", c_kv_BxTxC, self.w_uv.astype(dt))
    return jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1), v

  def out(self, o_BxLxHxV):
    dt = jnp.dtype(self.cfg.dtype)
    return project_km(self, "w_o", rearrange(o_BxLxHxV, "b l h v -> b l (h v)"),
                      rearrange(self.w_o, "h v d -> (h v) d"), dt)

  def __call__(self, x_BxLxD, positions_BxL, cache: Optional[Any] = None, layer: int = 0,
               fresh: bool = False):
    q_nope, q_rope, c_kv, k_rope = self.project(x_BxLxD, positions_BxL)
    absorbed = cache is not None and self.impl.mla == "absorbed"
    if absorbed and not hasattr(cache, "attend_latent"):
      raise ValueError(f"impl.mla='absorbed' needs a cache that holds the MLA latent "
                       f"(attend_latent / update_latent, model/cache.py); "
                       f"{type(cache).__name__} does not")
    if absorbed and not fresh:
      dt = jnp.dtype(self.cfg.dtype)
      q_latent = jnp.einsum("blhn,chn->blhc", q_nope, self.w_uk.astype(dt))
      kv_new_BxLxW = jnp.concatenate([c_kv, k_rope], axis=-1)
      o_latent, cache = attend_update_latent(cache, layer, q_latent, q_rope, kv_new_BxLxW,
                                             positions_BxL, self.scale, self.impl)
      return self.out(jnp.einsum("blhc,chv->blhv", o_latent, self.w_uv.astype(dt))), cache
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    k, v = self.expand(c_kv, k_rope)
    if cache is not None and not fresh:  # expanded decode: attend (reading the cache), write
      o, cache = attend_update(cache, layer, q, k, v, positions_BxL, self.impl)
      return self.out(o), cache
    o = attend(q, k, v, causal_mask(positions_BxL, positions_BxL))
    if absorbed:  # a fresh prefill into the latent cache
      cache = cache.update_latent(layer, jnp.concatenate([c_kv, k_rope], -1), positions_BxL)
    elif cache is not None:
      cache = cache.update(layer, k, v, positions_BxL)
    return self.out(o), cache
