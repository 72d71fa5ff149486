"""Byte-level BPE (`data.tokenizer='bpe:N'`), trained with the `tokenizers` package.

Byte-level BPE as in GPT-2 (Radford et al. 2019; Sennrich et al. 2016 arXiv
1508.07909 for BPE): text is UTF-8 bytes, each byte a symbol, and merges of
frequent adjacent symbol pairs are learned on the training split until the
vocabulary holds N ids. Ids are laid out like the byte tokenizer's
(train/tokenizer.py), so every other module keeps its meaning of them:

    0..255    the single bytes          256, 257, 258   BOS, EOS, PAD
    259..N-1  merges, in the order they were learned

(BOS/EOS/PAD are vocabulary entries whose names no byte sequence can form, so
text never encodes to them.) `token_bytes()[i]` is the number of bytes id i
stands for, so bits per byte stays sum(nats over non-special targets) /
(ln 2 * bytes they cover) for any tokenizer (train/step.py `eval_step`).

Training is deterministic: the same texts in the same order give the same
merges (the trainer breaks ties by pair, not by hash order), so the file is
the same on every host. Text is decoded from UTF-8 with invalid bytes
replaced by U+FFFD; the bytes counted are those of the decoded text, which
for a UTF-8 corpus are the file's bytes. The trained tokenizer is saved as
`tokenizer.json` in the workdir (the `tokenizers` JSON format), which
`experiments.generate --workdir` loads.
"""

import json
import os

import numpy as np

from train import tokenizer

FILENAME = "tokenizer.json"
SPECIALS = {tokenizer.BOS: "\u27e8bos\u27e9", tokenizer.EOS: "\u27e8eos\u27e9",
            tokenizer.PAD: "\u27e8pad\u27e9"}


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character map of byte-level BPE (the `tokenizers`
  ByteLevel alphabet): printable Latin-1 bytes stand for themselves, the
  other 68 bytes for U+0100 onwards."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
  out, extra = {}, 0
  for b in range(256):
    if b in keep:
      out[b] = chr(b)
    else:
      out[b] = chr(256 + extra)
      extra += 1
  return out


class BPETokenizer:
  """A trained byte-level BPE with the id layout of the module docstring."""

  bos, eos, pad = tokenizer.BOS, tokenizer.EOS, tokenizer.PAD

  def __init__(self, hf_tokenizer):
    self._tok = hf_tokenizer
    char_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = hf_tokenizer.get_vocab()
    self._bytes = [b""] * (max(vocab.values()) + 1)
    for name, i in vocab.items():
      if i not in SPECIALS:
        self._bytes[i] = bytes(char_byte[c] for c in name)

  @property
  def vocab_size(self) -> int:
    return len(self._bytes)

  def encode(self, text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
    """Ids of `text` (bytes are decoded as UTF-8, invalid bytes replaced)."""
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return ([self.bos] if bos else []) + self._tok.encode(text).ids + ([self.eos] if eos else [])

  def encode_batch(self, texts: list[bytes]) -> list[np.ndarray]:
    """uint16 ids of each of `texts` (no specials); parallel in `tokenizers`."""
    out = self._tok.encode_batch([t.decode("utf-8", errors="replace") for t in texts])
    return [np.asarray(e.ids, np.uint16) for e in out]

  def decode(self, ids) -> str:
    """Ids -> text; specials are dropped, invalid UTF-8 is replaced."""
    return b"".join(self._bytes[int(i)] for i in ids
                    if 0 <= int(i) < len(self._bytes)).decode("utf-8", errors="replace")

  def token_bytes(self) -> np.ndarray:
    """Bytes each id stands for, [vocab_size] float32 (0 for BOS/EOS/PAD)."""
    return np.array([len(b) for b in self._bytes], np.float32)

  def to_str(self) -> str:
    return self._tok.to_str()

  def save(self, path: str) -> None:
    """Writes the `tokenizers` JSON atomically (temporary file + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(self.to_str())
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)


def train(texts: list[bytes], vocab_size: int) -> BPETokenizer:
  """Learns a byte-level BPE of at most `vocab_size` ids (specials included) on `texts`.

  A corpus with fewer distinct pairs than merges to learn gives fewer ids.
  """
  if vocab_size < tokenizer.VOCAB_SIZE:
    raise ValueError(f"data.tokenizer: a BPE needs >= {tokenizer.VOCAB_SIZE} ids "
                     f"(got bpe:{vocab_size})")
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: PLC0415
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIALS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  hf.train_from_iterator([t.decode("utf-8", errors="replace") for t in texts], trainer)
  spec = json.loads(hf.to_str())
  learned = spec["model"]["vocab"]
  byte_char = bytes_to_unicode()
  vocab = {byte_char[b]: b for b in range(256)}
  vocab.update({name: i for i, name in SPECIALS.items()})
  for name in sorted((n for n in learned if n not in vocab), key=learned.get):
    vocab[name] = len(vocab)
  spec["model"]["vocab"] = vocab
  return BPETokenizer(Tokenizer.from_str(json.dumps(spec)))


def load(path: str) -> BPETokenizer:
  from tokenizers import Tokenizer  # noqa: PLC0415
  return BPETokenizer(Tokenizer.from_file(path))
