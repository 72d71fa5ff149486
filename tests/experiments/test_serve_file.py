"""`experiments.generate --prompts_file`: request lines checked before compiling, and
an end-to-end run whose output lines, in input order, equal `generate` per request;
the serving benchmark's workload and utilisation accounting (experiments/bench_serving.py)."""

import json
import subprocess
import sys

import jax  # noqa: F401  (first: experiments.* then leave the device count alone)
import numpy as np
import pytest
import torch
import transformers

from decode.config import GenerationConfig
from decode.generate import generate
from experiments.bench_serving import static_utilisation, workload
from experiments.serve_file import read_requests
from model.hf_interop import load_hf

REPO = __file__.rsplit("/tests/", 1)[0]


class Bytes:
  def encode(self, text):
    return [256] + list(text.encode())


def write(tmp_path, lines):
  path = tmp_path / "in.jsonl"
  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  return str(path)


@pytest.mark.parametrize("line,match", [
    ("{not json", "line 1: not JSON"),
    ([1, 2], "line 1: must be a JSON object"),
    ({"prompt_ids": [1], "temprature": 0.5}, r"line 1: unknown field\(s\) \['temprature'\]"),
    ({"prompt": "a", "prompt_ids": [1]}, "exactly one of prompt and prompt_ids"),
    ({"prompt_ids": [1, "2"]}, "prompt_ids must be a list of integers"),
    ({"prompt_ids": [1], "top_p": 0.5}, r"line 1: generation\.top_p: is a sampling parameter"),
    ({"prompt_ids": [1], "strategy": "sample", "top_p": 1.5}, r"generation\.top_p: must be"),
    ({"prompt_ids": [1], "max_new_tokens": 0}, r"generation\.max_new_tokens"),
])
def test_bad_lines_name_the_line_and_field(tmp_path, line, match):
  with pytest.raises(ValueError, match=match):
    read_requests(write(tmp_path, [line]), Bytes(), GenerationConfig())


def test_lines_override_the_flag_defaults(tmp_path):
  defaults = GenerationConfig(strategy="sample", temperature=0.7, max_new_tokens=9,
                              eos_token_id=257)
  reqs = read_requests(write(tmp_path, [{"prompt": "hi"}, "",
                                        {"prompt_ids": [3], "strategy": "greedy",
                                         "stop_ids": [5], "max_new_tokens": 2}]),
                       Bytes(), defaults)
  assert [r.prompt for r in reqs] == [(256, 104, 105), (3,)]
  assert reqs[0].gen.temperature == 0.7 and reqs[0].gen.max_new_tokens == 9
  assert reqs[1].gen.strategy == "greedy" and reqs[1].gen.temperature == 1.0
  assert reqs[1].gen.eos_token_id == (5, 257) and reqs[1].gen.max_new_tokens == 2


def test_prompts_file_end_to_end(tmp_path):
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=259, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, bos_token_id=256, eos_token_id=257,
      pad_token_id=258, initializer_range=0.3)).eval()
  hf.save_pretrained(tmp_path / "hf")
  lines = [{"prompt": "de", "max_new_tokens": 5},
           {"prompt_ids": [256, 100, 101, 7], "max_new_tokens": 9, "strategy": "sample",
            "temperature": 0.7, "seed": 4},
           {"prompt_ids": [256, 1, 2], "stop_ids": [50]},
           {"prompt_ids": [256] + list(range(40, 60))}]
  out = subprocess.run(
      [sys.executable, "-m", "experiments.generate", f"--hf_model={tmp_path / 'hf'}",
       f"--prompts_file={write(tmp_path, lines)}", f"--output={tmp_path / 'out.jsonl'}",
       "--max_batch=2", "--page_size=4", "--max_new_tokens=6"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "4 requests" in out.stdout and "KV utilisation" in out.stdout
  recs = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
  assert [r["index"] for r in recs] == [0, 1, 2, 3]
  cfg, params = load_hf(str(tmp_path / "hf"))
  prompts = [[256, 100, 101], [256, 100, 101, 7], [256, 1, 2], [256] + list(range(40, 60))]
  gens = [GenerationConfig(max_new_tokens=5, eos_token_id=257, pad_token_id=258),
          GenerationConfig(strategy="sample", temperature=0.7, seed=(4,), max_new_tokens=9,
                           eos_token_id=257, pad_token_id=258),
          GenerationConfig(max_new_tokens=6, eos_token_id=(50, 257), pad_token_id=258),
          GenerationConfig(max_new_tokens=6, eos_token_id=257, pad_token_id=258)]
  for rec, prompt, gen in zip(recs, prompts, gens):
    assert rec["tokens"] == generate(cfg, params, [prompt], gen, num_devices=1).sequences()[0]


def test_workload_is_heavy_tailed_capped_and_fixed_by_its_seed():
  prompts, outs = workload(256, 0, 100, 150, 1.0, 1024, 1024)
  assert workload(256, 0, 100, 150, 1.0, 1024, 1024)[1] == outs
  lens = np.array([len(p) for p in prompts])
  assert 70 < np.median(lens) < 130 and 110 < np.median(outs) < 190
  assert np.mean(outs) > 1.3 * np.median(outs)  # the tail pulls the mean up
  assert (lens + np.array(outs) <= 1024).all() and min(outs) >= 1


def test_static_utilisation_counts_prompt_plus_generated_over_allocated():
  # rows of prompt 2 and 4 with outputs 1 and 3, 3 steps, 10 slots allocated per row
  stored, allocated = static_utilisation([2, 4], [1, 3], lambda t: 20)
  assert stored == (2 + 4) + (3 + 5) + (3 + 6) and allocated == 60
