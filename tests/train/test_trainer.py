"""End-to-end training: overfitting, bitwise kill-and-resume, config errors."""

import jax
import numpy as np
import optax
import pytest

from model.transformer import Decoder
from train import step as step_lib
from train import metrics, trainer
from train.config import RunConfig


def test_tiny_model_overfits_one_batch(tiny_config):
  run = RunConfig.from_config(tiny_config)
  model = Decoder(run.model)
  tx = optax.adam(3e-3)
  state = step_lib.init_state(model, tx, 0, 32)
  batch = np.random.default_rng(0).integers(0, 256, (4, 33)).astype(np.int32)
  step = step_lib.jit_train_step(model, tx)
  first = None
  for _ in range(150):
    state, m = step(state, batch)
    first = float(m["ce"]) if first is None else first
  assert first > 5.0 and float(m["ce"]) < 0.1, (first, float(m["ce"]))


def params_of(summary):
  return jax.tree.leaves(jax.device_get(summary["state"].params))


def rows_of(workdir):
  return [(r["step"], r["split"]) for r in metrics.read(str(workdir))]


def test_kill_and_resume_is_bitwise_identical(tiny_config, tmp_path):
  straight = trainer.train_and_evaluate(tiny_config, str(tmp_path / "a"), progress=False)
  # "Killed" after step 5: the step-4 checkpoint survives, step 5 is lost.
  killed = trainer.train_and_evaluate(tiny_config, str(tmp_path / "b"), stop_after=5,
                                      progress=False)
  assert killed["final_step"] == 5
  assert (5, "train") in rows_of(tmp_path / "b")  # logged (its last step), not checkpointed
  resumed = trainer.train_and_evaluate(tiny_config, str(tmp_path / "b"), progress=False)
  assert resumed["start_step"] == 4 and resumed["final_step"] == 6
  for a, b in zip(params_of(straight), params_of(resumed)):
    np.testing.assert_array_equal(a, b)
  # and the last step really changed the parameters
  assert any(np.any(a != b) for a, b in zip(params_of(killed), params_of(resumed)))
  # The resume dropped the rows after its checkpoint (step 5's): metrics.jsonl
  # holds each step once, exactly the rows of the straight run.
  assert rows_of(tmp_path / "b") == rows_of(tmp_path / "a")


@pytest.mark.parametrize("section, field, value, match", [
    ("model", "moe_top_k", 5, "model.moe_top_k"),
    ("model", "num_kv_heads", 3, "model.num_kv_heads"),
    ("model", "aux_z_coef", -1.0, "model.aux_z_coef"),
    ("model", "moe_gate", "nope", "model.moe_gate"),
    ("model", "vocab_size", 100, "model.vocab_size"),
    ("train", "steps", 0, "train.steps"),
    ("data", "batch_size", -2, "data.batch_size"),
    ("data", "seq_len", 4096, "data.seq_len"),
    ("optimizer", "learning_rate", -1.0, "optimizer.learning_rate"),
    ("optimizer", "learning_rate", float("inf"), r"optimizer.learning_rate: must be finite"),
    ("optimizer", "learning_rate", float("nan"), r"optimizer.learning_rate: must be finite"),
    ("optimizer", "grad_clip_norm", float("inf"), r"optimizer.grad_clip_norm: must be finite"),
    ("optimizer", "b2", 1.0, "optimizer.b2"),
    ("optimizer", "warmup_steps", 10, "optimizer.warmup_steps"),
    ("checkpoint", "keep", 0, "checkpoint.keep"),
    ("mesh", "expert", 3, "mesh.expert"),
    ("mesh", "data", 0, "mesh.data"),
    ("mesh", "data", -2, "mesh.data"),
])
def test_invalid_run_config_raises_before_compiling(tiny_config, section, field, value,
                                                    match):
  tiny_config[section][field] = value
  with pytest.raises(ValueError, match=match):
    RunConfig.from_config(tiny_config)


def test_unknown_field_is_an_error(tiny_config):
  with tiny_config.unlocked():
    tiny_config.optimizer.lerning_rate = 1.0
  with pytest.raises(ValueError, match="lerning_rate"):
    RunConfig.from_config(tiny_config)
