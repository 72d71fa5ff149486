"""Synthetic tasks: deterministic (prompt, answer) generators and exact-match scoring.

`--config.data.task=NAME` trains and evaluates on one of TASKS instead of
the text corpus. Every example is one row `BOS prompt answer EOS PAD ...`
of data.seq_len + 1 tokens (train/data.py `load_task`); PAD targets count
in no loss. Fields (train/config.py DataConfig):

* addition (data.task_digits = n, data.task_scratchpad): two zero-padded
  n-digit operands, the n+1-digit zero-padded sum.
      prompt "042+917="   answer "0959"
  With the scratchpad (chain of thought, cf. Nye et al. 2021 arXiv
  2112.00114) the answer first writes every column from the units up as
  `a_i+b_i+carry_in=` and the two-digit column sum (carry out, digit), then
  `|` and the sum:
      answer "2+7+0=09,4+1+0=05,0+9+0=09|0959"
* kv_retrieval (data.task_pairs, data.needle_depth, data.task_distractors):
  task_pairs `key:value` pairs (4 lowercase letters : 3 digits), then a
  query key; the answer is its value. The queried pair (the needle) sits at
  pair index round(needle_depth * (task_pairs - 1)); task_distractors other
  keys differ from it in exactly one letter (near duplicates, with other
  values) and no filler key does (in the style of the needle-in-a-haystack
  and multi-key retrieval of Liu et al. 2023 arXiv 2307.03172).
      prompt "qwer:123,abcd:456,abce:789;abcd?"   answer "456"
* mapping (data.task_shots = k): a fresh random bijection of the letters
  a-h onto i-p per example, k 3-letter words with their images, then a
  new word made of letters the examples showed; the answer is its image.
      prompt "abc>kmo,heb>pjm;cab>"   answer "okm"
* json_records (data.task_json_fields = f): f `key=value` fields of a
  record, then its compact JSON (`json.dumps(..., separators=(",", ":"))`),
  keys in FIELDS order; `json_schema(f)` is its JSON schema.
      prompt "id=17 name=Ada age=42;"   answer '{"id":17,"name":"Ada","age":42}'

Determinism and splits: the example stream of a task is `random.Random` of
(task name, data.task_seed) (Python guarantees that stream across
versions); an example is validation iff crc32(prompt) % 5 == 0, so the two
splits never share a prompt. The stream is drawn until the train split has
data.task_train_examples and validation data.task_val_examples.

Exact match (eval metric `exact_match`): teacher-forced, a row matches iff
at every answer position (the answer tokens and the EOS after them) the
argmax of the logits is the target. Greedy decoding emits the argmax given
the prefix, so a row matches exactly when greedy decoding from the prompt
writes the answer and stops; this needs no decode loop (train/ does not
import decode/). With the scratchpad the whole chain counts.
"""

import functools
import json
import random
import string
import zlib

import numpy as np

TASKS = ("addition", "kv_retrieval", "mapping", "json_records")
VAL_BUCKETS = 5   # validation iff crc32(prompt) % VAL_BUCKETS == 0
MAX_DRAWS_PER_EXAMPLE = 100

NAMES = ("Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Leslie",
         "Margaret", "Niklaus", "Radia", "Tony", "Ken", "Dennis", "Guido")
CITIES = ("Oslo", "Lima", "Kyoto", "Cairo", "Quito", "Paris", "Accra", "Hanoi", "Perth",
          "Dublin", "Nairobi", "Bogota")
# (key, kind, values): ints are inclusive ranges.
FIELDS = (("id", "int", (1, 9999)), ("name", "str", NAMES), ("age", "int", (18, 90)),
          ("city", "str", CITIES), ("score", "int", (0, 100)), ("active", "bool", None))
KEY_LEN, VALUE_LEN = 4, 3
MAP_IN, MAP_OUT, WORD_LEN = "abcdefgh", "ijklmnop", 3


def check(cfg) -> None:
  """Validates the task fields of a DataConfig; ValueError names the field."""
  def err(field, msg):
    raise ValueError(f"data.{field}: {msg} (got {getattr(cfg, field)!r})")

  if cfg.task and cfg.task not in TASKS:
    err("task", f"must be '' (the text corpus) or one of {TASKS}")
  for f in ("task_digits", "task_pairs", "task_shots", "task_json_fields",
            "task_train_examples", "task_val_examples"):
    if isinstance(getattr(cfg, f), bool) or not isinstance(getattr(cfg, f), int) \
        or getattr(cfg, f) < 1:
      err(f, "must be a positive integer")
  if isinstance(cfg.task_distractors, bool) or not isinstance(cfg.task_distractors, int) \
      or cfg.task_distractors < 0:
    err("task_distractors", "must be a non-negative integer")
  if not 0 <= cfg.needle_depth <= 1:
    err("needle_depth", "must be in [0, 1]")
  if cfg.task_distractors >= cfg.task_pairs:
    err("task_distractors", f"needs fewer than data.task_pairs={cfg.task_pairs} "
        "(the needle takes a pair too)")
  if cfg.task_distractors > KEY_LEN * (len(string.ascii_lowercase) - 1):
    err("task_distractors", "more near duplicates than a key has")
  if cfg.task_json_fields > len(FIELDS):
    err("task_json_fields", f"at most {len(FIELDS)} fields ({[f[0] for f in FIELDS]})")


def max_example_chars(cfg) -> tuple[int, int]:
  """Upper bounds (prompt, answer) on the characters of cfg.task's examples
  (ASCII: bytes, and at least the tokens of any BPE)."""
  if cfg.task == "addition":
    n = cfg.task_digits
    return 2 * n + 2, (n + 1) + (9 * n if cfg.task_scratchpad else 0)
  if cfg.task == "kv_retrieval":
    return cfg.task_pairs * (KEY_LEN + 1 + VALUE_LEN + 1) + KEY_LEN + 1, VALUE_LEN
  if cfg.task == "mapping":
    return cfg.task_shots * (2 * WORD_LEN + 2) + WORD_LEN + 1, WORD_LEN
  fields = FIELDS[:cfg.task_json_fields]
  widest = [max(len(str(v)) for v in _field_values(f)) for f in fields]
  prompt = sum(len(f[0]) + 1 + w + 1 for f, w in zip(fields, widest))
  answer = 2 + sum(len(f[0]) + 3 + w + (2 if f[1] == "str" else 0) + 1
                   for f, w in zip(fields, widest)) - 1
  return prompt, answer


def _field_values(field):
  key, kind, values = field
  if kind == "int":
    return (values[0], values[1])
  if kind == "bool":
    return ("true", "false")
  return values


# ------------------------------------------------------------------ generators
def addition(rng: random.Random, digits: int, scratchpad: bool) -> tuple[str, str]:
  a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
  sa, sb = f"{a:0{digits}d}", f"{b:0{digits}d}"
  answer = f"{a + b:0{digits + 1}d}"
  if scratchpad:
    answer = f"{scratchpad_chain(sa, sb)}|{answer}"
  return f"{sa}+{sb}=", answer


def scratchpad_chain(sa: str, sb: str) -> str:
  """The column-by-column carries of sa + sb, units first: 'a+b+c=cd,...'."""
  steps, carry = [], 0
  for da, db in zip(reversed(sa), reversed(sb)):
    s = int(da) + int(db) + carry
    steps.append(f"{da}+{db}+{carry}={s // 10}{s % 10}")
    carry = s // 10
  return ",".join(steps)


def _key(rng: random.Random) -> str:
  return "".join(rng.choice(string.ascii_lowercase) for _ in range(KEY_LEN))


def _value(rng: random.Random) -> str:
  return "".join(rng.choice(string.digits) for _ in range(VALUE_LEN))


def _near(a: str, b: str) -> bool:
  return sum(x != y for x, y in zip(a, b)) <= 1


def kv_retrieval(rng: random.Random, pairs: int, depth: float,
                 distractors: int) -> tuple[str, str]:
  needle, value = _key(rng), _value(rng)
  keys = {needle}
  near = []
  while len(near) < distractors:
    i = rng.randrange(KEY_LEN)
    k = needle[:i] + rng.choice(string.ascii_lowercase.replace(needle[i], "")) + needle[i + 1:]
    if k not in keys:
      keys.add(k)
      near.append(k)
  fillers = []
  while len(fillers) < pairs - 1 - distractors:
    k = _key(rng)
    if k not in keys and not _near(k, needle):
      keys.add(k)
      fillers.append(k)
  others = [(k, _other_value(rng, value)) for k in near] + [(k, _value(rng)) for k in fillers]
  rng.shuffle(others)
  at = round(depth * (pairs - 1))
  context = others[:at] + [(needle, value)] + others[at:]
  return ",".join(f"{k}:{v}" for k, v in context) + f";{needle}?", value


def _other_value(rng: random.Random, value: str) -> str:
  while True:
    v = _value(rng)
    if v != value:
      return v


def mapping(rng: random.Random, shots: int) -> tuple[str, str]:
  image = dict(zip(MAP_IN, rng.sample(MAP_OUT, len(MAP_OUT))))
  words = ["".join(rng.choice(MAP_IN) for _ in range(WORD_LEN)) for _ in range(shots)]
  seen = sorted(set("".join(words)))
  query = "".join(rng.choice(seen) for _ in range(WORD_LEN))
  for _ in range(8):  # a word not shown, where the shown letters allow one
    if query not in words:
      break
    query = "".join(rng.choice(seen) for _ in range(WORD_LEN))
  m = lambda w: "".join(image[c] for c in w)
  return ",".join(f"{w}>{m(w)}" for w in words) + f";{query}>", m(query)


def json_records(rng: random.Random, num_fields: int) -> tuple[str, str]:
  record = {}
  for key, kind, values in FIELDS[:num_fields]:
    if kind == "int":
      record[key] = rng.randint(*values)
    elif kind == "bool":
      record[key] = rng.random() < 0.5
    else:
      record[key] = rng.choice(values)
  shown = lambda v: json.dumps(v) if isinstance(v, bool) else str(v)
  prompt = " ".join(f"{k}={shown(v)}" for k, v in record.items()) + ";"
  return prompt, json.dumps(record, separators=(",", ":"))


def json_schema(num_fields: int) -> dict:
  """JSON schema of json_records' answers (for guided decoding)."""
  props = {}
  for key, kind, values in FIELDS[:num_fields]:
    if kind == "int":
      props[key] = {"type": "integer", "minimum": values[0], "maximum": values[1]}
    elif kind == "bool":
      props[key] = {"type": "boolean"}
    else:
      props[key] = {"type": "string", "enum": list(values)}
  return {"type": "object", "properties": props, "required": list(props),
          "additionalProperties": False}


def example(name: str, rng: random.Random, cfg) -> tuple[str, str]:
  """One (prompt, answer) of task `name` with cfg's parameters."""
  if name == "addition":
    return addition(rng, cfg.task_digits, cfg.task_scratchpad)
  if name == "kv_retrieval":
    return kv_retrieval(rng, cfg.task_pairs, cfg.needle_depth, cfg.task_distractors)
  if name == "mapping":
    return mapping(rng, cfg.task_shots)
  if name == "json_records":
    return json_records(rng, cfg.task_json_fields)
  raise ValueError(f"data.task: unknown task {name!r}; known: {TASKS}")


def is_validation(prompt: str) -> bool:
  return zlib.crc32(prompt.encode()) % VAL_BUCKETS == 0


def splits(cfg) -> tuple[list, list]:
  """(train, validation) lists of (prompt, answer), disjoint in prompts."""
  rng = random.Random(f"{cfg.task}:{cfg.task_seed}")
  train, val = [], []
  n_train, n_val = cfg.task_train_examples, cfg.task_val_examples
  for _ in range(MAX_DRAWS_PER_EXAMPLE * (n_train + n_val)):
    if len(train) == n_train and len(val) == n_val:
      return train, val
    ex = example(cfg.task, rng, cfg)
    split, n = (val, n_val) if is_validation(ex[0]) else (train, n_train)
    if len(split) < n:
      split.append(ex)
  raise ValueError(f"data.task: {cfg.task!r} with these parameters has too few distinct "
                   f"prompts for data.task_train_examples={n_train} and "
                   f"data.task_val_examples={n_val} (got {len(train)} and {len(val)})")


def encode(examples, encode_text, bos: int, eos: int, pad: int, seq_len: int):
  """(tokens_WxL1 int32, answer_WxL bool): rows `BOS prompt answer EOS PAD...` of
  seq_len + 1 tokens, and the mask of the targets (tokens[:, 1:]) that are the
  answer or its EOS. Prompt and answer are encoded apart (a token boundary
  between them under any tokenizer)."""
  tokens = np.full((len(examples), seq_len + 1), pad, np.int32)
  answer = np.zeros((len(examples), seq_len), bool)
  for r, (prompt, ans) in enumerate(examples):
    p, a = encode_text(prompt), encode_text(ans)
    row = [bos] + p + a + [eos]
    if len(row) > seq_len + 1:
      raise ValueError(f"data.seq_len: a task example needs {len(row) - 1} tokens "
                       f"(got seq_len={seq_len})")
    tokens[r, :len(row)] = row
    answer[r, len(p):len(p) + len(a) + 1] = True   # target t is tokens[t + 1]
  return tokens, answer


def exact_match(pred_BxL, targets_BxL, answer_BxL) -> np.ndarray:
  """Per row: every answer target is predicted (rows without answer: False)."""
  pred, targets, answer = map(np.asarray, (pred_BxL, targets_BxL, answer_BxL))
  ok = np.where(answer, pred == targets, True).all(-1)
  return ok & answer.any(-1)


def argmax_step(params, batch_BxL1, *, model):
  """Teacher-forced argmax predictions of the targets, [B, L] int32."""
  import jax.numpy as jnp  # noqa: PLC0415  (train/config.py imports this module: no jax)
  logits, _ = model.apply({"params": params}, batch_BxL1[:, :-1], train=False)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def predict_fn(model):
  import jax  # noqa: PLC0415
  return jax.jit(functools.partial(argmax_step, model=model))


def exact_match_rate(predict, params, batches) -> float:
  """Fraction of counted rows matching over `batches` of (tokens_BxL1,
  answer_BxL, counted_B) (train/data.py `val_task_batches`)."""
  import jax  # noqa: PLC0415
  hits = []
  for tokens, answer, counted in batches:
    ok = exact_match(jax.device_get(predict(params, tokens)), tokens[:, 1:], answer)
    hits.append(ok[counted])
  return float(np.concatenate(hits).mean())
