"""Corpus -> packed, shuffled fixed-length batches.

Corpus: `data.path` is a glob of text files; the empty default is the running
interpreter's own standard-library `*.py` files (every Python install has
them, so the default run needs no download). Files are read in sorted order
of their path relative to the glob root; a file is validation iff
crc32(relative path) % 100 < val_percent, so the split is deterministic and
by file (no leakage of a file's text between splits).

Packing: each split is one stream `BOS file_1 EOS BOS file_2 EOS ...`, cut into
non-overlapping windows of seq_len + 1 tokens (inputs = w[:-1], targets = w[1:]).

Shuffling: the training batch of step s is a pure function of (seed, s): epoch
e = s // steps_per_epoch uses permutation `default_rng([seed, e])` of the
windows. A resumed run therefore sees exactly the batches an uninterrupted
run sees, with no iterator state to checkpoint.
"""

import dataclasses
import glob
import os
import sysconfig
import zlib

import numpy as np

from train import tokenizer


def stdlib_files() -> tuple[str, list[str]]:
  """(root, sorted relative paths) of this interpreter's stdlib *.py files."""
  root = sysconfig.get_paths()["stdlib"]
  rel = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "dist-packages", "__pycache__"))
    rel += [os.path.relpath(os.path.join(dirpath, f), root)
            for f in filenames if f.endswith(".py")]
  return root, sorted(rel)


def glob_files(pattern: str) -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the files matching `pattern`."""
  pattern = os.path.expanduser(pattern)
  paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise ValueError(f"data.path: no files match {pattern!r}")
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  return root, sorted(os.path.relpath(os.path.abspath(p), root) for p in paths)


def is_validation(rel_path: str, val_percent: int) -> bool:
  return zlib.crc32(rel_path.encode()) % 100 < val_percent


def pack(root: str, rel_paths: list[str]) -> np.ndarray:
  """BOS file EOS BOS file EOS ... as one uint16 stream."""
  parts = []
  for rel in rel_paths:
    with open(os.path.join(root, rel), "rb") as f:
      parts += [np.array([tokenizer.BOS], np.uint16), tokenizer.encode_array(f.read()),
                np.array([tokenizer.EOS], np.uint16)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


@dataclasses.dataclass
class Dataset:
  """Windows of seq_len + 1 tokens over the train and validation streams."""

  train_WxL1: np.ndarray
  val_WxL1: np.ndarray
  num_train_files: int
  num_val_files: int

  @property
  def num_train_tokens(self) -> int:
    return self.train_WxL1.size


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  n = (len(stream) - 1) // seq_len
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  return stream[idx]


def load(path: str, seq_len: int, val_percent: int) -> Dataset:
  root, rel = glob_files(path) if path else stdlib_files()
  val = [r for r in rel if is_validation(r, val_percent)]
  trn = [r for r in rel if not is_validation(r, val_percent)]
  if not trn:
    raise ValueError(f"data.val_percent: every one of the {len(rel)} files is validation")
  if not val:  # tiny corpora: hold out the last file
    trn, val = trn[:-1], trn[-1:]
  ds = Dataset(windows(pack(root, trn), seq_len), windows(pack(root, val), seq_len),
               len(trn), len(val))
  if len(ds.train_WxL1) == 0 or len(ds.val_WxL1) == 0:
    raise ValueError(f"data.path: corpus too small for data.seq_len={seq_len}")
  return ds


def train_batch(ds: Dataset, step: int, batch_size: int, seed: int) -> np.ndarray:
  """The [batch_size, seq_len + 1] int32 batch of training step `step`."""
  n = len(ds.train_WxL1)
  per_epoch = max(1, n // batch_size)
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  rows = perm[(i * batch_size + np.arange(batch_size)) % n]
  return ds.train_WxL1[rows].astype(np.int32)


def val_batches(ds: Dataset, num_batches: int, batch_size: int):
  """The first num_batches * batch_size validation windows (fixed across evals);
  a last partial batch is filled by wrapping around to the first windows."""
  n = len(ds.val_WxL1)
  for b in range(min(num_batches, -(-n // batch_size))):
    rows = (b * batch_size + np.arange(batch_size)) % n
    yield ds.val_WxL1[rows].astype(np.int32)
