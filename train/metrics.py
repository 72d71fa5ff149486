"""Metric sinks: one JSON object per line in `workdir/metrics.jsonl` and
TensorBoard event files in `workdir/tb/` (tensorboardX writer).

Scalars go to both; per-expert vectors (lists) go to JSONL only, where the
plots (experiments/plots.py) read them back. In a multi-process run only
process 0 writes (`enabled=False` elsewhere): every process computes the same
replicated metrics, and N writers would append every row N times.
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

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tb"))

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


def read(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
