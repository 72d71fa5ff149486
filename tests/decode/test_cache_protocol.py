"""The decode loops depend only on the cache protocol (model/cache.py).

A deliberately different cache, which stores position p of a row in slot
T - 1 - p (reverse order), grows at the front and runs the loops in three
phases of its own sizes, decodes token for token like the contiguous cache,
for every strategy and both attention implementations.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.generate import generate
from model.attention import attend_cached
from model.cache import CACHE_KINDS, register
from model.config import ModelConfig
from model.kv_cache import update_rows
from model.transformer import Decoder

CFG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_dim=48, max_seq_len=64)


@flax.struct.dataclass
class ReversedKVCache:
  """Per block k/v_BxTxKxE with position p of a row in slot T - 1 - p."""

  k: tuple
  v: tuple

  @property
  def max_len(self) -> int:
    return self.k[0].shape[1]

  def reserve(self, positions_BxL):
    return self

  def attend(self, layer, q_BxLxHxE, k_BxLxKxE, v_BxLxKxE, positions_BxL, impl):
    position_T = self.max_len - 1 - jnp.arange(self.max_len)
    cache_mask_BxLxT = jnp.broadcast_to(position_T[None, None] < positions_BxL[:, :1, None],
                                        positions_BxL.shape + (self.max_len,))
    new_mask_BxLxL = positions_BxL[:, None, :] <= positions_BxL[:, :, None]
    return attend_cached(q_BxLxHxE, self.k[layer], self.v[layer], cache_mask_BxLxT,
                         k_BxLxKxE, v_BxLxKxE, new_mask_BxLxL, impl)

  def update(self, layer, k_BxLxKxE, v_BxLxKxE, positions_BxL):
    start_B = self.max_len - positions_BxL[:, 0] - positions_BxL.shape[1]
    put = lambda bufs, new: bufs[:layer] + (update_rows(bufs[layer], new[:, ::-1], start_B),) \
        + bufs[layer + 1:]
    return ReversedKVCache(put(self.k, k_BxLxKxE), put(self.v, v_BxLxKxE))

  def repeat(self, n):
    return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), self)

  def reorder(self, rows_B):
    return jax.tree.map(lambda x: x[rows_B], self)

  def grow(self, max_len):
    pad = ((0, 0), (max_len - self.max_len, 0), (0, 0), (0, 0))  # new slots in front
    return jax.tree.map(lambda x: jnp.pad(x, pad), self)

  def release(self, rows_B):
    return self


@register("reversed_for_test")
@dataclasses.dataclass(frozen=True)
class ReversedSpec:
  @classmethod
  def from_config(cls, gen):
    return cls()

  def init(self, cfg, rows, max_len, dtype=None):
    shape = (rows, max_len, cfg.num_kv_heads, cfg.dim_per_head)
    zeros = tuple(jnp.zeros(shape, dtype or cfg.dtype) for _ in range(cfg.num_layers))
    return ReversedKVCache(zeros, zeros)

  def check(self, cfg, rows, max_len):
    pass

  def windows(self, prompt_width, total):
    """Three phases: every loop grows this cache twice."""
    return (prompt_width + (total - prompt_width) // 3,
            prompt_width + 2 * (total - prompt_width) // 3, total)

  def split(self, num_devices):
    return self


PROMPTS = [[1, 5, 9, 2, 7], [3, 8, 1, 4, 4, 6, 2, 9, 11, 5, 7, 1, 2]]


@pytest.fixture(scope="module")
def params():
  p = jax.jit(Decoder(CFG).init)(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)


@pytest.fixture(scope="module")
def eos(params):
  """Row 0's 6th greedy token: rows stop at different steps."""
  return int(generate(CFG, params, PROMPTS[:1], max_new_tokens=6, num_devices=1).tokens[0, 5])


def test_the_toy_cache_really_stores_rows_in_reverse():
  spec = CACHE_KINDS["reversed_for_test"]()
  cache = spec.init(CFG, 1, 8)
  k = jnp.arange(3.0)[None, :, None, None] * jnp.ones((1, 3, 2, 8))
  cache = cache.update(0, k + 1, k, jnp.array([[2, 3, 4]]))
  np.testing.assert_array_equal(cache.k[0][0, :, 0, 0], [0, 0, 0, 3, 2, 1, 0, 0])


@pytest.mark.parametrize("strategy,attention,extra", [
    ("greedy", "xla", {}), ("greedy", "cpu", {}),
    ("sample", "cpu", dict(temperature=0.8, top_k=20, num_return_sequences=2)),
    ("beam", "cpu", dict(num_beams=3, num_return_sequences=2, length_penalty=0.7))])
def test_generate_is_the_same_with_a_cache_that_stores_rows_in_reverse(params, eos, strategy,
                                                                      extra, attention):
  """Rows of 5 and 13 tokens (width 16), 30 new tokens: the toy cache's
  loops run in windows of 26, 36 and 46 slots."""
  kw = dict(strategy=strategy, max_new_tokens=30, seed=3, num_devices=1,
            attention_impl=attention, eos_token_id=eos, **extra)
  ours = generate(CFG, params, PROMPTS, kv_cache="contiguous", **kw)
  toy = generate(CFG, params, PROMPTS, kv_cache="reversed_for_test", **kw)
  assert len(set(ours.lengths.tolist())) > 1
  np.testing.assert_array_equal(toy.tokens, ours.tokens)
  np.testing.assert_array_equal(toy.lengths, ours.lengths)
  np.testing.assert_allclose(toy.logprobs, ours.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(toy.scores, ours.scores, rtol=1e-5, atol=1e-5)


def test_attention_impls_decode_token_identically(params):
  """On CPU, attention_impl='xla' (grouped) equals the 'cpu' block-diagonal form."""
  for strategy in ("greedy", "beam"):
    a, b = (generate(CFG, params, PROMPTS, strategy=strategy, max_new_tokens=24, num_devices=1,
                     attention_impl=impl) for impl in ("xla", "cpu"))
    assert (a.backend.impl.attention, b.backend.impl.attention) == ("xla", "cpu")
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
