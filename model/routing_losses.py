"""Auxiliary routing losses and load metrics, from per-expert token means.

Everything here is computed from `RouterStats`, a handful of per-expert
*means over tokens*. Means over equal-sized shards combine by `pmean`, so the
expert-parallel layer computes the same statistics over the global batch with
one collective and reuses these functions unchanged.

Losses (each with its own coefficient in ModelConfig):

* Switch load balance (Fedus et al. 2021, eq. 4-6), coefficient alpha:

      L_switch = alpha * N * sum_i f_i * P_i

  N = number of experts, P_i = mean over tokens of softmax(H(x))_i, and
  f_i = fraction of routing *assignments* that go to expert i: every token
  contributes k assignments (its top-k experts, dropped or not), and
  f_i = (#assignments to i) / (k * tokens), so sum_i f_i = 1 for every k. For
  k=1 this is exactly Switch's "fraction of tokens dispatched to expert i";
  uniform routing gives L = alpha and total collapse onto one expert gives
  L = alpha * N, for every k. f_i is a count (no gradient); gradients flow
  through P_i.

* Importance loss (Shazeer et al. 2017, eq. 6-7), coefficient w_importance:

      Importance(X) = sum_x G(x),     L_importance = w * CV(Importance(X))^2

* Load loss (Shazeer et al. 2017, appendix A, eq. 8-11), coefficient w_load:

      Load(X)_i = sum_x P(x, i),      L_load = w * CV(Load(X))^2

  with the smooth estimator P(x, i) from model/router.py (needs
  router_noise='shazeer').

* Router z-loss (Zoph et al. 2022, ST-MoE eq. 5), coefficient c_z:

      L_z = (1/B) sum_x (logsumexp_j H(x)_j)^2

* Complementary sequence-wise balance loss (DeepSeek-V3, arXiv 2412.19437
  eq. 17-20), coefficient alpha = aux_seq_coef, per sequence of T tokens:

      L_Bal = alpha * sum_i f_i P_i,   f_i = N_r / (K_r T) * sum_t 1(s_it in TopK),
      s'_it = s_it / sum_j s_jt,       P_i = (1/T) sum_t s'_it

  N_r experts, K_r = top-k; averaged over the batch's sequences
  (`sequence_balance`; s' is `Routing.probs_NxX`). It keeps single
  sequences from collapsing where the bias balancing (model/router.py) acts
  on whole batches only.

CV^2 = Var / Mean^2 (population variance); it is scale invariant, so token
means give the same value as the papers' token sums.
"""

import flax.struct
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.router import Routing


@flax.struct.dataclass
class RouterStats:
  """Per-layer routing statistics, all means over tokens.

  expert_frac_X: f_i, assignments to expert i / (k * tokens).
  prob_mean_X: P_i, mean router probability of expert i.
  importance_X: mean gate mass G(x)_i per expert.
  load_X: mean smooth load P(x, i) (Shazeer), or f_i when not available.
  z: mean of logsumexp(H(x))^2.
  entropy: mean per-token entropy of the routing distribution probs_NxX (nats).
  dropped: fraction of assignments dropped for lack of capacity.
  seq_balance: mean over sequences of N_r sum_i f_i P_i (eq. 17 without alpha).
  """

  expert_frac_X: jax.Array
  prob_mean_X: jax.Array
  importance_X: jax.Array
  load_X: jax.Array
  z: jax.Array
  entropy: jax.Array
  dropped: jax.Array
  seq_balance: jax.Array = 0.0


def sequence_balance(routing: Routing, rows: int):
  """N_r sum_i f_i P_i of each of the `rows` sequences (eq. 17-20), averaged.

  The N tokens are `rows` sequences of N / rows, row-major (MoE's [B, L] flattened)."""
  n, k = routing.expert_NxA.shape
  num_experts = routing.probs_NxX.shape[-1]
  assign = jax.nn.one_hot(routing.expert_NxA.reshape(rows, n // rows, k), num_experts,
                          dtype=jnp.float32)
  f_BxX = jax.lax.stop_gradient(assign.mean(axis=(1, 2)))   # count_i / (K_r T)
  p_BxX = routing.probs_NxX.reshape(rows, n // rows, num_experts).mean(1)
  return (num_experts * (f_BxX * p_BxX).sum(-1)).mean()


def router_stats(routing: Routing, dropped, seq_balance=0.0) -> RouterStats:
  """Token means of the routing decision (one shard's view)."""
  num_experts = routing.probs_NxX.shape[-1]
  assign_NxAxX = jax.nn.one_hot(routing.expert_NxA, num_experts, dtype=jnp.float32)
  expert_frac_X = jax.lax.stop_gradient(assign_NxAxX.mean(axis=(0, 1)))
  importance_X = jnp.einsum("nk,nke->e", routing.gate_NxA, assign_NxAxX) / assign_NxAxX.shape[0]
  load_X = expert_frac_X if routing.load_NxX is None else routing.load_NxX.mean(0)
  lse_N = jax.nn.logsumexp(routing.logits_NxX, axis=-1)
  logp_NxX = jnp.log(jnp.where(routing.probs_NxX > 0, routing.probs_NxX, 1.0))
  entropy = -(routing.probs_NxX * logp_NxX).sum(-1).mean()
  return RouterStats(
      expert_frac_X=expert_frac_X,
      prob_mean_X=routing.probs_NxX.mean(0),
      importance_X=importance_X,
      load_X=load_X,
      z=jnp.mean(lse_N ** 2),
      entropy=entropy,
      dropped=jnp.asarray(dropped, jnp.float32),
      seq_balance=jnp.asarray(seq_balance, jnp.float32))


def cv_squared(x_X):
  """Squared coefficient of variation Var/Mean^2 (population variance)."""
  return jnp.var(x_X) / (jnp.mean(x_X) ** 2 + 1e-10)


def switch_loss(stats: RouterStats):
  """N * sum_i f_i P_i (without alpha)."""
  return stats.expert_frac_X.shape[-1] * jnp.sum(stats.expert_frac_X * stats.prob_mean_X, -1)


def aux_losses(stats: RouterStats, cfg: ModelConfig) -> dict:
  """Unweighted losses and their weighted sum 'total' for one layer."""
  losses = {
      "switch": switch_loss(stats),
      "importance": cv_squared(stats.importance_X),
      "load": cv_squared(stats.load_X),
      "z": stats.z,
      "seq": stats.seq_balance,
  }
  losses["total"] = (cfg.aux_switch_coef * losses["switch"]
                     + cfg.aux_importance_coef * losses["importance"]
                     + cfg.aux_load_coef * losses["load"]
                     + cfg.aux_z_coef * losses["z"])
  if cfg.aux_seq_coef:
    losses["total"] = losses["total"] + cfg.aux_seq_coef * losses["seq"]
  return losses


def load_metrics(stats: RouterStats) -> dict:
  """Load-balance metrics for one layer: load fractions, max/mean, CV, dropped, entropy."""
  f = stats.expert_frac_X
  mean = jnp.mean(f, -1)
  return {
      "load_frac": f,
      "max_over_mean_load": jnp.max(f, -1) / mean,
      "load_cv": jnp.std(f, -1) / mean,
      "dropped_frac": stats.dropped,
      "router_entropy": stats.entropy,
  }
