"""Shared by the model tests: `gguf_helpers` (test_gguf_interop.py, test_pretrained.py),
the strings the tokenizers are compared on and moelab's logits of a checkpoint; and
`decode_step` (test_linear.py, test_rope.py), a jitted cached decode step."""

import random
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.kv_cache import ContiguousSpec
from model.transformer import Decoder


def strings(n=200, seed=0):
  """Code, prose, non-ASCII, whitespace runs, digits, emoji, special tokens."""
  base = ["def fib(n):\n    if n < 2:\n        return n\n    return fib(n-1) + fib(n-2)",
          "The quick brown fox jumps over the lazy dog.", "x  1", "  123", "price: $1,234.56!!",
          "naïve café déjà vu — «quotes» ‘single’", "日本語のテキスト、中文字符。한국어",
          "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "\t\ttabs\tand\n\n\nnewlines   \n  ",
          "I'm you're they've we'll it's DON'T", "<|im_start|>user\nhi<|im_end|>", "ЁЖЗ привет мир",
          "α β γ ∑ ∫ √ ≤ ≥", "    indented\n        more", "a\u00a0b\u2003c", "1234567890 00 007",
          '{"json": [1, 2.5e-3, null]}', "http://example.com/path?q=1&r=2#frag", " ", "\n",
          "a qwertyuiop xyzzy", "   leading and trailing   "]
  chars = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + " " * 12 +
           "\n\t.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`éüñçßøåæœабвгд中文字😀🎉🚀\u00a0\u2009")
  rng, out = random.Random(seed), list(base)
  while len(out) < n:
    s = "".join(rng.choice(chars) for _ in range(rng.randint(1, 60)))
    out.append(rng.choice(base) + s if rng.random() < 0.2 else s)
  return out


def logits(cfg, params, ids):
  """moelab's float logits of token ids [B, L] (no cache)."""
  return np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(ids))[0])


def rel_rms(a, ref):
  return float(np.sqrt(np.sum((np.asarray(a) - ref) ** 2) / np.sum(np.asarray(ref) ** 2)))


@pytest.fixture(scope="session")
def gguf_helpers():
  return types.SimpleNamespace(strings=strings, logits=logits, rel_rms=rel_rms)


def decode_step(cfg, impl, tokens_BxL, positions_BxL, cache_len: int = 16):
  """jit(params -> logits) of one cached Decoder.decode step under `impl`, on an empty
  contiguous cache of `cache_len` slots a row."""
  cache = ContiguousSpec().init(cfg, tokens_BxL.shape[0], cache_len)
  return jax.jit(lambda p: Decoder(cfg, impl).apply({"params": p}, tokens_BxL, positions_BxL,
                                                    cache, method=Decoder.decode)[0])


@pytest.fixture(scope="session")
def decode_step_fn():
  return decode_step
