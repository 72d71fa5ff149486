"""Expert-parallel MoE (shard_map + all_to_all) against the single-device MoE.

Runs on 8 CPU devices (see conftest.py). Meshes are (data, expert) with
data * expert = 8, so tokens are split over 8 shards and experts over
`expert` of them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from model import expert_parallel
from model.config import ModelConfig
from model.moe import MoE
from model.routing_losses import aux_losses

B, L, D, F = 4, 16, 16, 32  # N = 64 tokens, 8 per device
TOL = dict(rtol=1e-5, atol=1e-5)
MODES = {  # name -> (moe_dispatch, capacity_factor; None: E / k, so C = N)
    "capacity_drop": ("capacity", 0.5),        # C = half the mean load: >= 50% dropped
    "capacity_nodrop": ("capacity", None),     # C = N: nothing can be dropped
    "dropless": ("dropless", None),
}


def make_mesh(expert: int):
  return jax.make_mesh((8 // expert, expert), ("data", "expert"), (AxisType.Auto,) * 2)


def moe_cfg(num_experts: int, mode: str, k: int = 2, gate: str = "topk_softmax"):
  dispatch, factor = MODES[mode]
  return ModelConfig(d_model=D, num_heads=2, num_kv_heads=2, ffn_dim=F, num_experts=num_experts,
                     moe_top_k=k, moe_gate=gate, moe_dispatch=dispatch,
                     capacity_factor=factor or num_experts / k, aux_importance_coef=1e-1,
                     router_init_scale=5.0)  # confident router: uneven expert loads


@functools.lru_cache(maxsize=None)
def single_device(cfg: ModelConfig):
  return loss_and_grads(cfg)[0]


def loss_and_grads(cfg: ModelConfig, mesh=None):
  """Value, gradients (params and input) and aux of a scalar of the layer output."""
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  probe = jax.random.normal(jax.random.key(2), (B, L, D))
  params = MoE(cfg).init(jax.random.key(0), x)["params"]

  def loss(params, x):
    y, stats = MoE(cfg).apply({"params": params}, x, True)
    aux = aux_losses(stats, cfg)
    return jnp.sum(y * probe) + aux["total"], (y, stats, aux)

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    return fn(params, x), None
  with jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(fn)(params, x))
    return fn(params, x), jaxpr


def assert_trees_close(a, b):
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **TOL,
                               err_msg=jax.tree_util.keystr(path))


# CI keeps one case per (experts-per-peer, dispatch) corner; the full grid runs with -m slow.
CI_CASES = {(8, 2, "capacity_drop"), (8, 2, "dropless"), (16, 8, "capacity_drop"),
            (16, 4, "dropless"), (8, 4, "capacity_nodrop"), (16, 8, "capacity_nodrop")}
GRID = [c if c in CI_CASES else pytest.param(*c, marks=pytest.mark.slow)
        for c in [(e, x, mode) for e in (8, 16) for x in (2, 4, 8)
                  for mode in ("capacity_drop", "dropless")]
        + [(8, 4, "capacity_nodrop"), (16, 8, "capacity_nodrop")]]


@pytest.mark.parametrize("num_experts,expert,mode", GRID)
def test_forward_grads_and_stats_equal_single_device(num_experts, expert, mode):
  cfg = moe_cfg(num_experts, mode)
  (loss1, aux1), grads1 = single_device(cfg)
  ((loss8, aux8), grads8), jaxpr = loss_and_grads(cfg, make_mesh(expert))
  assert "shard_map" in jaxpr and "all_to_all" in jaxpr  # really the EP path
  dropped = float(aux1[1].dropped)
  assert (dropped >= 0.5) if mode == "capacity_drop" else dropped == 0.0
  assert_trees_close((loss8, aux8, grads8), (loss1, aux1, grads1))


@pytest.mark.parametrize("gate", ["softmax_topk", "topk_softmax"])
def test_top1_switch_routing_with_drops(gate):
  cfg = moe_cfg(8, "capacity_drop", k=1, gate=gate)
  (loss1, aux1), grads1 = single_device(cfg)
  ((loss8, aux8), grads8), _ = loss_and_grads(cfg, make_mesh(4))
  assert float(aux1[1].dropped) >= 0.5
  assert_trees_close((loss8, aux8, grads8), (loss1, aux1, grads1))


def test_aux_loss_is_global_not_per_shard():
  """The EP aux loss is the single-device one on the whole batch, which differs
  from what any one shard's tokens give."""
  cfg = moe_cfg(8, "capacity_nodrop")
  (_, (_, stats1, aux1)), _ = single_device(cfg)
  ((_, (_, stats8, aux8)), _), _ = loss_and_grads(cfg, make_mesh(4))
  for name in ("switch", "importance", "load", "z", "total"):
    np.testing.assert_allclose(aux8[name], aux1[name], **TOL, err_msg=name)
  np.testing.assert_allclose(stats8.expert_frac_X.sum(), 1.0, rtol=1e-6)
  # One shard's view (its 8 tokens) gives a different loss.
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  layer = MoE(cfg)
  params = layer.init(jax.random.key(0), x)["params"]
  _, stats_shard = layer.apply({"params": params}, x[:1, :L // 2], True)
  assert abs(float(aux_losses(stats_shard, cfg)["switch"]) - float(aux1["switch"])) > 1e-3


def test_experts_not_divisible_by_expert_axis():
  cfg = moe_cfg(8, "capacity_nodrop").replace(num_experts=6, moe_top_k=2)
  with pytest.raises(ValueError, match="num_experts=6 is not divisible by the 'expert'"):
    loss_and_grads(cfg, make_mesh(4))


def test_tokens_not_divisible_by_devices():
  cfg = moe_cfg(8, "dropless")
  x = jnp.ones((1, 12, D))
  layer = MoE(cfg)
  params = layer.init(jax.random.key(0), x)["params"]
  with jax.set_mesh(make_mesh(2)):
    with pytest.raises(ValueError, match="12 tokens cannot be split evenly over 8 devices"):
      layer.apply({"params": params}, x, True)


def test_exchange_choice():
  assert expert_parallel.resolve_exchange("auto") == "padded"  # XLA:CPU: no ragged a2a
  assert expert_parallel.resolve_exchange("ragged") == "ragged"
  with pytest.raises(ValueError, match="exchange must be one of"):
    expert_parallel.resolve_exchange("nccl")
  assert expert_parallel.expert_axis_size(make_mesh(4)) == 4
  assert expert_parallel.expert_axis_size(jax.sharding.get_abstract_mesh()) == 1
