"""Metric sinks: one JSON object per line in `workdir/metrics.jsonl` and
TensorBoard event files in `workdir/tb/` (tensorboardX writer).

Scalars go to both; per-expert vectors (lists) go to JSONL only, where the
plots (experiments/plots.py) read them back. In a multi-process run only
process 0 writes (`enabled=False` elsewhere): every process computes the same
replicated metrics, and N writers would append every row N times.

A resumed run retrains the steps after its checkpoint, so `MetricWriter(...,
resume_step=s)` first drops the rows of steps > s from metrics.jsonl (an
atomic rewrite) and tells TensorBoard to purge its events from step s + 1 on
(the old event files keep them on disk; TensorBoard hides them).
"""

import json
import os

import numpy as np
from tensorboardX import SummaryWriter


def _py(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricWriter:
  """write(step, split, {name: scalar or array}) -> JSONL + TensorBoard.

  enabled=False: a writer that writes nothing (processes other than 0).
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    tb_dir = os.path.join(workdir, "tb")
    purge = None
    if resume_step is not None:
      truncate(workdir, resume_step)
      if os.path.isdir(tb_dir) and os.listdir(tb_dir):
        purge = resume_step + 1
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(tb_dir, purge_step=purge)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": split}
    for k, v in metrics.items():
      row[k] = _py(v)
      if np.ndim(v) == 0:
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._jsonl.close()
    self._tb.close()


def truncate(workdir: str, last_step: int) -> int:
  """Keeps only the rows of steps <= last_step in metrics.jsonl (and drops a
  torn last line); returns how many rows were dropped. Temporary file +
  os.replace, so a crash leaves either the old file or the new one.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line cut off by a kill mid-write
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
      kept.append(line)
  dropped = sum(1 for line in lines if line.strip()) - len(kept)
  if dropped:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
      f.write("".join(line + "\n" for line in kept))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return dropped


def read(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
