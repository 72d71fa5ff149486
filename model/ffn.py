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
from model.impl import ModelImpl
from model.linear import project_km


def fan_in_init(scale: float = 1.0, batch_axis=()):
  return nn.initializers.variance_scaling(
      scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
      batch_axis=batch_axis)


def swiglu(h_x2F):
  """[..., 2F] pre-activations ([gate | up]) -> [..., F], in float32 and rounded once to
  the input's dtype: a bfloat16 step would otherwise round after every op of SiLU (and
  XLA:CPU runs that chain of converts ~4% of a SmolLM2 bf16 decode step)."""
  gate, up = jnp.split(h_x2F.astype(jnp.float32), 2, axis=-1)
  return (jax.nn.silu(gate) * up).astype(h_x2F.dtype)


class SwiGLU(nn.Module):
  """x_BxLxD -> y_BxLxD. Params: w_in (D, 2F), w_out (F, D); F = width or cfg.ffn_dim."""

  cfg: ModelConfig
  width: int = 0
  impl: ModelImpl = ModelImpl()

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    f = self.width or cfg.ffn_dim
    w_in = self.param("w_in", fan_in_init(), (cfg.d_model, 2 * f), jnp.float32)
    w_out = self.param("w_out", fan_in_init(), (f, cfg.d_model), jnp.float32)
    h_BxLx2F = project_km(self, "w_in", x_BxLxD, w_in, dt)
    return project_km(self, "w_out", swiglu(h_BxLx2F), w_out, dt)
