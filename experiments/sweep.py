"""Grid sweeps of experiments.train: every combination, resumable, one table.

  python -m experiments.sweep --config=configs/moe_tiny.py \
      --sweep='model.moe_top_k=1,2 model.router_noise=none,shazeer model.aux_switch_coef=0,0.01' \
      --seeds=2 --workdir=runs/sweep1 [--parallel=2] [--config.train.steps=200 ...]

* `--sweep`: space-separated `section.field=v1,v2,...`; the runs are the
  cartesian product (first field slowest), each for `--seeds` seeds
  (train.seed = the config's seed + 0, 1, ...). Linked fields vary together:
  `model.aux_importance_coef&model.aux_load_coef=0&0,0.1&0.1` is two runs,
  not four. Values hold no `,` or `&`. Ordinary `--config.a.b=v`
  overrides apply to every run; a field may not be both swept and overridden.
* Each run trains in `<workdir>/<name>`, named by its overrides, e.g.
  `moe_top_k=1,router_noise=none,aux_switch_coef=0,seed=0` (the field name
  alone unless two swept fields share it; characters other than letters,
  digits and `._:+-` become `_`).
* Resumable: a run whose `sweep_done.json` records the same resolved config
  is finished and skipped; any other run is (re)started and the trainer
  resumes it from its checkpoints.
* A failed run does not stop the others: an invalid combination fails
  before any process starts (the config's own ValueError, e.g.
  aux_load_coef without router_noise='shazeer'), a run that exits non-zero
  with the last `FATAL` line (or last line) of its `sweep.log`.
* Writes `<workdir>/sweep.csv` and `<workdir>/sweep.md` (FINAL_METRICS of
  every run) and prints the markdown table.

Parallel runs (`--parallel=P`) are separate `python -m experiments.train`
processes. With C usable cores each gets max(1, C // P) of them, c: its
affinity is set to those cores (`taskset -c`, else os.sched_setaffinity),
and its environment gets XLA_FLAGS `--xla_cpu_multi_thread_eigen=<c > 1>
intra_op_parallelism_threads=c` (added to any XLA_FLAGS already set; once
per sweep a probe checks that this jaxlib accepts them and leaves them out
if not) and OMP_NUM_THREADS = MKL_NUM_THREADS = OPENBLAS_NUM_THREADS =
RAYON_NUM_THREADS = c (RAYON: the `tokenizers` BPE).
"""

import csv
import dataclasses
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time

DONE_FILE = "sweep_done.json"
LOG_FILE = "sweep.log"
# (column, what it is): the final metrics of a run (`final_metrics`).
FINAL_METRICS = (
    ("val_bpb", "eval bits/byte at the last eval"),
    ("val_loss", "eval loss (nats/token) at the last eval"),
    ("exact_match", "task exact match at the last eval (tasks only)"),
    ("load_cv", "CV of the expert load f_i, mean over MoE layers"),
    ("max_mean", "max/mean expert load, mean over MoE layers"),
    ("dropped", "fraction of assignments dropped (capacity)"),
    ("entropy", "router entropy (nats), mean over MoE layers"),
    ("tok_s", "training tokens/s, mean over logged windows"),
)
TAIL_FRACTION = 0.1  # routing metrics: mean over the train rows of the last 10% of steps


@dataclasses.dataclass
class Run:
  name: str
  overrides: tuple  # ((section.field, value string), ...), the seed last
  workdir: str


def parse_grid(spec: str) -> list[tuple[str, list[str]]]:
  """'model.a=1,2 data.b=x' -> [('model.a', ['1', '2']), ('data.b', ['x'])].

  Linked fields vary together: 'model.a&model.b=0&0,1&2' is the two runs
  (a=0, b=0) and (a=1, b=2).
  """
  from configs import base  # noqa: PLC0415
  grid = []
  for item in spec.split():
    key, sep, values = item.partition("=")
    keys = key.split("&")
    if not sep or not values or any(not re.fullmatch(r"[^.=]+\.[^.=]+", k) for k in keys):
      raise ValueError(f"--sweep: expected section.field=v1,v2,... (got {item!r})")
    for k in keys:
      if k.split(".")[0] not in base.SECTIONS:
        raise ValueError(f"--sweep: unknown config section {k.split('.')[0]!r} in {item!r}; "
                         f"known: {', '.join(base.SECTIONS)}")
      if k in grid_fields(grid) or keys.count(k) > 1:
        raise ValueError(f"--sweep: {k} is swept twice")
    vals = values.split(",")
    if any(not v or len(v.split("&")) != len(keys) or "" in v.split("&") for v in vals):
      raise ValueError(f"--sweep: empty value, or not one value per linked field, in {item!r}")
    grid.append((key, vals))
  return grid


def grid_fields(grid) -> list[str]:
  return [k for key, _ in grid for k in key.split("&")]


def _short_names(keys: list[str]) -> dict[str, str]:
  fields = [k.split(".", 1)[1] for k in keys]
  return {k: (f if fields.count(f) == 1 else k) for k, f in zip(keys, fields)}


def run_name(overrides, short: dict[str, str]) -> str:
  return ",".join(f"{short.get(k, k.split('.', 1)[1])}={re.sub(r'[^A-Za-z0-9._:+-]', '_', v)}"
                  for k, v in overrides)


def expand(grid, seeds: int, base_seed: int, root: str) -> list[Run]:
  """The runs of `grid` x seeds, in order (first grid field slowest, seed fastest)."""
  if seeds < 1:
    raise ValueError(f"--seeds: must be >= 1 (got {seeds})")
  fields = grid_fields(grid)
  if seeds > 1 and "train.seed" in fields:
    raise ValueError("--seeds: train.seed is swept; use --seeds=1")
  short = _short_names(fields + ["train.seed"])
  runs = []
  for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in grid]):
    combo = [kv for key, v in combo for kv in zip(key.split("&"), v.split("&"))]
    for s in range(seeds):
      ov = tuple(combo) + ((("train.seed", str(base_seed + s)),)
                           if "train.seed" not in fields else ())
      name = run_name(ov, short)
      runs.append(Run(name, ov, os.path.join(root, name)))
  names = [r.name for r in runs]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"--sweep: runs share a name after sanitizing: {dup}")
  return runs


def resolve(config_dict: dict, overrides) -> dict:
  """The run config (train.config.RunConfig.to_dict()) of a config + overrides;
  ValueError (naming the field) for an invalid combination."""
  from train.config import RunConfig  # noqa: PLC0415
  d = json.loads(json.dumps(config_dict))
  for key, value in overrides:
    section, field = key.split(".", 1)
    d.setdefault(section, {})[field] = value
  return RunConfig.from_config(d).to_dict()


def is_done(run: Run, resolved: dict) -> bool:
  path = os.path.join(run.workdir, DONE_FILE)
  try:
    with open(path) as f:
      return json.load(f).get("config") == resolved
  except (OSError, ValueError):
    return False


def final_metrics(workdir: str, steps: int) -> dict:
  """FINAL_METRICS of a run from its metrics.jsonl (absent ones are left out)."""
  from train import metrics as metrics_lib  # noqa: PLC0415
  rows = metrics_lib.read(workdir)
  train = sorted({r["step"]: r for r in rows if r["split"] == "train"}.items())
  evals = sorted({r["step"]: r for r in rows if r["split"] == "eval"}.items())
  out = {}
  if evals:
    ev = evals[-1][1]
    out.update(val_bpb=ev.get("bits_per_byte"), val_loss=ev.get("loss"))
    if "exact_match" in ev:
      out["exact_match"] = ev["exact_match"]
  if train:
    tail = [r for s, r in train if s > (1 - TAIL_FRACTION) * steps] or [train[-1][1]]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    for col, key in (("load_cv", "load_cv"), ("max_mean", "max_over_mean_load"),
                     ("entropy", "router_entropy")):
      per_row = [mean([v for k, v in r.items() if re.fullmatch(rf"moe\d+/{key}", k)])
                 for r in tail]
      if per_row and per_row[0] is not None:
        out[col] = mean(per_row)
    if "dropped_frac" in tail[0]:
      out["dropped"] = mean([r["dropped_frac"] for r in tail])
    rates = [r["tokens_per_s"] for _, r in train if "tokens_per_s" in r]
    if rates:
      out["tok_s"] = mean(rates)
  return {k: v for k, v in out.items() if v is not None}


def cpu_slots(parallel: int) -> list[list[int] | None]:
  """The cores of each of `parallel` slots (None: the OS cannot pin processes)."""
  if not hasattr(os, "sched_getaffinity"):
    return [None] * parallel
  cores = sorted(os.sched_getaffinity(0))
  per = max(1, len(cores) // parallel)
  return [[cores[(i * per + j) % len(cores)] for j in range(per)] for i in range(parallel)]


def xla_thread_flags(cores: int) -> str:
  return (f"--xla_cpu_multi_thread_eigen={'true' if cores > 1 else 'false'} "
          f"intra_op_parallelism_threads={cores}")


def probe_xla_flags(flags: str) -> bool:
  """Whether this jaxlib starts with `flags` in XLA_FLAGS (unknown flags abort it)."""
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", "import jax.numpy as j; j.ones(1).block_until_ready()"],
                       env=env, capture_output=True, timeout=300)
  return out.returncode == 0


def child_env(cores: int, xla_ok: bool) -> dict:
  env = dict(os.environ)
  if xla_ok:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_thread_flags(cores)}".strip()
  for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
    env[k] = str(cores)
  return env


def subprocess_runner(cmd, env, log_path, cpus):
  """Starts one run: a Popen writing to log_path, pinned to `cpus` (through
  `taskset`, which pins before the program starts; without it, right after
  the start, before the child's thread pools exist)."""
  log = open(log_path, "a")
  taskset = shutil.which("taskset") if cpus else None
  if taskset:
    cmd = [taskset, "-c", ",".join(map(str, cpus)), *cmd]
  log.write(f"\n$ {' '.join(cmd)}\n")
  log.flush()
  proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
  if cpus and not taskset:
    os.sched_setaffinity(proc.pid, cpus)
  proc.log = log
  return proc


def error_line(log_path: str) -> str:
  try:
    with open(log_path, errors="replace") as f:
      lines = [line.strip() for line in f.read().splitlines()[-400:] if line.strip()]
  except OSError:
    return "no log"
  fatal = [line for line in lines if line.startswith("FATAL")]
  return (fatal or lines or ["no output"])[-1][:500]


def run_sweep(config_file: str, config_dict: dict, grid, seeds: int, root: str,
              overrides=(), parallel: int = 1, runner=subprocess_runner,
              log=print) -> list[dict]:
  """Runs (or skips) every run of the grid; returns one result dict per run
  ({'run', 'status': done | skipped | failed, 'error', FINAL_METRICS...}, plus
  'workdir' and 'overrides') in grid order, and writes the tables.

  config_dict: the config file's config with `overrides` applied (for
  validation); overrides: the `--config.a.b=v` flags given to every run.
  """
  if parallel < 1:
    raise ValueError(f"--parallel: must be >= 1 (got {parallel})")
  given = {a.split("=", 1)[0].removeprefix("--config.") for a in overrides}
  both = sorted(given & set(grid_fields(grid)))
  if both:
    raise ValueError(f"--sweep: {both} also given as --config overrides")
  base_seed = int(config_dict.get("train", {}).get("seed", 0) or 0)
  runs = expand(grid, seeds, base_seed, root)
  os.makedirs(root, exist_ok=True)
  results, todo = {}, []
  for run in runs:
    res = {"run": run.name, "workdir": run.workdir, "overrides": dict(run.overrides)}
    try:
      resolved = resolve(config_dict, run.overrides)
    except ValueError as e:
      results[run.name] = {**res, "status": "failed", "error": f"invalid config: {e}"}
      log(f"[sweep] {run.name}: invalid config: {e}")
      continue
    if is_done(run, resolved):
      results[run.name] = {**res, "status": "skipped",
                           **final_metrics(run.workdir, resolved["train"]["steps"])}
      log(f"[sweep] {run.name}: finished earlier, skipped")
      continue
    todo.append((run, resolved, res))
  slots = cpu_slots(min(parallel, max(1, len(todo))))
  xla_ok = bool(todo) and runner is subprocess_runner and probe_xla_flags(xla_thread_flags(1))
  free, active = list(range(len(slots))), []
  queue = list(todo)
  while queue or active:
    while queue and free:
      run, resolved, res = queue.pop(0)
      slot = free.pop(0)
      os.makedirs(run.workdir, exist_ok=True)
      cmd = [sys.executable, "-m", "experiments.train", f"--config={config_file}",
             f"--workdir={run.workdir}", *overrides,
             *[f"--config.{k}={v}" for k, v in run.overrides]]
      cores = len(slots[slot]) if slots[slot] else (os.cpu_count() or 1)
      log(f"[sweep] start {run.name} on cores {slots[slot] or 'all'}")
      proc = runner(cmd, child_env(cores, xla_ok), os.path.join(run.workdir, LOG_FILE),
                    slots[slot])
      active.append((proc, slot, run, resolved, res, time.time()))
    time.sleep(0.05 if active else 0)
    for item in list(active):
      proc, slot, run, resolved, res, t0 = item
      code = proc.poll()
      if code is None:
        continue
      active.remove(item)
      free.append(slot)
      if getattr(proc, "log", None):
        proc.log.close()
      wall = time.time() - t0
      if code == 0:
        with open(os.path.join(run.workdir, DONE_FILE), "w") as f:
          json.dump({"config": resolved, "overrides": dict(run.overrides), "wall_s": wall}, f)
        results[run.name] = {**res, "status": "done", "wall_s": wall,
                             **final_metrics(run.workdir, resolved["train"]["steps"])}
        log(f"[sweep] done {run.name} in {wall:.0f} s")
      else:
        err = error_line(os.path.join(run.workdir, LOG_FILE))
        results[run.name] = {**res, "status": "failed", "error": f"exit {code}: {err}"}
        log(f"[sweep] FAILED {run.name} (exit {code}): {err}")
  ordered = [results[r.name] for r in runs]
  write_tables(ordered, root)
  return ordered


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
  return "" if v is None else str(v)


def table_columns(results) -> list[str]:
  cols = ["run", "status"] + [c for c, _ in FINAL_METRICS
                              if any(c in r for r in results)]
  return cols + ["error"]


def markdown(results) -> str:
  cols = table_columns(results)
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for r in results:
    cells = [_fmt(r.get(c)).replace("|", "\\|") for c in cols]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_tables(results, root: str) -> None:
  cols = table_columns(results)
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
  w.writeheader()
  w.writerows(results)
  with open(os.path.join(root, "sweep.csv"), "w") as f:
    f.write(buf.getvalue())
  with open(os.path.join(root, "sweep.md"), "w") as f:
    f.write(markdown(results))


def main(argv):
  del argv
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415
  f = flags.FLAGS
  overrides = [a for a in sys.argv[1:] if re.match(r"--?config\.", a)]
  overrides = ["--" + a.lstrip("-") for a in overrides]
  try:
    grid = parse_grid(f.sweep)
    results = run_sweep(config_flags.get_config_filename(f["config"]), f.config.to_dict(),
                        grid, f.seeds, f.workdir, overrides, f.parallel)
  except ValueError as e:
    sys.exit(f"FATAL {e}")
  print(markdown(results), end="")
  failed = [r["run"] for r in results if r["status"] == "failed"]
  print(f"{len(results)} runs, {len(failed)} failed; tables in "
        f"{os.path.join(f.workdir, 'sweep.md')} and sweep.csv")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", "configs/moe_tiny.py", "Path to a configs/*.py file.",
                                  lock_config=False, accept_new_attributes=True)
  flags.DEFINE_string("sweep", "", "Space-separated section.field=v1,v2,... (cartesian product).")
  flags.DEFINE_integer("seeds", 1, "Seeds per grid point (train.seed = config seed + i).")
  flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory per run, tables.")
  flags.DEFINE_integer("parallel", 1, "Runs at a time, each pinned to its share of the cores.")
  flags.mark_flag_as_required("workdir")

  def parse_flags(argv):
    from configs import base  # noqa: PLC0415
    for arg in argv[1:]:
      m = re.match(r"--?config\.([^.=]+)", arg)
      if m and m.group(1) not in base.SECTIONS:
        sys.exit(f"FATAL --config.{m.group(1)}: unknown config section {m.group(1)!r}; "
                 f"known: {', '.join(base.SECTIONS)}")
    return flags.FLAGS(argv)

  app.run(main, flags_parser=parse_flags)
