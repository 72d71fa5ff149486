"""Rematerialisation (`train.remat`, model/impl.py; Chen et al. 2016 arXiv 1604.06174):
the same gradients with less activation memory, for MHA/GQA, MLA, SwiGLU and MoE blocks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from model.config import ModelConfig
from model.impl import ModelImpl
from model.transformer import Block, Decoder
from train import step as step_lib
from train.config import RunConfig

REMATS = ("none", "block", "full")


def loss_of(cfg, remat):
  model = Decoder(cfg, ModelImpl(remat=remat))
  key = jax.random.key(1)  # router noise: the recomputed forward must draw the same
  return lambda p, b: step_lib.loss_fn(p, model, b, key, True)[0]


def grad_fn(cfg, remat):
  return jax.grad(loss_of(cfg, remat))


def residual_bytes(fn, *args) -> int:
  """Bytes the forward of `fn` keeps for its backward pass (the vjp's residuals)."""
  res = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(res))


def compile_grads(cfg, params, batch, remats=REMATS):
  """{remat: (compiled grad fn, its memory analysis)}. On CPU every form compiles with
  the memory-optimised scheduler the trainer uses for remat (train/step.py)."""
  options = step_lib.CPU_REMAT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else {}
  out = {}
  for remat in remats:
    compiled = jax.jit(grad_fn(cfg, remat)).lower(params, batch).compile(options)
    out[remat] = compiled, compiled.memory_analysis()
  return out


def assert_same_grads(grads):
  for remat in set(grads) - {"none"}:
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=remat)


def random_params(cfg):
  """Parameters of the model's shapes, N(0, 0.1^2) (no init to compile)."""
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 8), jnp.int32)))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype),
                      shapes)


def test_remat_same_gradients_and_less_compiled_memory():
  """6 GQA blocks, 4 rows of 256 tokens: the compiled backward's temporaries shrink
  (measured on CPU, jax 0.10.2: docs/performance.md, "Training memory")."""
  cfg = ModelConfig(d_model=64, num_layers=6, num_heads=4, num_kv_heads=2, ffn_dim=128)
  params = random_params(cfg)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 259, (4, 257)), jnp.int32)
  compiled = compile_grads(cfg, params, batch)
  temp = {r: m.temp_size_in_bytes for r, (_, m) in compiled.items()}
  print("compiled temp bytes", temp)
  assert temp["none"] > 1.15 * temp["block"], temp   # 1.28x measured
  assert_same_grads({r: c(params, batch) for r, (c, _) in compiled.items()})
  # What the forward keeps for the backward, whatever the backend's scheduler does:
  # block and full keep the blocks' inputs only.
  saved = {r: residual_bytes(loss_of(cfg, r), params, batch) for r in REMATS}
  print("saved residual bytes", saved)
  assert saved["none"] > 10 * saved["block"] and saved["block"] == saved["full"], saved


def test_full_remat_with_moe_and_mla_blocks():
  """'full' nests checkpoints around MLA, the dense SwiGLU and the MoE (static_argnums)."""
  cfg = ModelConfig(d_model=32, num_layers=2, num_heads=2, ffn_dim=64, attention="mla",
                    kv_lora_rank=16, rope_head_dim=8, q_lora_rank=16, num_experts=4,
                    moe_gate="sigmoid", moe_num_shared_experts=1, first_k_dense_replace=1,
                    moe_dispatch="dropless", router_noise="jitter", router_jitter_eps=0.1)
  params = random_params(cfg)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 259, (2, 17)), jnp.int32)
  compiled = compile_grads(cfg, params, batch, ("none", "full"))
  assert_same_grads({r: c(params, batch) for r, (c, _) in compiled.items()})
  # Inside an MoE block, 'full' keeps only its sub-layers' inputs.
  x = jnp.zeros((2, 16, cfg.d_model), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
  block_params = params["block_1"]

  def block_fn(remat):
    block = Block(cfg, True, 1, ModelImpl(remat=remat))
    return lambda p, x: block.apply({"params": p}, x, pos, True, None, False,
                                    rngs={"router": jax.random.key(1)})[0].sum()
  assert residual_bytes(block_fn("full"), block_params, x) < \
      0.5 * residual_bytes(block_fn("none"), block_params, x)


def test_remat_field_is_validated_and_reaches_only_the_training_model():
  c = base.get_config()
  c.train.remat = "everything"
  with pytest.raises(ValueError, match="train.remat"):
    RunConfig.from_config(c)
  c.train.remat = "full"
  assert RunConfig.from_config(c).train.remat == "full"
  with pytest.raises(ValueError, match="impl.remat"):
    ModelImpl(remat="blocks")
