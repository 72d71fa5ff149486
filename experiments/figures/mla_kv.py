"""MLA vs MHA / GQA / MQA (DeepSeek-V2, arXiv 2405.04434 sec. 2.1, Table 1 and
appendix D): validation loss against the KV cache per token, parameter-matched.

  python -m experiments.figures.mla_kv [--out=DIR] [--parallel=2]

Dense tiny models (common.TINY: d_model 64, 2 blocks of 4 heads of width
16), 300 steps, two seeds, differing only in attention: MHA (4 kv heads),
GQA (2), MQA (1) and MLA (latent d_c = 32, RoPE key d_R = 8, full-rank
queries). Fewer kv heads mean fewer parameters, so every model's FFN width
is set to bring its total parameter count to the MHA model's (the closest
integer width; the CSV keeps the counts). KV elements per token are
model/kv_accounting.py's `kv_per_token`, checked against DeepSeek-V2
Table 1 (MHA 2 n_h d_h l, GQA 2 n_g d_h l, MQA 2 d_h l, MLA (d_c + d_R) l)
and against the cache the decoder actually allocates
(model/kv_cache.py ContiguousSpec.init).

Criterion: the cache sizes equal the formulas, and MLA, whose cache lies
between MQA's and GQA's, reaches a validation bits/byte no worse than
either (seed means; DeepSeek-V2 appendix D: MLA beats MHA, which beats
GQA and MQA).
"""

import dataclasses

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.figures import common  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from train import flops  # noqa: E402

NAME = "mla_kv"
SEEDS = 2
# name: (attention, num_kv_heads, kv_lora_rank, rope_head_dim)
KINDS = {"MHA": ("mha", 4, 0, 0), "GQA": ("mha", 2, 0, 0), "MQA": ("mha", 1, 0, 0),
         "MLA": ("mla", 4, 32, 8)}
FIELDS = ("attention", "num_kv_heads", "kv_lora_rank", "rope_head_dim", "ffn_dim")


def model_config(values: dict, kind: str, ffn_dim: int) -> ModelConfig:
  attention, kv, c, r = KINDS[kind]
  base = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("model.")}
  return ModelConfig(**{**base, "attention": attention, "num_kv_heads": kv, "kv_lora_rank": c,
                        "rope_head_dim": r, "ffn_dim": ffn_dim})


def matched_ffn(values: dict, kind: str, target: int) -> int:
  """The FFN width whose model has the parameter count closest to `target`."""
  cfg = model_config(values, kind, values["model.ffn_dim"])
  per_unit = 3 * cfg.d_model * cfg.num_layers
  guess = cfg.ffn_dim + round((target - flops.param_counts(cfg).total) / per_unit)
  return min((guess - 1, guess, guess + 1), key=lambda f: abs(
      flops.param_counts(dataclasses.replace(cfg, ffn_dim=f)).total - target))


def table1(cfg: ModelConfig) -> int:
  """KV elements per token from DeepSeek-V2 Table 1."""
  if cfg.attention == "mla":
    return (cfg.kv_lora_rank + cfg.rope_head_dim) * cfg.num_layers
  return 2 * cfg.num_kv_heads * cfg.dim_per_head * cfg.num_layers


def allocated(cfg: ModelConfig, positions: int = 64) -> int:
  """Elements per token of the decode cache the model allocates."""
  import jax  # noqa: PLC0415

  from model.kv_cache import ContiguousSpec  # noqa: PLC0415
  shapes = jax.eval_shape(lambda: ContiguousSpec().init(cfg, 1, positions))
  return sum(x.size for x in jax.tree.leaves(shapes)) // positions


def make(out: str):
  from model import kv_accounting  # noqa: PLC0415
  values = common.settings(300, model__num_experts=0)
  target = flops.param_counts(model_config(values, "MHA", values["model.ffn_dim"])).total
  ffn = {k: matched_ffn(values, k, target) for k in KINDS}
  for f in FIELDS:  # swept, so not global overrides
    values.pop(f"model.{f}", None)
  grid = "model." + "&model.".join(FIELDS) + "=" + ",".join(
      "&".join(map(str, KINDS[k] + (ffn[k],))) for k in KINDS)
  results = common.run_grid(out, "configs/base.py", grid, values, SEEDS)
  records, curves, kv, sizes_ok = [], {}, {}, True
  for r in results:
    ov = r["overrides"]
    kind = next(k for k in KINDS if (ov["model.attention"], int(ov["model.num_kv_heads"]))
                == KINDS[k][:2])
    cfg = model_config({**values, "model.ffn_dim": ffn[kind]}, kind, ffn[kind])
    elements = kv_accounting.kv_per_token(cfg)[0]
    sizes_ok &= elements == table1(cfg) == allocated(cfg)
    kv[kind] = elements
    _, evals = common.rows(r["workdir"])
    records.append({"kind": kind, "seed": ov["train.seed"], "kv_elements_per_token": elements,
                    "table1_formula": table1(cfg), "allocated_per_token": allocated(cfg),
                    "ffn_dim": ffn[kind], "params_total": flops.param_counts(cfg).total,
                    "params_vs_mha": flops.param_counts(cfg).total / target - 1,
                    "val_bits_per_byte": evals[-1]["bits_per_byte"],
                    "val_loss": evals[-1]["loss"], "workdir": r["workdir"]})
    curves.setdefault(kind, []).append(evals)
  summary = {k: common.mean_spread([x["val_bits_per_byte"] for x in records
                                    if x["kind"] == k]) for k in KINDS}
  for k in KINDS:
    records.append({"kind": k, "seed": "mean", "kv_elements_per_token": kv[k],
                    "val_bits_per_byte": summary[k][0],
                    "val_bits_per_byte_seed_range": summary[k][1]})
  common.write_csv(f"{out}/{NAME}.csv", records)
  plot(out, curves, kv, summary)
  mla_ok = summary["MLA"][0] <= min(summary["GQA"][0], summary["MQA"][0])
  measured = (", ".join(f"{k}: {kv[k]} elements/token, {summary[k][0]:.4f} bits/byte"
                        for k in KINDS)
              + f"; cache sizes equal Table 1 and the allocated cache: {sizes_ok}; "
              f"params within {max(abs(x['params_vs_mha']) for x in records if 'params_vs_mha' in x):.2%} of MHA's")
  criterion = ("KV elements/token equal DeepSeek-V2 Table 1 and the allocated cache; MLA's "
               "val bits/byte <= GQA's and MQA's at parameter parity")
  return criterion, measured, sizes_ok and mla_ok


def plot(out, curves, kv, summary):
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
  for i, k in enumerate(KINDS):
    ax0.errorbar(kv[k], summary[k][0], yerr=summary[k][1] / 2, fmt="o", color=f"C{i}",
                 capsize=4, label=k)
    ax0.annotate(k, (kv[k], summary[k][0]), textcoords="offset points", xytext=(6, 4))
    for j, evals in enumerate(curves[k]):
      ax1.plot([r["step"] for r in evals], [r["bits_per_byte"] for r in evals], "o-", ms=2,
               color=f"C{i}", alpha=0.8, label=k if j == 0 else None)
  ax0.set(xscale="log", xlabel="KV cache elements per token (all layers)",
          ylabel="final val bits/byte", title=f"loss vs cache ({SEEDS} seeds, bar = half range)")
  ax0.legend()
  lo = min(s[0] for s in summary.values())
  ax1.set(xlabel="step", ylabel="val bits/byte", ylim=(lo - 0.1, lo + 1.0), title="validation")
  ax1.legend()
  fig.suptitle("MLA vs MHA / GQA / MQA at parameter parity (tiny dense, DeepSeek-V2 Table 1)")
  fig.tight_layout()
  fig.savefig(f"{out}/{NAME}.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  common.main(NAME, make)
