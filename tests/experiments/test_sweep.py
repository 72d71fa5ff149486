"""Sweeps (experiments/sweep.py): grid expansion, naming, resume-skip, failed runs,
and a real 2-step run in a subprocess."""

import csv
import json
import os
import sys

import pytest

from configs import dense_tiny, moe_tiny
from experiments import sweep

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Done:
  def __init__(self, code):
    self.code = code

  def poll(self):
    return self.code


def fake_runner(calls, fail=()):
  """Writes a finished run's metrics.jsonl (or fails with a FATAL line) at once."""
  def run(cmd, env, log_path, cpus):
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    calls.append((os.path.basename(workdir), cmd, env, cpus))
    if any(f in workdir for f in fail):
      with open(log_path, "a") as f:
        f.write("Traceback ...\nFATAL DivergenceError: training diverged: loss nan\nbye\n")
      return _Done(1)
    k = cmd.count("--config.model.moe_top_k=2") + 1
    rows = [{"step": 10, "split": "train", "moe0/load_cv": 0.1 * k, "moe1/load_cv": 0.3 * k,
             "moe0/max_over_mean_load": 1.5, "moe1/max_over_mean_load": 2.5,
             "moe0/router_entropy": 1.0, "moe1/router_entropy": 2.0, "dropped_frac": 0.05,
             "tokens_per_s": 1000.0},
            {"step": 10, "split": "eval", "loss": 2.0, "bits_per_byte": 3.0 / k}]
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write("".join(json.dumps(r) + "\n" for r in rows))
    return _Done(0)
  return run


def _config(**train):
  c = moe_tiny.get_config()
  c.train.update(steps=10, **train)
  c.optimizer.update(warmup_steps=1)
  return c.to_dict()


def test_grid_expansion_and_names(tmp_path):
  grid = sweep.parse_grid("model.moe_top_k=1,2 model.router_noise=none,shazeer")
  assert grid == [("model.moe_top_k", ["1", "2"]), ("model.router_noise", ["none", "shazeer"])]
  runs = sweep.expand(grid, seeds=2, base_seed=5, root=str(tmp_path))
  assert len(runs) == 8
  assert [r.name for r in runs[:3]] == ["moe_top_k=1,router_noise=none,seed=5",
                                        "moe_top_k=1,router_noise=none,seed=6",
                                        "moe_top_k=1,router_noise=shazeer,seed=5"]
  assert runs[-1].overrides == (("model.moe_top_k", "2"), ("model.router_noise", "shazeer"),
                                ("train.seed", "6"))
  assert runs[0].workdir == os.path.join(str(tmp_path), runs[0].name)
  assert sweep._short_names(["model.path", "data.path"]) == {"model.path": "model.path",
                                                             "data.path": "data.path"}
  assert sweep.run_name([("data.path", "a/b c*")], {}) == "path=a_b_c_"
  linked = sweep.expand(sweep.parse_grid("model.aux_importance_coef&model.aux_load_coef=0&0,"
                                         "0.1&0.2 model.moe_top_k=1"), 1, 0, str(tmp_path))
  assert [r.name for r in linked] == ["aux_importance_coef=0,aux_load_coef=0,moe_top_k=1,seed=0",
                                      "aux_importance_coef=0.1,aux_load_coef=0.2,moe_top_k=1,"
                                      "seed=0"]
  for bad in ("model.moe_top_k", "moe_top_k=1", "nosuch.x=1", "model.a=1, model.a=2",
              "model.a=1,,2", "model.a&model.b=1&2,3", "model.a&model.a=1&1"):
    with pytest.raises(ValueError, match="--sweep"):
      sweep.parse_grid(bad)
  with pytest.raises(ValueError, match="--seeds"):
    sweep.expand(sweep.parse_grid("train.seed=1,2"), 2, 0, str(tmp_path))


def test_failed_runs_are_reported_and_the_others_finish(tmp_path):
  calls = []
  grid = sweep.parse_grid("model.router_noise=none,shazeer model.aux_load_coef=0,0.01")
  res = sweep.run_sweep("configs/moe_tiny.py", _config(), grid, 1, str(tmp_path),
                        ["--config.train.steps=10"], parallel=2,
                        runner=fake_runner(calls, fail=("router_noise=shazeer,aux_load_coef=0,",)),
                        log=lambda *_: None)
  by = {r["run"]: r for r in res}
  invalid = by["router_noise=none,aux_load_coef=0.01,seed=0"]
  assert invalid["status"] == "failed" and "model.aux_load_coef" in invalid["error"]
  crashed = by["router_noise=shazeer,aux_load_coef=0,seed=0"]
  assert crashed["status"] == "failed"
  assert crashed["error"] == "exit 1: FATAL DivergenceError: training diverged: loss nan"
  ok = by["router_noise=shazeer,aux_load_coef=0.01,seed=0"]
  assert ok["status"] == "done" and ok["val_bpb"] == 3.0
  assert ok["load_cv"] == pytest.approx(0.2) and ok["max_mean"] == 2.0
  assert ok["entropy"] == 1.5 and ok["dropped"] == 0.05 and ok["tok_s"] == 1000.0
  # The invalid combination never started; every launch got the global override,
  # its own overrides, and a share of the cores.
  assert len(calls) == 3 and "router_noise=none,aux_load_coef=0.01,seed=0" not in [
      c[0] for c in calls]
  for _, cmd, env, cpus in calls:
    assert cmd[:3] == [sys.executable, "-m", "experiments.train"]
    assert "--config.train.steps=10" in cmd and "--config.train.seed=0" in cmd
    assert env["OMP_NUM_THREADS"] == str(len(cpus or [0] * (os.cpu_count() or 1)))
  md = (tmp_path / "sweep.md").read_text()
  assert md.splitlines()[0].startswith("| run | status | val_bpb | val_loss | load_cv")
  assert "model.aux_load_coef" in md and md.count("| done |") == 2
  rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
  assert [r["status"] for r in rows] == ["done", "failed", "failed", "done"]


def test_rerun_skips_finished_runs_and_retries_the_others(tmp_path):
  grid = sweep.parse_grid("model.moe_top_k=1,2")
  first = []
  sweep.run_sweep("c.py", _config(), grid, 1, str(tmp_path), [],
                  runner=fake_runner(first, fail=("moe_top_k=2",)), log=lambda *_: None)
  again = []
  res = sweep.run_sweep("c.py", _config(), grid, 1, str(tmp_path), [],
                        runner=fake_runner(again), log=lambda *_: None)
  assert [c[0] for c in again] == ["moe_top_k=2,seed=0"]          # only the failed one
  assert [r["status"] for r in res] == ["skipped", "done"]
  assert res[0]["val_bpb"] == 3.0                                   # read back from its run
  changed = []
  sweep.run_sweep("c.py", _config(eval_every=5), grid, 1, str(tmp_path), [],
                  runner=fake_runner(changed), log=lambda *_: None)
  assert len(changed) == 2                                          # another config: rerun
  with pytest.raises(ValueError, match="also given"):
    sweep.run_sweep("c.py", _config(), grid, 1, str(tmp_path), ["--config.model.moe_top_k=1"],
                    runner=fake_runner([]))


def test_core_shares_and_thread_flags():
  slots = sweep.cpu_slots(2)
  if hasattr(os, "sched_getaffinity"):
    cores = sorted(os.sched_getaffinity(0))
    assert all(len(s) == max(1, len(cores) // 2) and set(s) <= set(cores) for s in slots)
  env = sweep.child_env(1, xla_ok=True)
  assert "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" in env["XLA_FLAGS"]
  assert env["RAYON_NUM_THREADS"] == "1"
  assert "XLA_FLAGS" not in sweep.child_env(1, xla_ok=False) or (
      "intra_op" not in sweep.child_env(1, xla_ok=False)["XLA_FLAGS"])


def test_a_real_run_then_skipped(corpus, tmp_path, monkeypatch):
  """A real `python -m experiments.train` child (a dense model: quick to compile)."""
  monkeypatch.chdir(REPO)
  c = dense_tiny.get_config()
  flags = [f"--config.data.path={corpus}", "--config.data.seq_len=16",
           "--config.data.batch_size=2", "--config.model.d_model=16",
           "--config.model.num_layers=1", "--config.model.num_heads=2",
           "--config.model.num_kv_heads=2", "--config.model.ffn_dim=16",
           "--config.train.steps=2", "--config.train.log_every=1",
           "--config.train.eval_every=2", "--config.train.eval_batches=1",
           "--config.optimizer.warmup_steps=1"]
  for f in flags:
    key, value = f.removeprefix("--config.").split("=", 1)
    section, field = key.split(".")
    c[section][field] = value
  grid = sweep.parse_grid("optimizer.learning_rate=3e-3")
  res = sweep.run_sweep("configs/dense_tiny.py", c.to_dict(), grid, 1, str(tmp_path), flags,
                        log=lambda *_: None)
  assert [r["status"] for r in res] == ["done"], [r.get("error") for r in res]
  assert res[0]["val_bpb"] > 0 and res[0]["tok_s"] > 0
  assert json.load(open(tmp_path / res[0]["run"] / "config.json"))["optimizer"][
      "learning_rate"] == 3e-3
  calls = []
  res = sweep.run_sweep("configs/dense_tiny.py", c.to_dict(), grid, 1, str(tmp_path), flags,
                        runner=fake_runner(calls), log=lambda *_: None)
  assert calls == [] and [r["status"] for r in res] == ["skipped"]
