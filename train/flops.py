"""Model FLOPs per token, achieved FLOP/s and MFU of a training run.

Training FLOPs per token (Kaplan et al. 2020 arXiv 2001.08361 sec. 2.1;
PaLM, Chowdhery et al. 2022 arXiv 2204.02311 appendix B):

    flops_per_token = 6 * N_active + 6 * n_layers * T * H * (E_qk + E_v)

* 6 * N_active: a multiply-add (2 FLOPs) per weight per token in the forward
  pass and twice that in the backward pass. N_active counts every matmul
  weight a token passes through: attention projections, the FFN, or of an MoE
  layer the router (W_g, and W_noise for 'shazeer' noise), the A experts the
  token is routed to (all X with moe_mode='dense') and the shared experts,
  plus the unembedding D * V. The embedding *lookup* is excluded (a gather,
  no FLOPs; with tied embeddings the matrix counts once, as the unembedding);
  norm scales and the router bias are excluded (no matmul). Tokens dropped
  for capacity and the padding slots of capacity dispatch do not change the
  count: these are model FLOPs (PaLM appendix B), not hardware FLOPs.
* The attention term: per layer and token, q.k over T = seq_len positions
  (2 T H E_qk FLOPs forward) and the weighted sum of values (2 T H E_v), times
  3 for training. With E_qk = E_v = E this is PaLM's 12 * n_layers * T * H * E.
  T is the whole training sequence: the causal mask is not discounted (as in
  PaLM). MLA: E_qk = nope_head_dim + rope_head_dim, E_v = v_head_dim (the
  expanded training form, model/mla.py).

MFU = achieved model FLOP/s / (peak FLOP/s per chip * chips), with the
dense (no-sparsity) peaks of PEAK_FLOPS. Matmuls run in `model.dtype`; for
float32 the peak is what JAX's default matmul precision uses on that chip:
TF32 tensor cores on A100/H100/H200 and single-pass bfloat16 on TPU (JAX
"Matmul precision" docs), so float32 MFU is against those rates. float16
uses the bfloat16 rate (the same tensor-core rate on these chips). CPUs and
chips not in the table get no MFU.
"""

import dataclasses

from model.config import ModelConfig

# Dense peak FLOP/s per chip by matmul dtype (vendor datasheets: NVIDIA A100,
# H100 SXM and H200 SXM tensor-core peaks without sparsity; Google Cloud TPU
# v4 / v5e / v5p system architecture pages). float32 = TF32 on GPU, bf16 on TPU.
PEAK_FLOPS = {
    "H100 SXM": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "H200": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
}


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts of a Decoder (model/transformer.py).

  total: every parameter (what model.init creates).
  embedding: the token embedding V * D (+ the untied unembedding D * V).
  active: matmul weights a token uses (N_active of the module docstring).
  """

  total: int
  embedding: int
  active: int


def _attention(cfg: ModelConfig) -> tuple[int, int]:
  """(matmul weights, norm scales) of one attention block."""
  d, h = cfg.d_model, cfg.num_heads
  if cfg.attention == "mla":
    qk, v, c, r, q = (cfg.mla_nope_dim + cfg.rope_head_dim, cfg.mla_v_dim, cfg.kv_lora_rank,
                      cfg.rope_head_dim, cfg.q_lora_rank)
    w_q = d * q + q * h * qk if q else d * h * qk
    weights = w_q + d * (c + r) + c * h * cfg.mla_nope_dim + c * h * v + h * v * d
    return weights, c + q
  e = cfg.dim_per_head
  return d * (h + 2 * cfg.num_kv_heads) * e + h * e * d, 0


def _swiglu(d: int, f: int) -> int:
  return 3 * d * f  # w_in [D, 2F] (gate and up) + w_out [F, D]


def param_counts(cfg: ModelConfig) -> ParamCounts:
  """Total, embedding and active parameter counts of `cfg` (module docstring)."""
  d, x = cfg.d_model, cfg.num_experts
  embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  attn, attn_norms = _attention(cfg)
  total, active = embed + d, cfg.vocab_size * d  # + final norm; active: the unembedding
  for layer in range(cfg.num_layers):
    total += attn + attn_norms + 2 * d          # + attn_norm, ffn_norm
    active += attn
    if not cfg.is_moe_layer(layer):
      total += _swiglu(d, cfg.ffn_dim)
      active += _swiglu(d, cfg.ffn_dim)
      continue
    router = d * x * (2 if cfg.router_noise == "shazeer" else 1)
    expert = _swiglu(d, cfg.expert_ffn_dim)
    shared = _swiglu(d, cfg.shared_ffn_dim) if cfg.moe_num_shared_experts else 0
    total += router + x * expert + shared + (x if cfg.has_router_bias else 0)
    used = x if cfg.moe_mode == "dense" else cfg.moe_top_k
    active += router + used * expert + shared
  return ParamCounts(total=total, embedding=embed, active=active)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """6 * n_layers * T * H * (E_qk + E_v): training FLOPs of q.k and of the value sum."""
  if cfg.attention == "mla":
    qk, v = cfg.mla_nope_dim + cfg.rope_head_dim, cfg.mla_v_dim
  else:
    qk = v = cfg.dim_per_head
  return 6 * cfg.num_layers * seq_len * cfg.num_heads * (qk + v)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
  """Training model FLOPs per token: 6 * N_active + the attention term."""
  return 6 * param_counts(cfg).active + attention_flops_per_token(cfg, seq_len)


def chip_name(device_kind: str) -> str | None:
  """The PEAK_FLOPS key of a jax `device.device_kind`, or None (CPU, unknown chips)."""
  kind = device_kind.upper()
  if "H200" in kind:
    return "H200"
  if "H100" in kind:
    return None if ("PCIE" in kind or "NVL" in kind) else "H100 SXM"
  if "A100" in kind:
    return "A100"
  if kind.startswith("TPU V4"):
    return "TPU v4"
  if kind.startswith("TPU V5") and ("LITE" in kind or "V5E" in kind):
    return "TPU v5e"
  if kind.startswith("TPU V5"):
    return "TPU v5p"
  return None


def peak_flops(device_kind: str, dtype: str, num_chips: int = 1) -> float | None:
  """Peak FLOP/s of `num_chips` chips of `device_kind` for matmuls in `dtype`, or None."""
  chip = chip_name(device_kind)
  if chip is None:
    return None
  table = PEAK_FLOPS[chip]
  return table["float32" if dtype == "float32" else "bfloat16"] * num_chips


def throughput(flops_token: float, tokens_per_s: float | None,
               peak: float | None) -> dict:
  """{'flops_per_token', 'flops_per_s' (with a rate), 'mfu' (with a rate and a peak)}."""
  out = {"flops_per_token": float(flops_token)}
  if tokens_per_s:
    out["flops_per_s"] = flops_token * tokens_per_s
    if peak:
      out["mfu"] = out["flops_per_s"] / peak
  return out
