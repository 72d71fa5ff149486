"""experiments.generate: HF checkpoint directory and moelab workdir end to end."""

import json
import subprocess
import sys

import ml_collections
import numpy as np
import torch
import transformers

from configs import base

REPO = __file__.rsplit("/tests/", 1)[0]


def _run(*args):
  out = subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_hf_dir_and_workdir(tmp_path):
  # HF checkpoint directory without a tokenizer: byte tokenizer, ids from config.json.
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, bos_token_id=256, eos_token_id=257,
      pad_token_id=258, initializer_range=0.3)).eval()
  hf.save_pretrained(tmp_path / "hf")
  stdout = _run(f"--hf_model={tmp_path / 'hf'}", "--prompt_ids=256,100,101", "--prompt=de",
                "--strategy=greedy", "--max_new_tokens=6", "--cache_growth=0",
                f"--output={tmp_path / 'o.jsonl'}")
  recs = [json.loads(line) for line in open(tmp_path / "o.jsonl")]
  assert [r["prompt_index"] for r in recs] == [0, 1] and "logprob=" in stdout
  with torch.no_grad():  # --prompt first (BOS + bytes of 'de' = the same ids), then --prompt_ids
    ref = hf.generate(torch.tensor([[256, 100, 101]]), max_new_tokens=6, do_sample=False)
  assert recs[0]["tokens"] == recs[1]["tokens"] == ref[0, 3:].tolist()
  assert all(isinstance(r["text"], str) and np.isfinite(r["logprob"]) for r in recs)

  # moelab workdir: a 2-step training run, then beam search from its checkpoint.
  from train import trainer
  (tmp_path / "data").mkdir()
  for i in range(4):
    (tmp_path / "data" / f"{i}.txt").write_text("def f(x):\n  return x + 1\n" * 20)
  c = base.get_config()
  c.data.path = str(tmp_path / "data" / "*.txt")
  c.data.seq_len, c.data.batch_size = 32, 4
  c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.num_kv_heads = 32, 1, 2, 2
  c.model.ffn_dim = 32
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 2, 1, 2, 1
  c.optimizer.warmup_steps, c.checkpoint.every = 1, 2
  trainer.train_and_evaluate(ml_collections.ConfigDict(c), str(tmp_path / "run"), progress=False)
  stdout = _run(f"--workdir={tmp_path / 'run'}", "--prompt=def ", "--strategy=beam",
                "--num_beams=2", "--num_return_sequences=2", "--max_new_tokens=5",
                f"--output={tmp_path / 'b.jsonl'}")
  recs = [json.loads(line) for line in open(tmp_path / "b.jsonl")]
  assert len(recs) == 2 and recs[0]["score"] >= recs[1]["score"]
  assert all(1 <= len(r["tokens"]) <= 5 for r in recs)


def test_missing_model_paths_are_usage_errors_naming_the_flag(tmp_path):
  """--workdir, --hf_model and --gguf pointing at nothing: one line naming the flag, no
  traceback (one subprocess: absl flags are global)."""
  code = (
      "import sys\n"
      "from absl import app, flags\n"
      "from experiments import generate as g\n"
      "for arg in sys.argv[1:]:\n"
      "  flags.FLAGS.unparse_flags(); flags.FLAGS(['generate', arg, '--prompt=x'])\n"
      "  try:\n"
      "    g.load_model('float32')\n"
      "  except app.UsageError as e:\n"
      "    print(e)\n")
  (tmp_path / "empty").mkdir()
  args = [f"--workdir={tmp_path / 'none'}", f"--workdir={tmp_path / 'empty'}",
          f"--hf_model={tmp_path / 'none'}", f"--gguf={tmp_path / 'x.gguf'}"]
  out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 4 and all(line.startswith(a) for line, a in zip(lines, args)), lines
