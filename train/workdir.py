"""The run config stored in a workdir (`workdir/config.json`) and the check
that a run continuing in that workdir is the same model.

`check_config(workdir, run)` runs before anything is compiled or written. If
the workdir already holds checkpoints, any difference in an ARCHITECTURE
field is refused with a ValueError naming every such field with its stored
and new value: those weights (or the function they were trained for) would
silently become something else, and `config.json`, which `generate --workdir`
reads, would describe a model the checkpoints are not. Every other field
(schedule, optimizer, cadences, data, mesh, seed) may change; the changes are
returned for the trainer to print.

Architecture = every `model` field except those that only choose how the same
function is computed or bound:
  model.dtype            activation precision (parameters stay float32)
  model.moe_ep_exchange  the all-to-all implementation of expert parallelism
  model.moe_kernel_threads  threads of the CPU expert kernel (where ModelConfig has it)
  model.max_seq_len      a bound on sequence length; no parameter depends on it
  model.aux_*_coef, model.router_bias_update_rate, model.router_jitter_eps,
  model.router_noise_std, model.router_init_scale
                         the training objective and its noise (an ablation may
                         continue a run with other weights), and an init scale
                         a restored run never uses
plus `data.val_percent`: changing it would move validation files into the
training set, so eval would no longer be held out; and `data.tokenizer`:
the checkpoints' embedding rows mean the ids of the workdir's tokenizer.

`config.json` is written atomically (temporary file + rename), so a run killed
while writing it leaves the previous one.
"""

import dataclasses
import json
import os

from train.config import RunConfig

HARMLESS_MODEL_FIELDS = ("dtype", "moe_ep_exchange", "moe_kernel_threads", "max_seq_len",
                         "aux_switch_coef", "aux_importance_coef", "aux_load_coef",
                         "aux_z_coef", "aux_seq_coef", "router_bias_update_rate",
                         "router_jitter_eps", "router_noise_std", "router_init_scale")
REFUSED_OTHER_FIELDS = ("data.val_percent", "data.tokenizer")


class WorkdirConfigError(ValueError):
  """The run's config cannot continue the run stored in the workdir."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def write_config(workdir: str, config_dict: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  path = config_path(workdir)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_config(workdir: str) -> dict:
  with open(config_path(workdir)) as f:
    return json.load(f)


def has_checkpoints(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _flat(run: RunConfig) -> dict:
  return {f"{section}.{k}": v for section, fields in dataclasses.asdict(run).items()
          for k, v in fields.items()}


def is_architecture(name: str) -> bool:
  section, field = name.split(".", 1)
  if section == "model":
    return field not in HARMLESS_MODEL_FIELDS
  return name in REFUSED_OTHER_FIELDS


def check_config(workdir: str, run: RunConfig) -> list[str]:
  """Compares `run` with the workdir's stored config; returns notes on the
  accepted changes, raises WorkdirConfigError on an architecture change.

  Nothing to compare (no config.json, or no checkpoint to continue) gives [].
  """
  if not (os.path.exists(config_path(workdir)) and has_checkpoints(workdir)):
    return []
  try:
    stored = RunConfig.from_config(read_config(workdir))
  except (OSError, ValueError) as e:
    raise WorkdirConfigError(f"{config_path(workdir)}: cannot read the stored run config "
                             f"({e}); it describes the checkpoints in this workdir") from None
  old, new = _flat(stored), _flat(run)
  changed = [k for k in new if old[k] != new[k]]
  refused = [k for k in changed if is_architecture(k)]
  if refused:
    diffs = ", ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in refused)
    raise WorkdirConfigError(
        f"{workdir} holds checkpoints of a different model; refusing to change {diffs}. "
        f"Use a new --workdir (or set these back); nothing was written.")
  notes = []
  for k in changed:
    note = f"{k}: {old[k]!r} -> {new[k]!r}"
    if k in ("train.steps", "optimizer.warmup_steps", "optimizer.end_lr_ratio",
             "optimizer.learning_rate"):
      note += (" (the warmup + cosine learning-rate schedule is recomputed for it: the "
               "remaining steps follow a different schedule than an uninterrupted run's)")
    elif k.startswith("data.") or k == "train.seed":
      note += " (the batches from here on differ from an uninterrupted run's)"
    notes.append(note)
  return notes
