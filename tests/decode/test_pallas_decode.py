"""attention_impl='pallas': the Pallas decode kernels wired into decoding (issue 27).

One-token steps of the paged cache write the step's K/V (or MLA latent) first and
then attend in kernels/paged_attention.py / kernels/mla_attention.py over length + 1
tokens (model/paged_cache.py `attend_update`); prefill stays on the XLA gather.
`generate` with it equals attention_impl='xla' token for token on a GQA and an MLA
model, greedy and beam / sample, with pools that are NaN in every slot no row wrote.

Off-device (CI) the backend runs the Triton kernel in Pallas interpret mode on the
CPU. With MOELAB_KERNEL_TESTS_ON_DEVICE=1 (experiments/gpu_check.sh, section
decode_parity) the backend must be a GPU or TPU, and the kernel of that platform
runs compiled: the tests check that nothing was interpreted.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import generate as generate_lib
from decode.backend import resolve_attention
from decode.config import GenerationConfig
from decode.generate import generate, make_step_fn
from model.cache import CACHE_KINDS
from model.config import ModelConfig
from model.impl import ModelImpl
from model.paged_cache import PagedSpec
from model.transformer import Decoder

ON_DEVICE = os.environ.get("MOELAB_KERNEL_TESTS_ON_DEVICE") == "1"
PLATFORM = jax.default_backend()
if ON_DEVICE and PLATFORM not in ("gpu", "tpu"):
  raise RuntimeError("MOELAB_KERNEL_TESTS_ON_DEVICE=1 needs a GPU or TPU backend; jax has "
                     f"{PLATFORM!r}")

# Head width 16 and C = R = 16: the Triton kernel's smallest tiles; pages of 8 tokens
# (the TPU kernel's float32 sublane tile) that rows cross while decoding.
BASE = dict(vocab_size=53, d_model=32, num_layers=2, num_heads=4, head_dim=16, ffn_dim=48,
            max_seq_len=64)
MODELS = {
    "gqa": ModelConfig(**BASE, num_kv_heads=2),
    "mla": ModelConfig(**BASE, num_kv_heads=4, attention="mla", kv_lora_rank=16,
                       rope_head_dim=16, nope_head_dim=8, v_head_dim=8),
}
PROMPTS = [[1, 5, 9, 2, 7], [3, 8, 1, 4, 4, 6, 2, 9, 11]]
PAGE = 8
EOS = {"gqa": 5, "mla": 31}  # some rows stop early
STRATEGIES = {"greedy": {}, "beam": dict(num_beams=3, num_return_sequences=2),
              "sample": dict(temperature=0.8, num_return_sequences=2)}
CASES = [("gqa", "greedy"), ("gqa", "beam"), ("mla", "greedy"), ("mla", "sample")]


@pytest.fixture(scope="module")
def params():
  """Random params (numpy: no init to compile), wide enough that tokens vary."""
  def init(cfg):
    rng = np.random.default_rng(0)
    fill = lambda x: (rng.normal(0, 3.0 / np.sqrt(x.shape[0]), x.shape) if x.ndim > 1 else
                      1 + rng.uniform(-0.3, 0.3, x.shape)).astype(np.float32)
    return jax.tree.map(fill, jax.eval_shape(lambda: Decoder(cfg).init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"])
  return {name: init(cfg) for name, cfg in MODELS.items()}


def run(name, params, strategy, attention_impl, kv_cache="paged"):
  """generate; weight products in XLA (the C++ matmul kernel only adds compile time here)."""
  with jax.default_matmul_precision("highest"):  # no TF32 on a GPU: both sides in float32
    return generate(MODELS[name], params[name], PROMPTS, strategy=strategy, max_new_tokens=6,
                    seed=3, num_devices=1, eos_token_id=EOS[name], kv_cache=kv_cache,
                    page_size=PAGE, attention_impl=attention_impl, matmul_impl="xla",
                    **STRATEGIES[strategy])


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_pallas_decodes_token_for_token_like_xla(case, params):
  name, strategy = case
  ref = run(name, params, strategy, "xla")
  out = run(name, params, strategy, "pallas", kv_cache="paged_nan_for_test")
  impl = out.backend.impl
  assert (impl.attention, impl.interpret) == ("pallas", PLATFORM not in ("gpu", "tpu"))
  assert ref.backend.impl.attention == "xla"
  assert len(set(ref.lengths.tolist())) > 1  # some rows stopped early
  assert len({tuple(t) for t in ref.tokens.tolist()}) == len(ref.tokens)  # rows differ
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(out.scores, ref.scores, rtol=1e-5, atol=1e-4)


def pallas_impl(cfg):
  _, kernel, interpret = resolve_attention(
      cfg, GenerationConfig(kv_cache="paged", page_size=PAGE, attention_impl="pallas"),
      PLATFORM)
  return ModelImpl(attention="pallas", attention_kernel=kernel, interpret=interpret)


def kernel_calls(jaxpr) -> int:
  """pallas_call equations in a jaxpr and (per call site) the jaxprs it calls."""
  n = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      n += 1
      continue
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          n += kernel_calls(sub)
  return n


@pytest.mark.parametrize("name", MODELS)
def test_one_token_steps_call_the_kernel_and_prefill_does_not(name, params):
  """A kernel call per block in one-token steps, none in a 4-token (prefill) step or
  with attention 'xla'."""
  cfg = MODELS[name]
  cache = PagedSpec(page_size=PAGE).init(cfg, 2, 16)
  calls = {}
  for impl in (pallas_impl(cfg), ModelImpl()):
    step = make_step_fn(cfg, params[name], impl)
    for l in (1, 4):
      jaxpr = jax.make_jaxpr(step)(jnp.ones((2, l), jnp.int32),
                                   jnp.tile(jnp.arange(l, dtype=jnp.int32), (2, 1)), cache)
      calls[impl.attention, l] = kernel_calls(jaxpr.jaxpr)
  assert calls == {("pallas", 1): cfg.num_layers, ("pallas", 4): 0, ("xla", 1): 0, ("xla", 4): 0}


@pytest.mark.parametrize("name", MODELS)
def test_write_then_read_equals_read_then_write(name):
  """One step of rows at positions 0, 7, 8 (a page boundary) and 13 over a permuted
  block table and NaN pools: the same output and pools as 'xla'; a row holding no
  pages (limit 0, its write dropped) stays finite."""
  cfg = MODELS[name]
  rng = np.random.default_rng(0)
  positions_BxL = jnp.asarray([[0], [7], [8], [13], [0]], jnp.int32)
  b, m = positions_BxL.shape[0], 3
  nan_pools = CACHE_KINDS["paged_nan_for_test"]  # tests/decode/conftest.py
  cache = nan_pools(page_size=PAGE, num_pages=b * m).init(cfg, b, m * PAGE)
  table_BxM = rng.permutation(b * m).reshape(b, m).astype(np.int32)
  table_BxM[-1] = b * m  # NULL_PAGE: the empty row
  cache = cache.replace(table_BxM=jnp.asarray(table_BxM),
                        limit_B=jnp.asarray([m * PAGE] * (b - 1) + [0], jnp.int32))
  length_B = np.asarray(positions_BxL[:, 0])
  fill = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)

  def written(pool, page_axis):  # random entries in every slot below each row's position
    pool = np.array(pool)
    for r in range(b - 1):
      for t in range(length_B[r]):
        idx = (table_BxM[r, t // PAGE], t % PAGE)
        sl = (slice(None),) * page_axis + idx
        pool[sl] = rng.standard_normal(pool[sl].shape)
    return jnp.asarray(pool)

  layers = tuple(jax.tree.map(lambda x: written(x, x.ndim - 3), layer) for layer in cache.layers)
  cache = cache.replace(layers=layers)
  h = cfg.num_heads
  if name == "mla":
    c, r = cfg.kv_lora_rank, cfg.rope_head_dim
    args = (fill((b, 1, h, c)), fill((b, 1, h, r)), fill((b, 1, c + r)), positions_BxL, 0.25)
    step = lambda impl: cache.attend_update_latent(0, *args, impl)
  else:
    e, k = cfg.dim_per_head, cfg.num_kv_heads
    args = (fill((b, 1, h, e)), fill((b, 1, k, e)), fill((b, 1, k, e)), positions_BxL)
    step = lambda impl: cache.attend_update(0, *args, impl)
  o_ref, cache_ref = step(ModelImpl())
  o, cache_out = step(pallas_impl(cfg))
  assert np.isfinite(np.asarray(o)).all()
  np.testing.assert_allclose(o[:-1], o_ref[:-1], rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(cache_out.layers), jax.tree.leaves(cache_ref.layers)):
    np.testing.assert_array_equal(got, want)


def test_contiguous_cache_is_refused_before_anything_compiles(params, monkeypatch):
  def no_compile(*a, **kw):
    raise AssertionError("decode_fn was reached")

  monkeypatch.setattr(generate_lib, "decode_fn", no_compile)
  with pytest.raises(ValueError, match=r"generation\.attention_impl: 'pallas' .*"
                     r"kv_cache='contiguous'.*use kv_cache='paged'"):
    run("gqa", params, "greedy", "pallas", kv_cache="contiguous")
  narrow = ModelConfig(**dict(BASE, head_dim=8), num_kv_heads=2)  # E = 8: no Triton tile
  with pytest.raises(ValueError, match=r"generation\.attention_impl: 'pallas' cannot run.*"
                     r"E a power of two >= 16; got E=8"):
    generate(narrow, params["gqa"], PROMPTS, kv_cache="paged", attention_impl="pallas")


def test_auto_is_pallas_on_gpu_and_tpu_with_a_paged_cache_only():
  gqa, mla = MODELS["gqa"], MODELS["mla"]
  paged, contiguous = (GenerationConfig(kv_cache=k, page_size=PAGE)
                       for k in ("paged", "contiguous"))
  for cfg in (gqa, mla):
    assert resolve_attention(cfg, paged, "gpu") == ("pallas", "gpu", False)
    assert resolve_attention(cfg, paged, "tpu") == ("pallas", "tpu", False)
    assert resolve_attention(cfg, paged, "cpu") == ("cpu", "", False)
    assert resolve_attention(cfg, contiguous, "gpu") == ("xla", "", False)
    assert resolve_attention(cfg, contiguous, "cpu") == ("cpu", "", False)
  # Shapes a kernel does not take fall back: pages of 4 (TPU float32 needs 8), E = 8
  # (Triton needs 16), MLA's expanded per-head K and V of different widths.
  assert resolve_attention(gqa, paged.replace(page_size=4), "tpu") == ("xla", "", False)
  assert resolve_attention(gqa, paged.replace(page_size=4), "gpu") == ("pallas", "gpu", False)
  narrow = dataclasses.replace(gqa, head_dim=8)
  assert resolve_attention(narrow, paged, "gpu") == ("xla", "", False)
  assert resolve_attention(mla, paged.replace(mla_impl="expanded"), "gpu") == ("xla", "", False)
  # Explicit choices: 'pallas' off GPU / TPU interprets the Triton kernel.
  explicit = paged.replace(attention_impl="pallas")
  assert resolve_attention(gqa, explicit, "cpu") == ("pallas", "gpu", True)
  assert resolve_attention(gqa, explicit, "gpu") == ("pallas", "gpu", False)
  assert resolve_attention(gqa, paged.replace(attention_impl="xla"), "gpu") == ("xla", "", False)
