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
