"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then BOS, EOS, PAD.

    encode("hé") == [104, 195, 169]          vocab size 259
"""

import numpy as np

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
  """UTF-8 bytes of `text` as ids, optionally wrapped in BOS/EOS."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return ([BOS] if bos else []) + list(data) + ([EOS] if eos else [])


def encode_array(data: bytes) -> np.ndarray:
  """Fast path for corpora: bytes -> uint16 ids (no specials)."""
  return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)


def decode(ids) -> str:
  """Ids -> text; specials are dropped, invalid UTF-8 is replaced."""
  return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def is_byte(ids):
  """Mask of ids that are bytes (used to count bits per *byte*)."""
  return ids < 256
