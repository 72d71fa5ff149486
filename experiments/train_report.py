"""Throughput of finished training runs, from their metrics.jsonl: one row per workdir.

  python -m experiments.train_report --json=OUT.json WORKDIR [WORKDIR ...]

Per run: the median over its timed train rows (each a log window after the
compiling first step, train/trainer.py) of steps/s, tokens/s, FLOP/s and MFU
(MFU only on the chips of train/flops.py's table), the FLOPs per token, the
final train loss, and the config's remat / dtype / dispatch. Prints one line
per run and writes the rows as JSON. experiments/gpu_check.sh reports its
training sections with it.
"""

import json
import os
import statistics
import sys

from train import metrics

RATES = ("steps_per_s", "tokens_per_s", "flops_per_s", "mfu")


def summarize(workdir: str) -> dict:
  """{'workdir', 'steps', median RATES, 'flops_per_token', 'loss', settings} of one run."""
  rows = [r for r in metrics.read(workdir) if r["split"] == "train"]
  timed = [r for r in rows if "tokens_per_s" in r]
  out = {"workdir": workdir, "steps": rows[-1]["step"] if rows else 0,
         "timed_rows": len(timed), "loss": rows[-1]["loss"] if rows else None,
         "flops_per_token": rows[-1].get("flops_per_token") if rows else None}
  for k in RATES:
    values = [r[k] for r in timed if k in r]
    out[k] = statistics.median(values) if values else None
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)
    out.update(remat=config["train"].get("remat"), dtype=config["model"]["dtype"],
               dispatch=config["model"]["moe_dispatch"] if config["model"]["num_experts"]
               else "dense", batch=config["data"]["batch_size"],
               seq_len=config["data"]["seq_len"])
  return out


def line(row: dict) -> str:
  def fmt(k, spec):
    return format(row[k], spec) if row.get(k) is not None else "-"
  return (f"{os.path.basename(row['workdir'].rstrip('/')):<24} steps {row['steps']:>4}  "
          f"steps/s {fmt('steps_per_s', '.3g'):>6}  tokens/s {fmt('tokens_per_s', ',.0f'):>9}  "
          f"FLOP/s {fmt('flops_per_s', '.3g'):>8}  MFU {fmt('mfu', '.1%'):>6}  "
          f"loss {fmt('loss', '.3f')}  remat={row.get('remat')} {row.get('dtype')} "
          f"{row.get('dispatch')}")


def main(argv: list[str]) -> int:
  out_json = None
  workdirs = []
  for a in argv:
    if a.startswith("--json="):
      out_json = a.split("=", 1)[1]
    else:
      workdirs.append(a)
  if not workdirs:
    print(__doc__, file=sys.stderr)
    return 2
  rows = [summarize(w) for w in workdirs]
  for r in rows:
    print(line(r))
  if out_json:
    with open(out_json, "w") as f:
      json.dump(rows, f, indent=2)
  return 0 if all(r["timed_rows"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
