"""Continuous batching: an offline engine that keeps its batch full over a request queue.

    engine = Engine(cfg, params, requests, max_batch=32)     # checks everything first
    completions = engine.run(progress=True)                   # in input order
    completions[i].tokens, completions[i].logprob

A static batch runs until its longest row is done, its finished rows idle, and its
cache reserves every row's longest length. Here (iteration-level scheduling, Orca,
Yu et al. OSDI 2022 §3.2-3.3; paged KV memory, vLLM, Kwon et al. 2023, arXiv
2309.06180 §4.2-4.5) the engine holds `max_batch` slots over one paged cache
(model/paged_cache.py); the host-side scheduler runs between chunks of jitted
decode steps (decode/engine_steps.py): a finished row gives its pages back at once,
and waiting requests are prefilled into the free slots, first come first served.
A request is admitted only when its worst case (prompt + max_new_tokens, in pages)
fits next to the worst cases of the running ones, so the pool never runs dry and
nothing is preempted or overwritten; pages are still claimed only as rows grow.

Each request has its own prompt, strategy ('greedy' or 'sample'; beam search is
not served here: use `generate`), sampling values, max_new_tokens, stop ids and
seed (a `GenerationConfig`, validated as for `generate`). Its tokens never depend
on which requests shared its batch: greedy rows equal `generate` on the request
alone, and a sampled request draws as `generate([prompt], seed=(seed,))`.

The engine runs on one device (XLA's intra-op threads and the CPU attention kernel's
share the cores); `generate` is the one that splits rows over devices.

Compilation: one decode-chunk program, and one prefill program per prompt width
(powers of two from 16) for 1 and for `prefill_rows` new requests; `compile()`
builds them ahead of a timed run.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Sequence

import jax
import numpy as np

from decode import backend as backend_lib
from decode import engine_steps
from decode import processors as proc
from decode.config import GenerationConfig, check_request
from decode.generate import active_processors, packed_weights
from model.config import ModelConfig
from model.paged_cache import PagedSpec

ENGINE_STRATEGIES = ("greedy", "sample")
MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt (token ids) and its settings."""

  prompt: tuple
  gen: GenerationConfig = GenerationConfig()


@dataclasses.dataclass
class Completion:
  """A request's generated ids (stop token included) and their summed log p_model."""

  tokens: list
  logprob: float


@dataclasses.dataclass
class EngineStats:
  """What a run did: tokens, time, decode steps, chunks and KV memory utilisation."""

  generated: int = 0
  seconds: float = 0.0
  steps: int = 0
  chunks: int = 0
  prefills: int = 0
  utilisation: float = float("nan")  # token states / slots of claimed pages, over steps
  peak_pages: int = 0


def bucket(n: int, low: int = 1) -> int:
  """The power of two >= max(n, low)."""
  return 1 << (max(n, low, 1) - 1).bit_length()


class Engine:
  """Serves `requests` with `max_batch` slots over one pool (see the module docstring).

  page_size, num_pages: the paged cache (num_pages 0: max_batch rows at the longest
  request's worst case). chunk: decode steps per program call at most. prefill_rows:
  most requests prefilled in one call. attention_impl, moe_impl: as GenerationConfig.
  cache_spec: a PagedSpec (or a subclass) to build the cache with, instead of one of
  `page_size`.
  """

  def __init__(self, cfg: ModelConfig, params, requests: Sequence[Request], *,
               max_batch: int = 32, page_size: int = 16, num_pages: int = 0, chunk: int = 32,
               prefill_rows: int = 4, attention_impl: str = "auto", moe_impl: str = "auto",
               cache_spec: PagedSpec | None = None):
    for name, v, low in (("max_batch", max_batch, 1), ("chunk", chunk, 1),
                         ("prefill_rows", prefill_rows, 1), ("num_pages", num_pages, 0)):
      if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"engine.{name}: must be an integer >= {low} (got {v!r})")
    if not requests:
      raise ValueError("engine.requests: no request given")
    gens = [r.gen for r in requests]
    for i, r in enumerate(requests):
      g = r.gen
      where = f"request {i}: "
      if g.strategy not in ENGINE_STRATEGIES:
        raise ValueError(f"{where}generation.strategy: the engine serves {ENGINE_STRATEGIES} "
                         f"(got {g.strategy!r}; use decode.generate for beam search)")
      if g.num_return_sequences != 1:
        raise ValueError(f"{where}generation.num_return_sequences: the engine returns one "
                         f"sequence per request (got {g.num_return_sequences})")
      if isinstance(g.seed, tuple) or any(isinstance(getattr(g, f), tuple) for f in
                                          ("temperature", "top_k", "top_p", "min_p",
                                           "repetition_penalty")):
        raise ValueError(f"{where}generation: one value per field (a request is one prompt)")
      try:
        check_request(cfg, g, [list(r.prompt)])
      except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    if len({g.min_tokens_to_keep for g in gens}) > 1:
      raise ValueError("generation.min_tokens_to_keep: must be the same for every request")
    self.cfg, self.requests, self.max_batch, self.chunk = cfg, list(requests), max_batch, chunk
    self.prefill_rows = min(prefill_rows, max_batch)
    self.spec = cache_spec or PagedSpec(page_size=page_size)
    page_size = self.spec.page_size
    self.need = [math.ceil((len(r.prompt) + r.gen.max_new_tokens) / page_size)
                 for r in requests]
    self.max_len = max(len(r.prompt) + r.gen.max_new_tokens for r in requests)
    width = math.ceil(self.max_len / page_size)
    self.num_pages = num_pages or max_batch * width
    worst = max(self.need)
    if worst > self.num_pages:
      i = self.need.index(worst)
      raise ValueError(f"engine.num_pages: {self.num_pages} pages of {page_size} tokens cannot "
                       f"hold request {i} (prompt {len(requests[i].prompt)} + max_new_tokens "
                       f"{requests[i].gen.max_new_tokens} needs {worst} pages)")
    active = sorted({a for g in gens for a in active_processors(g)},
                    key=proc.PROCESSORS.index)
    self.stop_width = max(1, max(len(g.eos_token_id) for g in gens))
    gen0 = GenerationConfig(attention_impl=attention_impl, moe_impl=moe_impl, num_devices=1,
                            kv_cache="paged", page_size=page_size)
    self.backend = backend_lib.resolve(cfg, gen0, max_batch)
    # Products read the matrix kernel's layout of the weights, laid out once (their loops
    # run a chunk of steps a call).
    impl = self.backend.loop_impl()
    self.weights = (params, packed_weights(cfg, params, impl))
    self._prefill, self._decode = engine_steps.programs(
        cfg, impl, active=tuple(active),
        min_tokens_to_keep=gens[0].min_tokens_to_keep, chunk=chunk,
        sample=any(g.strategy == "sample" for g in gens),
        compiler_options=self.backend.compiler_options)
    self._presence = "repetition_penalty" in active
    self.stats = EngineStats()

  # ------------------------------------------------------------------ device state
  def _empty_state(self):
    cache = dataclasses.replace(self.spec, num_pages=self.num_pages).init(
        self.cfg, self.max_batch, self.max_len, self.backend.cache_dtype)
    return engine_steps.init_state(cache, self.cfg.vocab_size, self.stop_width, self._presence)

  def _prefill_args(self, slots: list[int], reqs: list[int]):
    """Host arrays for `prefill` of requests `reqs` into `slots`, padded to buckets."""
    n = 1 if len(reqs) == 1 else self.prefill_rows
    width = bucket(max(len(self.requests[r].prompt) for r in reqs), MIN_PROMPT_BUCKET)
    prompt = np.zeros((n, width), np.int32)
    lens, max_new, seeds = (np.ones(n, np.int32), np.zeros(n, np.int32),
                            np.zeros(n, np.uint32))
    greedy = np.ones(n, bool)
    stop = np.full((n, self.stop_width), -1, np.int32)
    vals = {f: np.full(n, proc.IDENTITY[f], np.float32 if f != "top_k" else np.int32)
            for f in proc.PROCESSORS}
    for i, r in enumerate(reqs):
      req = self.requests[r]
      prompt[i, :len(req.prompt)] = req.prompt
      lens[i], max_new[i], seeds[i] = len(req.prompt), req.gen.max_new_tokens, req.gen.seed
      greedy[i] = req.gen.strategy == "greedy"
      stop[i, :len(req.gen.eos_token_id)] = req.gen.eos_token_id
      for f in proc.PROCESSORS:
        vals[f][i] = getattr(req.gen, f)
    slots_n = np.full(n, self.max_batch, np.int32)  # padding rows: no slot, no pages
    slots_n[:len(slots)] = slots
    sp = proc.SamplingParams(*(vals[f] for f in proc.PROCESSORS))
    return slots_n, prompt, lens, max_new, greedy, sp, stop, seeds

  def compile(self) -> float:
    """Compiles the decode chunk and every prefill bucket this queue can use; seconds."""
    t = time.perf_counter()
    state = self._empty_state()
    widths = sorted({bucket(len(r.prompt), MIN_PROMPT_BUCKET) for r in self.requests})
    rows = sorted({1, self.prefill_rows})
    for w in widths:
      for n in rows:
        fits = [i for i, r in enumerate(self.requests)
                if bucket(len(r.prompt), MIN_PROMPT_BUCKET) == w][:1] * n
        args = self._prefill_args(list(range(n)), fits)
        self._prefill.lower(self.weights, state, *args).compile()
    self._decode.lower(self.weights, state, np.int32(1)).compile()
    return time.perf_counter() - t

  # ------------------------------------------------------------------ scheduler
  def run(self, progress: bool = False) -> list[Completion]:
    """Serves every request; returns their completions in input order."""
    t0 = time.perf_counter()
    state = self._empty_state()
    pending = collections.deque(range(len(self.requests)))
    slot_req = [-1] * self.max_batch
    tokens: dict[int, list] = {}
    done: dict[int, Completion] = {}
    reserved = 0
    stats = EngineStats()
    bar = _progress_bar(len(self.requests)) if progress else None
    while pending or any(r >= 0 for r in slot_req):
      admit = []  # (slot, request), first come first served while pages fit
      free = [b for b in range(self.max_batch) if slot_req[b] < 0]
      while pending and free and reserved + self.need[pending[0]] <= self.num_pages:
        r = pending.popleft()
        admit.append((free.pop(0), r))
        reserved += self.need[r]
      by_width = collections.defaultdict(list)
      for s, r in admit:
        slot_req[s] = r
        tokens[r] = []
        by_width[bucket(len(self.requests[r].prompt), MIN_PROMPT_BUCKET)].append((s, r))
      for group in by_width.values():
        for k in range(0, len(group), self.prefill_rows):
          part = group[k:k + self.prefill_rows]
          args = self._prefill_args([s for s, _ in part], [r for _, r in part])
          state = self._prefill(self.weights, state, *args)
          stats.prefills += 1
      empty = sum(r < 0 for r in slot_req)
      state, out, steps = self._decode(self.weights, state, np.int32(empty + 1))
      out, done_b, logprob, in_use = jax.device_get(
          (out, state.done_B, state.logprob_B, state.cache.pool.in_use))
      stats.steps += int(steps)
      stats.chunks += 1
      stats.peak_pages = max(stats.peak_pages, int(in_use))
      for b, r in enumerate(slot_req):
        if r < 0:
          continue
        row = out[b]
        tokens[r].extend(int(t) for t in row[row >= 0])
        if done_b[b]:
          done[r] = Completion(tokens=tokens.pop(r), logprob=float(logprob[b]))
          slot_req[b] = -1
          reserved -= self.need[r]
          if bar is not None:
            bar.update(1)
      if bar is not None:
        gen = sum(len(c.tokens) for c in done.values()) + sum(map(len, tokens.values()))
        bar.set_postfix(tok_s=f"{gen / (time.perf_counter() - t0):.0f}",
                        pages=f"{int(in_use)}/{self.num_pages}",
                        batch=f"{sum(r >= 0 for r in slot_req)}/{self.max_batch}")
    if bar is not None:
      bar.close()
    exhausted, stored, allocated = jax.device_get(
        (state.cache.pool.exhausted, state.stored, state.allocated))
    if exhausted:  # admission keeps every worst case inside the pool; this is a bug
      raise RuntimeError("engine: the page pool ran dry; some tokens were not stored")
    stats.seconds = time.perf_counter() - t0
    stats.generated = sum(len(c.tokens) for c in done.values())
    stats.utilisation = float(stored / allocated) if allocated else float("nan")
    self.stats = stats
    return [done[i] for i in range(len(self.requests))]


def _progress_bar(total: int):
  import tqdm  # noqa: PLC0415 (only for progress output)
  return tqdm.tqdm(total=total, unit="req", desc="requests", dynamic_ncols=True)
