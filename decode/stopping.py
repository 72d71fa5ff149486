"""Stop criterion: a row stops when it emits one of the stop tokens.

    hit[r] = token[r] in stop_ids        (HF `EosTokenCriteria`; EOS + extra stop ids)

The length limit (`max_new_tokens`) is checked by each loop next to this.

With no stop ids the result is a constant False and no array of the ids is
made: a zero-size constant inside `jax.shard_map` (decode/data_parallel.py)
crashes jaxlib 0.11.2's compiler (a segfault in Shardy's
ManualComputationUnusedInputsPattern, once the while loop no longer reads it).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def stop_hits(tokens: jax.Array, stop_ids: Sequence[int]) -> jax.Array:
  """bool array shaped like `tokens` (any shape, int): token is a stop id.

  stop_ids: static token ids (may be empty).
  """
  if not stop_ids:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(stop_ids, jnp.int32))
