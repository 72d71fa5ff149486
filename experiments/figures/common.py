"""What every figure script shares: its output directory, tiny run settings sized
for a 2-core CPU, its sweep (experiments/sweep.py), metric reading and the verdict.

A figure `python -m experiments.figures.NAME [--out=DIR] [--parallel=2] [--steps=N]`
writes into DIR (default runs/figures/NAME/): NAME.png, NAME.csv (the numbers
behind the picture), verdict.txt (one line: the criterion, the measured
value, whether it held, and the wall time) and verdict.json, and keeps every
run's workdir (metrics.jsonl, config.json, final checkpoint) under DIR/runs/
with the sweep's own sweep.csv / sweep.md. Rerunning skips finished runs.
"""

import csv
import importlib.util
import json
import os
import statistics
import time

from absl import app, flags

from experiments import sweep as sweep_lib

_OUT = flags.DEFINE_string("out", None, "Output directory (default runs/figures/<name>).")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Training runs at a time (experiments/sweep.py).")
_STEPS = flags.DEFINE_integer("steps", None, "Override the figure's training steps "
                              "(a quick smoke run; the verdict then says so).")

# Tiny settings shared by the figures: d_model 64, 2 layers, seq_len 64.
TINY = {
    "model.d_model": 64, "model.num_layers": 2, "model.num_heads": 4, "model.num_kv_heads": 4,
    "model.ffn_dim": 256, "model.max_seq_len": 128,
    "data.seq_len": 64, "data.batch_size": 16,
    "train.log_every": 10, "train.eval_every": 50, "train.eval_batches": 8,
    "optimizer.learning_rate": 3e-3,
    "checkpoint.keep": 1,
}


def settings(steps: int, **changes) -> dict:
  """TINY + `steps` training steps (warm-up 10%, a checkpoint at the end only) + changes;
  keys are 'section.field' with '.' written as '__' in `changes`."""
  steps = _STEPS.value or steps
  out = dict(TINY)
  out.update({"train.steps": steps, "optimizer.warmup_steps": max(1, steps // 10),
              "checkpoint.every": steps})
  out.update({k.replace("__", "."): v for k, v in changes.items()})
  return out


def flags_of(values: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in values.items()]


def load_config(config_file: str, values: dict) -> dict:
  """The config file's config as a dict, with `values` ('section.field': v) set."""
  spec = importlib.util.spec_from_file_location("figure_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  d = module.get_config().to_dict()
  for key, v in values.items():
    section, field = key.split(".", 1)
    d.setdefault(section, {})[field] = v
  return d


def run_grid(out: str, config_file: str, grid: str, values: dict, seeds: int = 1) -> list[dict]:
  """Runs `grid` (experiments/sweep.py syntax) with `values` for every run, in out/runs."""
  results = sweep_lib.run_sweep(config_file, load_config(config_file, values),
                                sweep_lib.parse_grid(grid), seeds, os.path.join(out, "runs"),
                                flags_of(values), parallel=_PARALLEL.value)
  print(sweep_lib.markdown(results), end="")
  failed = [r for r in results if r["status"] == "failed"]
  if failed:
    raise RuntimeError(f"{len(failed)} run(s) failed: " +
                       "; ".join(f"{r['run']}: {r['error']}" for r in failed))
  return results


def rows(workdir: str) -> tuple[list[dict], list[dict]]:
  """(train rows, eval rows) of a run, one per step (the last write wins)."""
  from train import metrics as metrics_lib  # noqa: PLC0415
  all_rows = metrics_lib.read(workdir)
  pick = lambda split: [r for _, r in sorted({r["step"]: r for r in all_rows
                                              if r["split"] == split}.items())]
  return pick("train"), pick("eval")


def layer_mean(row: dict, key: str) -> float:
  """Mean over MoE layers of `moe{i}/key` in a metrics row."""
  vals = [v for k, v in row.items() if k.startswith("moe") and k.endswith("/" + key)]
  return sum(vals) / len(vals)


def tail_mean(train_rows: list[dict], key: str, after: float = 0.9) -> float:
  """Mean of layer_mean(key) (or of the scalar `key`) over rows past `after` of the run."""
  last = train_rows[-1]["step"]
  tail = [r for r in train_rows if r["step"] > after * last] or train_rows[-1:]
  get = (lambda r: r[key]) if key in tail[0] else (lambda r: layer_mean(r, key))
  return sum(map(get, tail)) / len(tail)


def mean_spread(values: list[float]) -> tuple[float, float]:
  """(mean, max - min) over seeds."""
  return statistics.fmean(values), (max(values) - min(values)) if values else 0.0


def write_csv(path: str, records: list[dict]) -> None:
  cols = list(dict.fromkeys(k for r in records for k in r))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols)
    w.writeheader()
    w.writerows(records)


def verdict(out: str, name: str, criterion: str, measured: str, held: bool,
            seconds: float, notes: str = "") -> str:
  smoke = f" [smoke run: --steps={_STEPS.value}]" if _STEPS.value else ""
  line = (f"{name}: {criterion} | measured: {measured} | "
          f"{'HELD' if held else 'DID NOT HOLD'} | {seconds:.0f} s on this machine{smoke}")
  with open(os.path.join(out, "verdict.txt"), "w") as f:
    f.write(line + "\n" + (notes + "\n" if notes else ""))
  with open(os.path.join(out, "verdict.json"), "w") as f:
    json.dump({"figure": name, "criterion": criterion, "measured": measured, "held": held,
               "seconds": seconds, "notes": notes, "steps_override": _STEPS.value}, f, indent=2)
  return line


def main(name: str, make):
  """Runs `make(out) -> (criterion, measured, held[, notes])` as an absl app."""
  def _main(argv):
    del argv
    out = _OUT.value or os.path.join("runs", "figures", name)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    criterion, measured, held, *notes = make(out)
    print(verdict(out, name, criterion, measured, held, time.time() - t0, *notes))
  app.run(_main)
