"""DeepSeek-V3 MoE pieces: sigmoid gates with bias and groups, bias update,
shared experts, dense first blocks, the sequence-wise balance loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.ffn import SwiGLU
from model.moe import MoE
from model.router import (Routing, merge_router_bias, sigmoid_gates, split_router_bias,
                          update_router_bias)
from model.routing_losses import sequence_balance
from model.transformer import Decoder


def reference_gates(logits, bias, k, n_group, topk_group, norm, scale):
  """HF DeepseekV3TopkRouter.forward, token by token in numpy."""
  experts, gates = [], []
  for row in np.asarray(logits, np.float64):
    s = 1 / (1 + np.exp(-row))
    choice = s + bias
    groups = choice.reshape(n_group, -1)
    group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
    kept = np.argsort(-group_score)[:topk_group]
    masked = np.full_like(choice, -np.inf)
    for g in kept:
      masked[g * groups.shape[1]:(g + 1) * groups.shape[1]] = groups[g]
    top = np.argsort(-masked)[:k]
    w = s[top] / (s[top].sum() + 1e-20) if norm else s[top]
    experts.append(sorted(top.tolist()))
    gates.append(dict(zip(top.tolist(), (w * scale).tolist())))
  return experts, gates


@pytest.mark.parametrize("n_group,topk_group,norm,scale", [(1, 1, True, 1.0), (4, 2, True, 2.5),
                                                           (2, 1, False, 1.0)])
def test_sigmoid_gates_follow_hf_deepseek_v3(n_group, topk_group, norm, scale):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 8)).astype(np.float32)
  bias = rng.uniform(-0.5, 0.5, 8).astype(np.float32)
  expert, gate, probs = jax.jit(sigmoid_gates, static_argnums=(2, 3, 4, 5, 6))(
      logits, bias, 2, n_group, topk_group, norm, scale)
  want_experts, want_gates = reference_gates(logits, bias, 2, n_group, topk_group, norm, scale)
  assert [sorted(e) for e in np.asarray(expert).tolist()] == want_experts
  for e_row, g_row, want in zip(np.asarray(expert), np.asarray(gate), want_gates):
    np.testing.assert_allclose(g_row, [want[e] for e in e_row], rtol=1e-5)
  s = 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(probs, s / s.sum(-1, keepdims=True), rtol=1e-5)


def test_bias_selects_experts_but_never_enters_the_gates():
  logits = jnp.zeros((3, 4)).at[:, 0].set(2.0)             # expert 0 scores best
  bias = jnp.array([0.0, 0.0, 0.0, 1.0])                   # ... but expert 3 is preferred
  expert, gate, _ = sigmoid_gates(logits, bias, 1, norm=False)
  np.testing.assert_array_equal(expert[:, 0], 3)
  np.testing.assert_allclose(gate[:, 0], jax.nn.sigmoid(0.0))  # s_3, without b_3
  grad = jax.grad(lambda b: sigmoid_gates(logits, b, 2)[1].sum())(bias)
  np.testing.assert_array_equal(grad, 0.0)


def test_bias_update_moves_each_expert_toward_the_mean_load():
  bias = jnp.array([0.1, 0.0, -0.2, 0.0])
  load = jnp.array([0.5, 0.25, 0.0, 0.25])                 # mean 0.25
  np.testing.assert_allclose(update_router_bias(bias, load, 0.01), [0.09, 0.0, -0.19, 0.0])


def test_split_and_merge_router_bias_round_trip():
  cfg = ModelConfig(num_layers=3, num_heads=4, num_kv_heads=4, d_model=32, ffn_dim=32,
                    num_experts=4, moe_gate="sigmoid", first_k_dense_replace=1)
  params = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 4), jnp.int32)))["params"]
  rest, biases = split_router_bias(params)
  assert sorted(biases) == ["block_1", "block_2"] and "ffn" in params["block_0"]
  assert "bias" not in rest["block_1"]["moe"]["router"]
  merged = merge_router_bias(rest, biases)
  assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_shared_expert_is_added_to_the_routed_output():
  cfg = ModelConfig(d_model=16, num_heads=2, num_kv_heads=2, num_experts=4, moe_top_k=2,
                    moe_ffn_dim=8, moe_num_shared_experts=2, moe_gate="sigmoid")
  # capacity dispatch at eval factor 2: Z = 10 slots per expert hold all 10 tokens
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  moe = MoE(cfg)
  rng = np.random.default_rng(0)
  v = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                   jax.eval_shape(moe.init, jax.random.key(1), x))
  assert v["params"]["shared"]["w_out"].shape == (16, 16)   # 2 experts x width 8, as one MLP
  apply = jax.jit(lambda v: moe.apply(v, x)[0])
  with_shared = apply(v)
  routed = apply(jax.tree_util.tree_map_with_path(
      lambda p, w: w * 0 if "shared" in jax.tree_util.keystr(p) else w, v))
  shared = jax.jit(SwiGLU(cfg, 16).apply)({"params": v["params"]["shared"]}, x)
  np.testing.assert_allclose(with_shared, routed + shared, atol=1e-5)


def test_sequence_balance_is_eq_17_to_20_averaged_over_sequences():
  rng = np.random.default_rng(1)
  rows, t, x, k = 3, 10, 6, 2
  probs = rng.dirichlet(np.ones(x), rows * t).astype(np.float32)
  expert = np.stack([rng.choice(x, k, replace=False) for _ in range(rows * t)]).astype(np.int32)
  routing = Routing(logits_NxX=jnp.log(probs), probs_NxX=jnp.asarray(probs),
                    expert_NxA=jnp.asarray(expert), gate_NxA=jnp.ones((rows * t, k)))
  want = []
  for r in range(rows):
    e, p = expert[r * t:(r + 1) * t], probs[r * t:(r + 1) * t]
    f = np.array([x / (k * t) * (e == i).sum() for i in range(x)])   # eq. 18
    want.append((f * p.mean(0)).sum())                                 # eq. 17, 20
  np.testing.assert_allclose(sequence_balance(routing, rows), np.mean(want), rtol=1e-5)
