"""Processors == HF warpers on random logits; sampling frequencies (chi-square)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation import logits_process as hf

from decode import processors as proc
from decode.sampling import choose_tokens, greedy_tokens

V = 40


def _logits(b=6, seed=0):
  # Well-separated values (a permutation of a grid plus noise): no input sits on
  # a top-k/top-p/min-p threshold up to rounding.
  rng = np.random.default_rng(seed)
  base = np.stack([rng.permutation(V) for _ in range(b)]).astype(np.float32) * 0.21
  return base + rng.uniform(0, 0.01, (b, V)).astype(np.float32)


def _hf(warpers, logits, ids=None):
  ids = torch.zeros((logits.shape[0], 1), dtype=torch.long) if ids is None else ids
  s = torch.tensor(logits)
  for w in warpers:
    s = w(ids, s)
  return s.numpy()


def _ours(logits, **kw):
  b = logits.shape[0]
  presence = kw.pop("presence", None)
  keep = kw.pop("min_tokens_to_keep", 1)
  sp = proc.SamplingParams.create(b, **kw)
  return np.asarray(proc.process(jnp.asarray(logits), sp, presence, sp.active(), keep))


@pytest.mark.parametrize("kw,warpers", [
    (dict(temperature=0.7), [hf.TemperatureLogitsWarper(0.7)]),
    (dict(top_k=5), [hf.TopKLogitsWarper(5)]),
    (dict(top_p=0.8), [hf.TopPLogitsWarper(0.8)]),
    (dict(top_p=0.01, min_tokens_to_keep=3), [hf.TopPLogitsWarper(0.01, min_tokens_to_keep=3)]),
    (dict(min_p=0.2), [hf.MinPLogitsWarper(0.2)]),
    (dict(min_p=0.9, min_tokens_to_keep=4), [hf.MinPLogitsWarper(0.9, min_tokens_to_keep=4)]),
    (dict(temperature=1.7, top_k=12, top_p=0.9, min_p=0.05),
     [hf.TemperatureLogitsWarper(1.7), hf.TopKLogitsWarper(12), hf.TopPLogitsWarper(0.9),
      hf.MinPLogitsWarper(0.05)]),
])
def test_matches_hf_warpers(kw, warpers):
  logits = _logits()
  keep = kw.get("min_tokens_to_keep", 1)
  for w in warpers:
    if hasattr(w, "min_tokens_to_keep"):
      w.min_tokens_to_keep = keep
  ref, got = _hf(warpers, logits), _ours(logits, **kw)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
  np.testing.assert_allclose(got[~np.isinf(got)], ref[~np.isinf(ref)], rtol=1e-6)
  assert np.isinf(ref).any() or kw == dict(temperature=0.7)


def test_top_k_keeps_ties_at_the_boundary():
  logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.5]], np.float32)
  got = _ours(logits, top_k=2)
  np.testing.assert_array_equal(np.isinf(got[0]), [False, True, False, False, True])


def test_repetition_penalty_matches_hf():
  logits = _logits(3) - 4.0  # both signs
  ids = torch.tensor([[1, 5, 5, 30], [0, 2, 3, 4], [39, 39, 39, 39]])
  presence = proc.presence_mask(jnp.asarray(ids.numpy()), jnp.ones(ids.shape, bool), V)
  got = _ours(logits, repetition_penalty=1.3, presence=presence)
  ref = _hf([hf.RepetitionPenaltyLogitsProcessor(1.3)], logits, ids)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  assert not np.allclose(got, logits)


def test_per_row_parameters_and_identity_rows():
  logits = _logits(3)
  got = _ours(logits, top_k=[0, 3, 0], top_p=[1.0, 1.0, 0.5], temperature=[1.0, 2.0, 1.0])
  np.testing.assert_array_equal(got[0], logits[0])
  np.testing.assert_allclose(got[1], _hf([hf.TemperatureLogitsWarper(2.0),
                                          hf.TopKLogitsWarper(3)], logits[1:2])[0])
  np.testing.assert_allclose(got[2], _hf([hf.TopPLogitsWarper(0.5)], logits[2:3])[0])


def test_invalid_parameters_raise():
  with pytest.raises(ValueError, match="temperature"):
    proc.SamplingParams.create(2, temperature=0.0)
  with pytest.raises(ValueError, match="top_p"):
    proc.SamplingParams.create(2, top_p=1.5)


def test_sampling_frequencies_match_processed_distribution():
  """Chi-square goodness of fit of 40k draws against softmax(processed logits)."""
  logits = _logits(1, seed=3)[:, :12] * 0.8
  n = 40_000
  kw = dict(temperature=0.8, top_k=8, top_p=0.95)
  sp = proc.SamplingParams.create(n, **kw)
  rows = jnp.broadcast_to(jnp.asarray(logits), (n, logits.shape[1]))
  draws = jax.jit(lambda x, p, r: choose_tokens(x, p, None, r, strategy="sample",
                                                active=sp.active()))(rows, sp, jax.random.split(jax.random.key(0), n))
  probs = np.asarray(jax.nn.softmax(_ours(logits, **kw)[0])).astype(np.float64)
  probs /= probs.sum()
  counts = np.bincount(np.asarray(draws), minlength=logits.shape[1])
  support = probs > 0
  assert counts[~support].sum() == 0  # nothing outside the processed support
  assert support.sum() >= 4
  chi2, pval = scipy.stats.chisquare(counts[support], probs[support] * n)
  assert pval > 1e-3, (chi2, pval)
  # And the test has power: the unprocessed distribution is rejected.
  raw = np.asarray(jax.nn.softmax(logits[0])).astype(np.float64)
  assert scipy.stats.chisquare(counts, raw * n / raw.sum())[1] < 1e-6


def test_greedy_tokens_is_argmax():
  """First maximum on ties, first NaN if any, 0 for an all -inf row; 49k vocabulary."""
  rng = np.random.default_rng(3)
  s = rng.standard_normal((7, 49152)).astype(np.float32)
  s[1, [5, 9000, 40000]] = 10.0                 # ties
  s[2, [700, 30]] = np.nan                      # NaN wins, the first one
  s[3] = -np.inf
  s[4, -1] = np.inf
  s[5] = 2.0                                    # all equal
  s[6, 0] = np.nan
  got = jax.jit(greedy_tokens)(s)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, jnp.argmax(s, axis=-1))
  np.testing.assert_array_equal(got, [int(np.argmax(s[0])), 5, 30, 0, 49151, 0, 0])
