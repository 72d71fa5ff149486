"""Prefill: run the (right-padded) prompts through the model in one pass.

The decode loops see the model only through a step function

    step_fn(tokens_BxL, positions_BxL, cache, fresh=False, logits_at_B=None)
        -> (logits_BxLxV, cache)

(`Decoder.decode` with bound params, see decode/generate.py): prefill is a
step with L = P prompt positions, a decode step one with L = 1, and a
speculative verify step one with L = gamma + 1, all writing the cache at the
row's own positions. Prefill passes fresh=True: the cache is empty, so the
prompt attends causally within itself and never reads the cache's slots. It
also passes logits_at_B = each row's last prompt index, so only those B
positions are unembedded (L = 1 in the logits returned).

Rows have their own prompt lengths; no left padding. Slots past a row's
length hold padding keys, which no query of that row reads before the
row's generated tokens overwrite them (model/kv_cache.py).
"""

import jax.numpy as jnp


def prefill(step_fn, prompt_BxP, prompt_len_B, cache):
  """Returns (logits_BxV at each row's last prompt token, cache)."""
  b, p = prompt_BxP.shape
  positions_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits_Bx1xV, cache = step_fn(prompt_BxP, positions_BxP, cache, fresh=True,
                                logits_at_B=prompt_len_B - 1)
  return logits_Bx1xV[:, 0], cache
