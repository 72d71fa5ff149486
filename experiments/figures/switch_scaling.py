"""Switch Transformer (Fedus et al. 2021, arXiv 2101.03961) sec. 3 / Fig. 4: scaling
the number of experts at equal active FLOPs.

  python -m experiments.figures.switch_scaling [--out=DIR] [--parallel=2]

A dense tiny model (common.TINY: SwiGLU FFN of width 256) against Switch
models with 2, 4, 8 and 16 experts of that width, top-1 (softmax then top-1
gates, capacity factor 1.25, alpha = 0.01): every token runs one FFN of the
dense width, so all runs have the same FLOPs per token up to the router's
D * X (train/flops.py), while the parameters grow with the experts. 400
steps, two seeds each. Left: validation bits/byte against step (seed
mean); right: final validation bits/byte against the parameter count.

Criterion (the paper's Fig. 4: more experts, lower loss at fixed FLOPs):
the final loss is ordered dense > 2 experts > 8 experts, each gap larger
than the seed noise (the largest max - min over seeds of the three).
"""

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.figures import common  # noqa: E402
from train import flops  # noqa: E402
from train.config import RunConfig  # noqa: E402

NAME = "switch_scaling"
EXPERTS = ("0", "2", "4", "8", "16")
SEEDS = 2


def _label(x: str) -> str:
  return "dense" if x == "0" else f"{x} experts"


def make(out: str):
  values = common.settings(400, model__moe_ffn_dim=256)
  results = common.run_grid(out, "configs/switch_tiny.py",
                            "model.num_experts=" + ",".join(EXPERTS), values, SEEDS)
  records, curves, by = [], {}, {}
  for r in results:
    x = r["overrides"]["model.num_experts"]
    with open(f"{r['workdir']}/config.json") as f:
      model = RunConfig.from_config(json.load(f)).model
    counts = flops.param_counts(model)
    _, evals = common.rows(r["workdir"])
    records.append({"num_experts": x, "seed": r["overrides"]["train.seed"],
                    "params_total": counts.total, "params_active": counts.active,
                    "flops_per_token": flops.flops_per_token(model, values["data.seq_len"]),
                    "val_bits_per_byte": evals[-1]["bits_per_byte"],
                    "val_loss": evals[-1]["loss"], "tokens_per_s": r.get("tok_s"),
                    "workdir": r["workdir"]})
    curves.setdefault(x, []).append(evals)
    by.setdefault(x, []).append(records[-1])
  summary = {x: common.mean_spread([rec["val_bits_per_byte"] for rec in by[x]]) for x in EXPERTS}
  for x in EXPERTS:
    records.append({"num_experts": x, "seed": "mean", "params_total": by[x][0]["params_total"],
                    "val_bits_per_byte": summary[x][0], "val_bits_per_byte_seed_range":
                    summary[x][1]})
  common.write_csv(f"{out}/{NAME}.csv", records)
  plot(out, curves, by, summary)

  noise = max(summary[x][1] for x in ("0", "2", "8"))
  gap_d2, gap_28 = summary["0"][0] - summary["2"][0], summary["2"][0] - summary["8"][0]
  held = gap_d2 > noise and gap_28 > noise
  measured = (", ".join(f"{_label(x)} {summary[x][0]:.4f}" for x in EXPERTS)
              + f" val bits/byte (seed mean); gaps dense-2 {gap_d2:+.4f}, 2-8 {gap_28:+.4f} "
              f"vs seed noise {noise:.4f}")
  criterion = "final val loss ordered dense > 2 > 8 experts, each gap beyond seed noise"
  return criterion, measured, held


def plot(out, curves, by, summary):
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, x in enumerate(EXPERTS):
    runs = curves[x]
    steps = [r["step"] for r in runs[0]]
    mean = [sum(run[j]["bits_per_byte"] for run in runs) / len(runs) for j in range(len(steps))]
    ax0.plot(steps, mean, "o-", color=f"C{i}", ms=3, label=_label(x))
    for run in runs:
      ax0.plot(steps, [r["bits_per_byte"] for r in run], color=f"C{i}", alpha=0.25, lw=1)
    params = by[x][0]["params_total"]
    ax1.errorbar(params, summary[x][0], yerr=summary[x][1] / 2, fmt="o", color=f"C{i}",
                 capsize=4, label=_label(x))
  ax0.set(xlabel="step", ylabel="val bits/byte", title="validation (seed mean; thin: seeds)")
  lo = min(summary[x][0] for x in EXPERTS)
  ax0.set_ylim(lo - 0.1, lo + 1.2)
  ax0.legend()
  ax1.set(xscale="log", xlabel="parameters (total)", ylabel="final val bits/byte",
          title="final loss vs parameters at equal FLOPs/token")
  ax1.legend()
  fig.suptitle("Switch Transformer scaling with experts (tiny, top-1, CF 1.25)")
  fig.tight_layout()
  fig.savefig(f"{out}/{NAME}.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  common.main(NAME, make)
