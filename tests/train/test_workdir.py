"""A run continuing a workdir must be the same model: an architecture change is
refused before anything is written (config.json stays byte for byte), a
schedule change is accepted with a note."""

import logging
import os

import pytest

from train import trainer
from train import workdir as workdir_lib
from train.config import RunConfig


def snapshot(workdir) -> dict:
  """Every file under workdir -> its bytes."""
  out = {}
  for root, _, names in os.walk(workdir):
    for n in names:
      path = os.path.join(root, n)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


@pytest.mark.parametrize("changes, named", [
    ({"model.num_experts": 8}, ["model.num_experts: 4 -> 8"]),
    ({"model.moe_top_k": 1, "model.moe_gate": "softmax_topk"},
     ["model.moe_top_k: 2 -> 1", "model.moe_gate: 'topk_softmax' -> 'softmax_topk'"]),
    ({"model.d_model": 64, "train.steps": 9}, ["model.d_model: 32 -> 64"]),
    ({"data.val_percent": 10}, ["data.val_percent: 20 -> 10"]),
])
def test_architecture_change_is_refused_and_nothing_is_written(copy_run, changes, named):
  config, work, _ = copy_run
  for k, v in changes.items():
    section, field = k.split(".")
    config[section][field] = v
  before = snapshot(work)
  with pytest.raises(workdir_lib.WorkdirConfigError, match="refusing to change") as e:
    trainer.train_and_evaluate(config, str(work), progress=False)
  for n in named:
    assert n in str(e.value)
  assert "train.steps" not in str(e.value)  # only the refused fields are named
  assert snapshot(work) == before


def test_schedule_change_is_accepted_with_a_note(copy_run, caplog):
  """The finished 6-step run continued with other cadences (nothing to train,
  so nothing compiles); the note on a train.steps change is checked below."""
  config, work, _ = copy_run
  config.train.eval_every, config.checkpoint.every = 2, 3
  caplog.set_level(logging.WARNING)
  summary = trainer.train_and_evaluate(config, str(work), progress=False)
  assert summary["start_step"] == 6 and summary["final_step"] == 6
  (note,) = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
  assert "train.eval_every: 3 -> 2" in note and "checkpoint.every: 2 -> 3" in note
  assert workdir_lib.read_config(str(work))["train"]["eval_every"] == 2


def test_which_fields_may_change(copy_run):
  config, work, _ = copy_run
  stored = RunConfig.from_config(config)
  harmless = stored.to_dict()
  harmless["model"].update(dtype="bfloat16", max_seq_len=512, aux_importance_coef=0.5,
                           aux_z_coef=1e-2)
  harmless["mesh"]["expert"] = 2
  harmless["data"].update(batch_size=8, seq_len=16)
  harmless["train"].update(seed=3, steps=9)
  harmless["optimizer"]["learning_rate"] = 1e-3
  notes = workdir_lib.check_config(str(work), RunConfig.from_config(harmless))
  assert len(notes) == 10 and any("batches from here on differ" in n for n in notes)
  assert any(n.startswith("train.steps: 6 -> 9 (the warmup + cosine learning-rate schedule "
                          "is recomputed") for n in notes)
  assert "optimizer.learning_rate: 0.003 -> 0.001" in " ".join(notes)
  # Without a checkpoint there is nothing to protect: any config may take the workdir.
  other = stored.to_dict()
  other["model"]["num_experts"] = 8
  os.rename(work / "checkpoints", work / "elsewhere")
  assert workdir_lib.check_config(str(work), RunConfig.from_config(other)) == []
