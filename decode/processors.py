"""Logits processors: pure functions with per-row parameters (HF semantics).

Applied by `process` in Hugging Face's order (transformers
`generation/logits_process.py`):

    repetition penalty -> temperature -> top-k -> top-p -> min-p

Every parameter is per row (`[B]`), so one compiled loop serves a batch of
requests with different settings; a row at the identity value (penalty 1,
T = 1, k = 0, p = 1, min_p = 0) is left unchanged. Removed tokens get -inf
(HF's `filter_value`).

* Repetition penalty (CTRL, Keskar et al. 2019): for every token already in
  the row (prompt included) `s * pen` if s < 0 else `s / pen`.
* Temperature: `s / T`, T > 0 (greedy is its own strategy).
* Top-k: remove `s < (k-th largest s)`: ties at the boundary survive;
  k is raised to `min_tokens_to_keep` and clipped to V.
* Top-p (Holtzman et al. 2019): HF's formulation, sort ascending, remove
  tokens whose ascending cumulative probability is <= 1 - p, i.e. keep the
  smallest descending prefix whose mass reaches p (the crossing token is
  kept), and never the last `min_tokens_to_keep`.
* Min-p: remove `prob < min_p * max_prob`, keeping the `min_tokens_to_keep`
  most probable tokens.

`SamplingParams` carries the per-row values; `SamplingParams.active()` (host
side, static) lists the processors some row needs so the others are not even
traced.

Shape names: B rows, V vocabulary.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PROCESSORS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p")
IDENTITY = {"repetition_penalty": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "min_p": 0.0}
NEG_INF = -jnp.inf


def repetition_penalty(logits_BxV, presence_BxV, penalty_B):
  """HF RepetitionPenaltyLogitsProcessor: penalise tokens present in the row."""
  pen_Bx1 = penalty_B[:, None].astype(logits_BxV.dtype)
  penalised = jnp.where(logits_BxV < 0, logits_BxV * pen_Bx1, logits_BxV / pen_Bx1)
  return jnp.where(presence_BxV, penalised, logits_BxV)


def temperature(logits_BxV, temperature_B):
  """HF TemperatureLogitsWarper: s / T."""
  return logits_BxV / temperature_B[:, None].astype(logits_BxV.dtype)


def top_k(logits_BxV, k_B, min_tokens_to_keep: int = 1):
  """HF TopKLogitsWarper: remove s < k-th largest (ties kept); k = 0 is identity."""
  v = logits_BxV.shape[-1]
  k_eff_B = jnp.clip(jnp.maximum(k_B, min_tokens_to_keep), 1, v)
  desc_BxV = -jnp.sort(-logits_BxV, axis=-1)
  kth_Bx1 = jnp.take_along_axis(desc_BxV, (k_eff_B - 1)[:, None], axis=-1)
  out = jnp.where(logits_BxV < kth_Bx1, NEG_INF, logits_BxV)
  return jnp.where((k_B > 0)[:, None], out, logits_BxV)


def top_p(logits_BxV, p_B, min_tokens_to_keep: int = 1):
  """HF TopPLogitsWarper (nucleus); p = 1 is identity."""
  order_BxV = jnp.argsort(logits_BxV, axis=-1)                      # ascending
  asc_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
  cum_BxV = jnp.cumsum(jax.nn.softmax(asc_BxV, axis=-1), axis=-1)
  remove_sorted = cum_BxV <= (1.0 - p_B[:, None])
  v = logits_BxV.shape[-1]
  remove_sorted = remove_sorted & (jnp.arange(v) < v - min_tokens_to_keep)
  rows_Bx1 = jnp.arange(logits_BxV.shape[0])[:, None]
  remove_BxV = jnp.zeros_like(remove_sorted).at[rows_Bx1, order_BxV].set(remove_sorted)
  out = jnp.where(remove_BxV, NEG_INF, logits_BxV)
  return jnp.where((p_B < 1.0)[:, None], out, logits_BxV)


def min_p(logits_BxV, min_p_B, min_tokens_to_keep: int = 1):
  """HF MinPLogitsWarper: remove prob < min_p * max prob; min_p = 0 is identity."""
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  max_Bx1 = probs_BxV.max(axis=-1, keepdims=True)
  remove_BxV = probs_BxV < min_p_B[:, None] * max_Bx1
  if min_tokens_to_keep > 1:
    _, top_BxM = jax.lax.top_k(probs_BxV, min(min_tokens_to_keep, logits_BxV.shape[-1]))
    rows_Bx1 = jnp.arange(logits_BxV.shape[0])[:, None]
    remove_BxV = remove_BxV.at[rows_Bx1, top_BxM].set(False)
  return jnp.where(remove_BxV, NEG_INF, logits_BxV)


@flax.struct.dataclass
class SamplingParams:
  """Per-row processor parameters (arrays of shape [B])."""

  repetition_penalty_B: jax.Array
  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array
  min_p_B: jax.Array

  @classmethod
  def create(cls, batch: int, repetition_penalty=1.0, temperature=1.0, top_k=0, top_p=1.0,
             min_p=0.0) -> "SamplingParams":
    """Each argument is a scalar (all rows) or a length-`batch` sequence.

    Host-side numpy arrays, validated here (HF rejects the same values).
    """
    def row(name, value, dtype):
      a = np.broadcast_to(np.asarray(value, dtype), (batch,)).copy()
      if a.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or {batch} values")
      return a
    p = cls(row("repetition_penalty", repetition_penalty, np.float32),
            row("temperature", temperature, np.float32), row("top_k", top_k, np.int32),
            row("top_p", top_p, np.float32), row("min_p", min_p, np.float32))
    checks = {"repetition_penalty": p.repetition_penalty_B > 0,
              "temperature": p.temperature_B > 0,
              "top_k": p.top_k_B >= 0,
              "top_p": (p.top_p_B >= 0) & (p.top_p_B <= 1),
              "min_p": (p.min_p_B >= 0) & (p.min_p_B <= 1)}
    for name, ok in checks.items():
      if not np.all(ok):
        raise ValueError(f"{name}: invalid value(s) {getattr(p, name + '_B')} (temperature and "
                         "repetition_penalty must be > 0, top_k >= 0, top_p and min_p in [0, 1]); "
                         "use strategy='greedy' for greedy decoding")
    return p

  def active(self) -> tuple[str, ...]:
    """Processors some row needs (host values; static for tracing)."""
    return tuple(n for n in PROCESSORS
                 if np.any(np.asarray(getattr(self, n + "_B")) != IDENTITY[n]))

  def repeat(self, n: int) -> "SamplingParams":
    """Each row repeated n times consecutively (num_samples / beams)."""
    return jax.tree.map(lambda x: np.repeat(np.asarray(x), n, axis=0), self)


def process(logits_BxV, params: SamplingParams, presence_BxV=None,
            active: Sequence[str] = PROCESSORS, min_tokens_to_keep: int = 1):
  """Applies the `active` processors in HF order. float32 in, float32 out."""
  s = logits_BxV.astype(jnp.float32)
  if "repetition_penalty" in active:
    s = repetition_penalty(s, presence_BxV, params.repetition_penalty_B)
  if "temperature" in active:
    s = temperature(s, params.temperature_B)
  if "top_k" in active:
    s = top_k(s, params.top_k_B, min_tokens_to_keep)
  if "top_p" in active:
    s = top_p(s, params.top_p_B, min_tokens_to_keep)
  if "min_p" in active:
    s = min_p(s, params.min_p_B, min_tokens_to_keep)
  return s


def presence_mask(tokens_BxL, valid_BxL, vocab_size: int):
  """presence[b, v] = token v occurs among the valid tokens of row b."""
  rows_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[0])[:, None], tokens_BxL.shape)
  return jnp.zeros((tokens_BxL.shape[0], vocab_size), bool).at[rows_BxL, tokens_BxL].max(
      valid_BxL)
