"""Tokenizer, corpus split, packing and step-indexed shuffling."""

import numpy as np

from train import data, tokenizer


def test_byte_tokenizer_round_trip():
  ids = tokenizer.encode("héllo\n", bos=True, eos=True)
  assert ids[0] == tokenizer.BOS and ids[-1] == tokenizer.EOS and len(ids) == 9
  assert tokenizer.decode(ids) == "héllo\n"


def test_stdlib_corpus_is_deterministic_and_split_by_file():
  root, rel = data.stdlib_files()
  assert len(rel) > 100 and rel == sorted(rel) and "os.py" in rel
  val = [r for r in rel if data.is_validation(r, 5)]
  assert 0.01 < len(val) / len(rel) < 0.10
  assert data.stdlib_files()[1] == rel


def test_packing_and_windows(corpus):
  ds = data.load(corpus, seq_len=16, val_percent=20)
  assert ds.train_WxL1.shape[1] == 17
  stream = ds.train_WxL1
  assert stream[0, 0] == tokenizer.BOS
  # consecutive windows overlap by one token (targets of one = next inputs)
  assert stream[0, -1] == stream[1, 0]
  text = tokenizer.decode(stream[:4, :-1].reshape(-1))
  assert text.startswith("def f")


def test_batches_are_a_pure_function_of_seed_and_step(corpus):
  ds = data.load(corpus, seq_len=16, val_percent=20)
  a = data.train_batch(ds, 7, 4, seed=0)
  np.testing.assert_array_equal(a, data.train_batch(ds, 7, 4, seed=0))
  assert not np.array_equal(a, data.train_batch(ds, 7, 4, seed=1))
  assert not np.array_equal(a, data.train_batch(ds, 8, 4, seed=0))


def test_one_epoch_visits_every_window_once():
  ds = data.Dataset(np.arange(40 * 3).reshape(40, 3), np.zeros((1, 3)), 1, 1)
  rows = np.concatenate([data.train_batch(ds, s, 4, 0) for s in range(10)])
  assert sorted(rows[:, 0].tolist()) == list(range(0, 120, 3))
  assert rows[:, 0].tolist() != list(range(0, 120, 3))  # shuffled
