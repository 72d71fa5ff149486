"""Orbax checkpointing of the TrainState under `workdir/checkpoints/`, verified.

Every committed step gets a sha256 manifest (train/checkpoint_integrity.py);
a restore checks it, restores, and checks that every value is finite. If the
newest step fails any of these, one warning names the step and the bad file
and the newest intact step is restored instead; if none is intact, one
`CheckpointError` names every step tried and what is wrong with it. A run that
falls back moves the bad newer steps to `workdir/checkpoints.quarantine/`
(kept, not deleted, and out of the way of the steps it saves again).

The run's full config is written beside it as `workdir/config.json`
(train/workdir.py), so a workdir alone is enough to rebuild the model
(`restore_params`).
"""

import os
import shutil
import threading

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from model.transformer import Decoder
from train import checkpoint_integrity as integrity
from train import optimizer
from train import step as step_lib
from train import workdir as workdir_lib
from train.config import RunConfig

QUARANTINE = "checkpoints.quarantine"


class CheckpointError(RuntimeError):
  """No usable checkpoint (every candidate step is corrupt, incomplete or unreadable),
  or a committed step could not be sealed with its manifest."""


class NonFiniteStateError(ValueError):
  """A state with NaN/Inf values was about to be saved (it never is)."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def manager(workdir: str, every: int, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                         create=True)
  with integrity.quiet_missing_metadata():  # reported by the restore's verification
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _first_line(e: BaseException, limit: int = 300) -> str:
  """The gist of an Orbax/TensorStore error: its first line, without the spec dump."""
  text = (str(e).strip().splitlines() or [type(e).__name__])[0]
  text = text.split(" [tensorstore_spec=")[0]
  return text if len(text) <= limit else text[:limit] + "..."


def _restore_verified(mngr: ocp.CheckpointManager, target, step: int | None):
  """(state, step, sealed, problems of the newer steps passed over)."""
  integrity.quiet_abandoned_loops()
  with integrity.quiet_missing_metadata():
    return _restore_steps(mngr, target, step)


def _restore_steps(mngr: ocp.CheckpointManager, target, step: int | None):
  mngr.reload()  # the steps on disk now, not when the manager was made
  directory = str(mngr.directory)
  if step is not None:
    if step not in mngr.all_steps():
      raise CheckpointError(f"no checkpoint step {step} under {directory} "
                            f"(steps: {sorted(mngr.all_steps())})")
    steps = [step]
  else:
    steps = sorted(mngr.all_steps(), reverse=True)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  problems = []
  for s in steps:
    step_dir = os.path.join(directory, str(s))
    problem = integrity.verify(step_dir, s)
    if problem:
      problems.append(problem)
      continue
    try:
      state = mngr.restore(s, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax/TensorStore raise many types; all mean "unreadable"
      problems.append(integrity.Problem(s, "default/", f"Orbax cannot restore it: "
                                                       f"{_first_line(e)}"))
      continue
    leaf = integrity.first_nonfinite(state)
    if leaf:
      problems.append(integrity.Problem(s, f"array {leaf}", "holds NaN or Inf values"))
      continue
    return state, s, integrity.has_manifest(step_dir), problems
  listing = "\n  ".join(str(p) for p in problems)
  raise CheckpointError(f"no intact checkpoint under {directory}; tried:\n  {listing}\n"
                        f"(nothing was changed; move the steps away to start the run over)")


def _report(directory: str, step: int, sealed: bool, problems, moved) -> None:
  """The one warning of a restore that passed over bad steps or took an unsealed one."""
  notes = []
  if problems:
    notes.append(f"restored step {step} of {directory} instead of the newer step(s), "
                 f"which are unusable: " + "; ".join(str(p) for p in problems))
  if moved:
    notes.append(f"moved {', '.join(moved)} out of the way")
  if not sealed:
    notes.append(f"step {step} has no checksum manifest ({integrity.MANIFEST}; saved by an "
                 f"older moelab or before its manifest was written): it restored and is "
                 f"finite, so it is used unverified")
  if notes:
    logging.warning("checkpoint: %s", ". ".join(notes))


def restore(mngr: ocp.CheckpointManager, target, step: int | None = None):
  """Restores into the structure (and shardings) of `target`, a state or its
  `jax.ShapeDtypeStruct`s: the newest intact step (or exactly `step`).

  Raises CheckpointError if no candidate is intact; never returns NaN/Inf.
  """
  state, s, sealed, problems = _restore_verified(mngr, target, step)
  _report(str(mngr.directory), s, sealed, problems, [])
  return state


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


class Checkpoints:
  """The run's CheckpointManager: saves that get sealed with a manifest once
  committed, and a verified restore with fallback.

  Process 0 seals a step (writes its manifest, in a background thread) as soon
  as `poll`, called once per training step, sees Orbax's async save of it
  finished, and at the latest in `wait` (the next save and `close` call it).
  A kill before that leaves the step unsealed, which a restore accepts only
  after it restored finite values.
  """

  def __init__(self, workdir: str, every: int, keep: int):
    self.workdir = workdir
    self.mngr = manager(workdir, every, keep)
    self._unsealed: list[int] = []
    self._sealer: threading.Thread | None = None
    self._sealer_error: BaseException | None = None

  @property
  def directory(self) -> str:
    return str(self.mngr.directory)

  def latest_step(self) -> int | None:
    return self.mngr.latest_step()

  def will_save(self, step: int, force: bool = False) -> bool:
    return force or self.mngr.should_save(step)

  def save(self, step: int, state, force: bool = False) -> bool:
    """Starts an async save of `state` at `step` if the cadence (or force) says so.

    Raises NonFiniteStateError instead of saving a state with NaN/Inf values,
    so the newest checkpoint is always one a run can continue from.
    """
    if not self.will_save(step, force):
      return False
    leaf = integrity.first_nonfinite(state)
    if leaf:
      raise NonFiniteStateError(f"step {step}: {leaf} holds NaN or Inf values; not saved")
    self.wait()
    saved = self.mngr.save(step, args=ocp.args.StandardSave(state), force=force)
    if saved and jax.process_index() == 0:
      self._unsealed.append(step)
    return saved

  def poll(self) -> None:
    """Starts sealing the steps whose async save has committed; never blocks."""
    if self._unsealed and self._sealer is None and not self.mngr.is_saving_in_progress():
      self._start_sealing()

  def _start_sealing(self) -> None:
    steps, self._unsealed = self._unsealed, []

    def seal():
      try:
        for s in steps:
          step_dir = os.path.join(self.directory, str(s))
          if os.path.isdir(step_dir):  # a failed async save leaves no committed step
            integrity.write_manifest(step_dir, s)
      except BaseException as e:  # re-raised by wait() in the main thread
        self._sealer_error = e

    self._sealer = threading.Thread(target=seal, name="moelab-checkpoint-seal")
    self._sealer.start()

  def wait(self) -> None:
    """Waits for pending async saves, then seals the steps they committed."""
    self.mngr.wait_until_finished()
    if self._unsealed and self._sealer is None:
      self._start_sealing()
    if self._sealer is not None:
      self._sealer.join()
      self._sealer = None
      if self._sealer_error is not None:
        error, self._sealer_error = self._sealer_error, None
        raise CheckpointError(f"writing the checksum manifest under {self.directory} "
                              f"failed: {error}") from error

  def close(self) -> None:
    self.wait()
    self.mngr.close()

  def restore(self, target):
    """Newest intact step restored into `target`'s structure and shardings; the
    bad newer steps passed over are moved to `workdir/checkpoints.quarantine/`."""
    state, s, sealed, problems = _restore_verified(self.mngr, target, None)
    moved = []
    newer = sorted({p.step for p in problems if p.step > s})
    if newer and jax.process_index() == 0:
      qdir = os.path.join(self.workdir, QUARANTINE)
      os.makedirs(qdir, exist_ok=True)
      for bad in newer:
        dest = os.path.join(qdir, str(bad))
        n = 1
        while os.path.exists(dest):
          dest, n = os.path.join(qdir, f"{bad}.{n}"), n + 1
        shutil.move(os.path.join(self.directory, str(bad)), dest)
        moved.append(f"step {bad} to {dest}")
    if newer:
      _sync("moelab-checkpoint-quarantine")
      self.mngr.reload()
    _report(self.directory, s, sealed, problems, moved)
    return state


def write_config(workdir: str, config_dict: dict) -> None:
  workdir_lib.write_config(workdir, config_dict)


def read_config(workdir: str) -> dict:
  return workdir_lib.read_config(workdir)


def restore_params(workdir: str, step: int | None = None):
  """(ModelConfig, params) of the newest intact (or the given) checkpoint in `workdir`."""
  run = RunConfig.from_config(ml_collections.ConfigDict(read_config(workdir)))
  model = Decoder(run.model)
  tx = optimizer.make(run.optimizer, run.train.steps)
  abstract = jax.eval_shape(
      lambda: step_lib.init_state(model, tx, run.train.seed, run.data.seq_len))
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint under {directory}")
  with integrity.quiet_missing_metadata():
    mngr = ocp.CheckpointManager(directory)
  try:
    if mngr.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint under {directory}")
    state = restore(mngr, abstract, step)
  finally:
    mngr.close()
  return run.model, state.params
