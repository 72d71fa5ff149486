"""Gradient accumulation (`train.grad_accum_steps`, train/step.py): N microbatches scanned
inside the jitted step give the update of the whole batch, MoE aux loss and router bias
included (the semantics are in train/step.py's docstring)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from model.config import ModelConfig
from model.router import merge_router_bias, split_router_bias
from model.transformer import Decoder
from train import step as step_lib
from train import tokenizer
from train.config import RunConfig

# Sigmoid gates with bias balancing, and only the aux losses that are token / sequence
# means (z-loss, DeepSeek's sequence-wise loss): the whole batch's update, exactly.
MEAN_LOSSES = ModelConfig(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=64,
                          num_experts=4, moe_top_k=2, moe_gate="sigmoid",
                          moe_dispatch="dropless", router_bias_update_rate=1e-2,
                          aux_switch_coef=0.0, aux_z_coef=1e-2, aux_seq_coef=1e-2)


def a_batch(rows=4, length=17):
  batch = np.random.default_rng(0).integers(0, 256, (rows, length)).astype(np.int32)
  batch[0, 5:] = tokenizer.PAD  # microbatches with different target counts
  return batch


def assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_accumulated_update_equals_the_whole_batch_update():
  # Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 a gradient
  # element near zero turns float summation-order noise (which differs by CPU) into a
  # different step; eps 1e-3 keeps the step a smooth function of g.
  model, tx = Decoder(MEAN_LOSSES), optax.adamw(1e-2, eps=1e-3)
  init = jax.jit(lambda: step_lib.init_state(model, tx, 0, 16))
  batch = a_batch()
  whole, m1 = step_lib.jit_train_step(model, tx)(init(), batch)   # (the steps donate it)
  accum, m2 = step_lib.jit_train_step(model, tx, grad_accum_steps=2)(init(), batch)
  # 1e-5 is 0.1% of the largest step (lr).
  assert_trees_close(whole.params, accum.params, atol=1e-5)
  assert_trees_close(whole.opt_state, accum.opt_state)
  for k in ("loss", "ce", "aux_loss", "grad_norm", "router_bias"):
    np.testing.assert_allclose(m1[k], m2[k], rtol=2e-5, atol=1e-7, err_msg=k)
  assert_trees_close(m1["moe"], m2["moe"])   # routing statistics: the whole batch's
  _, bias = split_router_bias(jax.device_get(accum.params))
  assert np.abs(bias["block_0"]).max() == pytest.approx(1e-2)  # b_i moved once, by gamma
  assert float(m2["aux_loss"]) > 0


def test_balance_losses_are_averaged_over_microbatches():
  """With the Switch loss (a product of token means) accumulation optimises
  CE(whole batch) + mean_i aux(microbatch i), computed here without the scan."""
  # Capacity 2 = X / k: no assignment is dropped, in a microbatch or the whole batch.
  cfg = MEAN_LOSSES.replace(moe_gate="topk_softmax", router_bias_update_rate=0.0,
                            aux_switch_coef=1e-1, aux_seq_coef=0.0, moe_dispatch="capacity",
                            capacity_factor=2.0)
  model = Decoder(cfg)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))()[
      "params"]
  batch, key = jnp.asarray(a_batch()), jax.random.key(3)

  def reference(p):
    ce = step_lib.loss_fn(p, model, batch, key, True, aux_weight=0.0)[0]
    micro = [batch[0::2], batch[1::2]]   # microbatch i: rows i, i + 2
    aux = [model.apply({"params": p}, m[:, :-1], train=True)[1]["loss"] for m in micro]
    return ce + sum(aux) / 2, ce

  want, whole_ce = jax.jit(jax.grad(reference, has_aux=True))(params)
  got, ce, aux = jax.jit(lambda p: step_lib.accumulated_grads(p, model, batch, key, {}, 2))(
      params)
  assert_trees_close(want, got)
  np.testing.assert_allclose(ce, whole_ce, rtol=1e-5)
  assert float(aux["loss"]) > 0.1 * cfg.aux_switch_coef


def test_grad_accum_steps_is_validated():
  c = base.get_config()
  c.data.batch_size = 6
  c.train.grad_accum_steps = 4
  with pytest.raises(ValueError, match="train.grad_accum_steps: must divide data.batch_size"):
    RunConfig.from_config(c)
  c.train.grad_accum_steps = 0
  with pytest.raises(ValueError, match="train.grad_accum_steps"):
    RunConfig.from_config(c)
  c.train.grad_accum_steps = 3
  assert RunConfig.from_config(c).train.grad_accum_steps == 3


def test_merge_keeps_bias_out_of_the_accumulated_grads():
  """The routers' b_i never reaches the optimizer, with or without accumulation."""
  model = Decoder(MEAN_LOSSES)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))[
      "params"]
  trainable, bias = split_router_bias(params)
  grads = jax.eval_shape(lambda p, b: step_lib.accumulated_grads(
      p, model, jnp.zeros((4, 17), jnp.int32), jax.random.key(0), b, 2)[0], trainable, bias)
  assert jax.tree.structure(grads) == jax.tree.structure(trainable)
  assert jax.tree.structure(merge_router_bias(grads, bias)) == jax.tree.structure(params)
