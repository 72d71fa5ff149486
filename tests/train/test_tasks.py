"""Synthetic tasks (train/tasks.py): formats, determinism, splits, exact-match scoring."""

import dataclasses
import json
import random

import numpy as np
import pytest

from configs import base
from train import tasks, tokenizer
from train.config import DataConfig, RunConfig


def _cfg(**kw):
  return DataConfig(task_train_examples=300, task_val_examples=60, **kw)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_deterministic_disjoint_and_within_bounds(task):
  cfg = _cfg(task=task, task_distractors=4 if task == "kv_retrieval" else 0)
  train, val = tasks.splits(cfg)
  assert (train, val) == tasks.splits(cfg)                       # same seed, same data
  assert tasks.splits(dataclasses.replace(cfg, task_seed=1))[0] != train
  assert len(train) == 300 and len(val) == 60
  assert not {p for p, _ in train} & {p for p, _ in val}         # no shared prompt
  assert all(tasks.is_validation(p) for p, _ in val)
  bound = tasks.max_example_chars(cfg)
  assert max(len(p) for p, _ in train + val) <= bound[0]
  assert max(len(a) for _, a in train + val) <= bound[1]


def test_addition_and_scratchpad_format():
  assert tasks.scratchpad_chain("042", "917") == "2+7+0=09,4+1+0=05,0+9+0=09"
  assert tasks.scratchpad_chain("58", "67") == "8+7+0=15,5+6+1=12"
  rng = random.Random(0)
  for _ in range(50):
    prompt, answer = tasks.addition(rng, 3, scratchpad=True)
    a, b = prompt[:-1].split("+")
    chain, total = answer.split("|")
    assert total == f"{int(a) + int(b):04d}" and len(a) == len(b) == 3
    steps = chain.split(",")
    assert [s[-1] for s in steps][::-1] == list(total[1:])    # column digits, units first
    assert steps[-1][-2] == total[0]                          # the last carry leads
  prompt, answer = tasks.addition(random.Random(0), 2, scratchpad=False)
  assert prompt.endswith("=") and len(answer) == 3 and answer.isdigit()


@pytest.mark.parametrize("distractors", [0, 1, 4])
def test_kv_retrieval_needle_depth_and_near_duplicates(distractors):
  rng = random.Random(3)
  for depth in (0.0, 0.5, 1.0):
    prompt, answer = tasks.kv_retrieval(rng, 9, depth, distractors)
    context, query = prompt.split(";")
    pairs = [p.split(":") for p in context.split(",")]
    key = query.rstrip("?")
    assert len(pairs) == 9 and pairs[round(depth * 8)] == [key, answer]
    near = [k for k, _ in pairs if k != key and sum(x != y for x, y in zip(k, key)) == 1]
    assert len(near) == distractors
    assert len({k for k, _ in pairs}) == 9


def test_mapping_and_json_formats():
  prompt, answer = tasks.mapping(random.Random(1), 4)
  shots, query = prompt.split(";")
  image = {}
  for s in shots.split(","):
    w, m = s.split(">")
    image.update(zip(w, m))
  assert "".join(image[c] for c in query.rstrip(">")) == answer
  prompt, answer = tasks.json_records(random.Random(2), 4)
  record = json.loads(answer)
  assert list(record) == ["id", "name", "age", "city"]
  assert prompt == " ".join(f"{k}={v}" for k, v in record.items()) + ";"
  assert set(tasks.json_schema(4)["required"]) == set(record)


def test_encode_marks_the_answer_and_eos():
  tokens, answer = tasks.encode([("12+34=", "046")], tokenizer.encode, tokenizer.BOS,
                                tokenizer.EOS, tokenizer.PAD, 16)
  assert tokens.shape == (1, 17) and answer.shape == (1, 16)
  targets = tokens[0, 1:]
  assert tokenizer.decode(targets[answer[0]]) == "046"
  assert targets[answer[0]][-1] == tokenizer.EOS
  assert (tokens[0, 12:] == tokenizer.PAD).all()
  with pytest.raises(ValueError, match="data.seq_len"):
    tasks.encode([("12+34=", "046")], tokenizer.encode, 256, 257, 258, 8)


def test_exact_match_scores_perfect_and_imperfect_predictions():
  tokens, answer = tasks.encode([("1+2=", "3"), ("4+4=", "8"), ("9+9=", "18")],
                                tokenizer.encode, tokenizer.BOS, tokenizer.EOS,
                                tokenizer.PAD, 10)
  targets = tokens[:, 1:]
  perfect = targets.copy()
  assert tasks.exact_match(perfect, targets, answer).tolist() == [True, True, True]
  wrong = perfect.copy()
  wrong[0, np.flatnonzero(answer[0])[0]] = ord("4")    # a wrong answer digit
  wrong[1, np.flatnonzero(answer[1])[-1]] = ord("0")   # no EOS after the answer
  wrong[2, 0] = ord("x")                               # a prompt position: not scored
  assert tasks.exact_match(wrong, targets, answer).tolist() == [False, False, True]
  assert not tasks.exact_match(perfect, targets, np.zeros_like(answer)).any()


def test_task_config_is_validated():
  with pytest.raises(ValueError, match="data.task:"):
    DataConfig(task="sorting")
  with pytest.raises(ValueError, match="data.needle_depth"):
    DataConfig(task="kv_retrieval", needle_depth=1.5)
  with pytest.raises(ValueError, match="data.task_distractors"):
    DataConfig(task="kv_retrieval", task_pairs=4, task_distractors=4)
  c = base.get_config()
  c.data.update(task="kv_retrieval", task_pairs=20, seq_len=64)
  with pytest.raises(ValueError, match="data.seq_len: data.task='kv_retrieval'"):
    RunConfig.from_config(c)
