"""Test helper: `python tests/train/signal_driver.py <experiments.train flags>`
runs the training CLI and sends itself a signal right after the save call of
one step, so a test can interrupt a run at an exact step (even with that
step's async save still in flight) without racing it from outside.

Environment: MOELAB_SIGNAL_AT (step), MOELAB_SIGNAL (SIGINT or SIGTERM).
It prints `signal sent after step S, save in flight: BOOL` to stderr.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from absl import app  # noqa: E402

from experiments import train as cli  # noqa: E402
from train import checkpoint  # noqa: E402

AT = int(os.environ["MOELAB_SIGNAL_AT"])
SIG = signal.Signals[os.environ["MOELAB_SIGNAL"]]
_save = checkpoint.Checkpoints.save
_sent = []


def save(self, step, state, force=False):
  saved = _save(self, step, state, force)
  if step == AT and not _sent:
    _sent.append(step)
    print(f"signal sent after step {step}, save in flight: {self.mngr.is_saving_in_progress()}",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), SIG)
  return saved


checkpoint.Checkpoints.save = save

if __name__ == "__main__":
  app.run(cli.main, flags_parser=cli.parse_flags)
