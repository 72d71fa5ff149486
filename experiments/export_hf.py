"""Export a trained moelab run as a Hugging Face checkpoint directory.

  python -m experiments.export_hf --workdir=RUN --out=DIR [--step=N]

Restores the newest intact checkpoint of RUN (train/checkpoint.restore_params)
and writes DIR/config.json + DIR/model.safetensors (model/hf_export.py), which
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads as Llama,
Mixtral or DeepseekV3, whichever computes the run's decode function. The
byte tokenizer's BOS/EOS/PAD ids go into config.json. A config HF cannot
express exits 1 naming the field; training-only settings that the checkpoint
leaves out are printed as notes. `python -m experiments.generate
--hf_model=DIR` decodes the result.
"""

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags():
  """The CLI's flags, defined only when run as a program: `export` is imported
  by tests beside the other CLIs, whose --workdir would otherwise clash."""
  flags.DEFINE_string("workdir", None, "moelab run directory.", required=True)
  flags.DEFINE_string("out", None, "Output directory (created).", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest intact one).")


def export(workdir: str, out: str, step: int | None = None) -> tuple[str, list[str]]:
  """Writes the HF directory; returns (HF architecture, notes)."""
  import ml_collections

  from model.hf_export import export_kind, save_hf
  from train import checkpoint, tokenizer
  from train.config import RunConfig
  stored = RunConfig.from_config(ml_collections.ConfigDict(checkpoint.read_config(workdir)))
  kind = export_kind(stored.model)  # an inexpressible config is refused before the restore
  cfg, params = checkpoint.restore_params(workdir, step)
  notes = save_hf(cfg, params, out, bos_token_id=tokenizer.BOS, eos_token_id=tokenizer.EOS,
                  pad_token_id=tokenizer.PAD)
  return kind, notes


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax's per-restore INFO lines
  try:
    kind, notes = export(FLAGS.workdir, FLAGS.out, FLAGS.step)
  except ValueError as e:
    print(f"FATAL {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {FLAGS.out} ({kind})")
  for note in notes:
    print(f"note: {note}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
