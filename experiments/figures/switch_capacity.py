"""Switch Transformer (Fedus et al. 2021, arXiv 2101.03961) sec. 2.2 / Table 1: the
capacity factor, token dropping and the load-balancing loss.

  python -m experiments.figures.switch_capacity [--out=DIR] [--parallel=2]

8 experts of the dense width, top-1 Switch gates, capacity dispatch
(tokens over an expert's capacity Z = CF * tokens / X skip the FFN), on
the tiny model of common.TINY (300 steps): capacity factor CF in {1.0,
1.25, 2.0} x alpha (the Switch loss, eq. 4) in {0, 0.01}. The dropped
fraction is that of the training steps' routing assignments, mean over MoE
layers; "after warm-up" = the steps after the learning-rate warm-up.

Criteria: drops fall as capacity rises (for each alpha: CF 1.0 >= 1.25 >=
2.0, and 1.0 > 2.0); with alpha = 0.01 and CF 1.25, drops < 2% after
warm-up; collapse visible with alpha = 0: at CF 1.25 its max/mean expert
load (last 10% of steps) >= 2 (the heatmaps show the load over training).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.figures import common  # noqa: E402

NAME = "switch_capacity"
CFS = ("1.0", "1.25", "2.0")
ALPHAS = ("0", "0.01")


def make(out: str):
  values = common.settings(300, model__moe_ffn_dim=256)
  grid = f"model.capacity_factor={','.join(CFS)} model.aux_switch_coef={','.join(ALPHAS)}"
  results = common.run_grid(out, "configs/switch_tiny.py", grid, values)
  warmup = values["optimizer.warmup_steps"]
  records, trains = [], {}
  for r in results:
    cf, a = r["overrides"]["model.capacity_factor"], r["overrides"]["model.aux_switch_coef"]
    train, evals = common.rows(r["workdir"])
    after = [x["dropped_frac"] for x in train if x["step"] > warmup]
    records.append({"capacity_factor": cf, "alpha": a,
                    "dropped_after_warmup": sum(after) / len(after),
                    "dropped_last10pct": common.tail_mean(train, "dropped_frac"),
                    "max_over_mean_load": common.tail_mean(train, "max_over_mean_load"),
                    "load_cv": common.tail_mean(train, "load_cv"),
                    "val_bits_per_byte": evals[-1]["bits_per_byte"], "workdir": r["workdir"]})
    trains[cf, a] = train
  common.write_csv(f"{out}/{NAME}.csv", records)
  rec = {(x["capacity_factor"], x["alpha"]): x for x in records}
  plot(out, rec, trains)

  d = lambda cf, a: rec[cf, a]["dropped_after_warmup"]
  falls = all(d("1.0", a) >= d("1.25", a) >= d("2.0", a) and d("1.0", a) > d("2.0", a)
              for a in ALPHAS)
  low = d("1.25", "0.01") < 0.02
  collapse = rec["1.25", "0"]["max_over_mean_load"]
  checks = {"drops fall with CF": falls, "alpha 0.01, CF 1.25: drops < 2%": low,
            "alpha 0, CF 1.25: max/mean >= 2": collapse >= 2}
  measured = ("dropped after warm-up " + "; ".join(
      f"alpha {a}: " + ", ".join(f"CF {cf} {d(cf, a):.2%}" for cf in CFS) for a in ALPHAS)
      + f"; max/mean load at CF 1.25: alpha 0 {collapse:.2f}, alpha 0.01 "
      f"{rec['1.25', '0.01']['max_over_mean_load']:.2f}; failed: "
      + (", ".join(k for k, ok in checks.items() if not ok) or "none"))
  criterion = ("drops fall as CF rises; alpha 0.01 & CF 1.25: drops < 2% after warm-up; "
               "alpha 0 collapses (max/mean >= 2 at CF 1.25)")
  return criterion, measured, all(checks.values())


def plot(out, rec, trains):
  fig = plt.figure(figsize=(14, 8))
  ax0, ax1 = fig.add_subplot(2, 2, 1), fig.add_subplot(2, 2, 2)
  x = [float(cf) for cf in CFS]
  for i, a in enumerate(ALPHAS):
    ax0.plot(x, [100 * rec[cf, a]["dropped_after_warmup"] for cf in CFS], "o-", color=f"C{i}",
             label=f"alpha = {a}")
    for j, cf in enumerate(CFS):
      t = trains[cf, a]
      ax1.plot([r["step"] for r in t], [100 * r["dropped_frac"] for r in t], color=f"C{i}",
               ls=("-", "--", ":")[j], label=f"alpha {a}, CF {cf}")
  ax0.axhline(2, color="gray", ls=":", lw=1)
  ax0.set(xlabel="capacity factor", ylabel="dropped assignments (%)", xticks=x,
          title="dropped fraction after warm-up")
  ax0.legend()
  ax1.set(xlabel="step", ylabel="dropped (%)", title="dropped fraction over training")
  ax1.legend(fontsize=7, ncol=2)
  for k, a in enumerate(ALPHAS):
    ax = fig.add_subplot(2, 2, 3 + k)
    t = trains["1.25", a]
    load = np.array([r["moe0/load_frac"] for r in t]).T
    im = ax.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(t[0]["step"], t[-1]["step"], load.shape[0] - 0.5, -0.5),
                   vmin=0, vmax=max(2.0 / load.shape[0], load.max()))
    ax.set(xlabel="step", ylabel="expert (MoE layer 0)",
           title=f"expert load f_i, alpha = {a}, CF 1.25 (uniform = 1/8)")
    fig.colorbar(im, ax=ax)
  fig.suptitle("Switch capacity factor x load-balancing loss (tiny, 8 experts, top-1)")
  fig.tight_layout()
  fig.savefig(f"{out}/{NAME}.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  common.main(NAME, make)
