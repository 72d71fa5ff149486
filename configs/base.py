"""The base of every moelab run: the config sections, with no values.

Every default lives in one place, the dataclasses that validate a run:
`model.config.ModelConfig` (section `model`) and `train.config` (`data`,
`train`, `optimizer`, `checkpoint`, `mesh`). A config file sets only what
it changes; `experiments.train` fills in the rest and writes the whole
resolved config to `workdir/config.json`.

Run (a small dense model on the embedded corpus, the interpreter's stdlib):

  python -m experiments.train --config=configs/base.py --workdir=/tmp/moelab/base

Any field can be overridden from the command line, whether or not the file
sets it, e.g.

  --config.model.num_experts=16 --config.train.steps=2000 --config.data.path='~/text/*.txt'

Sections:
  model       fields of model.config.ModelConfig (validated there)
  data        corpus, sequence length, batch size
  train       steps, eval/log cadence, seed
  optimizer   AdamW + warmup/cosine schedule + clipping
  checkpoint  Orbax CheckpointManager cadence
  mesh        device mesh axis sizes (product = number of devices)
"""

import ml_collections

SECTIONS = ("model", "data", "train", "optimizer", "checkpoint", "mesh")


def get_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({s: {} for s in SECTIONS})
