"""Hugging Face DeepSeek-V3 <-> moelab: config fields and weight layouts.

DeepseekV3ForCausalLM (transformers 5.x) is a moelab decoder with MLA
attention (model/mla.py), dense SwiGLU FFNs in the first
`first_k_dense_replace` blocks and, in the others, the DeepSeek-V3 MoE: a
sigmoid router with the selection bias `e_score_correction_bias`,
group-limited top-k, normalised and scaled gates (model/router.py) and
shared experts (model/moe.py). Names and layouts (HF `nn.Linear` is [out, in]):

    q_proj [H(n+R), D]                   -> attn/w_q [D, H, n+R]     (q_lora_rank None)
    q_a_proj [Q, D], q_a_layernorm [Q]   -> attn/w_dq [D, Q], attn/q_norm
    q_b_proj [H(n+R), Q]                 -> attn/w_uq [Q, H, n+R]
    kv_a_proj_with_mqa [C+R, D]          -> attn/w_dkv [D, C+R]      ([c_kv ; k_rope] outputs)
    kv_a_layernorm [C]                   -> attn/kv_norm             (normalises c_kv only)
    kv_b_proj [H(n+v), C]                -> attn/w_uk [C, H, n], attn/w_uv [C, H, v]
    o_proj [D, Hv]                       -> attn/w_o [H, v, D]
    mlp.gate.weight [X, D], e_score_correction_bias [X] -> moe/router/w_gate [D, X], moe/router/bias
    mlp.experts.gate_up_proj [X, 2F, D], down_proj [X, D, F]    (module state), or on disk
      mlp.experts.{e}.gate_proj / up_proj [F, D], down_proj [D, F] -> moe/w_in [X, D, 2F], w_out
    mlp.shared_experts.gate/up/down_proj -> moe/shared/w_in [D, 2S], w_out [S, D]

(n nope, v value head widths; S = moe_intermediate_size * n_shared_experts.)
Refused: any RoPE scaling (YaRN, with its mscale on the attention scale) and
multi-token-prediction layers (num_nextn_predict_layers > 0), which moelab
does not implement.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from einops import rearrange


def _get(hf: Mapping[str, Any], key: str, default=None):
  return hf.get(key, default) if hf.get(key) is not None else default


def config_kwargs(hf: Mapping[str, Any]) -> dict:
  """ModelConfig fields of an HF DeepSeek-V3 config dict beyond the Llama-like ones."""
  mtp = _get(hf, "num_nextn_predict_layers", _get(hf, "num_mtp_layers", 0))
  if mtp:
    raise ValueError(f"hf_interop: num_nextn_predict_layers={mtp}: multi-token-prediction "
                     "layers are not supported (set it to 0 for the main model alone, and "
                     "drop the MTP weights)")
  for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
    if hf.get(key) not in (None, want):
      raise ValueError(f"hf_interop: {key}={hf[key]!r} is not supported (only {want!r})")
  h = hf["num_attention_heads"]
  if _get(hf, "num_key_value_heads", h) != h:
    raise ValueError(f"hf_interop: DeepSeek-V3 MLA needs num_key_value_heads == "
                     f"num_attention_heads ({hf['num_key_value_heads']} != {h})")
  layers = hf["num_hidden_layers"]
  experts = _get(hf, "n_routed_experts", _get(hf, "num_local_experts", 0))
  dense_first = min(_get(hf, "first_k_dense_replace", 0), layers)
  kw = dict(attention="mla", num_kv_heads=h, q_lora_rank=_get(hf, "q_lora_rank", 0),
            kv_lora_rank=hf["kv_lora_rank"], rope_head_dim=hf["qk_rope_head_dim"],
            nope_head_dim=hf["qk_nope_head_dim"], v_head_dim=hf["v_head_dim"],
            head_dim=0 if hf["hidden_size"] % h == 0 else hf["v_head_dim"],
            rope_interleave=bool(_get(hf, "rope_interleave", True)))
  if experts and dense_first < layers:
    kw.update(num_experts=experts, moe_top_k=hf["num_experts_per_tok"], moe_every=1,
              moe_ffn_dim=hf["moe_intermediate_size"], moe_mode="sparse", moe_gate="sigmoid",
              moe_dispatch="dropless", router_noise="none", first_k_dense_replace=dense_first,
              moe_num_shared_experts=_get(hf, "n_shared_experts", 0),
              norm_topk_prob=bool(_get(hf, "norm_topk_prob", True)),
              routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0)),
              n_group=_get(hf, "n_group", 1), topk_group=_get(hf, "topk_group", 1),
              aux_switch_coef=0.0, aux_z_coef=0.0)
  return kw


def mla_from_hf(take, pre: str, cfg) -> dict:
  """attn params of block `pre` ('model.layers.{i}.')."""
  h, nope = cfg.num_heads, cfg.mla_nope_dim
  a = pre + "self_attn."
  heads = lambda w: rearrange(w, "(h e) i -> i h e", h=h)
  out = {}
  if cfg.q_lora_rank:
    out.update(w_dq=take(a + "q_a_proj.weight").T,
               q_norm={"scale": take(a + "q_a_layernorm.weight")},
               w_uq=heads(take(a + "q_b_proj.weight")))
  else:
    out["w_q"] = heads(take(a + "q_proj.weight"))
  kv_b = heads(take(a + "kv_b_proj.weight"))               # [C, H, n + v]
  out.update(w_dkv=take(a + "kv_a_proj_with_mqa.weight").T,
             kv_norm={"scale": take(a + "kv_a_layernorm.weight")},
             w_uk=kv_b[..., :nope], w_uv=kv_b[..., nope:],
             w_o=rearrange(take(a + "o_proj.weight"), "d (h v) -> h v d", h=h))
  return out


def moe_from_hf(sd, take, pre: str, cfg) -> dict:
  """moe params of block `pre`: fused v5 module state or the per-expert disk layout."""
  m = pre + "mlp."
  swiglu = lambda p: np.concatenate([take(p + "gate_proj.weight").T,
                                     take(p + "up_proj.weight").T], axis=1)
  out = {"router": {"w_gate": take(m + "gate.weight").T,
                    "bias": take(m + "gate.e_score_correction_bias")}}
  if m + "experts.gate_up_proj" in sd:
    out.update(w_in=np.transpose(take(m + "experts.gate_up_proj"), (0, 2, 1)),
               w_out=np.transpose(take(m + "experts.down_proj"), (0, 2, 1)))
  else:
    ex = [f"{m}experts.{e}." for e in range(cfg.num_experts)]
    out.update(w_in=np.stack([swiglu(p) for p in ex]),
               w_out=np.stack([take(p + "down_proj.weight").T for p in ex]))
  if cfg.moe_num_shared_experts:
    out["shared"] = {"w_in": swiglu(m + "shared_experts."),
                     "w_out": take(m + "shared_experts.down_proj.weight").T}
  return out


# ------------------------------------------------------------------ export
def hf_config(cfg) -> dict:
  """DeepseekV3 config.json fields of an MLA ModelConfig (the checks are hf_export's)."""
  moe = cfg.num_experts > 0
  return dict(
      model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
      num_key_value_heads=cfg.num_heads, q_lora_rank=cfg.q_lora_rank or None,
      kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.rope_head_dim,
      qk_nope_head_dim=cfg.mla_nope_dim, v_head_dim=cfg.mla_v_dim,
      rope_interleave=cfg.rope_interleave, num_nextn_predict_layers=0,
      n_routed_experts=cfg.num_experts if moe else 1,
      num_experts_per_tok=cfg.moe_top_k if moe else 1,
      moe_intermediate_size=cfg.expert_ffn_dim,
      n_shared_experts=cfg.shared_ffn_dim // cfg.expert_ffn_dim if moe else 0,
      first_k_dense_replace=cfg.first_k_dense_replace if moe else cfg.num_layers,
      norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
      n_group=cfg.n_group, topk_group=cfg.topk_group)


def mla_to_hf(attn: dict, cfg, a: str) -> dict:
  """HF tensors of one block's attn params; `a` = 'model.layers.{i}.self_attn.'."""
  flat = lambda w: rearrange(w, "i h e -> (h e) i")
  out = {a + "kv_a_proj_with_mqa.weight": attn["w_dkv"].T,
         a + "kv_a_layernorm.weight": attn["kv_norm"]["scale"],
         a + "kv_b_proj.weight": flat(np.concatenate([attn["w_uk"], attn["w_uv"]], -1)),
         a + "o_proj.weight": rearrange(attn["w_o"], "h v d -> d (h v)")}
  if cfg.q_lora_rank:
    out.update({a + "q_a_proj.weight": attn["w_dq"].T,
                a + "q_a_layernorm.weight": attn["q_norm"]["scale"],
                a + "q_b_proj.weight": flat(attn["w_uq"])})
  else:
    out[a + "q_proj.weight"] = flat(attn["w_q"])
  return out


def moe_to_hf(moe: dict, cfg, m: str) -> dict:
  """HF on-disk tensors of one block's moe params; `m` = 'model.layers.{i}.mlp.'."""
  f = cfg.expert_ffn_dim
  out = {m + "gate.weight": moe["router"]["w_gate"].T,
         m + "gate.e_score_correction_bias": moe["router"]["bias"]}
  for e in range(cfg.num_experts):
    out[f"{m}experts.{e}.gate_proj.weight"] = moe["w_in"][e, :, :f].T
    out[f"{m}experts.{e}.up_proj.weight"] = moe["w_in"][e, :, f:].T
    out[f"{m}experts.{e}.down_proj.weight"] = moe["w_out"][e].T
  if cfg.moe_num_shared_experts:
    s = cfg.shared_ffn_dim
    out[m + "shared_experts.gate_proj.weight"] = moe["shared"]["w_in"][:, :s].T
    out[m + "shared_experts.up_proj.weight"] = moe["shared"]["w_in"][:, s:].T
    out[m + "shared_experts.down_proj.weight"] = moe["shared"]["w_out"].T
  return out
