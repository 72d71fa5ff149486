"""Train a moelab model from a config file.

  python -m experiments.train --config=configs/moe_tiny.py --workdir=/tmp/moelab/moe_tiny \
      [--config.model.num_experts=16 ...]

Trains (resuming from `workdir` if it holds checkpoints), evaluates,
checkpoints, and finally writes loss_curves.png and expert_load.png into the
workdir. See configs/base.py for every field.
"""

import json
import logging as py_logging

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import plots
from train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moe_tiny.py",
                                          "Path to a configs/*.py file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots).")
flags.mark_flag_as_required("workdir")


class _QuietLibraries(py_logging.Filter):
  """Drops Orbax's per-save INFO chatter; warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "orbax" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  summary.pop("state")
  for path in plots.write_all(_WORKDIR.value):
    logging.info("wrote %s", path)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
