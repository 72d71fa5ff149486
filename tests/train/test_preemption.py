"""SIGINT/SIGTERM finish the step, save it and exit 130/143; the resumed run
ends bitwise equal to an uninterrupted one. metrics.jsonl holds each step once
(also after a plain kill: tests/train/test_trainer.py's kill-and-resume test)."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from train import checkpoint, preemption, trainer
from train import checkpoint_integrity as integrity
from train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(REPO, "tests", "train", "signal_driver.py")


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def cli_flags(config, workdir) -> list[str]:
  flags = ["--config=configs/base.py", f"--workdir={workdir}"]
  for section in ("model", "data", "train", "optimizer", "checkpoint"):
    flags += [f"--config.{section}.{k}={v}" for k, v in config[section].items()]
  return flags


def steps_and_splits(workdir):
  return [(r["step"], r["split"]) for r in metrics_lib.read(str(workdir))]


def test_cli_signals_save_the_step_and_the_resumed_run_is_bitwise_identical(trained,
                                                                            tmp_path):
  config, _, final = trained
  # SIGINT at step 3 (no save due; step 2's may be in flight), SIGTERM right
  # after step 4's async save started. Both runs at once: two cores.
  cases = {"SIGINT": 3, "SIGTERM": 4}
  procs = {}
  for sig, at in cases.items():
    env = dict(os.environ, MOELAB_SIGNAL=sig, MOELAB_SIGNAL_AT=str(at))
    procs[sig] = subprocess.Popen([sys.executable, DRIVER, *cli_flags(config, tmp_path / sig)],
                                  cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
  for sig, at in cases.items():
    out, err = procs[sig].communicate(timeout=300)
    signum = signal.Signals[sig]
    assert procs[sig].returncode == 128 + signum, err[-3000:]
    work = tmp_path / sig
    assert f"checkpoint saved in {work}/checkpoints/{at}. Resume with: python -m " \
           f"experiments.train" in err
    if sig == "SIGTERM":
      assert f"signal sent after step {at}, save in flight: True" in err
    assert "Traceback" not in err and "cannot schedule new futures" not in err
    step_dir = work / "checkpoints" / str(at)
    assert integrity.has_manifest(str(step_dir))
    assert integrity.verify(str(step_dir), at) is None
    assert max(int(s) for s in os.listdir(work / "checkpoints")) == at
    resumed = trainer.train_and_evaluate(config, str(work), progress=False)
    assert resumed["start_step"] == at and resumed["final_step"] == 6
    assert_trees_equal(jax.device_get(resumed["state"].params), final)
    rows = steps_and_splits(work)
    assert len(rows) == len(set(rows))


def test_stop_request_in_process(tiny_config, tmp_path, monkeypatch):
  """handle_signals + a real SIGTERM at step 3 (sent from the trainer's save
  call); the run returns with a checkpoint at step 3 and the handlers are
  restored afterwards."""
  real_save = checkpoint.Checkpoints.save

  def save(self, step, state, force=False):
    saved = real_save(self, step, state, force)
    if step == 3 and not force:
      os.kill(os.getpid(), signal.SIGTERM)
    return saved

  monkeypatch.setattr(checkpoint.Checkpoints, "save", save)
  before = signal.getsignal(signal.SIGTERM)
  with preemption.handle_signals():
    summary = trainer.train_and_evaluate(tiny_config, str(tmp_path / "w"), progress=False)
  assert signal.getsignal(signal.SIGTERM) is before and preemption.requested() is None
  assert summary["interrupted"] == "SIGTERM"
  assert summary["final_step"] == 3 and summary["checkpoint_step"] == 3
  assert integrity.verify(str(tmp_path / "w" / "checkpoints" / "3"), 3) is None
  assert integrity.has_manifest(str(tmp_path / "w" / "checkpoints" / "3"))


def test_truncate_keeps_rows_up_to_the_step(tmp_path):
  rows = [{"step": s, "split": "train"} for s in (1, 2, 3, 4)]
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "spl')  # cut by a kill
  assert metrics_lib.truncate(str(tmp_path), 2) == 3
  assert [r["step"] for r in metrics_lib.read(str(tmp_path))] == [1, 2]
  assert metrics_lib.truncate(str(tmp_path), 2) == 0
  assert not [p for p in os.listdir(tmp_path) if p != "metrics.jsonl"]  # no temp file left


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_exit_codes(signum, code):
  assert preemption.exit_code(signum) == code


@pytest.mark.slow  # ~40 s on 2 cores: two jax processes compile the train step
def test_two_processes_stop_at_one_step_when_one_gets_sigterm(tmp_path, corpus):
  """JAX's preemption service turns a SIGTERM to process 1 alone into one
  agreed stop step: both processes save it together and exit 143."""
  import socket  # noqa: PLC0415
  import time  # noqa: PLC0415
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  work = tmp_path / "run"
  flags = [f"--workdir={work}", "--config=configs/moe_tiny.py", f"--config.data.path={corpus}",
           "--config.data.seq_len=16", "--config.data.batch_size=8",
           "--config.data.val_percent=20", "--config.model.d_model=32",
           "--config.model.num_layers=2", "--config.model.ffn_dim=64",
           "--config.model.moe_ffn_dim=64", "--config.model.num_heads=2",
           "--config.model.num_kv_heads=1", "--config.train.steps=5000",
           "--config.train.log_every=1", "--config.train.eval_every=10000",
           "--config.train.eval_batches=1", "--config.optimizer.warmup_steps=1",
           "--config.checkpoint.every=4000", "--config.mesh.data=2", "--config.mesh.expert=4",
           f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *flags,
                             f"--process_id={i}"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  deadline = time.time() + 300
  while not (work / "metrics.jsonl").exists() or len(steps_and_splits(work)) < 5:
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs[0][-3000:] + outs[1][-3000:]
  last = steps_and_splits(work)[-1][0]
  saved = sorted(int(s) for s in os.listdir(work / "checkpoints"))
  assert saved[-1] == last and 5 <= last < 5000
  assert f"checkpoint saved in {work}/checkpoints/{last}" in outs[0]
  assert integrity.verify(str(work / "checkpoints" / str(last)), last) is None
  assert integrity.has_manifest(str(work / "checkpoints" / str(last)))
