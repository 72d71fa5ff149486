"""decode/stopping.py: stop-token hits; no zero-size array in the decode program."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import processors as proc
from decode.config import GenerationConfig
from decode.generate import decode_fn, plan_for
from decode.stopping import stop_hits
from model.config import ModelConfig
from model.transformer import Decoder

CFG = ModelConfig(vocab_size=37, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                  ffn_dim=24, max_seq_len=32)


def test_stop_hits_marks_stop_ids_and_nothing_without_them():
  tokens = jnp.array([[3, 5, 9], [7, 3, 2]], jnp.int32)
  np.testing.assert_array_equal(stop_hits(tokens, (3, 9)),
                                [[True, False, True], [False, True, False]])
  none = stop_hits(tokens, ())
  assert none.shape == tokens.shape and none.dtype == bool and not none.any()


@pytest.mark.parametrize("strategy,beams", [("greedy", 1), ("sample", 1), ("beam", 2)])
def test_decode_without_stop_ids_has_no_zero_size_array(strategy, beams):
  """jaxlib 0.11.2 segfaults compiling a zero-size constant inside
  `jax.shard_map` (the row-split decode); an empty array of stop ids was one."""
  params = Decoder(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  fn = decode_fn(CFG, plan_for(CFG, GenerationConfig(strategy=strategy, max_new_tokens=4,
                                                     num_beams=beams), 8, 2))
  args = (params, jnp.ones((2, 8), jnp.int32), jnp.full((2,), 8, jnp.int32),
          proc.SamplingParams.create(2 * beams), jax.random.split(jax.random.key(0), 2),
          (np.float32(1.0), np.int32(1)))
  text = fn.lower(*args).as_text()
  assert not re.findall(r"tensor<(?:\d+x)*0x\w*>", text)
