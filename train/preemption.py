"""Stop requests (SIGINT, SIGTERM) that the trainer honours between steps.

`handle_signals()` (the CLI wraps a run in it) turns the first SIGINT or
SIGTERM into a request: the trainer finishes the step it is in, saves a
checkpoint at that step, waits for pending async saves and returns with
`summary["interrupted"]` set, instead of dying inside an Orbax save. A second
SIGINT aborts at once (KeyboardInterrupt), for when saving is not wanted.

Every process must stop at the same step, or the collective ops of the save
hang. `StopCheck` decides, once per step:
  * one process: the local request.
  * several processes with JAX's preemption service (on by default after
    `jax.distributed.initialize`): `multihost_utils.reached_preemption_sync_point`,
    which all processes call every step and which turns a SIGTERM on any
    host into one agreed stop step. JAX installs that SIGTERM handler itself,
    so `handle_signals` leaves SIGTERM alone there and forwards a SIGINT to it.
  * several processes without the service: the local requests are combined
    (max over processes) at log steps, which all processes share.
"""

import contextlib
import os
import signal

import jax

_requested: int | None = None  # signal number of the first request


def request(signum: int) -> None:
  """Asks the running trainer to stop after the current step (what a handler does)."""
  global _requested
  if _requested is None:
    _requested = int(signum)


def requested() -> int | None:
  return _requested


def clear() -> None:
  global _requested
  _requested = None


def exit_code(signum: int) -> int:
  """The shell convention for death by a signal: 128 + its number (130, 143)."""
  return 128 + int(signum)


def _preemption_service() -> bool:
  return jax.process_count() > 1 and bool(getattr(jax.config, "jax_enable_preemption_service",
                                                   False))


def _say(text: str) -> None:
  os.write(2, (text + "\n").encode())  # safe in a signal handler, unlike logging


@contextlib.contextmanager
def handle_signals():
  """Installs the SIGINT/SIGTERM handlers for the duration; restores the old ones
  and forgets the request on exit (a later run in this process starts clean)."""
  jax_has_sigterm = _preemption_service()

  def handler(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if _requested is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      _say(f"{name} received again; still finishing the step and saving")
      return
    request(signum)
    _say(f"{name} received: finishing this step, saving a checkpoint, then exiting "
         f"(Ctrl-C again aborts without saving)")
    if jax_has_sigterm and signum == signal.SIGINT:
      signal.raise_signal(signal.SIGTERM)  # JAX's handler tells every process

  signums = [signal.SIGINT] + ([] if jax_has_sigterm else [signal.SIGTERM])
  old = {s: signal.signal(s, handler) for s in signums}
  clear()
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    clear()


class StopCheck:
  """`check(step, at_log_step)` -> signal number to stop with after `step`, or None."""

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.sync_point = _preemption_service()

  def check(self, step: int, at_log_step: bool) -> int | None:
    if not self.multi:
      return requested()
    if self.sync_point:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          return requested() or int(signal.SIGTERM)
        return None
      except RuntimeError:  # service not running after all
        self.sync_point = False
    if not at_log_step:
      return None
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415
    any_request = multihost_utils.process_allgather(np.int32(requested() or 0))
    return int(np.max(any_request)) or None
