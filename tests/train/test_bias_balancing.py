"""Auxiliary-loss-free balancing (DeepSeek-V3 sec. 2.1.2): the selection bias
undoes a collapsed router without any auxiliary loss; it stays out of the
optimizer and is checkpointed with the params."""

import jax
import numpy as np
import optax
import pytest

from model.config import ModelConfig
from model.transformer import Decoder
from train import checkpoint
from train import step as step_lib

STEPS = 40


CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                  ffn_dim=32, max_seq_len=32, num_experts=4, moe_top_k=1, moe_ffn_dim=16,
                  moe_gate="sigmoid", aux_switch_coef=0.0,
                  aux_z_coef=0.0, router_init_scale=1.0)
TX = optax.adamw(3e-3)


@pytest.fixture(scope="module")
def collapsed_start():
  """A router that sends every token to expert 0: a shared direction in every
  embedding, which expert 0's gate weight follows."""
  state = jax.tree.map(np.array, jax.device_get(  # host copies: the steps donate theirs
      jax.jit(lambda: step_lib.init_state(Decoder(CFG), TX, 0, 16))()))
  state.params["embed"][:, 0] += 3.0
  state.params["block_0"]["moe"]["router"]["w_gate"][0, 0] = 1.0
  return state


def collapsed_run(state, rate: float):
  """Trains the 1-block top-1 MoE from `state` with bias update rate `rate` and
  no auxiliary loss. Returns (max/mean load per step, final state, last metrics)."""
  model = Decoder(CFG.replace(router_bias_update_rate=rate))
  step = step_lib.jit_train_step(model, TX)
  rng = np.random.default_rng(0)
  max_over_mean = []
  for _ in range(STEPS):
    state, metrics = step(state, rng.integers(0, 64, (8, 17)).astype(np.int32))
    load = np.asarray(metrics["moe"].expert_frac_X[0])
    max_over_mean.append(load.max() / load.mean())
  return np.array(max_over_mean), state, metrics


@pytest.fixture(scope="module")
def runs(collapsed_start):
  return {rate: collapsed_run(collapsed_start, rate) for rate in (0.0, 0.05)}


def test_bias_updates_bring_the_collapsed_load_down(runs):
  off, on = runs[0.0][0], runs[0.05][0]
  assert off[0] == on[0] == 4.0                     # the same start: all tokens on one expert
  assert off[-10:].mean() > 3.5                     # without balancing it stays collapsed
  assert on[-10:].mean() < 0.75 * off[-10:].mean()  # the bias spreads the tokens
  bias = np.asarray(runs[0.05][2]["router_bias"][0])
  assert np.all(bias[0] < bias[1:])                 # the overloaded expert pushed below the rest
  np.testing.assert_array_equal(runs[0.0][2]["router_bias"], 0.0)


def test_bias_is_reported_kept_out_of_the_optimizer_and_checkpointed(runs, tmp_path):
  _, state, metrics = runs[0.05]
  bias = state.params["block_0"]["moe"]["router"]["bias"]
  np.testing.assert_array_equal(metrics["router_bias"][0], bias)
  assert not any("bias" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state))
  ckpts = checkpoint.Checkpoints(str(tmp_path), every=1, keep=1)
  ckpts.save(STEPS, state, force=True)
  ckpts.wait()
  restored = ckpts.restore(jax.tree.map(np.zeros_like, jax.device_get(state)))
  ckpts.close()
  np.testing.assert_array_equal(restored.params["block_0"]["moe"]["router"]["bias"], bias)
