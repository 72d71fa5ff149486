"""Byte-level BPE (train/bpe.py): training, saving, reloading and bits/byte accounting;
one tiny run with a task and a BPE end to end (tokenizer.json, exact_match, generate)."""

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from train import bpe, data, metrics, step, tokenizer, trainer
from train.config import RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXTS = [("def add(x, y):\n    return x + y  # héllo\n" * 30).encode(),
         "for i in range(10):\n    print(i, 'wörld')\n".encode() * 20]
KNOWN = "def mul(x, y):\n    return x * y  # wörld ü\n"


def test_train_save_reload_round_trip(tmp_path):
  tok = bpe.train(TEXTS, 300)
  assert tok.to_str() == bpe.train(TEXTS, 300).to_str()          # deterministic
  assert tokenizer.VOCAB_SIZE < tok.vocab_size <= 300
  ids = tok.encode(KNOWN)
  assert len(ids) < len(KNOWN.encode())                           # merges were learned
  assert tok.decode(ids) == KNOWN
  assert tok.encode(KNOWN, bos=True, eos=True) == [tokenizer.BOS] + ids + [tokenizer.EOS]
  # The byte tokenizer's id layout: 0..255 bytes, then BOS/EOS/PAD.
  assert tok.encode("A") == [ord("A")] and tok.decode([tokenizer.BOS, 65, tokenizer.PAD]) == "A"
  path = str(tmp_path / bpe.FILENAME)
  tok.save(path)
  again = bpe.load(path)
  assert again.encode(KNOWN) == ids and again.to_str() == tok.to_str()
  np.testing.assert_array_equal(again.token_bytes(), tok.token_bytes())


def test_bits_per_byte_accounting_equals_bytes_accounting():
  """On a known string the BPE targets cover exactly its bytes, and eval_step's
  bits/byte numerator is the nats of exactly the non-special targets."""
  tok = bpe.train(TEXTS, 300)
  table = tok.token_bytes()
  assert table[:256].tolist() == [1.0] * 256 and table[256:259].tolist() == [0.0] * 3
  ids = tok.encode(KNOWN, bos=True, eos=True)
  assert table[ids].sum() == len(KNOWN.encode()) == len(tokenizer.encode(KNOWN))
  byte_ids = tokenizer.encode(KNOWN, bos=True, eos=True)

  class Uniform:  # a model of constant logits: every target costs ln(V) nats
    def __init__(self, v):
      self.v = v

    def apply(self, variables, inputs, train=False):
      return jnp.zeros(inputs.shape + (self.v,)), {"loss": jnp.zeros(())}

  bpe_sums = step.eval_step({}, jnp.asarray([ids]), model=Uniform(300), token_bytes_V=table)
  byte_sums = step.eval_step({}, jnp.asarray([byte_ids]), model=Uniform(259))
  assert float(bpe_sums["bytes"]) == float(byte_sums["bytes"]) == len(KNOWN.encode())
  n_bpe = len(ids) - 2                                             # targets minus EOS
  assert float(bpe_sums["byte_nats"]) == pytest.approx(n_bpe * math.log(300), rel=1e-6)
  assert float(byte_sums["byte_nats"]) == pytest.approx(len(KNOWN.encode()) * math.log(259),
                                                        rel=1e-6)


def test_tokenizer_spec_is_validated():
  assert tokenizer.vocab_size_of("bytes") == 259 and tokenizer.vocab_size_of("bpe:512") == 512
  for bad in ("bpe", "bpe:x", "bpe:100", "sentencepiece"):
    with pytest.raises(ValueError, match="data.tokenizer"):
      tokenizer.vocab_size_of(bad)
  c = base.get_config()
  c.data.tokenizer = "bpe:512"
  with pytest.raises(ValueError, match="model.vocab_size: data.tokenizer='bpe:512' needs >= 512"):
    RunConfig.from_config(c)


def test_task_run_with_bpe_end_to_end(tmp_path):
  c = base.get_config()
  c.model.update(d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, ffn_dim=32,
                 vocab_size=300)
  c.data.update(task="json_records", task_json_fields=2, tokenizer="bpe:300", seq_len=48,
                batch_size=8, task_train_examples=200, task_val_examples=12)
  c.train.update(steps=2, log_every=1, eval_every=2, eval_batches=2)
  c.optimizer.update(warmup_steps=1)
  work = tmp_path / "run"
  trainer.train_and_evaluate(c, str(work), progress=False)
  ev = [r for r in metrics.read(str(work)) if r["split"] == "eval"][-1]
  assert 0.0 <= ev["exact_match"] <= 1.0 and ev["bits_per_byte"] > 0
  train_row = [r for r in metrics.read(str(work)) if r["split"] == "train"][-1]
  assert train_row["flops_per_token"] > 0 and train_row["flops_per_s"] > 0
  saved = bpe.load(str(work / bpe.FILENAME))
  ds = data.load_run(RunConfig.from_config(c).data, str(work))    # reads it back (checkpoints)
  counted = np.concatenate([k for _, _, k in data.val_task_batches(ds, 2, 8)])
  assert counted.sum() == 12   # the 12 examples once each, the wrapped-around 4 not
  text = saved.decode(ds.val_WxL1[0])
  assert text.startswith("id=") and '{"id":' in text
  # experiments.generate --workdir reads it (in a subprocess: its absl flags are global).
  code = ("import json, sys; from experiments import generate; "
          "_, _, tok = generate.load_workdir(sys.argv[1]); ids = tok.encode('name=Ada'); "
          "print(json.dumps([ids, tok.decode(ids)]))")
  out = subprocess.run([sys.executable, "-c", code, str(work)], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  ids, text = json.loads(out.stdout.strip().splitlines()[-1])
  assert ids == saved.encode("name=Ada", bos=True) and text == "name=Ada"
