"""Rotary position embedding (Su et al. 2021, RoFormer eq. 34).

For a head vector split into halves (x1, x2) of D/2 each (the "rotate-half"
layout used by Hugging Face Llama/Mistral/Mixtral, so weights load unchanged):

    theta_j = rope_theta ** (-2j / D),  j = 0..D/2-1
    RoPE(x, p) = [x1 cos(p theta) - x2 sin(p theta),  x2 cos(p theta) + x1 sin(p theta)]

Positions are explicit per token (`positions_BxL`) so a decode step, a packed
sequence or a paged cache can use any positions.
"""

import jax.numpy as jnp


def rope_angles(positions_BxL, dim: int, theta: float):
  """Returns (cos, sin), each B x L x dim/2 (positions' shape x dim/2), float32."""
  inv_freq = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  ang_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(ang_BxLxF), jnp.sin(ang_BxLxF)


def apply_rope(x_BxLxHxD, positions_BxL, theta: float, interleave: bool = False,
               table_len: int | None = None):
  """Rotates each head of x by its token's position. Shape preserved.

  interleave: the pairs are (x0, x1), (x2, x3), ... (HF DeepSeek-V3's
  `rope_interleave`); the result is in the rotate-half layout, as HF returns
  it (queries and keys alike, so their products are those of the pairs).
  table_len: positions are known to be below it (ModelImpl.rope_table): cos and sin
  are gathered from a table of that many positions (the same values), computed once
  per program, where XLA:CPU otherwise fuses them into the rotation and evaluates
  them for every element of x (H times per token).
  """
  d = x_BxLxHxD.shape[-1]
  if table_len is None:
    cos, sin = rope_angles(positions_BxL, d, theta)
  else:
    cos_PxF, sin_PxF = rope_angles(jnp.arange(table_len), d, theta)
    cos = jnp.take(cos_PxF, positions_BxL, axis=0, mode="clip")
    sin = jnp.take(sin_PxF, positions_BxL, axis=0, mode="clip")
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x = x_BxLxHxD.astype(jnp.float32)
  if interleave:
    x1, x2 = x[..., 0::2], x[..., 1::2]
  else:
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxD.dtype)
