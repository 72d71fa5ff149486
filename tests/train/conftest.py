"""A tiny run config shared by the training tests (corpus: tests/conftest.py),
and one finished run of it that tests copy instead of training their own."""

import shutil

import jax
import pytest

from configs import base
from train import trainer


def make_tiny_config(corpus: str):
  c = base.get_config()
  c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64,
                 num_experts=4, moe_top_k=2, router_noise="jitter", router_jitter_eps=0.1)
  c.data.update(path=corpus, seq_len=32, batch_size=4, val_percent=20)
  c.train.update(steps=6, log_every=2, eval_every=3, eval_batches=2)
  c.optimizer.update(warmup_steps=2)
  c.checkpoint.update(every=2, keep=5)
  return c


@pytest.fixture
def tiny_config(corpus):
  return make_tiny_config(corpus)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
  """(config, workdir, final params) of one straight 6-step run of the tiny
  config; its checkpoints are steps 1, 2, 4 and 6. Tests copy the workdir
  (`copy_run`) before damaging or continuing it."""
  root = tmp_path_factory.mktemp("trained")
  (root / "corpus").mkdir()
  for i in range(12):
    (root / "corpus" / f"f{i:02d}.txt").write_text(
        "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)))
  config = make_tiny_config(str(root / "corpus" / "*.txt"))
  workdir = root / "run"
  summary = trainer.train_and_evaluate(config, str(workdir), progress=False)
  return config, workdir, jax.device_get(summary["state"].params)


@pytest.fixture
def copy_run(trained, tmp_path):
  """A fresh copy of the trained workdir: (config, workdir path, final params)."""
  config, workdir, params = trained
  dest = tmp_path / "run"
  shutil.copytree(workdir, dest)
  return config.copy_and_resolve_references(), dest, params
