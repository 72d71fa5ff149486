"""Shazeer et al. 2017 (arXiv 1701.06538) Table 6: the importance and load balance losses.

  python -m experiments.figures.shazeer_balance [--out=DIR] [--parallel=2]

Noisy top-k gating (eq. 3-5, router_noise='shazeer', which the load loss's
smooth estimator needs; appendix A), 8 experts, top-2, no capacity limit
(dropless, as the paper's MoE layer), no Switch or z loss; the weights
w_importance / w_load (eq. 6-7, appendix A eq. 8-11) are 0/0, 0.01/0.01,
0.1/0.1 and 1/1, two seeds each, on the tiny model of common.TINY (800
steps: at 300 the balanced runs had not yet overtaken the collapsed one,
which then was 0.02-0.15 bits/byte better). Per run: CV and max/mean of the expert load f_i (share of routing
assignments, mean over MoE layers and over the last 10% of steps) and the
final validation bits/byte.

Criteria (the paper's table: without the losses the load collapses, with
them it is near uniform at no loss of quality): without a balance loss
CV(load) >= 3x that of every run with one and max/mean >= 2; with a loss
CV < 0.3 and max/mean < 1.5, at a validation bits/byte no worse than the
loss-free run's (up to the larger seed spread of the two).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.figures import common  # noqa: E402

NAME = "shazeer_balance"
WEIGHTS = ("0", "0.01", "0.1", "1")
SEEDS = 2


def make(out: str):
  values = common.settings(800, model__moe_ffn_dim=128, model__router_noise="shazeer",
                           model__aux_switch_coef=0.0, model__aux_z_coef=0.0,
                           model__moe_dispatch="dropless")
  grid = ("model.aux_importance_coef&model.aux_load_coef="
          + ",".join(f"{w}&{w}" for w in WEIGHTS))
  results = common.run_grid(out, "configs/moe_tiny.py", grid, values, SEEDS)
  records, curves = [], {}
  for r in results:
    w = r["overrides"]["model.aux_importance_coef"]
    train, evals = common.rows(r["workdir"])
    records.append({"w_importance": w, "w_load": r["overrides"]["model.aux_load_coef"],
                    "seed": r["overrides"]["train.seed"],
                    "load_cv": common.tail_mean(train, "load_cv"),
                    "max_over_mean_load": common.tail_mean(train, "max_over_mean_load"),
                    "val_bits_per_byte": evals[-1]["bits_per_byte"],
                    "val_loss": evals[-1]["loss"], "workdir": r["workdir"]})
    curves.setdefault(w, []).append(train)
  summary = {}
  for w in WEIGHTS:
    mine = [x for x in records if x["w_importance"] == w]
    summary[w] = {k: common.mean_spread([x[k] for x in mine])
                  for k in ("load_cv", "max_over_mean_load", "val_bits_per_byte")}
    records.append({"w_importance": w, "w_load": w, "seed": "mean",
                    **{k: v[0] for k, v in summary[w].items()},
                    **{f"{k}_seed_range": v[1] for k, v in summary[w].items()}})
  common.write_csv(f"{out}/{NAME}.csv", records)
  plot(out, curves, summary)

  none, losses = summary["0"], [summary[w] for w in WEIGHTS[1:]]
  cv_ratio = none["load_cv"][0] / max(s["load_cv"][0] for s in losses)
  bpb0, spread0 = none["val_bits_per_byte"]
  worse = [w for w, s in zip(WEIGHTS[1:], losses) if s["val_bits_per_byte"][0] >
           bpb0 + max(spread0, s["val_bits_per_byte"][1])]
  checks = {
      "CV(0/0) >= 3x every CV(w/w)": cv_ratio >= 3,
      "max/mean(0/0) >= 2": none["max_over_mean_load"][0] >= 2,
      "CV(w/w) < 0.3": all(s["load_cv"][0] < 0.3 for s in losses),
      "max/mean(w/w) < 1.5": all(s["max_over_mean_load"][0] < 1.5 for s in losses),
      "bpb(w/w) no worse": not worse,
  }
  measured = (f"CV(load) " + ", ".join(f"{w}/{w}: {summary[w]['load_cv'][0]:.3f}"
                                        for w in WEIGHTS)
              + f" (ratio {cv_ratio:.1f}x); max/mean "
              + ", ".join(f"{w}/{w}: {summary[w]['max_over_mean_load'][0]:.2f}" for w in WEIGHTS)
              + "; val bits/byte "
              + ", ".join(f"{w}/{w}: {summary[w]['val_bits_per_byte'][0]:.3f}"
                          f"±{summary[w]['val_bits_per_byte'][1] / 2:.3f}" for w in WEIGHTS)
              + "; failed: " + (", ".join(k for k, ok in checks.items() if not ok) or "none"))
  criterion = ("no balance loss: CV(load) >= 3x every run with one and max/mean >= 2; "
               "with one: CV < 0.3, max/mean < 1.5, val bits/byte no worse (seed spread)")
  return criterion, measured, all(checks.values())


def plot(out, curves, summary):
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for i, w in enumerate(WEIGHTS):
    for j, train in enumerate(curves[w]):
      steps = [r["step"] for r in train]
      kw = {"color": f"C{i}", "alpha": 0.8, "label": f"w = {w}/{w}" if j == 0 else None}
      axes[0].plot(steps, [common.layer_mean(r, "load_cv") for r in train], **kw)
      axes[1].plot(steps, [common.layer_mean(r, "max_over_mean_load") for r in train], **kw)
  axes[0].set(xlabel="step", ylabel="CV of expert load f_i", yscale="log",
              title="load CV (mean over MoE layers)")
  axes[0].axhline(0.3, color="gray", ls=":", lw=1)
  axes[1].set(xlabel="step", ylabel="max / mean load", title="max/mean expert load")
  axes[1].axhline(1.5, color="gray", ls=":", lw=1)
  axes[1].axhline(2.0, color="gray", ls="--", lw=1)
  axes[0].legend()
  x = np.arange(len(WEIGHTS))
  means = [summary[w]["val_bits_per_byte"][0] for w in WEIGHTS]
  half = [summary[w]["val_bits_per_byte"][1] / 2 for w in WEIGHTS]
  axes[2].bar(x, means, yerr=half, color=[f"C{i}" for i in x], capsize=4)
  axes[2].set(xticks=x, xticklabels=[f"{w}/{w}" for w in WEIGHTS], ylim=(min(means) - 0.1,
                                                                         max(means) + 0.05),
              xlabel="w_importance / w_load", ylabel="val bits/byte",
              title=f"final validation ({SEEDS} seeds, bar = half range)")
  fig.suptitle("Shazeer et al. 2017 Table 6 at tiny scale: 8 experts, top-2, noisy gating")
  fig.tight_layout()
  fig.savefig(f"{out}/{NAME}.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  common.main(NAME, make)
