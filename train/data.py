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

`load_run(data_config, workdir)` is what the trainer calls: the corpus with
the byte tokenizer, or with a byte-level BPE (`data.tokenizer='bpe:N'`,
train/bpe.py: trained on the training split's files in the order above, or
read back from `workdir/tokenizer.json` when the workdir holds checkpoints),
or a synthetic task (`data.task`, train/tasks.py: one example per window,
padded, with the mask of its answer targets for exact-match scoring).
"""

import dataclasses
import glob
import os
import sysconfig
import zlib

import numpy as np

from train import tasks, tokenizer


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


def read_files(root: str, rel_paths: list[str]) -> list[bytes]:
  out = []
  for rel in rel_paths:
    with open(os.path.join(root, rel), "rb") as f:
      out.append(f.read())
  return out


def pack(root: str, rel_paths: list[str], tok=None) -> np.ndarray:
  """BOS file EOS BOS file EOS ... as one uint16 stream (bytes, or `tok`'s ids)."""
  texts = read_files(root, rel_paths)
  ids = tok.encode_batch(texts) if tok is not None else map(tokenizer.encode_array, texts)
  parts = []
  for x in ids:
    parts += [np.array([tokenizer.BOS], np.uint16), x, np.array([tokenizer.EOS], np.uint16)]
  return np.concatenate(parts) if parts else np.zeros((0,), np.uint16)


@dataclasses.dataclass
class Dataset:
  """Windows of seq_len + 1 tokens over the train and validation streams.

  val_answer_WxL: for a synthetic task, the mask of each validation window's
    answer targets (train/tasks.py); None for a corpus.
  token_bytes_V: bytes each id covers (bits per byte); None is the byte tokenizer.
  """

  train_WxL1: np.ndarray
  val_WxL1: np.ndarray
  num_train_files: int
  num_val_files: int
  val_answer_WxL: np.ndarray | None = None
  token_bytes_V: np.ndarray | None = None

  @property
  def num_train_tokens(self) -> int:
    return self.train_WxL1.size


def windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  n = (len(stream) - 1) // seq_len
  idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None]
  return stream[idx]


def split_files(path: str, val_percent: int) -> tuple[str, list[str], list[str]]:
  """(root, train files, validation files) of the corpus at `path`."""
  root, rel = glob_files(path) if path else stdlib_files()
  val = [r for r in rel if is_validation(r, val_percent)]
  trn = [r for r in rel if not is_validation(r, val_percent)]
  if not trn:
    raise ValueError(f"data.val_percent: every one of the {len(rel)} files is validation")
  if not val:  # tiny corpora: hold out the last file
    trn, val = trn[:-1], trn[-1:]
  return root, trn, val


def load(path: str, seq_len: int, val_percent: int, tok=None) -> Dataset:
  """The corpus at `path` in windows, byte-tokenized or with `tok` (a BPETokenizer)."""
  root, trn, val = split_files(path, val_percent)
  ds = Dataset(windows(pack(root, trn, tok), seq_len), windows(pack(root, val, tok), seq_len),
               len(trn), len(val), token_bytes_V=None if tok is None else tok.token_bytes())
  if len(ds.train_WxL1) == 0 or len(ds.val_WxL1) == 0:
    raise ValueError(f"data.path: corpus too small for data.seq_len={seq_len}")
  return ds


def run_tokenizer(cfg, workdir: str | None, write: bool = True):
  """None (bytes) or the BPETokenizer of `cfg.tokenizer` ('bpe:N'): the one in
  `workdir/tokenizer.json` if the workdir holds checkpoints (they were trained
  with it), else trained on the training split (the corpus's training files,
  or a task's training texts) and, if `write`, saved there."""
  if cfg.tokenizer == "bytes":
    return None
  from train import bpe, workdir as workdir_lib  # noqa: PLC0415
  path = os.path.join(workdir, bpe.FILENAME) if workdir else None
  if path and os.path.exists(path) and workdir_lib.has_checkpoints(workdir):
    tok = bpe.load(path)
    if tok.vocab_size > tokenizer.vocab_size_of(cfg.tokenizer):
      raise ValueError(f"data.tokenizer: {path} holds {tok.vocab_size} ids, more than "
                       f"{cfg.tokenizer!r}")
    return tok
  if cfg.task:
    train_ex, _ = tasks.splits(cfg)
    texts = [(p + a).encode() for p, a in train_ex]
  else:
    root, trn, _ = split_files(cfg.path, cfg.val_percent)
    texts = read_files(root, trn)
  tok = bpe.train(texts, tokenizer.vocab_size_of(cfg.tokenizer))
  if path and write:
    os.makedirs(workdir, exist_ok=True)
    tok.save(path)
  return tok


def load_task(cfg, tok=None) -> Dataset:
  """Synthetic task `cfg.task`: one padded example per window (train/tasks.py)."""
  train_ex, val_ex = tasks.splits(cfg)
  enc = (lambda s: tokenizer.encode(s)) if tok is None else tok.encode
  args = (enc, tokenizer.BOS, tokenizer.EOS, tokenizer.PAD, cfg.seq_len)
  train_WxL1, _ = tasks.encode(train_ex, *args)
  val_WxL1, answer_WxL = tasks.encode(val_ex, *args)
  return Dataset(train_WxL1, val_WxL1, len(train_ex), len(val_ex), answer_WxL,
                 None if tok is None else tok.token_bytes())


def load_run(cfg, workdir: str | None = None, write: bool = True) -> Dataset:
  """The Dataset of a run's DataConfig `cfg` (module docstring)."""
  tok = run_tokenizer(cfg, workdir, write)
  if cfg.task:
    return load_task(cfg, tok)
  return load(cfg.path, cfg.seq_len, cfg.val_percent, tok)


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
  for rows in val_rows(len(ds.val_WxL1), num_batches, batch_size):
    yield ds.val_WxL1[rows].astype(np.int32)


def val_rows(n: int, num_batches: int, batch_size: int):
  """The window indices of each validation batch (see val_batches)."""
  for b in range(min(num_batches, -(-n // batch_size))):
    yield (b * batch_size + np.arange(batch_size)) % n


def val_task_batches(ds: Dataset, num_batches: int, batch_size: int):
  """(tokens_BxL1, answer_BxL, counted_B) of the validation batches of a task
  Dataset; counted_B is False on the wrapped-around repeats of a last partial
  batch (so every example counts once)."""
  n = len(ds.val_WxL1)
  for b, rows in enumerate(val_rows(n, num_batches, batch_size)):
    counted = b * batch_size + np.arange(batch_size) < n
    yield ds.val_WxL1[rows].astype(np.int32), ds.val_answer_WxL[rows], counted
