"""Noisy gating: noise only in training; Shazeer's smooth load P(x, i)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.router import Router, smooth_load

D, E = 8, 6


@pytest.mark.parametrize("noise, kw", [("shazeer", {}), ("jitter", {"router_jitter_eps": 0.2}),
                                       ("jitter", {"router_noise_std": 0.5})])
def test_noise_only_in_training(noise, kw):
  cfg = ModelConfig(num_experts=E, moe_top_k=2, router_noise=noise, **kw)
  x = jax.random.normal(jax.random.key(0), (32, D))
  router = Router(cfg)
  params = router.init(jax.random.key(1), x)
  if noise == "shazeer":  # W_g, W_noise start at zero; perturb to see the noise
    params = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
  ev1 = router.apply(params, x, False)
  ev2 = router.apply(params, x, False, rngs={"router": jax.random.key(5)})
  np.testing.assert_array_equal(ev1.logits_NxX, ev2.logits_NxX)
  np.testing.assert_allclose(ev1.logits_NxX, x @ params["params"]["w_gate"], atol=1e-5)
  tr1 = router.apply(params, x, True, rngs={"router": jax.random.key(3)})
  tr2 = router.apply(params, x, True, rngs={"router": jax.random.key(4)})
  assert np.abs(tr1.logits_NxX - ev1.logits_NxX).max() > 1e-3
  assert np.abs(tr1.logits_NxX - tr2.logits_NxX).max() > 1e-3


def test_no_noise_config_is_deterministic_in_training():
  cfg = ModelConfig(num_experts=E, moe_top_k=2)
  x = jax.random.normal(jax.random.key(0), (16, D))
  router = Router(cfg)
  params = router.init(jax.random.key(1), x)
  np.testing.assert_array_equal(router.apply(params, x, True).logits_NxX,
                                router.apply(params, x, False).logits_NxX)


@pytest.mark.parametrize("k", [1, 2])
def test_smooth_load_matches_monte_carlo(k):
  """P(x, i) = Pr[i in top-k] when only noise_i is redrawn (others held fixed)."""
  key = jax.random.split(jax.random.key(k), 3)
  n = 64
  clean = jax.random.normal(key[0], (n, E))
  std = jax.nn.softplus(jax.random.normal(key[1], (n, E))) + 0.3
  noisy = clean + jax.random.normal(key[2], (n, E)) * std
  p = smooth_load(clean, noisy, std, k)

  samples = 20_000
  eps = jax.random.normal(jax.random.key(99), (samples, n, E))
  def in_top_k(i):
    redrawn = noisy.at[:, i].set(0.0)[None] + jnp.zeros((samples, n, E))
    redrawn = redrawn.at[:, :, i].set(clean[:, i] + eps[:, :, i] * std[:, i])
    kth = jax.lax.top_k(redrawn, k)[0][..., -1]
    return (redrawn[:, :, i] >= kth).mean(0)
  mc = jnp.stack([in_top_k(i) for i in range(E)], -1)
  # Within 2 percentage points everywhere (MC std <= 0.0036 at 20k samples).
  np.testing.assert_allclose(p, mc, atol=0.02)
  assert float(jnp.abs(p - 0.5).max()) > 0.3  # a non-trivial case
