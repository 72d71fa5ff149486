"""Typed, validated view of a run's ml_collections config.

`RunConfig.from_config(config)` turns the ConfigDict of a configs/*.py file
(after command-line overrides) into frozen dataclasses and raises ValueError
naming the offending field ("train.steps: must be > 0 (got 0)") before
anything is compiled. Unknown keys are errors too, so a typo in
`--config.optimizer.lerning_rate` does not silently do nothing.

The dataclasses here and `model.config.ModelConfig` hold every default; a
config file sets only what it changes (configs/base.py).
"""

import dataclasses
import math

from model.config import ModelConfig, from_mapping
from model.impl import REMAT_IMPLS
from train import tasks, tokenizer


def _check(section, obj, positive=(), non_negative=(), unit=()):
  for f in dataclasses.fields(obj):
    v = getattr(obj, f.name)
    if isinstance(v, float) and not math.isfinite(v):
      raise ValueError(f"{section}.{f.name}: must be finite (got {v!r})")
  for f in positive:
    v = getattr(obj, f)
    if isinstance(v, bool) or not v > 0:
      raise ValueError(f"{section}.{f}: must be > 0 (got {v!r})")
  for f in non_negative:
    v = getattr(obj, f)
    if isinstance(v, bool) or not v >= 0:
      raise ValueError(f"{section}.{f}: must be >= 0 (got {v!r})")
  for f in unit:
    v = getattr(obj, f)
    if not 0 <= v <= 1:
      raise ValueError(f"{section}.{f}: must be in [0, 1] (got {v!r})")


def _ints(section, obj, fields):
  for f in fields:
    v = getattr(obj, f)
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"{section}.{f}: must be an integer (got {v!r})")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Corpus or synthetic task, tokenizer, sequence length, batch size.

  tokenizer: 'bytes' or 'bpe:N' (a byte-level BPE of N ids trained on the
    training split and kept in workdir/tokenizer.json; train/bpe.py).
    model.vocab_size is not set for it: it must be >= N (a ValueError names it).
  task: '' (the text corpus at `path`) or a synthetic task of train/tasks.py,
    with its parameters task_* and needle_depth (documented there).
  """

  path: str = ""
  val_percent: int = 5
  seq_len: int = 128
  batch_size: int = 16
  tokenizer: str = "bytes"
  task: str = ""
  task_seed: int = 0
  task_train_examples: int = 20000
  task_val_examples: int = 512
  task_digits: int = 3
  task_scratchpad: bool = False
  task_pairs: int = 8
  needle_depth: float = 0.5
  task_distractors: int = 0
  task_shots: int = 4
  task_json_fields: int = 3

  def __post_init__(self):
    _ints("data", self, ("val_percent", "seq_len", "batch_size", "task_seed"))
    _check("data", self, positive=("seq_len", "batch_size"), non_negative=("task_seed",))
    if not 0 <= self.val_percent < 100:
      raise ValueError(f"data.val_percent: must be in [0, 100) (got {self.val_percent})")
    tokenizer.vocab_size_of(self.tokenizer)  # ValueError naming data.tokenizer
    tasks.check(self)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Steps, seed, cadence, and how a step runs on the accelerator.

  remat: 'none' | 'block' | 'full', rematerialisation of the training model
    (model/impl.py; Chen et al. 2016 arXiv 1604.06174): less activation
    memory for about one more forward pass. Evaluation and decoding use 'none'.
  grad_accum_steps: N microbatches of data.batch_size / N rows per optimizer
    update, scanned inside the jitted step (train/step.py), so the update is
    that of the whole batch with 1/N of its activation memory.
  """

  steps: int = 500
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  remat: str = "none"
  grad_accum_steps: int = 1

  def __post_init__(self):
    _ints("train", self, ("steps", "seed", "log_every", "eval_every", "eval_batches",
                          "grad_accum_steps"))
    _check("train", self, positive=("steps", "log_every", "eval_every", "eval_batches",
                                    "grad_accum_steps"),
           non_negative=("seed",))
    if self.remat not in REMAT_IMPLS:
      raise ValueError(f"train.remat: must be one of {REMAT_IMPLS} (got {self.remat!r})")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  end_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0

  def __post_init__(self):
    _ints("optimizer", self, ("warmup_steps",))
    _check("optimizer", self, positive=("learning_rate",),
           non_negative=("warmup_steps", "weight_decay", "grad_clip_norm"),
           unit=("end_lr_ratio",))
    for f in ("b1", "b2"):
      if not 0 <= getattr(self, f) < 1:
        raise ValueError(f"optimizer.{f}: must be in [0, 1) (got {getattr(self, f)!r})")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 100
  keep: int = 3

  def __post_init__(self):
    _ints("checkpoint", self, ("every", "keep"))
    _check("checkpoint", self, positive=("every", "keep"))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; their product must equal the device count.

  data = -1 (the default) takes every device the expert axis leaves: the
  device count / expert (train/mesh.py `make_mesh`).
  """

  data: int = -1
  expert: int = 1

  def __post_init__(self):
    _ints("mesh", self, ("data", "expert"))
    _check("mesh", self, positive=("expert",))
    if self.data != -1 and self.data < 1:
      raise ValueError(f"mesh.data: must be > 0, or -1 for every device (got {self.data})")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  optimizer: OptimizerConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig

  @classmethod
  def from_config(cls, config) -> "RunConfig":
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                "optimizer": OptimizerConfig, "checkpoint": CheckpointConfig,
                "mesh": MeshConfig}
    unknown = sorted(set(d) - set(sections))
    if unknown:
      raise ValueError(f"config: unknown section(s) {unknown}; known: {sorted(sections)}")
    run = cls(**{k: from_mapping(c, k, d.get(k) or {}) for k, c in sections.items()})
    if run.data.seq_len > run.model.max_seq_len:
      raise ValueError(f"data.seq_len: exceeds model.max_seq_len={run.model.max_seq_len} "
                       f"(got {run.data.seq_len})")
    needed = tokenizer.vocab_size_of(run.data.tokenizer)
    if run.model.vocab_size < needed:
      raise ValueError(f"model.vocab_size: data.tokenizer={run.data.tokenizer!r} needs >= "
                       f"{needed} (got {run.model.vocab_size})")
    if run.data.task and run.data.tokenizer == "bytes":  # (a BPE's rows: checked at load)
      prompt, answer = tasks.max_example_chars(run.data)
      if prompt + answer + 1 > run.data.seq_len:
        raise ValueError(f"data.seq_len: data.task={run.data.task!r} examples need up to "
                         f"{prompt + answer + 1} tokens (got {run.data.seq_len})")
    if run.data.batch_size % run.train.grad_accum_steps:
      raise ValueError(f"train.grad_accum_steps: must divide data.batch_size="
                       f"{run.data.batch_size} (got {run.train.grad_accum_steps})")
    if run.optimizer.warmup_steps >= run.train.steps:
      raise ValueError(f"optimizer.warmup_steps: must be < train.steps={run.train.steps} "
                       f"(got {run.optimizer.warmup_steps})")
    if run.model.num_experts and run.model.num_experts % run.mesh.expert:
      raise ValueError(f"mesh.expert: must divide model.num_experts={run.model.num_experts} "
                       f"(got {run.mesh.expert})")
    return run

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)
