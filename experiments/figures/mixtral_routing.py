"""Routing analysis in the style of Mixtral (Jiang et al. 2024, arXiv 2401.04088) sec. 5.

  python -m experiments.figures.mixtral_routing [--out=DIR] [--parallel=2]

Trains the tiny top-2-of-8 model (configs/moe_tiny.py at common.TINY with 4
blocks, 400 steps) on the default corpus (the interpreter's stdlib .py
files), then routes held-out validation text through it:

* the text rendered with each token (a byte) on the colour of its
  first-choice expert, one panel per MoE layer (Mixtral Fig. 8);
* per layer, the rate at which consecutive tokens share their first-choice
  expert, and share any of their top-A experts (Mixtral Table 5 / Fig. 10),
  against the random baselines 1/X (first choice) and
  1 - C(X-A, A) / C(X, A) (two random A-subsets of X experts intersect),
  and against a shuffled baseline: the same rates between each token and a
  random other token of the text, which keeps the layer's load imbalance.

Criterion (Mixtral: consecutive tokens are assigned the same experts more
often than at random): in every layer both rates exceed both baselines.
"""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.figures import common  # noqa: E402

NAME = "mixtral_routing"
VAL_WINDOWS = 128      # validation windows routed for the statistics (128 x 64 tokens)
SHOWN_LINES, SHOWN_COLS, SHOWN_WINDOWS = 14, 72, 12


def random_topk_overlap(x: int, a: int) -> float:
  """P(two independent uniform A-subsets of X experts intersect) = 1 - C(X-A, A)/C(X, A)."""
  return 1.0 - math.comb(x - a, a) / math.comb(x, a)


def consecutive_rates(expert_BxLxA) -> tuple[float, float]:
  """(first choice equal, top-A sets intersect) over consecutive tokens of each row."""
  e = np.asarray(expert_BxLxA)
  first = (e[:, 1:, 0] == e[:, :-1, 0]).mean()
  overlap = (e[:, 1:, :, None] == e[:, :-1, None, :]).any(axis=(-1, -2)).mean()
  return float(first), float(overlap)


def shuffled_rates(expert_BxLxA, seed: int = 0) -> tuple[float, float]:
  """The same rates between every token and a random other token of the batch."""
  e = np.asarray(expert_BxLxA).reshape(-1, np.shape(expert_BxLxA)[-1])
  perm = np.random.default_rng(seed).permutation(len(e))
  first = (e[:, 0] == e[perm, 0]).mean()
  overlap = (e[:, :, None] == e[perm][:, None, :]).any(axis=(-1, -2)).mean()
  return float(first), float(overlap)


def route(workdir: str, windows: int):
  """(cfg, tokens_BxL, [expert_BxLxA per MoE layer]) of the run's validation text."""
  import jax  # noqa: PLC0415

  from model.router import Router  # noqa: PLC0415
  from model.transformer import Decoder  # noqa: PLC0415
  from train import checkpoint, data  # noqa: PLC0415
  from train.config import RunConfig  # noqa: PLC0415
  cfg, params = checkpoint.restore_params(workdir)
  run = RunConfig.from_config(checkpoint.read_config(workdir))
  tokens = data.load_run(run.data).val_WxL1[:windows, :-1].astype(np.int32)
  fn = jax.jit(lambda p, t: Decoder(cfg).apply(
      {"params": p}, t, train=False, mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: isinstance(mdl, Router))[1]["intermediates"])
  inter = jax.device_get(fn(params, tokens))
  experts = [np.asarray(inter[f"block_{i}"]["moe"]["router"]["__call__"][0].expert_NxA)
             .reshape(tokens.shape + (cfg.moe_top_k,))
             for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
  return cfg, tokens, experts


def make(out: str):
  values = common.settings(400, model__moe_ffn_dim=128)
  values.pop("model.num_layers")  # swept (to 4), so not a global override
  (result,) = common.run_grid(out, "configs/moe_tiny.py", "model.num_layers=4", values)
  cfg, tokens, experts = route(result["workdir"], VAL_WINDOWS)
  x, a = cfg.num_experts, cfg.moe_top_k
  base_first, base_topk = 1.0 / x, random_topk_overlap(x, a)
  records = []
  for layer, e in enumerate(experts):
    first, topk = consecutive_rates(e)
    sh_first, sh_topk = shuffled_rates(e, layer)
    share = np.bincount(e[..., 0].reshape(-1), minlength=x) / e[..., 0].size
    records.append({"moe_layer": layer, "first_choice_same": first, "topk_overlap": topk,
                    "random_first": base_first, "random_topk": base_topk,
                    "shuffled_first": sh_first, "shuffled_topk": sh_topk,
                    **{f"first_choice_share_{i}": float(s) for i, s in enumerate(share)}})
  common.write_csv(f"{out}/{NAME}.csv", records)
  plot(out, cfg, tokens, experts, records)
  held = all(r["first_choice_same"] > max(r["random_first"], r["shuffled_first"])
             and r["topk_overlap"] > max(r["random_topk"], r["shuffled_topk"]) for r in records)
  measured = "; ".join(
      f"layer {r['moe_layer']}: first {r['first_choice_same']:.3f} (random {base_first:.3f}, "
      f"shuffled {r['shuffled_first']:.3f}), top-{a} {r['topk_overlap']:.3f} (random "
      f"{base_topk:.3f}, shuffled {r['shuffled_topk']:.3f})" for r in records)
  criterion = (f"consecutive tokens share first-choice / any top-{a} experts more often than "
               f"random (1/X, 1 - C(X-A,A)/C(X,A)) and than shuffled tokens, in every layer")
  return criterion, measured, held


def _lines(tokens_L, codes_L):
  """Rows of (char, expert) for the first SHOWN_LINES lines of a token row."""
  lines, cur = [], []
  for t, c in zip(tokens_L, codes_L):
    if t == 10 or len(cur) == SHOWN_COLS:
      lines.append(cur)
      cur = []
      if t == 10:
        continue
    ch = chr(t) if 32 <= t < 127 else (" " if t == 9 else "\u00b7")
    cur.append((ch, c))
    if len(lines) == SHOWN_LINES:
      break
  return (lines + [cur])[:SHOWN_LINES]


def plot(out, cfg, tokens, experts, records):
  colors = plt.get_cmap("tab10").colors
  n = len(experts)
  fig = plt.figure(figsize=(15, 3.2 * n + 3.5))
  shown = min(SHOWN_WINDOWS, len(tokens))  # consecutive windows: contiguous text
  flat_tokens = tokens[:shown].reshape(-1)
  for layer, e in enumerate(experts):
    ax = fig.add_subplot(n + 1, 1, layer + 1)
    codes = e[:shown, :, 0].reshape(-1)
    for y, line in enumerate(_lines(flat_tokens, codes)):
      for col, (ch, c) in enumerate(line):
        ax.add_patch(mpatches.Rectangle((col, -y - 1), 1, 1, color=colors[c % 10], alpha=0.55,
                                        lw=0))
        ax.text(col + 0.5, -y - 0.5, ch, ha="center", va="center", family="monospace",
                fontsize=7)
    ax.set(xlim=(0, SHOWN_COLS), ylim=(-SHOWN_LINES, 0), xticks=[], yticks=[],
           title=f"MoE layer {layer}: each byte on the colour of its first-choice expert")
  handles = [mpatches.Patch(color=colors[i % 10], alpha=0.55, label=f"expert {i}")
             for i in range(cfg.num_experts)]
  fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.975),
             ncol=cfg.num_experts, fontsize=8)
  ax = fig.add_subplot(n + 1, 2, 2 * n + 1)
  layers = np.arange(n)
  ax.bar(layers, [r["first_choice_same"] for r in records], color="C0", label="measured")
  ax.plot(layers, [r["shuffled_first"] for r in records], "k^", label="shuffled tokens")
  ax.axhline(records[0]["random_first"], color="gray", ls="--", label="random 1/X")
  ax.set(xlabel="MoE layer", ylabel="rate", xticks=layers, title="same first-choice expert")
  ax.legend(fontsize=8)
  ax = fig.add_subplot(n + 1, 2, 2 * n + 2)
  ax.bar(layers, [r["topk_overlap"] for r in records], color="C1", label="measured")
  ax.plot(layers, [r["shuffled_topk"] for r in records], "k^", label="shuffled tokens")
  ax.axhline(records[0]["random_topk"], color="gray", ls="--", label="random 1-C(X-A,A)/C(X,A)")
  ax.set(xlabel="MoE layer", ylabel="rate", xticks=layers,
         title=f"any of the top-{cfg.moe_top_k} experts shared")
  ax.legend(fontsize=8)
  fig.suptitle("Mixtral-style routing analysis: consecutive tokens (validation stdlib text)",
               y=0.997)
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  fig.savefig(f"{out}/{NAME}.png", dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  common.main(NAME, make)
