"""Greedy and sampled decoding: one `lax.while_loop` over single-token steps.

Per iteration, for every row that is not done (HF `_sample` semantics):

    s_BxV   = process(logits)                       (decode/processors.py)
    x_B     = argmax s  (greedy)  |  x ~ softmax(s)  (sampling)
    logits  = step_fn(x_B at position_B)            (cached forward, one token)

A row is done after it emits a stop token (EOS or an extra stop id; the stop
token is kept and counted) or `max_new_tokens` tokens; done rows emit
`pad_id` and stop changing (their idle cache writes land past their last
token and are never read). The loop ends when every row is done.

Reported `logprob_B` is the sum over the generated tokens (stop token
included) of log p_model(x_t | x_<t), the unprocessed model distribution.

Shape names (README legend): B rows, O max_new_tokens, V vocabulary.
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

STRATEGIES = ("greedy", "sample")


@flax.struct.dataclass
class SampleState:
  """Carry of the greedy/sampling loop."""

  step: jax.Array               # [] int32, iterations run
  tokens_BxO: jax.Array         # generated ids, pad after a row is done
  num_generated_B: jax.Array    # [B] int32, stop token included
  position_B: jax.Array         # [B] int32, position of the next token
  done_B: jax.Array             # [B] bool
  logprob_B: jax.Array          # [B] float32, sum log p_model(generated)
  logits_BxV: jax.Array         # next-token logits (float32)
  presence_BxV: jax.Array | None  # tokens seen per row (repetition penalty)
  cache: object                 # any cache of the protocol in model/cache.py
  rng_B: jax.Array              # [B] PRNG keys, one per row


def greedy_tokens(s_BxV):
  """int32 [B]: jnp.argmax(s_BxV, -1) (the first maximum; the first NaN if any).

  As a max and a min over the masked indices: XLA:CPU runs argmax's variadic
  (value, index) reduce element by element, 4-8x slower at a 49k vocabulary.
  """
  top_Bx1 = jnp.max(s_BxV, axis=-1, keepdims=True)
  i_BxV = jax.lax.broadcasted_iota(jnp.int32, s_BxV.shape, 1)
  hit_BxV = (s_BxV == top_Bx1) | jnp.isnan(s_BxV)
  return jnp.min(jnp.where(hit_BxV, i_BxV, s_BxV.shape[1]), axis=-1)


def choose_tokens(logits_BxV, params: proc.SamplingParams, presence_BxV, rng_B, *,
                  strategy: str, active: Sequence[str], min_tokens_to_keep: int = 1):
  """Processes the logits and picks one token per row. Returns int32 [B].

  rng_B: one PRNG key per row, so a row's draw depends on its own key only,
  not on which rows share its batch or its device (decode/generate.py splits
  rows over devices).
  """
  s_BxV = proc.process(logits_BxV, params, presence_BxV, active, min_tokens_to_keep)
  if strategy == "greedy":
    return greedy_tokens(s_BxV)
  if strategy == "sample":
    return jax.vmap(jax.random.categorical)(rng_B, s_BxV).astype(jnp.int32)
  raise ValueError(f"strategy must be one of {STRATEGIES} (got {strategy!r})")


def sample_loop(step_fn, cache, prompt_BxP, prompt_len_B, params: proc.SamplingParams,
                rng_B, *, strategy: str, max_new_tokens: int, stop_ids: Sequence[int],
                pad_id: int, active: Sequence[str] = (), min_tokens_to_keep: int = 1,
                windows: Sequence[int] | None = None):
  """Prefill + decode loop. Returns the final SampleState.

  Args:
    step_fn: (tokens_BxL, positions_BxL, cache) -> (logits_BxLxV, cache).
    cache: empty cache with B rows and at least P + max_new_tokens positions,
      or of `windows[0]` positions when `windows` is given.
    prompt_BxP: right-padded prompts; prompt_len_B >= 1 valid tokens per row.
    params: per-row processor parameters (SamplingParams with [B] arrays).
    rng_B: one PRNG key per row; step t of row b draws with fold_in(rng_B[b], t).
    active: processors to apply (static; `SamplingParams.active()`); greedy
      uses only 'repetition_penalty' (HF applies no warpers when greedy).
    min_tokens_to_keep: HF's floor for top-k / top-p / min-p.
    windows: growing cache sizes, the last >= P + max_new_tokens
      (decode/cache_windows.py); None: the cache's own size throughout.
  """
  b, p = prompt_BxP.shape
  logits_BxV, cache = prefill(step_fn, prompt_BxP, prompt_len_B, cache)
  vocab = logits_BxV.shape[-1]
  presence = None
  if "repetition_penalty" in active:
    presence = proc.presence_mask(prompt_BxP, jnp.arange(p)[None] < prompt_len_B[:, None], vocab)
  state = SampleState(
      step=jnp.zeros((), jnp.int32),
      tokens_BxO=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      num_generated_B=jnp.zeros((b,), jnp.int32),
      position_B=prompt_len_B.astype(jnp.int32),
      done_B=jnp.zeros((b,), bool),
      logprob_B=jnp.zeros((b,), jnp.float32),
      logits_BxV=logits_BxV.astype(jnp.float32),
      presence_BxV=presence, cache=cache, rng_B=rng_B)

  def cond(s: SampleState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

  def body(s: SampleState):
    x_B = choose_tokens(s.logits_BxV, params, s.presence_BxV,
                        jax.vmap(jax.random.fold_in, (0, None))(s.rng_B, s.step),
                        strategy=strategy, active=active,
                        min_tokens_to_keep=min_tokens_to_keep)
    x_B = jnp.where(s.done_B, pad_id, x_B)
    logp_B = jnp.take_along_axis(jax.nn.log_softmax(s.logits_BxV, axis=-1), x_B[:, None],
                                 axis=-1)[:, 0]
    live_B = ~s.done_B
    tokens = s.tokens_BxO.at[jnp.arange(b), s.num_generated_B].set(x_B, mode="drop")
    num_generated = s.num_generated_B + live_B
    done = s.done_B | stop_hits(x_B, stop_ids) | (num_generated >= max_new_tokens)
    presence = s.presence_BxV
    if presence is not None:
      presence = presence.at[jnp.arange(b), x_B].max(live_B)
    logits_Bx1xV, cache = step_fn(x_B[:, None], s.position_B[:, None], s.cache)
    return SampleState(
        step=s.step + 1, tokens_BxO=tokens, num_generated_B=num_generated,
        position_B=s.position_B + live_B, done_B=done,
        logprob_B=s.logprob_B + jnp.where(live_B, logp_B, 0.0),
        logits_BxV=logits_Bx1xV[:, 0].astype(jnp.float32), presence_BxV=presence,
        cache=cache, rng_B=s.rng_B)

  return grow_while_loop(cond, body, state, windows or (cache.max_len,),
                         slots_needed=lambda s: jnp.max(s.position_B) + 1)
