"""`generate`: the one entry point for decoding a moelab `Decoder`.

    gen = GenerationConfig(strategy="greedy", max_new_tokens=32, eos_token_id=257)
    out = generate(cfg, params, [[1, 2, 3], [4, 5]], gen)
    out.tokens[r, :out.lengths[r]]      # generated ids of output row r
    generate(cfg, params, prompts, strategy="beam", num_beams=4)   # fields as keywords

Prompts are lists of ids of any lengths (no left padding; per-row
positions, model/cache.py). Strategies (decode/config.py):

* 'greedy': argmax (repetition penalty is the only processor, as in HF).
* 'sample': processors (decode/processors.py) with per-prompt parameters,
  then a categorical draw; `num_return_sequences` samples per prompt.
* 'beam': HF v5 beam search (decode/beam_search.py) returning
  `num_return_sequences` hypotheses per prompt, best first.

After the checks everything is one jitted function: prefill + the
`lax.while_loop` (in phases over a growing cache, decode/cache_windows.py),
specialised to a `DecodePlan` (the static part of the request, with the
cache kind and the backend choices of decode/backend.py). `decode_fn(cfg,
plan)` returns it, cached, so callers can time compilation separately
(`decode_fn(...).lower(*args).compile()`, experiments/bench_decode.py).
The loops see the model only through `make_step_fn`. Where the backend's
loop lays the matrix kernel's weights out (decode/backend.py `loop_impl`),
`generate` passes them laid out once per set of weights (`packed_weights`,
kept for the last few `params` it saw) instead of in every call's program.

Output rows are ordered prompt-major: row r continues prompt
`prompt_index[r]`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decode import backend as backend_lib
from decode import data_parallel
from decode import processors as proc
from decode.beam_search import beam_search_loop, early_stopping_code, length_penalty_divisor
from decode.config import GenerationConfig, check_request
from decode.sampling import sample_loop
from model.cache import CACHE_KINDS
from model.config import ModelConfig
from model.impl import ModelImpl
from model.linear import PACKED
from model.transformer import Decoder

PROMPT_BUCKET = 8  # prompt widths are padded to a multiple of this (fewer recompiles)


@dataclasses.dataclass
class GenerateOutput:
  """Host-side results; B output rows (prompt-major).

  tokens: [B, O] generated ids (stop token included), `pad_token_id` after `lengths`.
  lengths: [B] number of generated tokens.
  logprobs: [B] sum of log-probabilities of the generated tokens: of the
    model distribution for greedy/sample; for beam, the (processed) beam
    log-probability, HF's `sequences_scores * lp(length)`.
  scores: [B] beam: HF `sequences_scores` (length-penalised); otherwise logprobs.
  prompt_index: [B] prompt each row continues.
  backend: the implementation choices it ran with (decode/backend.py).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  scores: np.ndarray
  prompt_index: np.ndarray
  backend: backend_lib.Backend | None = None

  def sequences(self) -> list[list[int]]:
    return [t[:n].tolist() for t, n in zip(self.tokens, self.lengths)]


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """The static part of a request: what one compiled decode program is for."""

  strategy: str
  max_new_tokens: int
  cache_len: int                 # positions per row: prompt width + max_new_tokens
  stop_ids: tuple = ()
  pad_id: int = 0
  active: tuple = ()             # processors some row needs (decode/processors.py)
  num_beams: int = 1
  length_penalty_type: str = "hf"
  min_tokens_to_keep: int = 1
  cache: object = None           # a CacheSpec (model/cache.py)
  backend: backend_lib.Backend | None = None


def make_step_fn(cfg: ModelConfig, params, impl: ModelImpl = ModelImpl(), packed=None):
  """step_fn(tokens_BxL, positions_BxL, cache, fresh=False, logits_at_B=None)
  -> (logits_BxLxV, cache); see `Decoder.decode` and decode/prefill.py.

  packed: `packed_weights(cfg, params, impl)`, or None (with impl.matmul_packed the
  weights are then laid out inside the program).
  """
  model = Decoder(cfg, impl)
  variables = {"params": params} if packed is None else {"params": params, PACKED: packed}
  return lambda t, p, c, fresh=False, logits_at_B=None: model.apply(
      variables, t, p, c, fresh, logits_at_B, method=Decoder.decode)


@functools.lru_cache(maxsize=16)
def _pack_fn(cfg: ModelConfig, impl: ModelImpl):
  def pack(params):  # a 1-token forward visits every projection, which stores its layout
    _, state = Decoder(cfg, impl).apply({"params": params}, jnp.zeros((1, 1), jnp.int32),
                                        mutable=[PACKED])
    return state[PACKED]
  return jax.jit(pack)


_PACKED_CACHE: list = []  # [(treedef, weakrefs to params' leaves, cfg, impl, packed)], newest last
PACKED_CACHE_SIZE = 2     # sets of weights kept laid out (each as large as its weights)


def packed_weights(cfg: ModelConfig, params, impl: ModelImpl):
  """The "packed" collection of `params` for `impl` (model/linear.py `packed_km`: every
  [K, M] weight laid out for the matrix kernel), or None without impl.matmul_packed.

  Kept for the last PACKED_CACHE_SIZE sets of weights, by the identity of every leaf
  (jax arrays, which cannot change in place; a tree with other leaves is laid out anew
  each call), so that repeated calls with the same params lay them out once (~0.1-0.2 s
  for SmolLM2-135M on CPU, docs/performance.md) at the cost of a second copy of them.
  """
  if not impl.matmul_packed:
    return None
  leaves, treedef = jax.tree_util.tree_flatten(params)
  # Sets of weights since freed free their layouts too.
  _PACKED_CACHE[:] = [e for e in _PACKED_CACHE if all(r() is not None for r in e[1])]
  if not all(isinstance(x, jax.Array) for x in leaves):
    return _pack_fn(cfg, impl)(params)
  for tdef, refs, c, i, packed in _PACKED_CACHE:
    if (tdef == treedef and c == cfg and i == impl
        and all(r() is x for r, x in zip(refs, leaves))):
      return packed
  packed = _pack_fn(cfg, impl)(params)
  _PACKED_CACHE.append((treedef, [weakref.ref(x) for x in leaves], cfg, impl, packed))
  del _PACKED_CACHE[:-PACKED_CACHE_SIZE]
  return packed


def active_processors(gen: GenerationConfig) -> tuple[str, ...]:
  """Processors some prompt needs; HF applies the warpers only when sampling."""
  active = tuple(n for n in proc.PROCESSORS
                 if any(v != proc.IDENTITY[n] for v in np.atleast_1d(getattr(gen, n))))
  return active if gen.strategy == "sample" else tuple(
      a for a in active if a == "repetition_penalty")


def plan_for(cfg: ModelConfig, gen: GenerationConfig, prompt_width: int,
             num_prompts: int) -> DecodePlan:
  """The DecodePlan of `gen` for `num_prompts` prompts padded to `prompt_width`."""
  rows = num_prompts * (1 if gen.strategy == "beam" else gen.rows_per_prompt)
  backend = backend_lib.resolve(cfg, gen, rows)
  cache = CACHE_KINDS[gen.kv_cache].from_config(gen).split(backend.num_devices)
  cache.check(cfg, rows // backend.num_devices, prompt_width + gen.max_new_tokens)
  return DecodePlan(
      strategy=gen.strategy, max_new_tokens=gen.max_new_tokens,
      cache_len=prompt_width + gen.max_new_tokens, stop_ids=gen.eos_token_id,
      pad_id=gen.pad_token_id, active=active_processors(gen),
      num_beams=gen.num_beams if gen.strategy == "beam" else 1,
      length_penalty_type=gen.length_penalty_type, min_tokens_to_keep=gen.min_tokens_to_keep,
      cache=cache, backend=backend)


@functools.lru_cache(maxsize=64)
def decode_fn(cfg: ModelConfig, plan: DecodePlan):
  """Jitted fn(params, prompt_BxP, prompt_len_B, sampling_params, rng_B, beam, packed=None)
  -> dict.

  `beam` = (length_penalty float32 [], early_stopping_code int32 []): run-time
  values, so one compilation serves every length penalty. The dict holds
  `tokens` [B, O], `lengths` [B], `logprobs` [B], `scores` [B] for the B rows
  (greedy/sample) or B * num_beams rows (beam, best first).

  rng_B holds one PRNG key per row (`row_keys`). With
  plan.backend.num_devices > 1 the B rows split into equal blocks over that
  many local devices (decode/data_parallel.py): each runs prefill and its own
  while_loop over its block; the keys travel with their rows, so results do
  not depend on the device count. Pass params placed by
  `data_parallel.replicate(params, num_devices)`; `packed`, where the
  backend's loop lays weights out, `packed_weights(cfg, params,
  plan.backend.loop_impl())` placed likewise (None: laid out in the program).
  """
  backend = plan.backend
  strategy = plan.strategy

  def rows(params, prompt_BxP, prompt_len_B, sp, rng_B, beam, packed=None):
    b = prompt_BxP.shape[0]
    step_fn = make_step_fn(cfg, params, backend.loop_impl(), packed)
    windows = plan.cache.windows(prompt_BxP.shape[1], plan.cache_len)
    cache = plan.cache.init(cfg, b, windows[0], backend.cache_dtype)
    kw = dict(max_new_tokens=plan.max_new_tokens, stop_ids=plan.stop_ids, pad_id=plan.pad_id,
              active=plan.active, windows=windows)
    if strategy == "beam":
      s = beam_search_loop(step_fn, cache, prompt_BxP, prompt_len_B, sp,
                           num_beams=plan.num_beams, length_penalty=beam[0],
                           length_penalty_type=plan.length_penalty_type,
                           early_stopping=beam[1], **kw)
      lengths = s.finished_len_BxW.reshape(-1)
      scores = s.finished_scores_BxW.reshape(-1)
      o = s.finished_tokens_BxWxO.shape[-1]
      tokens = jnp.where(jnp.arange(o) < lengths[:, None],
                         s.finished_tokens_BxWxO.reshape(-1, o), plan.pad_id)
      logprobs = scores * length_penalty_divisor(lengths, beam[0], plan.length_penalty_type)
      return {"tokens": tokens, "lengths": lengths, "logprobs": logprobs, "scores": scores}
    s = sample_loop(step_fn, cache, prompt_BxP, prompt_len_B, sp, rng_B, strategy=strategy,
                    min_tokens_to_keep=plan.min_tokens_to_keep, **kw)
    return {"tokens": s.tokens_BxO, "lengths": s.num_generated_B, "logprobs": s.logprob_B,
            "scores": s.logprob_B}

  rows = data_parallel.split_rows(rows, backend.num_devices, replicated_args=(0, 5, 6))
  return jax.jit(rows, compiler_options=dict(backend.compiler_options) or None)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
  """Right-pads to a multiple of `bucket`. Returns (prompt_BxP, prompt_len_B) numpy int32."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generation.prompts: every prompt needs at least one token (e.g. BOS)")
  lens = np.array([len(p) for p in prompts], np.int32)
  width = bucket * math.ceil(lens.max() / bucket)
  out = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    out[i, : len(p)] = p
  return out, lens


def row_keys(gen: GenerationConfig, num_prompts: int):
  """PRNG key of every row: fold_in(key_b, j) for sample j of prompt b (GenerationConfig.seed)."""
  if isinstance(gen.seed, tuple):
    keys_B = jax.vmap(jax.random.key)(jnp.asarray(gen.seed, jnp.uint32))
  else:
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(gen.seed),
                                                      jnp.arange(num_prompts))
  rows = gen.rows_per_prompt if gen.strategy == "sample" else 1
  fold = jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))
  return fold(keys_B, jnp.arange(rows)).reshape(-1)


def sampling_params(gen: GenerationConfig, num_prompts: int) -> proc.SamplingParams:
  """Per-row processor values, each prompt's repeated over its rows."""
  sp = proc.SamplingParams.create(
      num_prompts, repetition_penalty=gen.repetition_penalty, temperature=gen.temperature,
      top_k=gen.top_k, top_p=gen.top_p, min_p=gen.min_p)
  return sp.repeat(gen.rows_per_prompt)


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]],
             gen: GenerationConfig | None = None, **fields) -> GenerateOutput:
  """Decodes continuations of `prompts` (lists of token ids, any lengths).

  Args:
    cfg, params: the moelab Decoder (e.g. from model/hf_interop.py).
    gen: the request (decode/config.py); `fields` replace some of its fields
      (or, without `gen`, those of the default GenerationConfig).
  """
  gen = (gen or GenerationConfig()).replace(**fields) if fields else (gen or GenerationConfig())
  check_request(cfg, gen, prompts)
  b = len(prompts)
  prompt_BxP, lens_B = pad_prompts(prompts, gen.pad_token_id)
  sp = sampling_params(gen, b)
  rows = gen.rows_per_prompt
  if gen.strategy == "sample":
    prompt_BxP, lens_B = np.repeat(prompt_BxP, rows, 0), np.repeat(lens_B, rows)
  plan = plan_for(cfg, gen, prompt_BxP.shape[1], b)
  fn = decode_fn(cfg, plan)
  beam = (np.float32(gen.length_penalty), np.int32(early_stopping_code(gen.early_stopping)))
  packed = packed_weights(cfg, params, plan.backend.loop_impl())
  params, packed = data_parallel.replicate((params, packed), plan.backend.num_devices)
  out = jax.device_get(fn(params, prompt_BxP, lens_B, sp, row_keys(gen, b), beam, packed))
  keep = gen.num_return_sequences
  sel = (np.arange(b)[:, None] * rows + np.arange(keep)[None]).reshape(-1)
  return GenerateOutput(tokens=np.asarray(out["tokens"])[sel],
                        lengths=np.asarray(out["lengths"])[sel],
                        logprobs=np.asarray(out["logprobs"])[sel],
                        scores=np.asarray(out["scores"])[sel],
                        prompt_index=sel // rows, backend=plan.backend)
