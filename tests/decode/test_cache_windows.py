"""Growing cache windows: the schedule, and decoding identical to one fixed cache."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import processors as proc
from decode.config import GenerationConfig
from decode.generate import decode_fn, generate, plan_for
from model.kv_cache import growing_windows as cache_windows
from model.config import ModelConfig
from model.transformer import Decoder
from tests.conftest import USER_XLA_OPTIONS

CFG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_dim=48, max_seq_len=256, num_experts=4, moe_top_k=2, moe_every=2,
                  moe_dispatch="dropless")
NEW = 180  # prompt width 16 + 180 = 196 slots: windows 128, 160, 196 at growth 1.25


@pytest.fixture(scope="module")
def params():
  p = jax.jit(Decoder(CFG).init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)


def test_schedule_doubles_from_the_power_of_two_above_the_prompt():
  assert cache_windows(64, 320) == (128, 256, 320)
  assert cache_windows(64, 320, 1.5) == (128, 192, 288, 320)
  assert cache_windows(130, 600) == (256, 512, 600)
  assert cache_windows(16, 196, 1.25) == (128, 160, 196)
  assert cache_windows(8, 100) == (100,)       # within the smallest window: one phase
  assert cache_windows(64, 320, 0) == (320,)   # growth <= 1: off
  with pytest.raises(ValueError, match="no room"):
    cache_windows(64, 64)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_growing_cache_decodes_as_one_fixed_cache(params, strategy):
  """Rows of different lengths (5 and 13 tokens) cross the window borders at
  different steps; every token and log-probability equals the fixed cache's."""
  prompts = [[1, 5, 9, 2, 7], [3, 8, 1, 4, 4, 6, 2, 9, 11, 5, 7, 1, 2]]
  kw = dict(strategy=strategy, max_new_tokens=NEW, seed=4, num_beams=2,
            num_return_sequences=2 if strategy == "beam" else 1, num_devices=1,
            **({"temperature": 0.8} if strategy == "sample" else {}))
  grown = generate(CFG, params, prompts, cache_growth=1.25, **kw)
  fixed = generate(CFG, params, prompts, cache_growth=0, **kw)
  np.testing.assert_array_equal(grown.lengths, NEW)
  np.testing.assert_array_equal(grown.tokens, fixed.tokens)
  np.testing.assert_allclose(grown.logprobs, fixed.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grown.scores, fixed.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_each_phase_loops_over_its_own_window_without_copying_the_cache(params, strategy):
  """One while loop per window, each carrying caches of its window's size;
  no loop body copies a cache buffer (the in-place write of
  test_generate.py holds in every phase). Beam search reorders every cache
  buffer each step (`KVCache.reorder`): a gather into the loop-carried
  buffer, which XLA does from a copy of it; that copy, one per buffer and
  step, is the only one allowed."""
  batch, width = (2, 16) if strategy == "greedy" else (1, 16)
  rows = batch * (2 if strategy == "beam" else 1)
  fn = decode_fn(CFG, plan_for(CFG, GenerationConfig(strategy=strategy, max_new_tokens=NEW,
                                                     num_beams=2, cache_growth=1.25,
                                                     num_devices=1), width, batch))
  args = (params, jnp.ones((batch, width), jnp.int32), jnp.full((batch,), width, jnp.int32),
          proc.SamplingParams.create(rows), jax.random.split(jax.random.key(0), batch),
          (np.float32(1.0), np.int32(1)))
  hlo = fn.lower(*args).compile(USER_XLA_OPTIONS).as_text()
  bodies = [re.search(r"^%" + re.escape(name) + r" .*?^}", hlo, re.M | re.S).group(0)
            for name in re.findall(r" while\(.*?body=%([\w.\-]+)", hlo)]
  shapes = [f"f32[{rows},{w},{CFG.num_kv_heads},{CFG.dim_per_head}]" for w in (128, 160, 196)]
  for shape in shapes:
    assert sum(shape in body for body in bodies) == 1, shape  # the phase of that window
  copies = [line for body in bodies for line in body.splitlines()
            if " copy(" in line and any(f"= {s}" in line for s in shapes)]
  if strategy == "beam":
    def feeds_only_the_reorder(copy_line):
      name = re.search(r"%(\S+) = ", copy_line).group(1)
      users = [line for line in hlo.splitlines() if re.search(rf"[(, ]%{re.escape(name)}[),]", line)]
      return len(users) == 1 and "jit(_take)/gather" in users[0]
    assert len(copies) <= 2 * CFG.num_layers * len(shapes), copies
    copies = [line for line in copies if not feeds_only_the_reorder(line)]
  assert not copies, copies[:3]
