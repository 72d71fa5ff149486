"""Multi-host training: two processes x 4 CPU devices joined by jax.distributed
(`experiments.train --coordinator_address ...`), one (data=2, expert=4) mesh."""

import json
import os
import socket
import subprocess
import sys

import pytest

from experiments import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # ~30-50 s on 2 cores: two jax processes compile the train step
def test_two_processes_train_one_expert_parallel_run(tmp_path, corpus):
  workdir = tmp_path / "run"
  flags = [f"--workdir={workdir}", "--config=configs/moe_tiny.py",
           f"--config.data.path={corpus}", "--config.data.seq_len=16",
           "--config.data.batch_size=8", "--config.data.val_percent=20",
           "--config.model.d_model=32", "--config.model.num_layers=2",
           "--config.model.ffn_dim=64", "--config.model.moe_ffn_dim=64",
           "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
           "--config.train.steps=2", "--config.train.log_every=1",
           "--config.train.eval_every=2", "--config.train.eval_batches=1",
           "--config.optimizer.warmup_steps=1", "--config.checkpoint.every=2",
           "--config.mesh.data=2", "--config.mesh.expert=4",
           f"--coordinator_address=localhost:{free_port()}", "--num_processes=2"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *flags,
                             f"--process_id={i}"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  assert '"final_step": 2' in outs[0]  # process 0 prints the summary
  assert (workdir / "checkpoints" / "2").is_dir()
  # Only process 0 writes metrics: train rows at steps 1 and 2, one eval row.
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (2, "eval")]


@pytest.mark.parametrize("coordinator,num,pid,match", [
    (None, 2, None, "need --coordinator_address"),
    ("localhost:1234", None, 0, "needs --num_processes and --process_id"),
    ("localhost:1234", 2, 2, r"--process_id must be in \[0, 2\)"),
])
def test_distributed_flag_errors(coordinator, num, pid, match):
  with pytest.raises(ValueError, match=match):
    train_cli.init_distributed(coordinator, num, pid)


def test_single_process_without_flags():
  assert train_cli.init_distributed(None, None, None) is False
