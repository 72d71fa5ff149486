"""A decode loop in phases over a growing cache: `grow_while_loop`.

A step's attention reads every slot of the cache buffer it is given (slots
at or past a row's position are masked), so a loop over a T-slot cache pays
for T slots from its first step, when only the prompt is there. Slicing the
filled prefix inside the loop does not help on CPU: XLA materialises the
slice, a copy as costly as the reads it saves. Instead the cache spec gives
the phases' sizes (`CacheSpec.windows`, model/cache.py; the contiguous
cache's schedule is `model.kv_cache.growing_windows`), and phase i is a
`lax.while_loop` over a cache of w_i slots. It runs while the loop's own
condition holds and the next step's writes stay below w_i; then
`cache.grow(w_{i+1})` (one copy of the cache per phase, not per step) and
phase i + 1 continues from the same state. The result is that of one loop
over T slots (masked slots add zero to the softmax; the differently sized
products may round differently in the last bits). Each phase compiles the
step once more. docs/performance.md has the measured gains.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax


def grow_while_loop(cond: Callable, body: Callable, state, windows: Sequence[int],
                    slots_needed: Callable):
  """`lax.while_loop(cond, body, state)` in phases over growing caches.

  Args:
    cond, body: the loop's condition and step over `state`, a dataclass
      with a `cache` field (model/cache.py) of `windows[0]` slots.
    windows: increasing cache sizes; the last is the final size. One window:
      a plain while_loop.
    slots_needed: state -> int32 scalar, the number of cache slots the next
      step writes into (its largest write position + 1, over all rows).
  Returns:
    the final state, its cache of `windows[-1]` slots.
  """
  for i, w in enumerate(windows):
    if i == len(windows) - 1:
      return jax.lax.while_loop(cond, body, state)
    state = jax.lax.while_loop(lambda s, w=w: cond(s) & (slots_needed(s) <= w), body, state)
    state = state.replace(cache=state.cache.grow(windows[i + 1]))
