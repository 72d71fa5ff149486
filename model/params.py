"""Parameter storage dtype: weights kept in bfloat16 halve the bytes a decode step reads.

The model casts every weight to `ModelConfig.dtype` at use (`w.astype(dt)`,
a no-op when they already match) and keeps RMSNorm scales and the router in
float32, where it also computes them; so those stay float32 here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STORAGE_DTYPES = ("float32", "bfloat16")


def cast_weights(params, dtype: str):
  """params with every weight matrix stored as `dtype`; norm scales and router weights kept."""
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"dtype: must be one of {STORAGE_DTYPES} (got {dtype!r})")
  keep = lambda path: any(getattr(q, "key", None) in ("scale", "router") for q in path)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: a if keep(path) else jnp.asarray(a).astype(jnp.dtype(dtype)), params)
