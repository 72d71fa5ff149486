"""Continuous batching (decode/engine.py): every request as if it ran alone.

50 greedy requests of random prompt and output lengths through 8 slots over pages
of 4 tokens: each equals `generate` on that request alone. Sampled requests draw by
their own seeds whatever the slot or the queue order; pages freed and poisoned with
NaN change nothing; bad requests fail before anything compiles.
"""

import dataclasses
import re

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.config import GenerationConfig
from decode.engine import Engine, Request
from decode.generate import generate
from model import page_pool
from model.config import ModelConfig
from model.paged_cache import LayerPages, PagedKVCache, PagedSpec
from model.transformer import Decoder
from tests.conftest import USER_XLA_OPTIONS

CFG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_dim=48, max_seq_len=64)
EOS = 11
SERVED = dict(max_batch=8, page_size=4, chunk=8, prefill_rows=1)


@pytest.fixture(scope="module")
def params():
  p = jax.jit(Decoder(CFG).init)(jax.random.key(5), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)


def greedy_requests(n, seed):
  """Prompts of 1-8 tokens, 6 or 12 new tokens, EOS."""
  rng = np.random.default_rng(seed)
  return [Request(tuple(int(t) for t in rng.integers(1, 53, int(rng.integers(1, 9)))),
                  GenerationConfig(max_new_tokens=int(rng.choice([6, 12])), eos_token_id=EOS))
          for _ in range(n)]


@pytest.fixture(scope="module")
def served(params):
  requests = greedy_requests(50, 0)
  engine = Engine(CFG, params, requests, **SERVED)
  return requests, engine.run(), engine.stats


def test_fifty_requests_through_eight_slots_equal_generate_alone(params, served):
  requests, done, stats = served
  lengths = [len(c.tokens) for c in done]
  assert len(set(lengths)) > 3 and any(n < r.gen.max_new_tokens
                                       for n, r in zip(lengths, requests))  # EOS hits
  for r, c in zip(requests, done):
    alone = generate(CFG, params, [list(r.prompt)], r.gen, num_devices=1)
    assert c.tokens == alone.sequences()[0]
    np.testing.assert_allclose(c.logprob, alone.logprobs[0], rtol=1e-5, atol=1e-5)
  # The batch stayed full: far fewer steps than one request at a time, and pages held
  # token states (the last page of a row is partly empty).
  assert stats.steps < sum(lengths) / 4 and stats.prefills == 50
  assert 0.6 < stats.utilisation <= 1.0 and stats.generated == sum(lengths)


def test_sampled_requests_draw_by_their_own_seed_whatever_shares_the_batch(params):
  """Request i samples as generate([prompt], seed=(seed,)); reversing the queue (other
  slots, other neighbours) changes no request's tokens (greedy ones ride along)."""
  rng = np.random.default_rng(1)
  requests = []
  for i in range(8):
    prompt = tuple(int(t) for t in rng.integers(1, 53, int(rng.integers(1, 8))))
    if i % 4 == 3:
      gen = GenerationConfig(max_new_tokens=12, eos_token_id=EOS)
    else:
      gen = GenerationConfig(strategy="sample", max_new_tokens=12, temperature=0.9, top_k=12,
                             seed=100 + i, eos_token_id=EOS)
    requests.append(Request(prompt, gen))
  kw = dict(max_batch=3, page_size=4, chunk=4, prefill_rows=2)
  first = Engine(CFG, params, requests, **kw).run()
  back = Engine(CFG, params, requests[::-1], **kw).run()[::-1]
  assert [c.tokens for c in first] == [c.tokens for c in back]
  for r, c in zip(requests, first):
    seed = (r.gen.seed,) if r.gen.strategy == "sample" else r.gen.seed
    alone = generate(CFG, params, [list(r.prompt)], r.gen, seed=seed, num_devices=1)
    assert c.tokens == alone.sequences()[0]
  assert len({tuple(c.tokens) for c in first}) == len(first)


@flax.struct.dataclass
class PoisonOnRelease(PagedKVCache):
  """Fills every free page with NaN whenever rows give pages back."""

  def release(self, rows_B):
    cache = super().release(rows_B)
    free_1xPx1x1 = page_pool.free_mask(cache.pool)[None, :, None, None]
    nan = lambda x: jnp.where(free_1xPx1x1, jnp.nan, x)
    return cache.replace(layers=tuple(LayerPages(nan(x.k_pages_KxPxSxE), nan(x.v_pages_KxPxSxE))
                                      for x in cache.layers))


@dataclasses.dataclass(frozen=True)
class PoisonSpec(PagedSpec):
  def init(self, cfg, rows, max_len, dtype=None):
    c = super().init(cfg, rows, max_len, dtype)
    return PoisonOnRelease(layers=c.layers, table_BxM=c.table_BxM, limit_B=c.limit_B,
                           pool=c.pool, page_size=c.page_size)


def test_pages_freed_and_poisoned_with_nan_change_nothing(params, served):
  """A finished row's pages go back to the pool as NaN and are handed to the next
  requests: reads stay below each row's length. (test_paged_cache.py runs the XLA
  gather path over NaN pools.)"""
  requests, done, _ = served
  engine = Engine(CFG, params, requests[:20], max_batch=4, chunk=8, prefill_rows=1,
                  cache_spec=PoisonSpec(page_size=4))
  assert [c.tokens for c in engine.run()] == [c.tokens for c in done[:20]]


def test_bad_requests_fail_before_compiling(params):
  ok = Request((1, 2, 3), GenerationConfig(max_new_tokens=8))
  cases = [
      (Request((1, 2), GenerationConfig(strategy="beam", max_new_tokens=4)), {},
       "request 0: generation.strategy"),
      (Request((1, 2), GenerationConfig(strategy="sample", num_return_sequences=2)), {},
       "num_return_sequences"),
      (Request((), GenerationConfig()), {}, r"request 0: generation\.prompts\[0\]: empty"),
      (Request((1, 99), GenerationConfig()), {}, "outside the vocabulary"),
      (Request((1,) * 40, GenerationConfig(max_new_tokens=40)), {}, "max_seq_len"),
      (ok, dict(num_pages=2, page_size=4), r"engine\.num_pages: 2 pages.*needs 3 pages"),
      (ok, dict(max_batch=0), r"engine\.max_batch"),
  ]
  for request, kw, match in cases:
    with pytest.raises(ValueError, match=match):
      Engine(CFG, params, [request], **kw)


def test_decode_chunk_updates_the_pool_in_place(params):
  """The engine's decode loop (page claims, releases, block writes) has no copy of a
  [K, P, S, E] pool in its body."""
  engine = Engine(CFG, params, greedy_requests(50, 0), **SERVED)  # compiled by `served`
  state = engine._empty_state()
  hlo = engine._decode.lower(engine.weights, state, np.int32(1)).compile(USER_XLA_OPTIONS).as_text()
  shape = f"f32[{CFG.num_kv_heads},{engine.num_pages},4,{CFG.dim_per_head}]"
  bodies = [re.search(r"^%" + re.escape(name) + r" .*?^}", hlo, re.M | re.S).group(0)
            for name in re.findall(r" while\(.*?body=%([\w.\-]+)", hlo)]
  assert any(shape in body for body in bodies)
  copies = [line for body in bodies for line in body.splitlines()
            if f"= {shape}" in line and " copy(" in line]
  assert not copies, copies[:3]
