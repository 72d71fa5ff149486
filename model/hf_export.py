"""moelab (ModelConfig, params) -> a Hugging Face checkpoint directory.

    notes = save_hf(cfg, params, "out_dir")   # config.json + model.safetensors

The directory loads with `transformers.AutoModelForCausalLM.from_pretrained`
as the architecture that computes the same function (the layouts are the
inverse of model/hf_interop.py and model/hf_deepseek.py; tensors are written
as HF's `save_pretrained` writes them, float32):

    attention='mha', no experts                    -> LlamaForCausalLM
    attention='mha', Mixtral-style MoE             -> MixtralForCausalLM
    attention='mla' (dense or DeepSeek-V3 MoE)     -> DeepseekV3ForCausalLM

What HF computes is moelab's decode function (dropless routing, no router
noise), so a config is exported when that function has an HF form and
refused otherwise, with a ValueError naming the field: softmax-then-top-k
gates without renormalisation (moe_gate='softmax_topk') or every expert
weighted (moe_mode='dense'), MoE every n > 1 blocks, shared experts,
dense-first blocks or scaled gates without MLA, sigmoid gates without MLA
(or MLA with softmax gates), shared experts whose width is not a multiple
of the expert width. Settings that shape only training are not part of an
HF checkpoint and are returned as notes instead: capacity dispatch (HF runs
every token through its experts, as moelab's decode does; moelab's
capacity-limited train/eval loss is not reproduced), router noise (and
Shazeer's W_noise, dropped), the auxiliary-loss coefficients, the bias
update rate, and a non-float32 activation dtype.
"""

from __future__ import annotations

import json
import os

import numpy as np
from einops import rearrange

from model import hf_deepseek
from model.config import ModelConfig


def export_kind(cfg: ModelConfig) -> str:
  """'llama' | 'mixtral' | 'deepseek_v3', or a ValueError naming the field HF cannot express."""
  def refuse(field: str, why: str):
    raise ValueError(f"hf_export: model.{field}={getattr(cfg, field)!r} has no Hugging Face "
                     f"form: {why}")

  moe = cfg.num_experts > 0
  if moe and cfg.moe_mode != "sparse":
    refuse("moe_mode", "HF MoE models route top-k")
  if moe and cfg.moe_every != 1:
    refuse("moe_every", "HF MoE models use experts in every block (DeepSeek-V3: after "
           "first_k_dense_replace)")
  if cfg.attention == "mla":
    if moe and cfg.moe_gate != "sigmoid":
      refuse("moe_gate", "DeepSeek-V3, the HF model with MLA, has sigmoid gates")
    if cfg.moe_num_shared_experts and cfg.shared_ffn_dim % cfg.expert_ffn_dim:
      refuse("moe_shared_ffn_dim", f"HF DeepSeek-V3's shared experts are n_shared_experts x "
             f"moe_intermediate_size={cfg.expert_ffn_dim} wide")
    return "deepseek_v3"
  if not moe:
    return "llama"
  if cfg.moe_gate != "topk_softmax":
    refuse("moe_gate", "Mixtral renormalises softmax over the top-k ('topk_softmax'); "
           "sigmoid gates need attention='mla' (DeepSeek-V3)")
  for field, default in (("moe_num_shared_experts", 0), ("first_k_dense_replace", 0),
                         ("routed_scaling_factor", 1.0)):
    if getattr(cfg, field) != default:
      refuse(field, "Mixtral has no such setting (DeepSeek-V3 does, with attention='mla')")
  return "mixtral"


def training_notes(cfg: ModelConfig) -> list[str]:
  """What the checkpoint leaves out because it shapes training only."""
  notes = []
  if cfg.num_experts and cfg.moe_dispatch == "capacity":
    notes.append("moe_dispatch='capacity': HF routes every token to its experts (dropless), as "
                 "moelab decodes; the capacity-limited training/eval loss is not reproduced")
  if cfg.num_experts and cfg.router_noise != "none":
    notes.append(f"router_noise={cfg.router_noise!r} (training only) is not exported"
                 + (" and router/w_noise is dropped" if cfg.router_noise == "shazeer" else ""))
  for f in ("aux_switch_coef", "aux_importance_coef", "aux_load_coef", "aux_z_coef",
            "aux_seq_coef", "router_bias_update_rate"):
    if cfg.num_experts and getattr(cfg, f):
      notes.append(f"{f}={getattr(cfg, f)} (training only) is not exported")
  if cfg.dtype != "float32":
    notes.append(f"dtype={cfg.dtype!r}: weights are written as float32")
  return notes


def hf_config(cfg: ModelConfig, kind: str) -> dict:
  hf = dict(
      model_type=kind, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.expert_ffn_dim if kind == "mixtral" else cfg.ffn_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head, hidden_act="silu",
      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, dtype="float32",
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
  if kind == "llama":
    hf.update(architectures=["LlamaForCausalLM"], mlp_bias=False)
  elif kind == "mixtral":
    hf.update(architectures=["MixtralForCausalLM"], num_local_experts=cfg.num_experts,
              num_experts_per_tok=cfg.moe_top_k, router_jitter_noise=0.0, sliding_window=None)
  else:
    hf.pop("head_dim")
    hf.update(hf_deepseek.hf_config(cfg))
  return hf


def state_dict(cfg: ModelConfig, params, kind: str) -> dict:
  """HF tensor name -> float32 numpy array (C-contiguous), the on-disk layout."""
  p = _numpy(params)
  sd = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = p["unembed"].T
  h, k = cfg.num_heads, cfg.num_kv_heads
  for i in range(cfg.num_layers):
    pre, b = f"model.layers.{i}.", p[f"block_{i}"]
    sd[pre + "input_layernorm.weight"] = b["attn_norm"]["scale"]
    sd[pre + "post_attention_layernorm.weight"] = b["ffn_norm"]["scale"]
    a = pre + "self_attn."
    if kind == "deepseek_v3":
      sd.update(hf_deepseek.mla_to_hf(b["attn"], cfg, a))
    else:
      flat = lambda w: rearrange(w, "d n e -> (n e) d")
      w_qkv = b["attn"]["w_qkv"]
      sd.update({a + "q_proj.weight": flat(w_qkv[:, :h]),
                 a + "k_proj.weight": flat(w_qkv[:, h:h + k]),
                 a + "v_proj.weight": flat(w_qkv[:, h + k:]),
                 a + "o_proj.weight": rearrange(b["attn"]["w_o"], "h e d -> d (h e)")})
    if "ffn" in b:
      f = cfg.ffn_dim
      sd.update({pre + "mlp.gate_proj.weight": b["ffn"]["w_in"][:, :f].T,
                 pre + "mlp.up_proj.weight": b["ffn"]["w_in"][:, f:].T,
                 pre + "mlp.down_proj.weight": b["ffn"]["w_out"].T})
    elif kind == "deepseek_v3":
      sd.update(hf_deepseek.moe_to_hf(b["moe"], cfg, pre + "mlp."))
      if not cfg.moe_num_shared_experts:  # HF builds an empty shared MLP (0 x D)
        s = pre + "mlp.shared_experts."
        sd.update({s + "gate_proj.weight": np.zeros((0, cfg.d_model), np.float32),
                   s + "up_proj.weight": np.zeros((0, cfg.d_model), np.float32),
                   s + "down_proj.weight": np.zeros((cfg.d_model, 0), np.float32)})
    else:
      m, f = pre + "block_sparse_moe.", cfg.expert_ffn_dim
      sd[m + "gate.weight"] = b["moe"]["router"]["w_gate"].T
      for e in range(cfg.num_experts):
        sd[f"{m}experts.{e}.w1.weight"] = b["moe"]["w_in"][e, :, :f].T
        sd[f"{m}experts.{e}.w3.weight"] = b["moe"]["w_in"][e, :, f:].T
        sd[f"{m}experts.{e}.w2.weight"] = b["moe"]["w_out"][e].T
  return {name: np.ascontiguousarray(x, np.float32) for name, x in sd.items()}


def _numpy(tree):
  if isinstance(tree, dict):
    return {k: _numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def save_hf(cfg: ModelConfig, params, directory: str, **config_fields) -> list[str]:
  """Writes `directory`/config.json and model.safetensors; returns the notes of
  `training_notes`. config_fields (e.g. bos_token_id) are added to config.json."""
  from safetensors.numpy import save_file  # noqa: PLC0415 (optional dependency)
  kind = export_kind(cfg)
  tensors = state_dict(cfg, params, kind)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({**hf_config(cfg, kind), **config_fields}, f, indent=2, sort_keys=True)
  return training_notes(cfg)
