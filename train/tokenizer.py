"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then BOS, EOS, PAD.

    encode("hé") == [104, 195, 169]          vocab size 259

`data.tokenizer='bpe:N'` replaces it with a byte-level BPE (train/bpe.py)
that keeps these ids: 0..255 are the single bytes, 256..258 BOS/EOS/PAD.
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


def token_bytes() -> np.ndarray:
  """Bytes each id covers, [VOCAB_SIZE] float32: 1 for a byte, 0 for BOS/EOS/PAD."""
  return (np.arange(VOCAB_SIZE) < 256).astype(np.float32)


def vocab_size_of(spec: str) -> int:
  """Ids the `data.tokenizer` spec needs: 'bytes' -> 259, 'bpe:N' -> N (train/bpe.py)."""
  if spec == "bytes":
    return VOCAB_SIZE
  n = spec.removeprefix("bpe:")
  if spec.startswith("bpe:") and n.isdigit():
    if int(n) < VOCAB_SIZE:
      raise ValueError(f"data.tokenizer: a BPE needs >= {VOCAB_SIZE} ids (the 256 bytes, "
                       f"BOS, EOS, PAD) (got {spec!r})")
    return int(n)
  raise ValueError(f"data.tokenizer: must be 'bytes' or 'bpe:N' (got {spec!r})")
