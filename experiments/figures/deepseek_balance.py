"""Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437 sec. 2.1.2;
Wang et al. 2024, arXiv 2408.15664): aux loss vs bias balancing vs neither.

  python -m experiments.figures.deepseek_balance [--out=DIR] [--parallel=2]

Sigmoid gates (eq. 13-16) over 8 experts, top-2, dropless, on the tiny
model of common.TINY (300 steps, two seeds), three ways:
  aux loss:  the Switch balance loss, alpha = 0.01, no selection bias updates;
  bias:      no aux loss; b_i += gamma * sign(mean load - load_i) after every
             step, gamma = 1e-3 (DeepSeek-V3's value);
  neither:   no aux loss, no bias updates.
Plotted over training: max/mean expert load (MaxVio + 1 of Wang et al.,
mean over MoE layers) and validation bits/byte.

Criterion (Wang et al. Table 2, DeepSeek-V3 Table 5: the bias balances the
load without the aux loss's cost in quality): the bias run's max/mean load
(last 10% of steps) is below the run with neither, and its final
validation bits/byte is no worse than the aux-loss run's (up to the larger
seed spread of the two).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.figures import common  # noqa: E402

NAME = "deepseek_balance"
GAMMA = "0.001"
METHODS = {"aux loss": ("0.01", "0"), "bias": ("0", GAMMA), "neither": ("0", "0")}
SEEDS = 2


def make(out: str):
  values = common.settings(300, model__moe_gate="sigmoid", model__moe_ffn_dim=128,
                           model__moe_dispatch="dropless", model__aux_z_coef=0.0)
  grid = ("model.aux_switch_coef&model.router_bias_update_rate="
          + ",".join(f"{a}&{g}" for a, g in METHODS.values()))
  results = common.run_grid(out, "configs/moe_tiny.py", grid, values, SEEDS)
  label = {v: k for k, v in METHODS.items()}
  records, curves = [], {}
  for r in results:
    ov = r["overrides"]
    method = label[ov["model.aux_switch_coef"], ov["model.router_bias_update_rate"]]
    train, evals = common.rows(r["workdir"])
    records.append({"method": method, "seed": ov["train.seed"],
                    "max_over_mean_load": common.tail_mean(train, "max_over_mean_load"),
                    "load_cv": common.tail_mean(train, "load_cv"),
                    "val_bits_per_byte": evals[-1]["bits_per_byte"],
                    "val_loss": evals[-1]["loss"], "workdir": r["workdir"]})
    curves.setdefault(method, []).append((train, evals))
  summary = {}
  for m in METHODS:
    mine = [x for x in records if x["method"] == m]
    summary[m] = {k: common.mean_spread([x[k] for x in mine])
                  for k in ("max_over_mean_load", "val_bits_per_byte")}
    records.append({"method": m, "seed": "mean", **{k: v[0] for k, v in summary[m].items()},
                    **{f"{k}_seed_range": v[1] for k, v in summary[m].items()}})
  common.write_csv(f"{out}/{NAME}.csv", records)
  plot(out, curves, summary)

  mm = {m: summary[m]["max_over_mean_load"][0] for m in METHODS}
  bpb = {m: summary[m]["val_bits_per_byte"] for m in METHODS}
  noise = max(bpb["bias"][1], bpb["aux loss"][1])
  checks = {"max/mean(bias) < max/mean(neither)": mm["bias"] < mm["neither"],
            "bpb(bias) <= bpb(aux) + noise": bpb["bias"][0] <= bpb["aux loss"][0] + noise}
  measured = ("max/mean load " + ", ".join(f"{m} {mm[m]:.2f}" for m in METHODS)
              + "; val bits/byte " + ", ".join(f"{m} {bpb[m][0]:.4f}" for m in METHODS)
              + f" (seed noise {noise:.4f}); failed: "
              + (", ".join(k for k, ok in checks.items() if not ok) or "none"))
  criterion = (f"bias balancing (gamma {GAMMA}) has lower max/mean load than neither and "
               "val bits/byte no worse than the aux loss")
  return criterion, measured, all(checks.values())


def plot(out, curves, summary):
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for i, m in enumerate(METHODS):
    for j, (train, evals) in enumerate(curves[m]):
      kw = {"color": f"C{i}", "alpha": 0.8, "label": m if j == 0 else None}
      axes[0].plot([r["step"] for r in train],
                   [common.layer_mean(r, "max_over_mean_load") for r in train], **kw)
      axes[1].plot([r["step"] for r in evals], [r["bits_per_byte"] for r in evals], "o-",
                   ms=3, **kw)
  axes[0].set(xlabel="step", ylabel="max / mean expert load", title="load imbalance")
  axes[0].legend()
  lo = min(s["val_bits_per_byte"][0] for s in summary.values())
  axes[1].set(xlabel="step", ylabel="val bits/byte", ylim=(lo - 0.1, lo + 1.0),
              title="validation")
  names = list(METHODS)
  axes[2].bar(names, [summary[m]["val_bits_per_byte"][0] for m in names],
              yerr=[summary[m]["val_bits_per_byte"][1] / 2 for m in names],
              color=[f"C{i}" for i in range(len(names))], capsize=4)
  axes[2].set(ylim=(lo - 0.05, lo + 0.1), ylabel="final val bits/byte",
              title=f"final ({SEEDS} seeds, bar = half range)")
  fig.suptitle("Auxiliary-loss-free balancing (DeepSeek-V3) at tiny scale: sigmoid gates, "
               "top-2 of 8")
  fig.tight_layout()
  fig.savefig(f"{out}/{NAME}.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  common.main(NAME, make)
