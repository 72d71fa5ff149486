"""Train a moelab model from a config file.

  python -m experiments.train --config=configs/moe_tiny.py --workdir=/tmp/moelab/moe_tiny \
      [--config.model.num_experts=16 ...]

Trains (resuming from `workdir` if it holds checkpoints), evaluates,
checkpoints, and finally writes loss_curves.png and expert_load.png into the
workdir. See configs/base.py for every field.

SIGINT (Ctrl-C) or SIGTERM: the run finishes its step, saves a checkpoint
there and exits 130 / 143 (128 + the signal), printing how to resume; a
second Ctrl-C aborts without saving. Exit 1 with one `FATAL` line: an
invalid config (naming the field), an architecture change in a workdir that
holds checkpoints (naming the fields; nothing is written), no intact
checkpoint to resume from (naming the steps and files), or a diverged loss
(the newest checkpoint is the last good state).

jax and the training modules are imported only once the config is valid, so
a bad flag fails in well under a second.
"""

import json
import logging as py_logging
import re
import shlex
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from configs import base
from experiments import compilation_cache
from train import workdir as workdir_lib
from train.config import RunConfig

# accept_new_attributes: a field the config file leaves at its default can
# still be overridden; train/config.py types and validates every value.
_CONFIG = config_flags.DEFINE_config_file("config", "configs/moe_tiny.py",
                                          "Path to a configs/*.py file.", lock_config=False,
                                          accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")
flags.mark_flag_as_required("workdir")
# Multi-host (README "Multi-host"): one process per host, same command on all.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0; enables jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id, 0..num_processes-1.")


def init_distributed(coordinator: str | None, num_processes: int | None,
                     process_id: int | None) -> bool:
  """jax.distributed.initialize from the flags; must run before any jax computation.

  Without --coordinator_address nothing happens (single process), unless
  --num_processes/--process_id are given alone, which is an error.
  """
  if coordinator is None:
    if num_processes is not None or process_id is not None:
      raise ValueError("--num_processes/--process_id need --coordinator_address")
    return False
  if num_processes is None or process_id is None:
    raise ValueError("--coordinator_address needs --num_processes and --process_id")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id must be in [0, {num_processes}) (got {process_id})")
  import jax  # noqa: PLC0415  (see the module docstring)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  return True


class _QuietLibraries(py_logging.Filter):
  """Drops Orbax's per-save INFO chatter; warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def check_config_sections(argv):
  """Rejects `--config.<section>.x` for a section moelab does not have, naming it
  (before absl parses flags, where it would be a bare KeyError)."""
  for arg in argv[1:]:
    m = re.match(r"--?config\.([^.=]+)", arg)
    if m and m.group(1) not in base.SECTIONS:
      raise app.UsageError(f"--config.{m.group(1)}: unknown config section "
                           f"{m.group(1)!r}; known: {', '.join(base.SECTIONS)}")


def parse_flags(argv):
  try:
    check_config_sections(argv)
  except app.UsageError as e:
    sys.exit(f"FATAL Flags parsing error: {e}")
  return flags.FLAGS(argv)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:  # before anything starts: a bad value fails at once, naming the field
    run = RunConfig.from_config(_CONFIG.value)
  except ValueError as e:
    sys.exit(f"FATAL invalid config: {e}")
  try:
    workdir_lib.check_config(_WORKDIR.value, run)  # the trainer checks (and notes) again
  except workdir_lib.WorkdirConfigError as e:
    sys.exit(f"FATAL WorkdirConfigError: {e}")
  init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  compilation_cache.enable()
  import jax  # noqa: PLC0415  (see the module docstring)

  from experiments import plots  # noqa: PLC0415
  from train import checkpoint, preemption, trainer  # noqa: PLC0415
  try:
    with preemption.handle_signals():
      summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (workdir_lib.WorkdirConfigError, checkpoint.CheckpointError,
          trainer.DivergenceError) as e:
    sys.exit(f"FATAL {type(e).__name__}: {e}")
  summary.pop("state")
  if summary["interrupted"]:
    exit_interrupted(summary)
  if jax.process_index() != 0:
    return
  for path in plots.write_all(_WORKDIR.value):
    logging.info("wrote %s", path)
  print(json.dumps(summary, indent=2))


def exit_interrupted(summary: dict):
  """Says where the interrupted run saved and how to resume; exits 128 + signal."""
  import jax  # noqa: PLC0415

  from train import checkpoint, preemption  # noqa: PLC0415
  signum = signal.Signals[summary["interrupted"]]
  if jax.process_index() == 0:
    where = f"{checkpoint.checkpoint_dir(_WORKDIR.value)}/{summary['checkpoint_step']}"
    resume = shlex.join(["python", "-m", "experiments.train", *sys.argv[1:]])
    print(f"{signum.name}: stopped after step {summary['final_step']}; checkpoint saved in "
          f"{where}. Resume with: {resume}", file=sys.stderr, flush=True)
  sys.exit(preemption.exit_code(signum))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
