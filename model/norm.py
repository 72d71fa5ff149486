"""Root-mean-square layer norm (Zhang & Sennrich 2019), used pre-norm.

    y = x / sqrt(mean(x^2) + eps) * scale

Computed in float32 (as Hugging Face Llama does) and cast back.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """x_...xD -> x_...xD. Parameter `scale` (D,), initialised to ones."""

  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)
