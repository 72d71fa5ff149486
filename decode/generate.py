"""`generate`: the one entry point for decoding a moelab `Decoder`.

    out = generate(cfg, params, [[1, 2, 3], [4, 5]], strategy="greedy",
                   max_new_tokens=32, eos_id=257)
    out.tokens[r, :out.lengths[r]]      # generated ids of output row r

Prompts are lists of ids of any lengths (no left padding; per-row
positions, model/kv_cache.py). Strategies:

* 'greedy': argmax (repetition penalty is the only processor, as in HF).
* 'sample': processors (decode/processors.py) with per-prompt parameters,
  then a categorical draw; `num_samples` independent samples per prompt.
* 'beam': HF v5 beam search (decode/beam_search.py) returning
  `num_return_sequences` hypotheses per prompt, best first.

Everything after the argument checks is one jitted function: prefill + the
`lax.while_loop` (in phases over a growing cache, decode/cache_windows.py).
`decode_fn` returns that jitted function (cached per
static configuration) so callers can time compilation separately
(`decode_fn(...).lower(*args).compile()`, experiments/bench_decode.py).

Output rows are ordered prompt-major: row r continues prompt
`prompt_index[r]` (`r // num_samples` or `r // num_return_sequences`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decode import data_parallel
from decode import processors as proc
from decode.beam_search import beam_search_loop, early_stopping_code, length_penalty_divisor
from decode.cache_windows import cache_windows
from decode.sampling import STRATEGIES as SAMPLING_STRATEGIES
from decode.sampling import sample_loop
from kernels import moe_cpu
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.transformer import Decoder

STRATEGIES = SAMPLING_STRATEGIES + ("beam",)
PROMPT_BUCKET = 8  # prompt widths are padded to a multiple of this (fewer recompiles)
# XLA's default copy insertion on CPU copies every loop-carried cache buffer
# that the step both reads (attention) and writes (the new token's slot):
# three whole-cache copies per layer and step. Region analysis proves the read
# precedes the in-place write and inserts none (see model/kv_cache.py).
# A CPU compiler option (XLA DebugOptions), passed only when compiling for CPU.
#
# XLA's tree-reduction rewriter splits every reduction longer than a few
# dozen elements into a reduce-window plus a reduce: two kernels instead of
# one for each RMSNorm and each softmax max and sum, about 40 kernels a layer
# in a batch-1 step that is bound by per-kernel cost. XLA:CPU's own reduction
# is as accurate here: log-sum-exp over 260, 32k and 128k float32 logits had
# the same error against float64 with the pass and without it. Disabling it,
# interleaved A/B of the whole decode in one process (paired medians):
# llama-like batch 1 1.05x (15 rounds; 1.09-1.10x in an earlier session),
# Mixtral-like batch 1 1.05x and 1.09x (21 and 15 rounds), llama-like batch 8
# over two devices 1.06x (13); neutral for Mixtral-like batch 8 (0.99x),
# beam 4 (llama-like 1.01x, Mixtral-like 1.00x) and 4 rows on one device
# (1.00x).
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True,
                    "xla_disable_hlo_passes": "tree_reduction_rewriter"}
# With the rows split over several CPU devices (decode/data_parallel.py, one
# per core) every core runs its own device's loop. XLA:CPU's YNNPACK fusions
# spread an op over the shared intra-op threads and then wait for the core
# the other device is using; an empty list of YNNPACK fusion types makes
# XLA:CPU run every op with its own kernels. Llama-like batch 8 on two
# devices, interleaved A/B in one process (paired median of the whole
# decode): 1.28x, 1.29x and 1.20x (15, 21 and 9 rounds), all of it in the
# attention part (without attention 0.97x); Mixtral-like batch 8 1.03x and
# 1.02x. On one device (batch 1, beam search, 4 rows) YNNPACK is kept:
# 0.96-0.99x without it.
ROW_SPLIT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@dataclasses.dataclass
class GenerateOutput:
  """Host-side results; R output rows (prompt-major).

  tokens: [R, N] generated ids (stop token included), `pad_id` after `lengths`.
  lengths: [R] number of generated tokens.
  logprobs: [R] sum of log-probabilities of the generated tokens: of the
    model distribution for greedy/sample; for beam, the (processed) beam
    log-probability, HF's `sequences_scores * lp(length)`.
  scores: [R] beam: HF `sequences_scores` (length-penalised); otherwise logprobs.
  prompt_index: [R] prompt each row continues.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  scores: np.ndarray
  prompt_index: np.ndarray

  def sequences(self) -> list[list[int]]:
    return [t[:n].tolist() for t, n in zip(self.tokens, self.lengths)]


def make_step_fn(cfg: ModelConfig, params):
  """step_fn(tokens_BxL, positions_BxL, cache, fresh=False, logits_at_B=None)
  -> (logits_BxLxV, cache); see `Decoder.decode` and decode/prefill.py."""
  model = Decoder(cfg)
  return lambda t, p, c, fresh=False, logits_at_B=None: model.apply(
      {"params": params}, t, p, c, fresh, logits_at_B, method=Decoder.decode)


def uses_moe_kernel(cfg: ModelConfig) -> bool:
  """Whether decode steps run the MoE layers in the C++ CPU expert kernel
  (kernels/moe_cpu.py): on the CPU backend, for float32 sparse dropless
  MoE, when the kernel builds (else the XLA paths of `dispatch.dropless_moe`).
  It reads every chosen expert once, in place, for all its rows, split over
  the device's cores. Mixtral-like on the 2-core VM, interleaved A/B in one
  process (paired median speed-up of the whole decode over the XLA paths it
  replaced, 9 rounds): batch 1 1.47x and beam 4 1.46x (2 threads; over
  per-expert weight buffers with a `lax.switch` per assignment, and the
  stacked expert loop), batch 8 1.23x (over per-expert buffers; two devices
  with 1 thread each and one device with 2 threads alike).
  """
  return (jax.default_backend() == "cpu" and cfg.num_experts > 0 and cfg.moe_mode == "sparse"
          and cfg.moe_dispatch == "dropless" and cfg.dtype == "float32" and moe_cpu.available())


def moe_kernel_config(cfg: ModelConfig, num_devices: int = 1) -> ModelConfig:
  """cfg with `moe_kernel_threads` set when `uses_moe_kernel`: the cores
  each of the `num_devices` devices has to itself (at least 1)."""
  if cfg.moe_kernel_threads or not uses_moe_kernel(cfg):
    return cfg
  return dataclasses.replace(cfg, moe_kernel_threads=max(1, _cores() // num_devices))


def _cores() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


@functools.lru_cache(maxsize=64)
def decode_fn(cfg: ModelConfig, strategy: str, *, max_new_tokens: int, cache_len: int,
              stop_ids: tuple = (), pad_id: int = 0, active: tuple = (), num_beams: int = 1,
              length_penalty_type: str = "hf", min_tokens_to_keep: int = 1,
              num_devices: int = 1, cache_growth: float = 2.0):
  """Jitted fn(params, prompt_BxP, prompt_len_B, sampling_params, rng, beam) -> dict.

  `beam` = (length_penalty float32 [], early_stopping_code int32 []): run-time
  values, so one compilation serves every length penalty. The dict holds
  `tokens` [R, N], `lengths` [R], `logprobs` [R], `scores` [R] with R = B rows
  (greedy/sample) or B * num_beams (beam, best first).

  num_devices > 1 splits the B prompts into equal blocks over that many local
  devices (decode/data_parallel.py): each runs prefill and its own while_loop
  over its block. Sampling keys are per row, split from `rng` before the
  split, so results do not depend on num_devices. Pass params placed by
  `data_parallel.replicate(params, num_devices)` (`generate` does).

  On CPU, MoE models run their decode steps in the C++ expert kernel
  (`moe_kernel_config`).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES} (got {strategy!r})")

  cfg = moe_kernel_config(cfg, num_devices)

  def rows(params, prompt_BxP, prompt_len_B, sp, rng_B, beam):
    b = prompt_BxP.shape[0]
    step_fn = make_step_fn(cfg, params)
    windows = cache_windows(prompt_BxP.shape[1], cache_len, cache_growth)
    cache = KVCache.init(cfg, b, windows[0])
    if strategy == "beam":
      s = beam_search_loop(step_fn, cache, prompt_BxP, prompt_len_B, sp, num_beams=num_beams,
                           max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                           length_penalty=beam[0], length_penalty_type=length_penalty_type,
                           early_stopping=beam[1], active=active, windows=windows)
      lengths = s.finished_len_BxW.reshape(-1)
      scores = s.finished_scores_BxW.reshape(-1)
      n = s.finished_tokens_BxWxN.shape[-1]
      tokens = jnp.where(jnp.arange(n) < lengths[:, None],
                         s.finished_tokens_BxWxN.reshape(-1, n), pad_id)
      logprobs = scores * length_penalty_divisor(lengths, beam[0], length_penalty_type)
      return {"tokens": tokens, "lengths": lengths, "logprobs": logprobs, "scores": scores}
    s = sample_loop(step_fn, cache, prompt_BxP, prompt_len_B, sp, rng_B, strategy=strategy,
                    max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                    active=active, min_tokens_to_keep=min_tokens_to_keep, windows=windows)
    return {"tokens": s.tokens_BxN, "lengths": s.num_generated_B, "logprobs": s.logprob_B,
            "scores": s.logprob_B}

  rows = data_parallel.split_rows(rows, num_devices, replicated_args=(0, 5))

  def run(params, prompt_BxP, prompt_len_B, sp, rng, beam):
    rng_B = jax.random.split(rng, prompt_BxP.shape[0])
    return rows(params, prompt_BxP, prompt_len_B, sp, rng_B, beam)

  on_cpu = jax.default_backend() == "cpu"
  return jax.jit(run, compiler_options=cpu_compiler_options(num_devices) if on_cpu else None)


def cpu_compiler_options(num_devices: int) -> dict:
  """The XLA:CPU options `decode_fn` compiles with: COMPILER_OPTIONS, plus
  ROW_SPLIT_OPTIONS when the rows are split over several devices; options
  this jaxlib does not know are left out (they are XLA debug options)."""
  options = dict(COMPILER_OPTIONS, **(ROW_SPLIT_OPTIONS if num_devices > 1 else {}))
  return {k: v for k, v in options.items() if _cpu_option_known(k, v)}


@functools.lru_cache(maxsize=None)
def _cpu_option_known(name: str, value) -> bool:
  """Whether XLA:CPU accepts compiler option `name` = `value` (a trial compile)."""
  try:
    jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options={name: value})
  except jax.errors.JaxRuntimeError:
    return False
  return True


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
  """Right-pads to a multiple of `bucket`. Returns (prompt_BxP, prompt_len_B) numpy int32."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (e.g. BOS)")
  lens = np.array([len(p) for p in prompts], np.int32)
  width = bucket * math.ceil(lens.max() / bucket)
  out = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    out[i, : len(p)] = p
  return out, lens


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             strategy: str = "greedy", max_new_tokens: int = 32, eos_id: int | None = None,
             stop_ids: Sequence[int] = (), pad_id: int = 0, temperature=1.0, top_k=0,
             top_p=1.0, min_p=0.0, repetition_penalty=1.0, min_tokens_to_keep: int = 1,
             num_samples: int = 1, num_beams: int = 4, length_penalty: float = 1.0,
             length_penalty_type: str = "hf", early_stopping=False,
             num_return_sequences: int = 1, seed: int = 0,
             num_devices: int | None = None, cache_growth: float = 2.0) -> GenerateOutput:
  """Decodes continuations of `prompts` (lists of token ids, any lengths).

  Args:
    cfg, params: the moelab Decoder (e.g. from model/hf_interop.py).
    strategy: 'greedy' | 'sample' | 'beam'.
    max_new_tokens: N, most tokens generated per row (stop token included).
    eos_id, stop_ids: a row stops after emitting any of them (the token is kept).
    pad_id: fills generated positions after a row stopped.
    temperature, top_k, top_p, min_p, repetition_penalty: HF processors, a
      scalar or one value per prompt; temperature/top-k/top-p/min-p apply to
      'sample' only, the repetition penalty to every strategy.
    min_tokens_to_keep: HF's floor for top-k/top-p/min-p.
    num_samples: samples per prompt ('sample'; 'greedy' would repeat).
    num_beams, length_penalty, length_penalty_type ('hf' | 'gnmt'),
      early_stopping (True | False | 'never'), num_return_sequences: beam search.
    seed: PRNG seed for sampling.
    num_devices: split the rows (prompts for beam search) over this many
      local devices (decode/data_parallel.py); None: the most devices, up to
      `jax.local_device_count()`, that divide them evenly.
    cache_growth: growing cache windows (`decode_fn`, decode/cache_windows.py);
      <= 1 attends over the whole cache from the first step.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES} (got {strategy!r})")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
  stop = tuple(sorted({int(t) for t in ([] if eos_id is None else [eos_id]) + list(stop_ids)}))
  prompt_BxP, lens_B = pad_prompts(prompts, pad_id)
  if lens_B.max() + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"prompt ({lens_B.max()}) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"model.max_seq_len={cfg.max_seq_len}")
  b = len(prompts)
  rows = {"sample": num_samples, "greedy": 1, "beam": num_beams}[strategy]
  if strategy == "beam":
    if not 1 <= num_return_sequences <= num_beams:
      raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}]")
    if num_beams < 1:
      raise ValueError("num_beams must be >= 1")
  elif num_samples < 1:
    raise ValueError("num_samples must be >= 1")
  sp = proc.SamplingParams.create(b, repetition_penalty=repetition_penalty,
                                  temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  active = sp.active()
  if strategy != "sample":  # HF applies the warpers only when sampling.
    active = tuple(a for a in active if a == "repetition_penalty")
  if strategy == "sample":
    prompt_BxP, lens_B = np.repeat(prompt_BxP, rows, 0), np.repeat(lens_B, rows)
  sp = sp.repeat(rows if strategy != "greedy" else 1)
  if num_devices is None:
    num_devices = data_parallel.auto_num_devices(prompt_BxP.shape[0])
  elif prompt_BxP.shape[0] % num_devices:
    raise ValueError(f"num_devices={num_devices} must divide the {prompt_BxP.shape[0]} rows "
                     "(prompts for beam search)")
  fn = decode_fn(cfg, strategy, max_new_tokens=max_new_tokens,
                 cache_len=prompt_BxP.shape[1] + max_new_tokens, stop_ids=stop, pad_id=pad_id,
                 active=active, num_beams=num_beams if strategy == "beam" else 1,
                 length_penalty_type=length_penalty_type,
                 min_tokens_to_keep=min_tokens_to_keep, num_devices=num_devices,
                 cache_growth=cache_growth)
  beam = (np.float32(length_penalty), np.int32(early_stopping_code(early_stopping)))
  params = data_parallel.replicate(params, num_devices)
  out = jax.device_get(fn(params, prompt_BxP, lens_B, sp, jax.random.key(seed), beam))
  keep = num_return_sequences if strategy == "beam" else rows
  sel = (np.arange(b)[:, None] * rows + np.arange(keep)[None]).reshape(-1)
  return GenerateOutput(tokens=np.asarray(out["tokens"])[sel],
                        lengths=np.asarray(out["lengths"])[sel],
                        logprobs=np.asarray(out["logprobs"])[sel],
                        scores=np.asarray(out["scores"])[sel],
                        prompt_index=sel // rows)
