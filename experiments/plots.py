"""Figures of a training run, read back from `workdir/metrics.jsonl`.

* loss_curves.png: train cross-entropy and aux loss vs step, eval loss and
  bits/byte at each eval.
* expert_load.png: for each MoE layer, a heatmap of the fraction of routing
  assignments f_i that expert i received (y) at each logged step (x); the
  uniform value is 1/E.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train import metrics as metrics_lib  # noqa: E402


def _latest_per_step(rows, split):
  """Rows of one split, last write wins (a resumed run re-logs some steps)."""
  by_step = {r["step"]: r for r in rows if r["split"] == split}
  return [by_step[s] for s in sorted(by_step)]


def loss_curves(rows, path: str) -> None:
  train = _latest_per_step(rows, "train")
  ev = _latest_per_step(rows, "eval")
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  ax0.plot([r["step"] for r in train], [r["ce"] for r in train], label="train CE")
  if ev:
    ax0.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="eval CE")
  ax0.set(xlabel="step", ylabel="nats / token", title="cross-entropy")
  ax0.legend()
  if ev:
    ax1.plot([r["step"] for r in ev], [r["bits_per_byte"] for r in ev], "o-", color="C2")
  ax1.set(xlabel="step", ylabel="bits / byte", title="validation bits per byte")
  if any(r.get("aux_loss", 0) for r in train):
    ax2 = ax1.twinx()
    ax2.plot([r["step"] for r in train], [r["aux_loss"] for r in train], color="C3",
             alpha=0.6, label="train aux loss")
    ax2.set_ylabel("aux loss")
    ax2.legend(loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def expert_load(rows, path: str) -> bool:
  """Writes the heatmap; False (and no file) for a dense model."""
  train = _latest_per_step(rows, "train")
  layers = sorted({int(k[3:].split("/")[0]) for r in train for k in r
                   if k.startswith("moe") and k.endswith("/load_frac")})
  if not layers:
    return False
  steps = [r["step"] for r in train]
  fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2.2 * len(layers)), squeeze=False)
  for ax, layer in zip(axes[:, 0], layers):
    load_ExS = np.array([r[f"moe{layer}/load_frac"] for r in train]).T
    num_experts = load_ExS.shape[0]
    im = ax.imshow(load_ExS, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(steps[0], steps[-1], num_experts - 0.5, -0.5),
                   vmin=0, vmax=max(2.0 / num_experts, load_ExS.max()))
    ax.set(ylabel=f"MoE layer {layer}\nexpert", xlabel="step")
    fig.colorbar(im, ax=ax, label="load fraction f_i")
  axes[0, 0].set_title("expert load over training (uniform = 1/E)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_all(workdir: str) -> list[str]:
  rows = metrics_lib.read(workdir)
  out = [os.path.join(workdir, "loss_curves.png")]
  loss_curves(rows, out[0])
  heat = os.path.join(workdir, "expert_load.png")
  if expert_load(rows, heat):
    out.append(heat)
  return out
