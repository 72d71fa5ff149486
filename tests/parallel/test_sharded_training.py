"""Training on an 8-device (data, expert) mesh: sharded step == unsharded step,
checkpoints restore onto a different mesh, invalid meshes fail clearly."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from model.config import ModelConfig
from model.transformer import Decoder
from train import checkpoint, trainer
from train import mesh as mesh_lib
from train import step as step_lib
from train.config import MeshConfig, RunConfig


def tiny_model(dispatch: str) -> ModelConfig:
  return ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                     ffn_dim=64, num_experts=8, moe_top_k=2, moe_dispatch=dispatch,
                     capacity_factor=1.0, router_noise="jitter", router_jitter_eps=0.1,
                     aux_importance_coef=1e-2)


def run_steps(model, tx, batches, mesh=None):
  """Two train steps from the same init; sharded over `mesh` if given."""
  init = lambda: step_lib.init_state(model, tx, 0, batches.shape[-1] - 1)
  if mesh is None:
    state, step = init(), step_lib.jit_train_step(model, tx)
    for b in batches:
      state, metrics = step(state, b)
    return state, metrics
  with jax.set_mesh(mesh):
    state, shardings = mesh_lib.init_sharded(init, mesh)
    step = step_lib.jit_train_step(model, tx,
                                   out_shardings=(shardings, mesh_lib.replicated(mesh)))
    for b in batches:
      state, metrics = step(state, mesh_lib.shard_batch(b, mesh))
  return state, metrics


@pytest.mark.parametrize("data,expert,dispatch", [
    pytest.param(2, 4, "capacity", marks=pytest.mark.slow),  # capacity EP: test_expert_parallel
    (4, 2, "dropless")])
def test_sharded_train_step_matches_unsharded(data, expert, dispatch):
  model = Decoder(tiny_model(dispatch))
  tx = optax.sgd(0.5)  # linear in the gradients (Adam's g / sqrt(v) amplifies f32 noise
                      # of near-zero gradients, which is not what is under test here)
  batches = np.random.default_rng(0).integers(0, 256, (2, 8, 17)).astype(np.int32)
  ref_state, ref_metrics = run_steps(model, tx, batches)
  mesh = mesh_lib.make_mesh(MeshConfig(data=data, expert=expert), 8)
  state, metrics = run_steps(model, tx, batches, mesh)
  w_in = state.params["block_0"]["moe"]["w_in"]
  assert w_in.sharding.spec == P("expert") and len(w_in.addressable_shards) == 8
  assert w_in.addressable_shards[0].data.shape[0] == 8 // expert
  assert state.params["embed"].sharding.is_fully_replicated
  if dispatch == "capacity":
    assert float(ref_metrics["moe"].dropped.mean()) > 0  # drops happen, identically
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path((state, metrics)),
                          jax.tree.leaves((ref_state, ref_metrics))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture
def tiny_run(corpus):
  c = base.get_config()
  c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64,
                 num_experts=8, moe_top_k=2)
  c.data.update(path=corpus, seq_len=16, batch_size=8, val_percent=20)
  c.train.update(steps=4, log_every=2, eval_every=4, eval_batches=1)
  c.optimizer.update(warmup_steps=1)
  c.checkpoint.update(every=2, keep=2)
  return c


def test_checkpoint_from_one_mesh_restores_on_another(tiny_run, tmp_path):
  workdir = str(tmp_path / "run")
  tiny_run.mesh.update(data=2, expert=4)
  saved = trainer.train_and_evaluate(tiny_run, workdir, progress=False)["state"]
  assert saved.params["block_1"]["moe"]["w_out"].sharding.mesh.shape["expert"] == 4

  for data, expert in [(4, 2), (8, 1)]:
    mesh = mesh_lib.make_mesh(MeshConfig(data=data, expert=expert), 8)
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(lambda: saved), mesh_lib.tree_shardings(saved, mesh))
    mngr = ocp.CheckpointManager(f"{workdir}/checkpoints")
    restored = checkpoint.restore(mngr, target)
    mngr.close()
    assert int(restored.step) == 4
    w = restored.params["block_1"]["moe"]["w_out"]
    assert w.sharding.mesh.shape["expert"] == expert and w.sharding.spec == P("expert")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # ... and the run resumes on the other mesh.
  tiny_run.mesh.update(data=4, expert=2)
  tiny_run.train.steps = 6
  resumed = trainer.train_and_evaluate(tiny_run, workdir, progress=False)
  assert resumed["start_step"] == 4 and resumed["final_step"] == 6
  assert resumed["state"].params["block_1"]["moe"]["w_out"].sharding.mesh.shape["expert"] == 2


@pytest.mark.parametrize("expert,shape", [(1, (8, 1)), (2, (4, 2)), (8, (1, 8))])
def test_default_data_axis_takes_every_device_the_expert_axis_leaves(expert, shape):
  assert RunConfig.from_config(base.get_config()).mesh.data == -1  # the default
  mesh = mesh_lib.make_mesh(MeshConfig(data=-1, expert=expert), 8)
  assert tuple(mesh.shape.values()) == shape and mesh.devices.size == 8


@pytest.mark.parametrize("data,expert,experts,match", [
    (2, 2, 8, r"data \* expert = 2 \* 2 = 4 must equal the number of devices \(8\)"),
    (1, 16, 16, "must equal the number of devices"),
    (2, 4, 6, "mesh.expert: must divide model.num_experts=6"),
    (-1, 3, 6, r"mesh.expert: must divide the number of devices \(8\) when mesh.data=-1"),
])
def test_invalid_mesh(data, expert, experts, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.make_mesh(MeshConfig(data=data, expert=expert), experts)


def test_invalid_mesh_in_a_run(tiny_run, tmp_path):
  tiny_run.mesh.update(data=2, expert=2)
  with pytest.raises(ValueError, match="must equal the number of devices"):
    trainer.train_and_evaluate(tiny_run, str(tmp_path / "bad"), progress=False)
  tiny_run.mesh.update(data=1, expert=8)
  tiny_run.data.batch_size = 4
  with pytest.raises(ValueError, match="data.batch_size: must be divisible by the 8 devices"):
    trainer.train_and_evaluate(tiny_run, str(tmp_path / "bad"), progress=False)


def test_rules_and_batch_sharding():
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, expert=4), 8)
  tree = {"params": {"block_0": {"moe": {"w_in": np.zeros((8, 4, 6)),
                                         "router": {"w_gate": np.zeros((4, 8))}},
                                 "attn": {"wq": np.zeros((4, 4))}}},
          "opt_state": ({"mu": {"block_0": {"moe": {"w_out": np.zeros((8, 3, 4))}}}},)}
  sh = mesh_lib.tree_shardings(tree, mesh)
  assert sh["params"]["block_0"]["moe"]["w_in"].spec == P("expert")
  assert sh["opt_state"][0]["mu"]["block_0"]["moe"]["w_out"].spec == P("expert")
  assert sh["params"]["block_0"]["moe"]["router"]["w_gate"].spec == P()
  assert sh["params"]["block_0"]["attn"]["wq"].spec == P()
  with pytest.raises(ValueError, match="cannot be split over 'expert' of size 4"):
    mesh_lib.tree_shardings({"moe": {"w_in": np.zeros((6, 2))}}, mesh)
  batch = np.arange(16 * 3).reshape(16, 3)
  arr = mesh_lib.shard_batch(batch, mesh)
  assert [s.data.shape for s in arr.addressable_shards] == [(2, 3)] * 8
  np.testing.assert_array_equal(np.asarray(arr), batch)
