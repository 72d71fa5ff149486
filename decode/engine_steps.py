"""The continuous-batching engine's device programs: slot state, prefill, decode chunk.

The engine (decode/engine.py) keeps `max_batch` slots of one paged cache
(model/paged_cache.py) and runs two kinds of jitted program over them, between
which its host-side scheduler admits and retires requests (iteration-level
scheduling, Orca, Yu et al. OSDI 2022 §3.2-3.3):

* `prefill(params, state, slots_N, prompt_NxP, ...)`: the N new requests' prompts
  (right-padded to a bucket width P) in one fresh cached forward over a row view
  of the cache (`PagedKVCache.rows`): their rows claim pages for the prompt tokens
  only (limit = prompt length), then get limit = prompt + max_new_tokens.
  Compiled once per (N, P) bucket.
* `decode_chunk(params, state, stop_at_done)`: up to `chunk` single-token steps of
  every slot in a `lax.while_loop`, which ends early once `stop_at_done` slots are
  done (a finished row frees its slot for a waiting request). A row that finishes
  gives its pages back at once (`release`). Compiled once.

Every row draws from its own request's key, fold_in(key(seed), 0) folded with the
index of the token it generates (decode/generate.py's `row_keys` for seed=(seed,),
sample 0), and greedy and sampled rows share a step: a greedy row has the identity
sampling values, so the processors leave it as `generate` does; so a request's
tokens never depend on the slot it got or on the other requests in the batch.

Shape names (README legend): B slots, N new requests, P prompt bucket, V vocabulary,
C decode steps per chunk; Z stop ids per request.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from decode import processors as proc
from decode.generate import make_step_fn
from decode.sampling import greedy_tokens


@flax.struct.dataclass
class SlotState:
  """The engine's loop state; an empty slot is `done` and holds no pages."""

  cache: object                 # PagedKVCache with B rows
  logits_BxV: jax.Array         # float32: next-token logits
  position_B: jax.Array         # int32: position of the next token fed
  generated_B: jax.Array        # int32: tokens generated (stop token included)
  max_new_B: jax.Array          # int32: the request's max_new_tokens
  done_B: jax.Array             # bool
  greedy_B: jax.Array           # bool: argmax instead of a draw
  sp: proc.SamplingParams       # [B] processor values (identity for greedy rows)
  stop_BxZ: jax.Array           # int32 stop ids, -1 padded
  key_B: jax.Array              # PRNG key of each request
  presence_BxV: jax.Array | None  # tokens seen (repetition penalty)
  logprob_B: jax.Array          # float32: sum of log p_model of the generated tokens
  stored: jax.Array             # float32 []: sum over steps of the token states held
  allocated: jax.Array          # float32 []: sum over steps of the slots of claimed pages


def init_state(cache, vocab_size: int, stop_width: int, presence: bool) -> SlotState:
  """Every slot empty."""
  b = cache.batch
  zeros_i = lambda: jnp.zeros((b,), jnp.int32)  # distinct buffers: the state is donated
  return SlotState(
      cache=cache, logits_BxV=jnp.zeros((b, vocab_size), jnp.float32), position_B=zeros_i(),
      generated_B=zeros_i(), max_new_B=zeros_i(), done_B=jnp.ones((b,), bool),
      greedy_B=jnp.ones((b,), bool), sp=jax.tree.map(jnp.asarray, proc.SamplingParams.create(b)),
      stop_BxZ=jnp.full((b, stop_width), -1, jnp.int32),
      key_B=jax.random.split(jax.random.key(0), b),
      presence_BxV=jnp.zeros((b, vocab_size), bool) if presence else None,
      logprob_B=jnp.zeros((b,), jnp.float32), stored=jnp.zeros((), jnp.float32),
      allocated=jnp.zeros((), jnp.float32))


@functools.lru_cache(maxsize=32)
def programs(cfg, impl, *, active: tuple, min_tokens_to_keep: int, chunk: int,
             sample: bool = True, compiler_options: tuple = ()):
  """(prefill, decode_chunk), jitted (cached: engines of one setting share compilations);
  see the module docstring. Both take `weights` = (params, packed): packed as
  decode/generate.py `packed_weights(cfg, params, impl)`. sample: some request samples
  (else no draws are traced); compiler_options: sorted (name, value) pairs."""

  def prefill(weights, state: SlotState, slots_N, prompt_NxP, len_N, max_new_N, greedy_N,
              sp_N: proc.SamplingParams, stop_NxZ, seed_N):
    n, p = prompt_NxP.shape
    step_fn = make_step_fn(cfg, weights[0], impl, weights[1])
    sub = state.cache.rows(slots_N, len_N)
    positions_NxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
    logits_Nx1xV, sub = step_fn(prompt_NxP, positions_NxP, sub, fresh=True,
                                logits_at_B=len_N - 1)
    put = lambda x_B, new_N: x_B.at[slots_N].set(new_N.astype(x_B.dtype), mode="drop")
    presence = state.presence_BxV
    if presence is not None:
      valid = jnp.arange(p)[None] < len_N[:, None]
      presence = put(presence, proc.presence_mask(prompt_NxP, valid, presence.shape[-1]))
    keys_N = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), 0))(seed_N)
    return state.replace(
        cache=state.cache.put_rows(slots_N, sub, len_N + max_new_N),
        logits_BxV=put(state.logits_BxV, logits_Nx1xV[:, 0]),
        position_B=put(state.position_B, len_N),
        generated_B=put(state.generated_B, jnp.zeros_like(len_N)),
        max_new_B=put(state.max_new_B, max_new_N),
        done_B=put(state.done_B, jnp.zeros_like(greedy_N)), greedy_B=put(state.greedy_B, greedy_N),
        sp=jax.tree.map(put, state.sp, sp_N), stop_BxZ=put(state.stop_BxZ, stop_NxZ),
        key_B=state.key_B.at[slots_N].set(keys_N, mode="drop"), presence_BxV=presence,
        logprob_B=put(state.logprob_B, jnp.zeros(n, jnp.float32)))

  def decode_chunk(weights, state: SlotState, stop_at_done):
    step_fn = make_step_fn(cfg, weights[0], impl, weights[1])
    b = state.done_B.shape[0]

    def cond(carry):
      i, s, _ = carry
      done = jnp.sum(s.done_B, dtype=jnp.int32)
      return (i < chunk) & (done < b) & (done < stop_at_done)

    def body(carry):
      i, s, out_BxC = carry
      s_BxV = proc.process(s.logits_BxV, s.sp, s.presence_BxV, active, min_tokens_to_keep)
      x_B = greedy_tokens(s_BxV)
      if sample:
        keys_B = jax.vmap(jax.random.fold_in)(s.key_B, s.generated_B)
        drawn_B = jax.vmap(jax.random.categorical)(keys_B, s_BxV).astype(jnp.int32)
        x_B = jnp.where(s.greedy_B, x_B, drawn_B)
      live_B = ~s.done_B
      x_B = jnp.where(live_B, x_B, 0)
      logp_B = jnp.take_along_axis(jax.nn.log_softmax(s.logits_BxV, axis=-1), x_B[:, None],
                                   axis=-1)[:, 0]
      generated_B = s.generated_B + live_B
      stop_B = jnp.any(x_B[:, None] == s.stop_BxZ, axis=-1)
      done_B = s.done_B | stop_B | (generated_B >= s.max_new_B)
      presence = s.presence_BxV
      if presence is not None:
        presence = presence.at[jnp.arange(b), x_B].max(live_B)
      cache = s.cache.release(done_B & live_B)  # finished rows give their pages back
      stored = s.stored + jnp.sum(jnp.where(done_B, 0, s.position_B)).astype(jnp.float32)
      allocated = s.allocated + (cache.pool.in_use * cache.page_size).astype(jnp.float32)
      logits_Bx1xV, cache = step_fn(x_B[:, None], s.position_B[:, None], cache)
      s = s.replace(
          cache=cache, logits_BxV=logits_Bx1xV[:, 0].astype(jnp.float32),
          position_B=s.position_B + live_B, generated_B=generated_B, done_B=done_B,
          presence_BxV=presence, logprob_B=s.logprob_B + jnp.where(live_B, logp_B, 0.0),
          stored=stored, allocated=allocated)
      return i + 1, s, out_BxC.at[:, i].set(jnp.where(live_B, x_B, -1))

    out = jnp.full((b, chunk), -1, jnp.int32)
    steps, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return state, out, steps

  jit = lambda f: jax.jit(f, donate_argnums=(1,), compiler_options=dict(compiler_options) or None)
  return jit(prefill), jit(decode_chunk)
