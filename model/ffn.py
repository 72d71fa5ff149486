"""SwiGLU feed-forward network (Shazeer 2020, "GLU Variants", eq. 6).

    FFN(x) = (SiLU(x W_gate) * (x W_up)) W_down

W_gate and W_up are fused into one D x 2F matrix `w_in` (one matmul instead of
two; layout [gate | up] on the last axis). `swiglu` is shared with the experts
of the MoE layer, which use the same function with a leading expert axis.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig


def fan_in_init(scale: float = 1.0, batch_axis=()):
  return nn.initializers.variance_scaling(
      scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
      batch_axis=batch_axis)


def swiglu(h_x2F):
  """[..., 2F] pre-activations ([gate | up]) -> [..., F]."""
  gate, up = jnp.split(h_x2F, 2, axis=-1)
  return jax.nn.silu(gate) * up


class SwiGLU(nn.Module):
  """x_BxLxD -> y_BxLxD. Params: w_in (D, 2F), w_out (F, D)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    w_in = self.param("w_in", fan_in_init(), (cfg.d_model, 2 * cfg.ffn_dim), jnp.float32)
    w_out = self.param("w_out", fan_in_init(), (cfg.ffn_dim, cfg.d_model), jnp.float32)
    h_BxLx2F = jnp.einsum("bld,df->blf", x_BxLxD.astype(dt), w_in.astype(dt))
    return jnp.einsum("blf,fd->bld", swiglu(h_BxLx2F), w_out.astype(dt))
