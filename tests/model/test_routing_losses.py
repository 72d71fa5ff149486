"""Auxiliary losses: Switch alpha / alpha*N, z-loss formula, CV^2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.router import Routing
from model.routing_losses import aux_losses, router_stats, cv_squared


def make_routing(expert_NxA, logits_NxX):
  probs = jax.nn.softmax(logits_NxX, -1)
  return Routing(logits_NxX=logits_NxX, probs_NxX=probs, expert_NxA=expert_NxA,
                 gate_NxA=jnp.take_along_axis(probs, expert_NxA, -1))


@pytest.mark.parametrize("k", [1, 2])
def test_switch_loss_is_alpha_under_uniform_routing(k):
  e, n, alpha = 8, 64, 0.01
  expert = (jnp.arange(n)[:, None] + jnp.arange(k)[None] * 3) % e
  stats = router_stats(make_routing(expert.astype(jnp.int32), jnp.zeros((n, e))), 0.0)
  cfg = ModelConfig(num_experts=e, moe_top_k=k, aux_switch_coef=alpha, aux_z_coef=0.0)
  np.testing.assert_allclose(aux_losses(stats, cfg)["total"], alpha, rtol=1e-6)


def test_switch_loss_is_alpha_n_under_total_collapse():
  e, n, alpha = 8, 64, 0.01
  logits = jnp.zeros((n, e)).at[:, 3].set(1e4)  # P_3 = 1
  stats = router_stats(make_routing(jnp.full((n, 1), 3, jnp.int32), logits), 0.0)
  cfg = ModelConfig(num_experts=e, moe_top_k=1, aux_switch_coef=alpha, aux_z_coef=0.0)
  np.testing.assert_allclose(aux_losses(stats, cfg)["total"], alpha * e, rtol=1e-6)


def test_switch_f_counts_every_assignment():
  """k=2: token n sends one assignment to each of its two experts."""
  expert = jnp.array([[0, 1], [0, 2], [0, 1], [3, 0]], jnp.int32)
  stats = router_stats(make_routing(expert, jnp.zeros((4, 4))), 0.0)
  np.testing.assert_allclose(stats.expert_frac_X, [4 / 8, 2 / 8, 1 / 8, 1 / 8])


def test_z_loss_formula():
  logits = jax.random.normal(jax.random.key(0), (16, 5)) * 3
  stats = router_stats(make_routing(jnp.argmax(logits, -1)[:, None].astype(jnp.int32),
                                    logits), 0.0)
  l = np.asarray(logits, np.float64)
  lse = np.log(np.exp(l).sum(-1))
  cfg = ModelConfig(num_experts=5, moe_top_k=1, aux_switch_coef=0.0, aux_z_coef=0.3)
  np.testing.assert_allclose(aux_losses(stats, cfg)["total"], 0.3 * np.mean(lse ** 2),
                             rtol=1e-5)


def test_cv_squared_and_importance_loss():
  x = jnp.array([1.0, 2.0, 3.0, 6.0])
  np.testing.assert_allclose(cv_squared(x), np.var(x) / np.mean(x) ** 2, rtol=1e-6)
  assert float(cv_squared(jnp.ones(4))) == 0.0
