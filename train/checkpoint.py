"""Orbax checkpointing of the TrainState under `workdir/checkpoints/`.

The run's full config is written beside it as `workdir/config.json`, so a
workdir alone is enough to rebuild the model (`restore_params`).
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from model.transformer import Decoder
from train import optimizer
from train import step as step_lib
from train.config import RunConfig



def manager(workdir: str, every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                         create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, force: bool = False) -> bool:
  return mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(mngr: ocp.CheckpointManager, target, step: int | None = None):
  """Restores into the structure (and shardings) of `target`, a state or its
  `jax.ShapeDtypeStruct`s. Latest step by default."""
  step = mngr.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def write_config(workdir: str, config_dict: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)


def read_config(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    return json.load(f)


def restore_params(workdir: str, step: int | None = None):
  """(ModelConfig, params) of the latest (or given) checkpoint in `workdir`."""
  run = RunConfig.from_config(ml_collections.ConfigDict(read_config(workdir)))
  model = Decoder(run.model)
  tx = optimizer.make(run.optimizer, run.train.steps)
  abstract = jax.eval_shape(
      lambda: step_lib.init_state(model, tx, run.train.seed, run.data.seq_len))
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
  state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  return run.model, state.params
