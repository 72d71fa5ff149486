"""`generate` semantics on a random moelab model: lengths, stops, scores."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import processors as proc
from decode import backend as backend_module
from decode.backend import cpu_compiler_options
from decode.config import GenerationConfig
from decode.generate import decode_fn, generate, plan_for
from kernels import moe_cpu
from model.config import ModelConfig
from model.transformer import Decoder
from tests.conftest import USER_XLA_OPTIONS

CFG = ModelConfig(vocab_size=53, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1,
                  ffn_dim=48, max_seq_len=64, num_experts=4, moe_top_k=2, moe_every=2,
                  moe_dispatch="dropless")


@pytest.fixture(scope="module")
def params():
  p = jax.jit(Decoder(CFG).init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, p)  # peakier distributions


_forward = jax.jit(Decoder(CFG).apply)


def _teacher_forced_logprob(params, prompt, gen):
  seq = list(prompt) + list(gen)
  padded = jnp.asarray([seq + [0] * (32 - len(seq))])  # causal: padding is never seen
  logits, _ = _forward({"params": params}, padded)
  logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
  p = len(prompt)
  return float(sum(logp[p - 1 + i, t] for i, t in enumerate(gen)))


def test_batched_rows_equal_solo_runs_and_logprobs(params, prompts):
  out = generate(CFG, params, prompts, strategy="sample", max_new_tokens=10, seed=3,
                 temperature=0.9, top_k=[0, 10, 20])
  for r, prompt in enumerate(prompts):
    seq = out.sequences()[r]
    np.testing.assert_allclose(out.logprobs[r], _teacher_forced_logprob(params, prompt, seq),
                               rtol=1e-4, atol=1e-4)
  greedy = generate(CFG, params, prompts, max_new_tokens=10)
  for r, prompt in enumerate(prompts):
    alone = generate(CFG, params, [prompt], max_new_tokens=10)
    assert alone.sequences()[0] == greedy.sequences()[r]


def test_stop_tokens_end_rows_and_finished_rows_stop_changing(params, prompts):
  free = generate(CFG, params, prompts, max_new_tokens=10, pad_token_id=0)
  stop = free.tokens[0, 3]  # the 4th greedy token of row 0
  extra = free.tokens[1, 5]
  out = generate(CFG, params, prompts, max_new_tokens=10,
                 eos_token_id=(int(stop), int(extra)), pad_token_id=0)
  for r in range(len(prompts)):
    ref = free.sequences()[r]
    hits = [i for i, t in enumerate(ref) if t in (stop, extra)]
    n = hits[0] + 1 if hits else 10
    assert out.sequences()[r] == ref[:n]
    assert (out.tokens[r, n:] == 0).all()
  assert out.lengths[0] <= 4 and out.lengths[1] <= 6
  # Finished rows stop changing: their log-probability stops accumulating.
  for r in range(len(prompts)):
    n = out.lengths[r]
    np.testing.assert_allclose(out.logprobs[r], _teacher_forced_logprob(
        params, prompts[r], out.sequences()[r]), atol=1e-4)
    assert n == 10 or out.sequences()[r][-1] in (stop, extra)


@pytest.mark.parametrize("kind", ["hf", "gnmt"])
def test_beam_scores_are_length_penalised_logprobs(params, prompts, kind):
  alpha = 0.7
  out = generate(CFG, params, prompts[:2], strategy="beam", num_beams=3,
                 num_return_sequences=3, max_new_tokens=10, eos_token_id=5, length_penalty=alpha,
                 length_penalty_type=kind)
  lp = {"hf": lambda n: n ** alpha, "gnmt": lambda n: ((5 + n) / 6) ** alpha}[kind]
  for r, seq in enumerate(out.sequences()):
    prompt = prompts[int(out.prompt_index[r])]
    ref = _teacher_forced_logprob(params, prompt, seq)
    assert out.scores[r] == pytest.approx(ref / lp(len(seq)), abs=1e-4)
  for b in range(2):  # best first
    assert list(out.scores[3 * b:3 * b + 3]) == sorted(out.scores[3 * b:3 * b + 3], reverse=True)


def test_num_samples_and_argument_errors(params, prompts):
  out = generate(CFG, params, prompts[:2], strategy="sample", num_return_sequences=3,
                 max_new_tokens=10)
  assert out.tokens.shape == (6, 10) and list(out.prompt_index) == [0, 0, 0, 1, 1, 1]
  assert len({tuple(s) for s in out.sequences()[:3]}) > 1  # independent draws
  with pytest.raises(ValueError, match="strategy"):
    generate(CFG, params, prompts, strategy="nucleus")
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(CFG, params, prompts, max_new_tokens=60)
  with pytest.raises(ValueError, match="temperature"):
    generate(CFG, params, prompts, strategy="sample", temperature=0.0)
  with pytest.raises(ValueError, match="early_stopping"):
    generate(CFG, params, prompts, strategy="beam", early_stopping="sometimes")


@pytest.mark.parametrize("batch,strategy", [(1, "greedy"), (3, "greedy"), (2, "sample")])
def test_compiled_decode_loop_never_copies_the_kv_cache(params, batch, strategy):
  """The step reads each layer's cache before writing it (model/kv_cache.py);
  with the CPU copy-insertion option of decode_fn the write is in place. A
  copy of a [B, T, K, E] buffer anywhere in the program would be a per-step
  (or per-call) copy of the whole cache."""
  prompt_len, new = 8, 6
  fn = decode_fn(CFG, plan_for(CFG, GenerationConfig(strategy=strategy, max_new_tokens=new,
                                                     num_devices=1), prompt_len, batch))
  args = (params, jnp.ones((batch, prompt_len), jnp.int32),
          jnp.full((batch,), prompt_len, jnp.int32), proc.SamplingParams.create(batch),
          jax.random.split(jax.random.key(0), batch), (np.float32(1.0), np.int32(1)))
  hlo = fn.lower(*args).compile(USER_XLA_OPTIONS).as_text()
  shape = f"f32[{batch},{prompt_len + new},{CFG.num_kv_heads},{CFG.dim_per_head}]"
  bodies = [re.search(r"^%" + re.escape(name) + r" .*?^}", hlo, re.M | re.S).group(0)
            for name in re.findall(r" while\(.*?body=%([\w.\-]+)", hlo)]
  assert any(shape in body for body in bodies)  # the decode loop carries the cache
  copies = [line for body in bodies for line in body.splitlines()
            if f"= {shape}" in line and " copy(" in line]
  assert not copies, copies[:3]


def test_compiled_decode_reduces_in_one_kernel_per_reduction(params):
  """decode_fn disables XLA's tree-reduction rewriter on CPU: the norms' and
  softmaxes' reductions (over 64 cache slots here) stay single reduces, with
  no reduce-window beside them."""
  if jax.default_backend() != "cpu":
    return  # a CPU compiler option; other backends compile with their defaults
  fn = decode_fn(CFG, plan_for(CFG, GenerationConfig(max_new_tokens=8), 64, 1))
  args = (params, jnp.ones((1, 64), jnp.int32), jnp.full((1,), 64, jnp.int32),
          proc.SamplingParams.create(1), jax.random.split(jax.random.key(0), 1),
          (np.float32(1.0), np.int32(1)))
  hlo = fn.lower(*args).compile().as_text()
  assert " reduce(" in hlo and "reduce-window" not in hlo


@pytest.mark.parametrize("strategy", [  # beam: the same kernel calls on W rows (-m slow)
    "greedy", pytest.param("beam", marks=pytest.mark.slow)])
def test_cpu_expert_kernel_decodes_the_same_as_xla(params, strategy):
  """On CPU, 'auto' runs MoE decode steps in the C++ expert kernel
  (kernels/moe_cpu.py, decode/backend.py): the compiled loop calls it, and
  batch 1 and 2 give the same tokens and log-probabilities as the XLA
  expert loop (moe_impl='cpu') and the generic dispatch (moe_impl='xla')."""
  gen = GenerationConfig(strategy=strategy, max_new_tokens=10, num_beams=2,
                         num_return_sequences=2 if strategy == "beam" else 1, num_devices=1)
  if jax.default_backend() != "cpu":
    assert backend_module.resolve(CFG, gen, 1).impl.moe == "xla"
    return
  plan = plan_for(CFG, gen, 8, 1)
  assert plan.backend.impl.moe == "cpu_kernel" and plan.backend.impl.moe_threads >= 1
  hlo = decode_fn(CFG, plan).lower(
      params, jnp.ones((1, 8), jnp.int32), jnp.full((1,), 8, jnp.int32),
      proc.SamplingParams.create(2 if strategy == "beam" else 1),
      jax.random.split(jax.random.key(0), 1), (np.float32(1.0), np.int32(1))).as_text()
  assert moe_cpu.TARGET in hlo
  prompts = [[5, 7, 9, 11, 2], [3, 1, 4, 1, 5, 9, 2, 6]]
  with_kernel = [generate(CFG, params, prompts[:b], gen) for b in (1, 2)]
  assert with_kernel[0].backend.impl.moe == "cpu_kernel"
  for moe in ("cpu", "xla"):
    other = [generate(CFG, params, prompts[:b], gen, moe_impl=moe) for b in (1, 2)]
    for k, x in zip(with_kernel, other):
      assert x.backend.impl.moe == moe
      np.testing.assert_array_equal(k.tokens, x.tokens)
      np.testing.assert_allclose(k.logprobs, x.logprobs, rtol=1e-5)


def test_cpu_compiler_options_per_device_count_and_unknown_options_left_out(monkeypatch):
  """Region-analysis copy insertion and no tree-reduction rewriter always;
  YNNPACK fusing dots only on one device and nothing when the rows are split
  over several; an option XLA:CPU does not know is dropped instead of failing
  the compile."""
  one, split = cpu_compiler_options(1), cpu_compiler_options(2)
  assert one == {"xla_cpu_copy_insertion_use_region_analysis": True,
                 "xla_disable_hlo_passes": "tree_reduction_rewriter",
                 "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  assert split == dict(one, xla_cpu_experimental_ynn_fusion_type="")
  monkeypatch.setattr(backend_module, "COMPILER_OPTIONS",
                      dict(backend_module.COMPILER_OPTIONS, xla_cpu_no_such_option=True))
  assert cpu_compiler_options(1) == one
