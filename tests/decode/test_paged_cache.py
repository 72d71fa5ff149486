"""The paged KV cache (model/paged_cache.py) decodes like the contiguous one.

Pages of 4 tokens, so every prompt and continuation crosses several; beams share
their prompt's pages and copy the last one on write; pools full of NaN in every
slot no row wrote never reach an output; the compiled loop updates the pool in
place.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.config import GenerationConfig
from decode.generate import (decode_fn, generate, make_step_fn, pad_prompts, plan_for, row_keys,
                             sampling_params)
from kernels import paged_attention
from model.config import ModelConfig
from model.paged_attend import attend_paged
from model.paged_cache import PagedSpec
from model.transformer import Decoder
from tests.conftest import USER_XLA_OPTIONS

BASE = dict(vocab_size=53, d_model=32, num_layers=2, num_heads=4, ffn_dim=48, max_seq_len=64)
MODELS = {
    "dense": ModelConfig(**BASE, num_kv_heads=4),
    "gqa": ModelConfig(**BASE, num_kv_heads=2),
    "moe": ModelConfig(**BASE, num_kv_heads=1, num_experts=4, moe_top_k=2, moe_every=2,
                       moe_dispatch="dropless"),
    "mla": ModelConfig(**BASE, num_kv_heads=4, attention="mla", kv_lora_rank=16,
                       rope_head_dim=8, nope_head_dim=8, v_head_dim=12),
}
PROMPTS = [[1, 5, 9, 2, 7], [3, 8, 1, 4, 4, 6, 2, 9, 11, 5, 7, 1, 2]]
STRATEGIES = {"greedy": {}, "sample": dict(temperature=0.8, top_k=20, num_return_sequences=2),
              "beam": dict(num_beams=3, num_return_sequences=2, length_penalty=0.7)}
# GQA and MoE greedy and beam search with kv_cache='paged' are checked against HF
# (test_hf_parity_paged.py); here every strategy on the dense (MHA) model, sampling on
# GQA and MoE, and MLA's latent pages.
CASES = [("dense", "greedy"), ("dense", "sample"), ("dense", "beam"), ("gqa", "sample"),
         ("moe", "sample"), ("mla", "greedy"), ("mla", "beam")]
EOS = {"dense": 10, "gqa": 8, "moe": 44, "mla": 52}  # rows stop at different steps


@pytest.fixture(scope="module")
def params():
  out = {}
  for name, cfg in MODELS.items():
    p = jax.jit(Decoder(cfg).init)(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"]
    out[name] = jax.tree.map(lambda x: x * (1.5 if name == "mla" else 3.0) if x.ndim > 1 else x,
                             p)
  return out


def run(name, params, strategy, **kw):
  return generate(MODELS[name], params[name], PROMPTS, strategy=strategy, max_new_tokens=14,
                  seed=3, num_devices=1, eos_token_id=EOS[name], **STRATEGIES[strategy], **kw)


@pytest.fixture(scope="module")
def contiguous(params):
  return {case: run(*case[:1], params, case[1], kv_cache="contiguous") for case in CASES}


def assert_same(a, b):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_paged_decodes_token_for_token_like_contiguous(case, params, contiguous):
  """Greedy, sampling (same seed) and beam search on dense, GQA, MoE and MLA models;
  NaN-filled pools (every slot no row wrote is NaN) change nothing."""
  name, strategy = case
  ref = contiguous[case]
  assert len(set(ref.lengths.tolist())) > 1  # some rows stopped early
  kind = "paged" if case == ("dense", "greedy") else "paged_nan_for_test"
  assert_same(run(name, params, strategy, kv_cache=kind, page_size=4), ref)


def test_xla_attention_path_decodes_like_contiguous(params, contiguous):
  """attention_impl='xla': single-token steps through the XLA gather, not the kernel;
  with NaN pools."""
  out = run("dense", params, "beam", kv_cache="paged_nan_for_test", page_size=4,
            attention_impl="xla")
  assert_same(out, contiguous["dense", "beam"])


def test_too_few_pages_raise_naming_num_pages_and_the_need(params):
  with pytest.raises(ValueError, match=r"generation\.num_pages: 7 pages .*need up to 8 pages \(use num_pages >= 8"):
    generate(MODELS["gqa"], params["gqa"], PROMPTS, max_new_tokens=14, kv_cache="paged",
             page_size=8, num_pages=7, num_devices=1)   # 2 rows x ceil((16 + 14) / 8)
  with pytest.raises(ValueError, match=r"generation\.page_size"):
    GenerationConfig(kv_cache="paged", page_size=0)
  with pytest.raises(ValueError, match=r"generation\.num_pages"):
    GenerationConfig(kv_cache="paged", num_pages=-1)
  assert PagedSpec(num_pages=10).split(4).num_pages == 2 and PagedSpec().split(4).num_pages == 0
  with pytest.raises(ValueError, match=r"num_pages: 16 pages split over 2 devices leave 8 per "
                     r"device.*need up to 12 pages \(use num_pages >= 24"):
    PagedSpec(page_size=4, num_pages=16).split(2).check(MODELS["gqa"], 2, 24)


def test_beams_share_their_prompt_pages_and_copy_the_last_on_write(params):
  """A 10-token prompt in pages of 4: 2 full pages + 1 partial. Three beams hold
  them by reference (3 pages in use, counts 3); their first write copies the
  partial page for two of them (5 pages) while the full pages stay shared; a
  reorder that drops beam 2 frees its copy."""
  cfg, p = MODELS["gqa"], params["gqa"]
  step = jax.jit(make_step_fn(cfg, p), static_argnames=("fresh",))
  prompt = jnp.asarray([[3, 8, 1, 4, 4, 6, 2, 9, 11, 5]])
  _, cache = step(prompt, jnp.arange(10)[None], PagedSpec(page_size=4, forks=3).init(cfg, 1, 16),
                  fresh=True)
  cache = cache.repeat(3)
  assert int(cache.pool.in_use) == 3
  assert np.asarray(cache.pool.refs_P)[np.asarray(cache.table_BxM[0, :3])].tolist() == [3, 3, 3]
  _, cache = step(jnp.asarray([[7], [8], [9]]), jnp.full((3, 1), 10), cache)
  table = np.asarray(cache.table_BxM)
  assert int(cache.pool.in_use) == 5
  assert (table[:, :2] == table[0, :2]).all() and len(set(table[:, 2].tolist())) == 3
  assert np.asarray(cache.pool.refs_P)[table[0, :2]].tolist() == [3, 3]
  cache = cache.reorder(jnp.asarray([0, 0, 1]))
  assert int(cache.pool.in_use) == 4


def test_single_token_attention_is_the_kernel_reference_with_the_new_token_written():
  """attend_paged over length tokens + the step's own key == the reference of
  kernels/paged_attention.py over length + 1 tokens with that key written at
  position length (the semantics the Pallas kernels match); NaN in every slot no
  row may read."""
  rng = np.random.default_rng(0)
  b, k, g, e, s, m = 3, 2, 2, 8, 4, 3
  p = b * m + 1
  table = rng.permutation(p)[:b * m].reshape(b, m).astype(np.int32)
  length = np.array([0, 5, 11], np.int32)
  k_pages, v_pages = rng.standard_normal((2, k, p, s, e)).astype(np.float32)
  q = rng.standard_normal((b, 1, k * g, e)).astype(np.float32)
  k_new, v_new = rng.standard_normal((2, b, 1, k, e)).astype(np.float32)
  written_k, written_v = k_pages.copy(), v_pages.copy()
  for r, n in enumerate(length):
    written_k[:, table[r, n // s], n % s] = k_new[r, 0]
    written_v[:, table[r, n // s], n % s] = v_new[r, 0]
    for t in range(n + 1, m * s):  # everything past the row's tokens: NaN
      for x in (k_pages, v_pages, written_k, written_v):
        x[:, table[r, t // s], t % s] = np.nan
  ref = paged_attention.paged_attention(q[:, 0], written_k, written_v, table, length + 1,
                                        impl="reference")
  ours = attend_paged(q, k_pages, v_pages, table, length, k_new, v_new, np.ones((b, 1, 1), bool))
  np.testing.assert_allclose(ours[:, 0], ref, rtol=1e-5, atol=1e-5)


def pool_copies(hlo, shape):
  """Lines of while-loop bodies that copy a buffer of `shape`, and whether a body
  carries one."""
  bodies = [re.search(r"^%" + re.escape(name) + r" .*?^}", hlo, re.M | re.S).group(0)
            for name in re.findall(r" while\(.*?body=%([\w.\-]+)", hlo)]
  carried = any(shape in body for body in bodies)
  return carried, [line for body in bodies for line in body.splitlines()
                   if f"= {shape}" in line and " copy(" in line]


@pytest.mark.parametrize("case", [("moe", "sample"), ("dense", "beam")], ids="-".join)
def test_compiled_paged_decode_loop_never_copies_the_pool(params, case):
  """Block writes, page claims and beam reorders update the pool in place: no
  [K, P, S, E] copy in any loop body (a copy there is a copy of every page per
  step). The programs of the equality test above (the same plan: a compilation
  cache hit)."""
  name, strategy = case
  cfg = MODELS[name]
  gen = GenerationConfig(strategy=strategy, max_new_tokens=14, seed=3, num_devices=1,
                         eos_token_id=EOS[name], kv_cache="paged_nan_for_test", page_size=4,
                         **STRATEGIES[strategy])
  prompt_BxP, lens_B = pad_prompts(PROMPTS, 0)
  sp = sampling_params(gen, len(PROMPTS))
  if strategy == "sample":
    prompt_BxP, lens_B = np.repeat(prompt_BxP, 2, 0), np.repeat(lens_B, 2)
  plan = plan_for(cfg, gen, prompt_BxP.shape[1], len(PROMPTS))
  hlo = decode_fn(cfg, plan).lower(
      params[name], prompt_BxP, lens_B, sp, row_keys(gen, len(PROMPTS)),
      (np.float32(gen.length_penalty), np.int32(0))).compile(USER_XLA_OPTIONS).as_text()
  pages = plan.cache.pages_needed(prompt_BxP.shape[0] if strategy == "sample" else len(PROMPTS),
                                  plan.cache_len)
  carried, copies = pool_copies(hlo, f"f32[{cfg.num_kv_heads},{pages},4,{cfg.dim_per_head}]")
  assert carried and not copies, copies[:3]
