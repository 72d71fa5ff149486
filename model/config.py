"""Typed, validated model configuration.

`ModelConfig` is the only thing the model modules read. It is built from the
`config.model` section of an ml_collections config file (`configs/base.py`) by
`ModelConfig.from_dict`, which rejects unknown keys, and `__post_init__`
validates every field so that an impossible combination fails with a
`ValueError` naming the field *before* anything is traced or compiled.

The MoE fields are flat (``--config.model.num_experts=16``) and select the
swappable pieces: the router (`model/router.py`), the dispatch
(`model/moe.py`) and the auxiliary losses (`model/routing_losses.py`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

# Enumerations (string valued so they round-trip through config files/flags).
ATTENTION_TYPES = ("mha", "mla")  # MHA/GQA/MQA through num_kv_heads | multi-head latent.
MOE_MODES = ("sparse", "dense")  # top-k routing | all experts, softmax-weighted.
MOE_DISPATCHES = ("capacity", "dropless")  # one-hot einsum with capacity | sort + ragged_dot.
MOE_EP_EXCHANGES = ("auto", "ragged", "padded")  # dropless expert-parallel all-to-all.
# Switch | Shazeer-2017 / Mixtral | DeepSeek-V3 (model/router.py).
MOE_GATES = ("softmax_topk", "topk_softmax", "sigmoid")
ROUTER_NOISES = ("none", "shazeer", "jitter")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer with optional Mixture-of-Experts FFNs.

  Attributes:
    vocab_size: V, embedding rows. Byte tokenizer uses 259 (256 + BOS/EOS/PAD).
    d_model: D, residual width.
    num_layers: number of transformer blocks.
    num_heads: H, query heads.
    num_kv_heads: K/V heads; == num_heads is MHA, 1 is MQA, else GQA.
    head_dim: per-head width (0 means d_model // num_heads).
    ffn_dim: F, hidden width of the dense SwiGLU FFN.
    rope_theta: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: unembed with the transposed token embedding.
    max_seq_len: longest sequence the model is used at (training and cache).
    attention: attention type (see ATTENTION_TYPES).
    dtype: activation dtype (params stay float32; the router is always f32).
    num_experts: E; 0 means every FFN is the dense SwiGLU.
    moe_top_k: experts per token (k=1 Switch, k=2 Mixtral).
    moe_every: every n-th block uses the MoE FFN (blocks n-1, 2n-1, ...);
      1 means every block.
    moe_ffn_dim: hidden width of each expert (0 means ffn_dim).
    moe_mode: 'sparse' top-k routing or 'dense' (every expert, softmax gates).
    moe_dispatch: 'capacity' (fixed expert capacity, overflow dropped) or
      'dropless' (sort by expert + grouped matmul).
    moe_gate: 'softmax_topk' (softmax over all E, keep top-k probabilities;
      Switch) or 'topk_softmax' (softmax over the k selected logits; Shazeer
      2017 eq. 3-5 and Mixtral).
    moe_ep_exchange: all-to-all of the dropless expert-parallel path
      (model/expert_parallel.py): 'ragged' (ragged_all_to_all, GPU/TPU),
      'padded' (fixed worst-case buffers, any backend) or 'auto' (ragged
      unless the backend is CPU). Used only under a mesh with an `expert`
      axis of size > 1.
    capacity_factor: training capacity factor (Switch; ST-MoE uses 1.25).
    eval_capacity_factor: evaluation capacity factor (ST-MoE uses 2.0).
    router_noise: 'none' | 'shazeer' (noisy top-k gating, Shazeer 2017 eq. 4)
      | 'jitter' (fixed multiplicative input / additive logit noise).
    router_jitter_eps: multiplicative jitter, x * U(1-eps, 1+eps) (Switch).
    router_noise_std: additive N(0, std^2) noise on the router logits.
    router_init_scale: router weight init scale relative to fan-in init
      (Switch uses 0.1x). Ignored for 'shazeer', whose W_g, W_noise start at 0.
    aux_switch_coef: alpha of the Switch load-balancing loss.
    aux_importance_coef: w_importance of Shazeer's importance CV^2 loss.
    aux_load_coef: w_load of Shazeer's load CV^2 loss.
    aux_z_coef: c_z of the ST-MoE router z-loss.

  Multi-head latent attention (attention='mla'; DeepSeek-V2 arXiv 2405.04434
  sec. 2.1, model/mla.py). num_kv_heads and head_dim's RoPE check do not
  apply: every head reads one shared latent.
    q_lora_rank: Q, rank of the query compression c_q = RMSNorm(h W_DQ);
      0 is a full-rank W_Q.
    kv_lora_rank: C = d_c, rank of the KV latent c_kv = RMSNorm(h W_DKV).
    rope_head_dim: R = d_r, width of the decoupled RoPE key (shared by all
      heads) and of each head's RoPE query part; even.
    nope_head_dim: per-head query/key width without RoPE (0 means head_dim).
    v_head_dim: per-head value width (0 means head_dim).
    rope_interleave: RoPE on interleaved pairs (x0, x1), (x2, x3), ... of the
      R dims (HF DeepSeek-V3's default) instead of rotate-half; MLA only.

  DeepSeek-V3 MoE (arXiv 2412.19437 sec. 2.1.2, model/router.py, model/moe.py):
    moe_num_shared_experts: N_s, always-on experts added to the routed output
      (eq. 12), run as one SwiGLU of width moe_shared_ffn_dim.
    moe_shared_ffn_dim: that width (0 means moe_num_shared_experts * moe_ffn_dim).
    first_k_dense_replace: the first k blocks use the dense FFN (beside moe_every).
    norm_topk_prob: sigmoid gates: divide the selected s_i by their sum (eq. 13).
    routed_scaling_factor: multiplies every routed gate (HF DeepSeek-V3).
    n_group, topk_group: group-limited routing: experts in n_group groups,
      only the topk_group groups with the largest sum of their top-2 s_i + b_i
      are eligible (sigmoid gates; 1, 1 is off).
    router_bias_update_rate: gamma of auxiliary-loss-free balancing (eq. 16;
      Wang et al. 2024 arXiv 2408.15664): after every step b_i += gamma *
      sign(mean load - load_i). The bias b_i exists with sigmoid gates.
    aux_seq_coef: alpha of the complementary sequence-wise balance loss (eq. 17-20).
  """

  vocab_size: int = 259
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  ffn_dim: int = 512
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  max_seq_len: int = 2048
  attention: str = "mha"
  dtype: str = "float32"
  # Mixture of experts.
  num_experts: int = 0
  moe_top_k: int = 2
  moe_every: int = 1
  moe_ffn_dim: int = 0
  moe_mode: str = "sparse"
  moe_dispatch: str = "capacity"
  moe_gate: str = "topk_softmax"
  moe_ep_exchange: str = "auto"
  capacity_factor: float = 1.25
  eval_capacity_factor: float = 2.0
  router_noise: str = "none"
  router_jitter_eps: float = 0.0
  router_noise_std: float = 0.0
  router_init_scale: float = 0.1
  aux_switch_coef: float = 1e-2
  aux_importance_coef: float = 0.0
  aux_load_coef: float = 0.0
  aux_z_coef: float = 1e-3
  # Multi-head latent attention (attention='mla').
  q_lora_rank: int = 0
  kv_lora_rank: int = 0
  rope_head_dim: int = 0
  nope_head_dim: int = 0
  v_head_dim: int = 0
  rope_interleave: bool = True
  # DeepSeek-V3 MoE.
  moe_num_shared_experts: int = 0
  moe_shared_ffn_dim: int = 0
  first_k_dense_replace: int = 0
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 1.0
  n_group: int = 1
  topk_group: int = 1
  router_bias_update_rate: float = 0.0
  aux_seq_coef: float = 0.0

  # ---------------------------------------------------------------- derived
  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def expert_ffn_dim(self) -> int:
    return self.moe_ffn_dim or self.ffn_dim

  @property
  def mla_nope_dim(self) -> int:
    return self.nope_head_dim or self.dim_per_head

  @property
  def mla_v_dim(self) -> int:
    return self.v_head_dim or self.dim_per_head

  @property
  def shared_ffn_dim(self) -> int:
    return self.moe_shared_ffn_dim or self.moe_num_shared_experts * self.expert_ffn_dim

  @property
  def has_router_bias(self) -> bool:
    """MoE routers hold the selection bias b_i (sigmoid gates, DeepSeek-V3 eq. 16)."""
    return self.num_experts > 0 and self.moe_gate == "sigmoid"

  def is_moe_layer(self, layer: int) -> bool:
    """Block `layer` (0-based) uses the MoE FFN: every `moe_every`-th block
    from block `first_k_dense_replace` on."""
    return (self.num_experts > 0 and layer >= self.first_k_dense_replace
            and (layer + 1) % self.moe_every == 0)

  @property
  def num_moe_layers(self) -> int:
    return sum(self.is_moe_layer(i) for i in range(self.num_layers))

  # ------------------------------------------------------------- validation
  def __post_init__(self):
    def err(field: str, msg: str):
      raise ValueError(f"model.{field}: {msg} (got {getattr(self, field)!r})")

    def enum(field: str, allowed):
      if getattr(self, field) not in allowed:
        err(field, f"must be one of {allowed}")

    for f in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
              "ffn_dim", "max_seq_len", "moe_top_k", "moe_every"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
        err(f, "must be a positive integer")
    for f in ("head_dim", "num_experts", "moe_ffn_dim"):
      if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
        err(f, "must be a non-negative integer")
    enum("attention", ATTENTION_TYPES)
    mla = self.attention == "mla"
    for f in ("q_lora_rank", "kv_lora_rank", "rope_head_dim", "nope_head_dim", "v_head_dim",
              "moe_num_shared_experts", "moe_shared_ffn_dim", "first_k_dense_replace"):
      if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int) \
          or getattr(self, f) < 0:
        err(f, "must be a non-negative integer")
    for f in ("n_group", "topk_group"):
      if isinstance(getattr(self, f), bool) or not isinstance(getattr(self, f), int) \
          or getattr(self, f) <= 0:
        err(f, "must be a positive integer")
    if not mla and self.num_heads % self.num_kv_heads:
      err("num_kv_heads", f"must divide num_heads={self.num_heads}")
    if (not self.head_dim and self.d_model % self.num_heads
        and not (mla and self.nope_head_dim and self.v_head_dim)):
      err("num_heads", f"must divide d_model={self.d_model} when head_dim=0")
    if not mla and self.dim_per_head % 2:
      err("head_dim", "RoPE needs an even per-head dimension")
    if self.rope_head_dim % 2:
      err("rope_head_dim", "RoPE needs an even width")
    if mla:
      for f in ("kv_lora_rank", "rope_head_dim"):
        if getattr(self, f) <= 0:
          err(f, "must be > 0 with attention='mla'")
    else:
      for f in ("q_lora_rank", "kv_lora_rank", "rope_head_dim", "nope_head_dim", "v_head_dim"):
        if getattr(self, f):
          err(f, f"is a multi-head latent attention width: only with attention='mla' "
              f"(attention={self.attention!r})")
    enum("dtype", DTYPES)
    enum("moe_mode", MOE_MODES)
    enum("moe_dispatch", MOE_DISPATCHES)
    enum("moe_gate", MOE_GATES)
    enum("moe_ep_exchange", MOE_EP_EXCHANGES)
    enum("router_noise", ROUTER_NOISES)
    if self.num_experts and self.moe_top_k > self.num_experts:
      err("moe_top_k", f"cannot exceed num_experts={self.num_experts}")
    if self.num_experts == 1:
      err("num_experts", "use 0 (dense FFN) or at least 2 experts")
    if self.num_experts and self.moe_every > self.num_layers:
      err("moe_every", f"leaves no MoE layer among num_layers={self.num_layers}")
    if self.num_experts and not self.num_moe_layers:
      err("first_k_dense_replace", f"leaves no MoE layer among num_layers={self.num_layers} "
          f"with moe_every={self.moe_every}")
    self._check_deepseek_moe(err)
    for f in (f.name for f in dataclasses.fields(self)):
      if isinstance(getattr(self, f), float) and not math.isfinite(getattr(self, f)):
        err(f, "must be finite")
    for f in ("capacity_factor", "eval_capacity_factor", "rope_theta", "norm_eps"):
      if not getattr(self, f) > 0:
        err(f, "must be > 0")
    for f in ("router_jitter_eps", "router_noise_std", "router_init_scale",
              "aux_switch_coef", "aux_importance_coef", "aux_load_coef",
              "aux_z_coef"):
      if getattr(self, f) < 0:
        err(f, "must be non-negative")
    if self.router_jitter_eps >= 1:
      err("router_jitter_eps", "must be < 1")
    if self.aux_load_coef > 0 and self.router_noise != "shazeer":
      err("aux_load_coef", "the smooth load estimator P(x,i) needs "
          "router_noise='shazeer'")
    if (self.router_noise == "jitter" and self.router_jitter_eps == 0
        and self.router_noise_std == 0):
      err("router_noise", "'jitter' needs router_jitter_eps or router_noise_std > 0")

  def _check_deepseek_moe(self, err):
    """Shared experts, sigmoid gates, bias balancing and group-limited routing."""
    if self.moe_num_shared_experts and not self.num_experts:
      err("moe_num_shared_experts", "shared experts need an MoE (num_experts > 0)")
    if self.moe_shared_ffn_dim and not self.moe_num_shared_experts:
      err("moe_shared_ffn_dim", "is the width of the shared experts: set "
          "moe_num_shared_experts > 0")
    for f in ("router_bias_update_rate", "aux_seq_coef"):
      if not getattr(self, f) >= 0:
        err(f, "must be non-negative")
    if not self.routed_scaling_factor > 0:
      err("routed_scaling_factor", "must be > 0")
    sigmoid = self.moe_gate == "sigmoid"
    if sigmoid and self.moe_mode != "sparse":
      err("moe_gate", "'sigmoid' gates select top-k experts: needs moe_mode='sparse'")
    if sigmoid and self.router_noise == "shazeer":
      err("router_noise", "'shazeer' noisy gating is a softmax gate; not with "
          "moe_gate='sigmoid'")
    if self.router_bias_update_rate > 0 and not (sigmoid and self.num_experts):
      err("router_bias_update_rate", "the selection bias b_i exists with "
          "moe_gate='sigmoid' and num_experts > 0")
    if self.topk_group > self.n_group:
      err("topk_group", f"cannot exceed n_group={self.n_group}")
    if self.n_group > 1:
      if not sigmoid:
        err("n_group", "group-limited routing scores groups by sigmoid gates: needs "
            "moe_gate='sigmoid'")
      if self.num_experts % self.n_group:
        err("n_group", f"must divide num_experts={self.num_experts}")
      if self.num_experts // self.n_group < 2:
        err("n_group", f"a group is scored by its top-2 experts: needs at least 2 experts "
            f"per group (num_experts={self.num_experts})")
      if self.topk_group * (self.num_experts // self.n_group) < self.moe_top_k:
        err("topk_group", f"the kept groups hold fewer experts than moe_top_k="
            f"{self.moe_top_k}")

  # ---------------------------------------------------------- construction
  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a mapping (e.g. `config.model`), rejecting unknown keys."""
    return from_mapping(cls, "model", d)

  # Fields of earlier versions, accepted at their old default in the config.json
  # of existing runs: moe_kernel_threads moved to model/impl.py.
  REMOVED = {"moe_kernel_threads": 0}

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def from_mapping(cls, section: str, d: Mapping[str, Any]):
  """`cls(**d)` for a frozen config dataclass, with the fields it omits at
  their defaults (the dataclass is the one place defaults are written).

  Rejects unknown keys and values of the wrong type, naming `section.field`;
  values from command-line flags are converted where that is exact (an int
  for a float field, '1e-3' or 'inf' for a float, 'true' for a bool), so
  that `__post_init__` sees the declared types and can check ranges.
  """
  names = {f.name for f in dataclasses.fields(cls)}
  removed = getattr(cls, "REMOVED", {})
  d = {k: v for k, v in d.items() if not (k in removed and v == removed[k])}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"{section}: unknown field(s) {unknown}; known: {sorted(names)}")
  hints = typing.get_type_hints(cls)
  return cls(**{k: _coerce(f"{section}.{k}", hints[k], v) for k, v in d.items()})


def _coerce(name: str, hint, value):
  """value as the scalar type `hint` (int, float, bool, str, or Optional of one)."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    if value is None:
      return None
    hint = args[0] if len(args) == 1 else hint
  if typing.get_origin(hint) is tuple:
    if isinstance(value, (list, tuple)):
      return tuple(_coerce(name, args[0] if args else Any, v) for v in value)
    return (_coerce(name, args[0] if args else Any, value),)
  if hint is bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
      return value.lower() == "true"
    if not isinstance(value, bool):
      raise ValueError(f"{name}: must be true or false (got {value!r})")
  elif hint is int:
    if isinstance(value, str):
      try:
        value = int(value)
      except ValueError:
        pass
    if isinstance(value, float) and value.is_integer() and math.isfinite(value):
      value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"{name}: must be an integer (got {value!r})")
  elif hint is float:
    if isinstance(value, str):
      try:
        value = float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"{name}: must be a number (got {value!r})")
    value = float(value)
  elif hint is str:
    if not isinstance(value, str):
      raise ValueError(f"{name}: must be a string (got {value!r})")
  return value
