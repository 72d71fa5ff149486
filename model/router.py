"""Token-level top-k router with optional noisy gating. Always float32.

Gate logits (Switch, Fedus et al. 2021, eq. 1; Shazeer et al. 2017, eq. 4):

    H(x)_i = (x W_g)_i                                          router_noise='none'
    H(x)_i = (x W_g)_i + N(0,1) * Softplus((x W_noise)_i)       router_noise='shazeer'
    H(x)_i = ((x * U(1-eps, 1+eps)) W_g)_i + N(0, std^2)        router_noise='jitter'

Noise is applied only when `train=True`. For 'shazeer', W_g and W_noise start
at zero (paper, sec. 2.1/appendix A) and, as in the authors' code, a floor of
1e-2 is added to the noise std so P(x,i) below stays finite.

Gate normalisation (`moe_gate`):

    'softmax_topk':  p = softmax(H(x)) over all E;  gate_i = p_i for i in top-k   (Switch)
    'topk_softmax':  G(x) = Softmax(KeepTopK(H(x), k))                             (Shazeer eq. 3;
                     Mixtral: softmax over the k selected logits)
    'sigmoid':       s_i = sigmoid(H(x)_i);  chosen = TopK(s_i + b_i, k)           (DeepSeek-V3,
                     g_i = s_i / sum_{j in chosen} s_j  (norm_topk_prob)            arXiv 2412.19437
                     gate_i = routed_scaling_factor * g_i                           eq. 13-16)

The selection bias b_i (`router/bias`, sigmoid gates) takes part in choosing
the experts only, never in the gate values, so it gets no gradient: training
moves it by auxiliary-loss-free balancing (Wang et al. 2024 arXiv 2408.15664,
alg. 1; DeepSeek-V3 sec. 2.1.2), after every step

    b_i <- b_i + gamma * sign(mean_j load_j - load_i)          (`update_router_bias`)

where load_i is the step's share of assignments to expert i; decoding uses
b_i unchanged. It lives in the params (so checkpoints, HF import/export and
decoding carry it) but train/step.py takes it out before the optimizer
(`split_router_bias`). Group-limited routing (n_group > 1, HF DeepSeek-V3):
the experts form n_group groups of X / n_group; a group's score is the sum
of its two largest s_i + b_i, and only the topk_group best groups' experts
may be chosen. For sigmoid gates `probs_NxX` is s_i / sum_j s_j (eq. 19), the
distribution the balance losses and statistics use.

Smooth load estimator (Shazeer et al. 2017, appendix A, eq. 8-9), returned
for 'shazeer' in training:

    P(x, i) = Phi( ((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i) )

where kth_excluding(v, k, i) is the k-th largest component of v excluding i:
the (k+1)-th largest of H if H_i is itself in the top k, else the k-th.

Shape names (README legend): N tokens, D width, X experts, A experts per token (top-k).
"""

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from model.config import ModelConfig

NOISE_STD_FLOOR = 1e-2


@flax.struct.dataclass
class Routing:
  """What the router decides for N tokens.

  logits_NxX: H(x), the (noisy in training) logits used to select experts.
  probs_NxX: softmax(H(x)) over all experts (Switch's P_i statistic); for
    sigmoid gates the normalised scores s_i / sum_j s_j.
  expert_NxA: chosen experts, best first (int32).
  gate_NxA: combine weights of the chosen experts (float32).
  load_NxX: Shazeer's smooth P(x, i) (None unless 'shazeer' and training).
  """

  logits_NxX: jax.Array
  probs_NxX: jax.Array
  expert_NxA: jax.Array
  gate_NxA: jax.Array
  load_NxX: Optional[jax.Array] = None


def top_k_gates(logits_NxX, k: int, gate: str):
  """Selects top-k experts and their gates. Returns (expert_NxA, gate_NxA, probs_NxX)."""
  probs_NxX = jax.nn.softmax(logits_NxX, axis=-1)
  top_logits_NxA, expert_NxA = jax.lax.top_k(logits_NxX, k)
  if gate == "softmax_topk":
    gate_NxA = jnp.take_along_axis(probs_NxX, expert_NxA, axis=-1)
  elif gate == "topk_softmax":
    gate_NxA = jax.nn.softmax(top_logits_NxA, axis=-1)
  else:
    raise ValueError(f"unknown moe_gate {gate!r}")
  return expert_NxA.astype(jnp.int32), gate_NxA, probs_NxX


def sigmoid_gates(logits_NxX, bias_X, k: int, n_group: int = 1, topk_group: int = 1,
                  norm: bool = True, scale: float = 1.0):
  """DeepSeek-V3 gates (module docstring). Returns (expert_NxA, gate_NxA, probs_NxX)."""
  s_NxX = jax.nn.sigmoid(logits_NxX)
  choice_NxX = s_NxX + jax.lax.stop_gradient(bias_X)
  n, x = choice_NxX.shape
  if n_group > 1:  # top-2 sum per group, keep the topk_group best groups
    per_group = x // n_group
    top2 = jax.lax.top_k(choice_NxX.reshape(n, n_group, per_group), 2)[0]
    _, groups_kept = jax.lax.top_k(top2.sum(-1), topk_group)
    kept_group = jax.nn.one_hot(groups_kept, n_group, dtype=jnp.bool_).any(axis=1)
    choice_NxX = jnp.where(jnp.repeat(kept_group, per_group, axis=1), choice_NxX, -jnp.inf)
  _, expert_NxA = jax.lax.top_k(choice_NxX, k)
  gate_NxA = jnp.take_along_axis(s_NxX, expert_NxA, axis=-1)
  if norm:
    gate_NxA = gate_NxA / (gate_NxA.sum(-1, keepdims=True) + 1e-20)
  probs_NxX = s_NxX / s_NxX.sum(-1, keepdims=True)
  return expert_NxA.astype(jnp.int32), gate_NxA * scale, probs_NxX


def update_router_bias(bias_X, load_X, rate: float):
  """b_i + rate * sign(mean load - load_i): Wang et al. 2024 (arXiv 2408.15664) alg. 1."""
  return bias_X + rate * jnp.sign(load_X.mean(-1, keepdims=True) - load_X)


def split_router_bias(params: dict):
  """(params without the routers' `bias`, {block name: bias_X}) of a Decoder's params."""
  rest, biases = {}, {}
  for name, sub in params.items():
    router = sub.get("moe", {}).get("router", {}) if isinstance(sub, dict) else {}
    if "bias" in router:
      biases[name] = router["bias"]
      router = {k: v for k, v in router.items() if k != "bias"}
      sub = {**sub, "moe": {**sub["moe"], "router": router}}
    rest[name] = sub
  return rest, biases


def merge_router_bias(params: dict, biases: dict) -> dict:
  """Inverse of `split_router_bias`."""
  out = dict(params)
  for name, bias_X in biases.items():
    moe = out[name]["moe"]
    out[name] = {**out[name], "moe": {**moe, "router": {**moe["router"], "bias": bias_X}}}
  return out


def smooth_load(clean_NxX, noisy_NxX, noise_std_NxX, k: int):
  """Shazeer's P(x, i): probability expert i stays in the top-k when only its
  own noise is redrawn (appendix A, eq. 9). Returns N x X in [0, 1]."""
  num_experts = noisy_NxX.shape[-1]
  if k >= num_experts:
    return jnp.ones_like(noisy_NxX)
  top_NxA1, _ = jax.lax.top_k(noisy_NxX, k + 1)
  threshold_if_in = top_NxA1[:, k:k + 1]      # (k+1)-th largest: i is in top-k
  threshold_if_out = top_NxA1[:, k - 1:k]     # k-th largest: i is outside
  is_in = noisy_NxX > threshold_if_in
  threshold = jnp.where(is_in, threshold_if_in, threshold_if_out)
  return jax.scipy.stats.norm.cdf((clean_NxX - threshold) / noise_std_NxX)


class Router(nn.Module):
  """x_NxD -> Routing. Params: w_gate (D, E) [and w_noise (D, E) for 'shazeer'].

  Needs the 'router' RNG stream when train=True and noise is enabled.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_NxD, train: bool = False) -> Routing:
    cfg = self.cfg
    d, e = x_NxD.shape[-1], cfg.num_experts
    shazeer = cfg.router_noise == "shazeer"
    init = (nn.initializers.zeros if shazeer else nn.initializers.variance_scaling(
        cfg.router_init_scale, "fan_in", "truncated_normal"))
    w_gate = self.param("w_gate", init, (d, e), jnp.float32)
    x = x_NxD.astype(jnp.float32)

    jitter = train and cfg.router_noise == "jitter"
    if jitter and cfg.router_jitter_eps > 0:
      eps = cfg.router_jitter_eps
      x = x * jax.random.uniform(self.make_rng("router"), x.shape, jnp.float32,
                                 1.0 - eps, 1.0 + eps)
    clean_NxX = x @ w_gate
    logits_NxX, load_NxX = clean_NxX, None
    if shazeer:
      w_noise = self.param("w_noise", nn.initializers.zeros, (d, e), jnp.float32)
      noise_std_NxX = jax.nn.softplus(x @ w_noise) + NOISE_STD_FLOOR
      if train:
        eps_NxX = jax.random.normal(self.make_rng("router"), clean_NxX.shape)
        logits_NxX = clean_NxX + eps_NxX * noise_std_NxX
        load_NxX = smooth_load(clean_NxX, logits_NxX, noise_std_NxX, cfg.moe_top_k)
    if jitter and cfg.router_noise_std > 0:
      logits_NxX = logits_NxX + cfg.router_noise_std * jax.random.normal(
          self.make_rng("router"), clean_NxX.shape)

    k = cfg.num_experts if cfg.moe_mode == "dense" else cfg.moe_top_k
    if cfg.moe_gate == "sigmoid":
      bias_X = self.param("bias", nn.initializers.zeros, (e,), jnp.float32)
      expert_NxA, gate_NxA, probs_NxX = sigmoid_gates(
          logits_NxX, bias_X, k, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
          cfg.routed_scaling_factor)
    else:
      expert_NxA, gate_NxA, probs_NxX = top_k_gates(logits_NxX, k, cfg.moe_gate)
      if cfg.routed_scaling_factor != 1.0:
        gate_NxA = gate_NxA * cfg.routed_scaling_factor
    if cfg.moe_mode == "dense":  # every expert, weighted by the full softmax
      gate_NxA = jnp.take_along_axis(probs_NxX, expert_NxA, axis=-1)
    return Routing(logits_NxX=logits_NxX, probs_NxX=probs_NxX, expert_NxA=expert_NxA,
                   gate_NxA=gate_NxA, load_NxX=load_NxX)
