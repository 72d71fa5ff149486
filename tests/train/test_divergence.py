"""A non-finite loss or state stops the run with DivergenceError; the diverged
state is never saved, so the newest checkpoint is the last good one."""

import os

import jax
import jax.numpy as jnp
import pytest

from train import checkpoint, trainer
from train import step as step_lib


@pytest.mark.parametrize("nan_after, log_every, found_at, newest, what", [
    (5, 2, 6, 4, "loss nan"),              # caught at the log step 6, before its save
    (4, 3, 4, 2, "state became non-finite"),  # caught by the check before step 4's save
])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path,
                                                             monkeypatch, nan_after,
                                                             log_every, found_at, newest,
                                                             what):
  """The train step is wrapped to poison the parameters after step `nan_after`."""
  make = step_lib.jit_train_step

  def poisoned(model, tx, **kw):
    step = make(model, tx, **kw)

    def run(state, batch):
      state, metrics = step(state, batch)
      if int(state.step) == nan_after:
        state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
      return state, metrics
    return run

  monkeypatch.setattr(step_lib, "jit_train_step", poisoned)
  tiny_config.train.log_every = log_every
  work = str(tmp_path / "w")
  with pytest.raises(trainer.DivergenceError, match=f"{what}.* at step {found_at}") as e:
    trainer.train_and_evaluate(tiny_config, work, progress=False)
  assert f"the newest checkpoint, step {newest} in" in str(e.value)
  assert "learning_rate" in str(e.value)
  assert max(int(s) for s in os.listdir(f"{work}/checkpoints")) == newest
  checkpoint.restore_params(work)  # verified and finite, or it raises
