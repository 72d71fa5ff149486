"""A row's decode does not depend on the rows that share its batch.

The model is trained with capacity dispatch and an evaluation capacity factor
of 1.0, where capacity drops depend on which tokens share a step; decoding
dispatches dropless (model/moe.py), so each prompt's greedy output alone
equals its output in a batch of 8, and sampled outputs equal theirs by seed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.config import GenerationConfig, check_request
from decode.generate import generate
from model.config import ModelConfig
from model.transformer import Decoder

CAPACITY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_dim=48, max_seq_len=64, num_experts=4, moe_top_k=2,
                       moe_dispatch="capacity", capacity_factor=1.0, eval_capacity_factor=1.0)
PROMPTS = [[1, 5, 9], [1, 30], [1, 7, 7, 7, 2, 40, 11], [1, 5, 9], [1, 8],
           [1, 50, 49, 48, 47], [1, 12, 13], [1, 5, 9]]


@pytest.fixture(scope="module")
def params():
  p = jax.jit(Decoder(CAPACITY).init)(jax.random.key(4), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)


def test_capacity_drops_would_couple_the_rows(params):
  """The premise: in a full forward, evaluation capacity drops tokens, so a
  prompt's logits depend on the batch; the decode path below does not."""
  tokens = jnp.asarray([p + [0] * (7 - len(p)) for p in PROMPTS])
  full, aux = Decoder(CAPACITY).apply({"params": params}, tokens)
  alone, _ = Decoder(CAPACITY).apply({"params": params}, tokens[:1])
  assert float(aux["stats"].dropped.max()) > 0
  assert not np.allclose(full[0], alone[0], atol=1e-4)


@pytest.mark.parametrize("strategy,extra", [
    ("greedy", {}), ("sample", dict(temperature=0.9, top_k=20, num_return_sequences=2))])
def test_each_prompt_alone_equals_its_rows_in_a_batch_of_8(params, strategy, extra):
  seeds = tuple(range(10, 10 + len(PROMPTS)))
  gen = GenerationConfig(strategy=strategy, max_new_tokens=10, num_devices=1, **extra)
  batch = generate(CAPACITY, params, PROMPTS, gen, seed=seeds)
  rows = gen.num_return_sequences
  for b, prompt in enumerate(PROMPTS):
    alone = generate(CAPACITY, params, [prompt], gen, seed=(seeds[b],))
    assert alone.sequences() == batch.sequences()[b * rows:(b + 1) * rows], b
    np.testing.assert_allclose(alone.logprobs, batch.logprobs[b * rows:(b + 1) * rows],
                               rtol=1e-5, atol=1e-5)
  if strategy == "greedy":  # identical prompts decode identically wherever they sit
    assert batch.sequences()[0] == batch.sequences()[3] == batch.sequences()[7]


def test_capacity_model_decodes_as_its_dropless_twin(params):
  dropless = CAPACITY.replace(moe_dispatch="dropless")
  a = generate(CAPACITY, params, PROMPTS, max_new_tokens=8, num_devices=1)
  b = generate(dropless, params, PROMPTS, max_new_tokens=8, num_devices=1)
  assert a.sequences() == b.sequences()


def test_a_scalar_seed_gives_each_prompt_its_own_stream(params):
  """seed=s: prompt b draws from fold_in(key(s), b): the same prompt at two
  indices samples differently, and prompt b alone with seed key_b's seed
  tuple is not needed to reproduce it: index and seed determine the draws."""
  gen = GenerationConfig(strategy="sample", max_new_tokens=12, seed=3, num_devices=1)
  out = generate(CAPACITY, params, [[1, 5, 9]] * 3, gen)
  assert len({tuple(s) for s in out.sequences()}) > 1
  again = generate(CAPACITY, params, [[1, 5, 9]] * 3 + [[1, 2]], gen)
  assert again.sequences()[:3] == out.sequences()


@pytest.mark.parametrize("prompts,fields,match", [
    ([[1, 2, 61]], {}, r"prompts\[0\].*outside the vocabulary"),
    ([[1, -5]], {}, r"prompts\[0\].*outside the vocabulary"),
    ([[1], []], {}, r"prompts\[1\]: empty prompt"),
    ([[1, 2]], dict(max_new_tokens=63), "max_seq_len"),
    ([[1, 2]], dict(eos_token_id=99), "eos_token_id"),
    ([[1, 2], [3]], dict(strategy="sample", temperature=(0.5, 0.7, 0.9)), "temperature"),
    ([[1, 2], [3]], dict(seed=(1,)), "seed"),
])
def test_requests_the_model_cannot_serve_name_the_field(prompts, fields, match):
  with pytest.raises(ValueError, match=match):
    check_request(CAPACITY, GenerationConfig(**fields), prompts)


@pytest.mark.parametrize("fields,match", [
    (dict(strategy="beam", num_beams=0), "generation.num_beams: must be an integer >= 1"),
    (dict(strategy="beam", num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(temperature=0.0), "generation.temperature: is a sampling parameter"),
    (dict(strategy="sample", temperature=0.0), r"generation.temperature: must be > 0"),
    (dict(strategy="sample", top_p=0.0), r"generation.top_p: must be in \(0, 1\]"),
    (dict(strategy="sample", top_p=1.5), "generation.top_p"),
    (dict(strategy="sample", min_p=-0.1), "generation.min_p"),
    (dict(strategy="sample", temperature=float("nan")), "generation.temperature"),
    (dict(strategy="nucleus"), "generation.strategy"),
    (dict(max_new_tokens=0), "generation.max_new_tokens"),
    (dict(num_return_sequences=2), "generation.num_return_sequences: greedy"),
    (dict(early_stopping="sometimes"), "generation.early_stopping"),
    (dict(kv_cache="nope"), "generation.kv_cache"),
    (dict(attention_impl="fast"), "generation.attention_impl"),
    (dict(moe_impl="gpu"), "generation.moe_impl"),
    (dict(seed=-1), "generation.seed"),
])
def test_invalid_generation_configs_name_the_field(fields, match):
  with pytest.raises(ValueError, match=match):
    GenerationConfig(**fields)
