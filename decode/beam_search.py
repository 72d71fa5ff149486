"""Beam search as one `lax.while_loop` (Hugging Face transformers v5 semantics).

A port of transformers' vectorised `_beam_search` (transformers v5
generation/utils.py), per prompt b with W = num_beams beams:

1. `log_softmax` of the logits, then the processors (repetition penalty),
   plus the running beam scores; the first step starts from beam 0 only
   (the other beams start at -1e9).
2. Keep the top U = max(2, 1 + n_stop) * W candidates over W x V.
3. A candidate "hits" if its token is a stop token or it reaches
   `max_new_tokens`. Running beams for the next step: the top W candidates
   after adding -1e9 to the hits.
4. Finished pool: a hit enters only if it ranks inside the top W
   candidates, with score `sum_logprobs / lp(generated_len)`, where
   generated_len counts the stop token and excludes the prompt, and

       lp(n) = n ** length_penalty                   ('hf')
       lp(n) = ((5 + n) / 6) ** length_penalty        ('gnmt', Wu et al. 2016 eq. 14)

   The pool keeps the best W of (old pool + new finishers). Nothing enters
   once `early_stopping=True` and the pool is full, or once the prompt is
   not improvable (5).
5. Improvable: best running score / lp(n_best) > worst finished score,
   with n_best = current generated length, or `max_new_tokens` when
   early_stopping='never' and length_penalty > 0.
6. Stop when no prompt is improvable, or (early_stopping=True) every pool
   is full, or every candidate hit a stop criterion.

The cache rows follow their beams: `cache.reorder` with the parent of every
running beam after each step.

Shape names (README legend): B prompts, W beams, U candidates kept,
O max_new_tokens, V vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from decode import processors as proc
from decode.cache_windows import grow_while_loop
from decode.prefill import prefill
from decode.stopping import stop_hits

NEG = -1.0e9  # HF's "very large negative" score offset.
LENGTH_PENALTIES = ("hf", "gnmt")
EARLY_STOPPING = (True, False, "never")


def early_stopping_code(early_stopping) -> int:
  """False -> 0, True -> 1, 'never' -> 2 (a traced int32 selects at run time)."""
  if early_stopping not in EARLY_STOPPING or not isinstance(early_stopping, (bool, str)):
    raise ValueError(f"early_stopping must be one of {EARLY_STOPPING} (got {early_stopping!r})")
  return {False: 0, True: 1, "never": 2}[early_stopping]


def length_penalty_divisor(gen_len, alpha: float, kind: str = "hf"):
  """lp(n): n ** alpha (HF) or ((5 + n) / 6) ** alpha (GNMT). float32."""
  n = jnp.asarray(gen_len, jnp.float32)
  if kind == "hf":
    return n ** alpha
  if kind == "gnmt":
    return ((5.0 + n) / 6.0) ** alpha
  raise ValueError(f"length_penalty_type must be one of {LENGTH_PENALTIES} (got {kind!r})")


@flax.struct.dataclass
class BeamState:
  """Carry of the beam-search loop (HF names in comments)."""

  step: jax.Array                 # [] int32: generated length of the running beams
  running_tokens_BxWxO: jax.Array  # running_sequences (generated part)
  running_scores_BxW: jax.Array   # running_beam_scores
  finished_tokens_BxWxO: jax.Array  # sequences
  finished_scores_BxW: jax.Array  # beam_scores
  finished_len_BxW: jax.Array     # generated length of each finished hypothesis
  is_finished_BxW: jax.Array      # is_sent_finished
  improvable_Bx1: jax.Array       # is_early_stop_heuristic_unsatisfied
  go: jax.Array                   # [] bool: not this_peer_finished
  logits_BWxV: jax.Array          # next-token logits of the running beams
  presence_BWxV: jax.Array | None  # repetition-penalty token sets
  cache: object


def _gather(x_BxUx, idx_BxJ):
  """x[b, idx[b, j]] along axis 1 (HF `_gather_beams`); idx in range (top-k
  positions), so clamped rather than masked (see `kv_cache.KVCache.reorder`)."""
  idx = idx_BxJ.reshape(idx_BxJ.shape + (1,) * (x_BxUx.ndim - 2))
  return jnp.take_along_axis(x_BxUx, idx, axis=1, mode="clip")


def beam_search_loop(step_fn, cache, prompt_BxP, prompt_len_B, params: proc.SamplingParams,
                     *, num_beams: int, max_new_tokens: int, stop_ids: Sequence[int],
                     pad_id: int, length_penalty: float = 1.0, length_penalty_type: str = "hf",
                     early_stopping=False, active: Sequence[str] = (),
                     windows: Sequence[int] | None = None):
  """Prefill (once per prompt) + beam loop. Returns the final BeamState.

  Args:
    step_fn: (tokens_BxL, positions_BxL, cache) -> (logits_BxLxV, cache).
    cache: empty cache with B rows (repeated to B*W after the prefill), of
      `windows[0]` positions when `windows` (growing cache sizes,
      decode/cache_windows.py) is given.
    params: per-beam (B*W rows) processor parameters; only the repetition
      penalty applies to beam search (HF applies warpers only when sampling).
    length_penalty: alpha (a float, or a traced float32 scalar so one
      compilation serves every value).
    early_stopping: True | False | 'never', or its `early_stopping_code` as a
      traced int32 scalar.
  """
  if isinstance(early_stopping, (bool, str)):
    early_stopping = early_stopping_code(early_stopping)
  es_true = jnp.asarray(early_stopping) == 1
  es_never = jnp.asarray(early_stopping) == 2
  b, p = prompt_BxP.shape
  w, n = num_beams, max_new_tokens
  k = max(2, 1 + len(stop_ids)) * w  # U
  lp = lambda m: length_penalty_divisor(m, length_penalty, length_penalty_type)

  logits_BxV, cache = prefill(step_fn, prompt_BxP, prompt_len_B, cache)
  vocab = logits_BxV.shape[-1]
  presence = None
  if "repetition_penalty" in active:
    presence = jnp.repeat(proc.presence_mask(
        prompt_BxP, jnp.arange(p)[None] < prompt_len_B[:, None], vocab), w, axis=0)
  position_BW = jnp.repeat(prompt_len_B.astype(jnp.int32), w)
  state = BeamState(
      step=jnp.zeros((), jnp.int32),
      running_tokens_BxWxO=jnp.full((b, w, n), pad_id, jnp.int32),
      running_scores_BxW=jnp.zeros((b, w), jnp.float32).at[:, 1:].set(NEG),
      finished_tokens_BxWxO=jnp.full((b, w, n), pad_id, jnp.int32),
      finished_scores_BxW=jnp.full((b, w), NEG, jnp.float32),
      finished_len_BxW=jnp.zeros((b, w), jnp.int32),
      is_finished_BxW=jnp.zeros((b, w), bool),
      improvable_Bx1=jnp.ones((b, 1), bool),
      go=jnp.ones((), bool),
      logits_BWxV=jnp.repeat(logits_BxV.astype(jnp.float32), w, axis=0),
      presence_BWxV=presence, cache=cache.repeat(w))

  def cond(s: BeamState):
    return s.go & (s.step < n)

  def body(s: BeamState):
    g = s.step
    # 1. log-probs, processors, accumulated scores.
    logp_BWxV = proc.process(jax.nn.log_softmax(s.logits_BWxV, axis=-1), params,
                             s.presence_BWxV, active)
    acc_BxWV = (logp_BWxV.reshape(b, w, vocab) + s.running_scores_BxW[:, :, None]).reshape(b, -1)
    # 2. top-K continuations.
    top_scores_BxU, idx_BxU = jax.lax.top_k(acc_BxWV, k)
    parent_BxU, token_BxU = idx_BxU // vocab, (idx_BxU % vocab).astype(jnp.int32)
    top_tokens_BxUxO = _gather(s.running_tokens_BxWxO, parent_BxU).at[:, :, g].set(token_BxU)
    # 3. stop criteria (stop token, max length) and the next running beams.
    hits_BxU = stop_hits(token_BxU, stop_ids) | (g + 1 >= n)
    running_BxU = top_scores_BxU + hits_BxU.astype(jnp.float32) * NEG
    _, next_BxW = jax.lax.top_k(running_BxU, w)
    running_tokens = _gather(top_tokens_BxUxO, next_BxW)
    running_scores = _gather(running_BxU, next_BxW)
    parent_BxW, token_BxW = _gather(parent_BxU, next_BxW), _gather(token_BxU, next_BxW)
    # 4. finished pool.
    just_done_BxU = hits_BxU & (jnp.arange(k) < w)
    fin_BxU = top_scores_BxU / lp(g + 1)
    pool_full_Bx1 = jnp.all(s.is_finished_BxW, axis=-1, keepdims=True) & es_true
    fin_BxU = fin_BxU + pool_full_Bx1.astype(jnp.float32) * NEG
    fin_BxU = fin_BxU + (~s.improvable_Bx1).astype(jnp.float32) * NEG
    fin_BxU = fin_BxU + (~just_done_BxU).astype(jnp.float32) * NEG
    merged_scores = jnp.concatenate([s.finished_scores_BxW, fin_BxU], axis=1)
    _, keep_BxW = jax.lax.top_k(merged_scores, w)
    cat = lambda old, new: _gather(jnp.concatenate([old, new], axis=1), keep_BxW)
    finished_tokens = cat(s.finished_tokens_BxWxO, top_tokens_BxUxO)
    finished_scores = _gather(merged_scores, keep_BxW)
    finished_len = cat(s.finished_len_BxW, jnp.full((b, k), g + 1, jnp.int32))
    is_finished = cat(s.is_finished_BxW, just_done_BxU)
    # Cache and repetition sets follow the surviving beams.
    rows_BW = (jnp.arange(b)[:, None] * w + parent_BxW).reshape(-1)
    cache = s.cache.reorder(rows_BW)
    presence = s.presence_BWxV
    if presence is not None:
      presence = presence[rows_BW].at[jnp.arange(b * w), token_BxW.reshape(-1)].set(True)
    # 5. improvable heuristic, 6. stopping condition.
    g1 = g + 1
    best_len = jnp.where(es_never & (length_penalty > 0), n, g1)
    best_Bx1 = running_scores[:, :1] / lp(best_len)
    worst_BxW = jnp.where(is_finished, finished_scores.min(axis=1, keepdims=True), NEG)
    improvable = s.improvable_Bx1 & jnp.any(best_Bx1 > worst_BxW, axis=-1, keepdims=True)
    go = (jnp.any(improvable) & ~(jnp.all(is_finished) & es_true)
          & ~jnp.all(hits_BxU))
    logits_BWx1xV, cache = step_fn(token_BxW.reshape(-1, 1), (position_BW + g)[:, None], cache)
    return BeamState(
        step=g1, running_tokens_BxWxO=running_tokens, running_scores_BxW=running_scores,
        finished_tokens_BxWxO=finished_tokens, finished_scores_BxW=finished_scores,
        finished_len_BxW=finished_len, is_finished_BxW=is_finished, improvable_Bx1=improvable,
        go=go, logits_BWxV=logits_BWx1xV[:, 0].astype(jnp.float32), presence_BWxV=presence,
        cache=cache)

  max_prompt = jnp.max(prompt_len_B).astype(jnp.int32)
  return grow_while_loop(cond, body, state, windows or (cache.max_len,),
                         slots_needed=lambda s: max_prompt + s.step + 1)
