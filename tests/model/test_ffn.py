"""model/ffn.swiglu: SiLU(gate) * up in float32, rounded once to the input's dtype."""

import jax
import jax.numpy as jnp
import numpy as np

from model.ffn import swiglu


def test_bfloat16_swiglu_rounds_once():
  h = jax.random.normal(jax.random.key(0), (4, 2 * 512)).astype(jnp.bfloat16)
  g, u = np.split(np.asarray(h, np.float64), 2, axis=-1)
  exact = g / (1 + np.exp(-g)) * u
  want = jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16)  # one rounding of the exact value
  got = swiglu(h)
  assert got.dtype == jnp.bfloat16
  # float32 arithmetic before the one rounding: at most one bfloat16 step from it, mostly equal
  diff = np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))
  ulp = np.abs(np.asarray(want, np.float32)) * 2.0 ** -7
  assert (diff <= ulp + 1e-30).all()
  assert (diff == 0).mean() > 0.99


def test_float32_swiglu_is_silu_times_up():
  h = jax.random.normal(jax.random.key(1), (3, 2 * 40))
  g, u = jnp.split(h, 2, axis=-1)
  np.testing.assert_allclose(swiglu(h), jax.nn.silu(g) * u, rtol=1e-6, atol=1e-7)
