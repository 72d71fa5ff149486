"""`GenerationConfig`: everything about one decode request, frozen and validated.

    gen = GenerationConfig(strategy="beam", num_beams=4, max_new_tokens=64, eos_token_id=257)
    out = generate(cfg, params, prompts, gen)                 # decode/generate.py

Names follow Hugging Face's `GenerationConfig` where the concept is the
same (max_new_tokens, eos_token_id, pad_token_id, temperature, top_k, top_p,
min_p, repetition_penalty, min_tokens_to_keep, num_beams,
num_return_sequences, length_penalty, early_stopping); `strategy` replaces
HF's do_sample/num_beams pair. Every invalid value raises
`ValueError("generation.<field>: ...")` when the config is built, and
`check_request` checks the values that depend on the model and the prompts
(ids in the vocabulary, lengths) before anything is traced.

The processor values (temperature, top_k, top_p, min_p, repetition_penalty)
are a scalar for every prompt or a tuple with one value per prompt.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from decode.beam_search import EARLY_STOPPING, LENGTH_PENALTIES
from decode.processors import IDENTITY
from model.cache import CACHE_KINDS
from model.config import ModelConfig, from_mapping
from model.impl import ATTENTION_IMPLS, MATMUL_IMPLS, MLA_IMPLS, MOE_IMPLS
import model.kv_cache  # noqa: F401  (registers the 'contiguous' cache kind)
import model.paged_cache  # noqa: F401  (registers the 'paged' cache kind)

STRATEGIES = ("greedy", "sample", "beam")
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p")
Scalars = Any  # a number, or a tuple with one per prompt


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """One decode request's settings (see the module docstring).

  Attributes:
    strategy: 'greedy' | 'sample' | 'beam'.
    max_new_tokens: most tokens generated per row (the stop token included).
    eos_token_id: stop ids: a row stops after emitting any of them (the token
      is kept); an int or a tuple, as in HF.
    pad_token_id: fills generated positions after a row stopped.
    temperature, top_k, top_p, min_p: sampling warpers ('sample' only).
    repetition_penalty: every strategy (CTRL; HF semantics).
    min_tokens_to_keep: HF's floor for top-k / top-p / min-p.
    num_beams: beams per prompt ('beam').
    num_return_sequences: rows returned per prompt: samples ('sample') or
      the best hypotheses ('beam', <= num_beams); 1 for 'greedy'.
    length_penalty, length_penalty_type, early_stopping: beam search scoring
      and stopping (HF; 'gnmt' is Wu et al. 2016 eq. 14).
    seed: PRNG seed, or one per prompt. Sample j of prompt b draws with
      fold_in(key_b, j), key_b = key(seed[b]) (a tuple) or fold_in(key(seed), b):
      a row's draws depend on its seed and indices only, never on the other
      prompts of the batch or on the device split.
    kv_cache: cache kind (model/cache.py registry): 'contiguous' | 'paged'.
    cache_growth: growing cache windows of the contiguous cache (<= 1: off).
    page_size: tokens per page of the paged cache (model/paged_cache.py; vLLM's 16).
    num_pages: pages of the paged cache; each of the num_devices devices gets a pool
      of num_pages // num_devices for its rows. 0 sizes each pool to the worst case
      of its rows (every row at its longest, nothing shared).
    attention_impl: 'auto' | 'xla' | 'cpu' | 'pallas': decode attention (decode/backend.py;
      'pallas', the Pallas kernels over a paged cache, needs kv_cache='paged').
    moe_impl: 'auto' | 'xla' | 'cpu' | 'cpu_kernel' (decode/backend.py).
    mla_impl: 'auto' (= 'absorbed') | 'absorbed' | 'expanded': MLA decode steps
      over the latent cache or over per-head K/V (model/mla.py).
    matmul_impl: 'auto' | 'xla' | 'cpu_kernel': decode-step weight products
      (model/linear.py; decode/backend.py).
    num_devices: local devices the rows are split over; 0 picks the most
      that divide the rows.
  """

  strategy: str = "greedy"
  max_new_tokens: int = 32
  eos_token_id: tuple[int, ...] = ()
  pad_token_id: int = 0
  temperature: Scalars = 1.0
  top_k: Scalars = 0
  top_p: Scalars = 1.0
  min_p: Scalars = 0.0
  repetition_penalty: Scalars = 1.0
  min_tokens_to_keep: int = 1
  num_beams: int = 4
  num_return_sequences: int = 1
  length_penalty: float = 1.0
  length_penalty_type: str = "hf"
  early_stopping: Any = False
  seed: Any = 0
  kv_cache: str = "contiguous"
  cache_growth: float = 2.0
  page_size: int = 16
  num_pages: int = 0
  attention_impl: str = "auto"
  moe_impl: str = "auto"
  mla_impl: str = "auto"
  matmul_impl: str = "auto"
  num_devices: int = 0

  def __post_init__(self):
    def err(field: str, msg: str):
      raise ValueError(f"generation.{field}: {msg} (got {getattr(self, field)!r})")

    def integer(field, low):
      v = getattr(self, field)
      if isinstance(v, bool) or not isinstance(v, int) or v < low:
        err(field, f"must be an integer >= {low}")

    if self.strategy not in STRATEGIES:
      err("strategy", f"must be one of {STRATEGIES}")
    eos = self.eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    object.__setattr__(self, "eos_token_id", tuple(sorted(set(eos))))
    for t in self.eos_token_id:
      if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        err("eos_token_id", "token ids must be integers >= 0")
    integer("max_new_tokens", 1)
    integer("pad_token_id", 0)
    integer("min_tokens_to_keep", 1)
    if isinstance(self.seed, list):
      object.__setattr__(self, "seed", tuple(self.seed))
    for x in _values(self.seed):
      if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        err("seed", "must be an integer >= 0 or a tuple of them, one per prompt")
    integer("num_devices", 0)
    integer("page_size", 1)
    integer("num_pages", 0)
    integer("num_beams", 1)
    integer("num_return_sequences", 1)
    for f in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
      v = getattr(self, f)
      if isinstance(v, list):
        object.__setattr__(self, f, tuple(v))
      for x in _values(getattr(self, f)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
          err(f, "must be a finite number or a tuple of them, one per prompt")
    if self.strategy != "sample":
      for f in SAMPLING_FIELDS:
        if any(x != IDENTITY[f] for x in _values(getattr(self, f))):
          err(f, f"is a sampling parameter; strategy={self.strategy!r} does not sample "
              "(use strategy='sample', or leave it at its default "
              f"{IDENTITY[f]!r})")
    checks = {"temperature": lambda x: x > 0, "top_k": lambda x: x >= 0 and x == int(x),
              "top_p": lambda x: 0 < x <= 1, "min_p": lambda x: 0 <= x <= 1,
              "repetition_penalty": lambda x: x > 0}
    ranges = {"temperature": "> 0", "top_k": "an integer >= 0", "top_p": "in (0, 1]",
              "min_p": "in [0, 1]", "repetition_penalty": "> 0"}
    for f, ok in checks.items():
      if not all(ok(x) for x in _values(getattr(self, f))):
        err(f, f"must be {ranges[f]}")
    if self.strategy == "greedy" and self.num_return_sequences != 1:
      err("num_return_sequences", "greedy decoding returns one sequence per prompt "
          "(use strategy='sample' or 'beam' for more)")
    if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
      err("num_return_sequences", f"cannot exceed num_beams={self.num_beams}")
    for f in ("length_penalty", "cache_growth"):
      v = getattr(self, f)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        err(f, "must be a finite number")
    if self.length_penalty_type not in LENGTH_PENALTIES:
      err("length_penalty_type", f"must be one of {LENGTH_PENALTIES}")
    if not (self.early_stopping is True or self.early_stopping is False
            or self.early_stopping == "never"):
      err("early_stopping", f"must be one of {EARLY_STOPPING}")
    if self.kv_cache not in CACHE_KINDS:
      err("kv_cache", f"must be one of {tuple(CACHE_KINDS)}")
    if self.attention_impl not in ("auto",) + ATTENTION_IMPLS:
      err("attention_impl", f"must be one of {('auto',) + ATTENTION_IMPLS}")
    if self.moe_impl not in ("auto",) + MOE_IMPLS:
      err("moe_impl", f"must be one of {('auto',) + MOE_IMPLS}")
    if self.mla_impl not in ("auto",) + MLA_IMPLS:
      err("mla_impl", f"must be one of {('auto',) + MLA_IMPLS}")
    if self.matmul_impl not in ("auto",) + MATMUL_IMPLS:
      err("matmul_impl", f"must be one of {('auto',) + MATMUL_IMPLS}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GenerationConfig":
    """From a mapping (e.g. flags), rejecting unknown keys."""
    return from_mapping(cls, "generation", d)

  def replace(self, **kw) -> "GenerationConfig":
    return dataclasses.replace(self, **kw)

  @property
  def rows_per_prompt(self) -> int:
    """Rows the loop decodes per prompt (beams for 'beam')."""
    return self.num_beams if self.strategy == "beam" else self.num_return_sequences


def _values(v) -> tuple:
  return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def check_request(cfg: ModelConfig, gen: GenerationConfig,
                  prompts: Sequence[Sequence[int]]) -> None:
  """Raises ValueError naming the field for what `gen` and `prompts` cannot do on `cfg`."""
  if not prompts:
    raise ValueError("generation.prompts: no prompt given")
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"generation.prompts[{i}]: empty prompt (give at least one token, "
                       "e.g. BOS)")
    bad = [t for t in p if isinstance(t, bool) or not 0 <= int(t) < cfg.vocab_size
           or int(t) != t]
    if bad:
      raise ValueError(f"generation.prompts[{i}]: token ids {bad[:8]} are outside the "
                       f"vocabulary [0, {cfg.vocab_size})")
  for f, ids in (("eos_token_id", gen.eos_token_id), ("pad_token_id", (gen.pad_token_id,))):
    bad = [t for t in ids if not t < cfg.vocab_size]
    if bad:
      raise ValueError(f"generation.{f}: {bad} outside the vocabulary [0, {cfg.vocab_size})")
  longest = max(len(p) for p in prompts)
  if longest + gen.max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"generation.max_new_tokens: prompt ({longest}) + max_new_tokens "
                     f"({gen.max_new_tokens}) exceeds model.max_seq_len={cfg.max_seq_len}")
  for f in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
    v = getattr(gen, f)
    if isinstance(v, tuple) and len(v) != len(prompts):
      raise ValueError(f"generation.{f}: {len(v)} values for {len(prompts)} prompts")
