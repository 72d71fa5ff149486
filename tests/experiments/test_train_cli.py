"""The CLI trains, checkpoints, writes metrics/TensorBoard events and plots."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_cli_end_to_end(tmp_path):
  corpus = tmp_path / "c"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"{i}.txt").write_text(f"line {i} " * 300)
  work = tmp_path / "run"
  cmd = [sys.executable, "-m", "experiments.train", "--config=configs/switch_tiny.py",
         f"--workdir={work}", f"--config.data.path={corpus}/*.txt",
         "--config.data.seq_len=32", "--config.data.batch_size=4",
         "--config.model.d_model=32", "--config.model.num_layers=2",
         "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
         "--config.model.ffn_dim=32", "--config.model.moe_ffn_dim=32",
         "--config.train.steps=4", "--config.train.log_every=1",
         "--config.train.eval_every=2", "--config.train.eval_batches=1",
         "--config.optimizer.warmup_steps=1", "--config.checkpoint.every=2"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  files = set(os.listdir(work))
  assert {"config.json", "metrics.jsonl", "tb", "checkpoints", "loss_curves.png",
          "expert_load.png"} <= files
  assert sorted(os.listdir(work / "checkpoints"))[-1] == "4"
  rows = [json.loads(l) for l in open(work / "metrics.jsonl")]
  evals = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [2, 4] and evals[-1]["bits_per_byte"] > 0
  train = [r for r in rows if r["split"] == "train"]
  assert len(train[-1]["moe0/load_frac"]) == 8 and "dropped_frac" in train[-1]
  assert os.listdir(work / "tb")
  assert json.loads(open(work / "config.json").read())["model"]["moe_top_k"] == 1

  # Continuing this workdir with another architecture: refused, nothing written.
  stored = (work / "config.json").read_bytes()
  listing = sorted(os.listdir(work)), sorted(os.listdir(work / "checkpoints"))
  out = subprocess.run(cmd + ["--config.model.num_experts=4", "--config.train.steps=6"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert "FATAL WorkdirConfigError" in out.stderr and "model.num_experts: 8 -> 4" in out.stderr
  assert "train.steps" not in out.stderr.split("FATAL")[1]
  assert (work / "config.json").read_bytes() == stored
  assert (sorted(os.listdir(work)), sorted(os.listdir(work / "checkpoints"))) == listing


def test_train_cli_refuses_bad_configs_and_a_diverging_run(tmp_path):
  """Each failure exits non-zero with one FATAL line naming the field or flag;
  a diverging run keeps its last good checkpoint. All processes at once."""
  corpus = tmp_path / "c"
  corpus.mkdir()
  for i in range(6):
    (corpus / f"{i}.txt").write_text(f"line {i} " * 300)
  base = ["--config=configs/base.py", f"--config.data.path={corpus}/*.txt",
          "--config.data.seq_len=16", "--config.data.batch_size=2", "--config.model.d_model=16",
          "--config.model.num_layers=1", "--config.model.num_heads=2",
          "--config.model.num_kv_heads=2", "--config.model.ffn_dim=16",
          "--config.train.steps=4", "--config.train.log_every=1",
          "--config.train.eval_every=4", "--config.train.eval_batches=1",
          "--config.optimizer.warmup_steps=1", "--config.checkpoint.every=2"]
  cases = {
      "inf": (["--config.optimizer.learning_rate=inf"],
              "FATAL invalid config: optimizer.learning_rate: must be finite (got inf)"),
      "nan": (["--config.optimizer.learning_rate=nan"],
              "FATAL invalid config: optimizer.learning_rate: must be finite (got nan)"),
      "warmup": (["--config.optimizer.warmup_steps=10"],
                 "FATAL invalid config: optimizer.warmup_steps: must be < train.steps=4"),
      "section": (["--config.optimzer.learning_rate=1"],
                  "--config.optimzer: unknown config section 'optimzer'"),
      "diverged": (["--config.optimizer.learning_rate=1e30",
                    "--config.optimizer.grad_clip_norm=0", "--config.optimizer.weight_decay=0"],
                   "FATAL DivergenceError: training diverged"),
  }
  procs = {name: subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *base, f"--workdir={tmp_path / name}", *extra],
      cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
      for name, (extra, _) in cases.items()}
  for name, (_, message) in cases.items():
    _, err = procs[name].communicate(timeout=300)
    assert procs[name].returncode == 1, (name, err[-3000:])
    assert message in err, (name, err[-3000:])
    assert "Traceback" not in err, (name, err[-3000:])
    if name != "diverged":
      assert not (tmp_path / name).exists()  # refused before anything was written
  # The diverged run saved steps before the loss went non-finite, never after.
  err = procs["diverged"].stderr
  kept = sorted(int(s) for s in os.listdir(tmp_path / "diverged" / "checkpoints"))
  assert kept, "the diverged run saved no good step"
  out = subprocess.run([sys.executable, "-c", "from train import checkpoint; "
                        f"checkpoint.restore_params({str(tmp_path / 'diverged')!r})"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]  # the newest step is intact and finite
