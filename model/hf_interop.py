"""Hugging Face Llama / Mistral / Mixtral / DeepSeek-V3 checkpoints -> moelab (ModelConfig, params).

    cfg, params = load_hf("path/to/checkpoint_dir")          # config.json + *.safetensors
    cfg = config_from_hf(hf_model.config)                    # or a config.json dict
    params = params_from_hf(hf_model.state_dict(), cfg)      # torch tensors or arrays

The architectures are the same function (pre-norm RMSNorm, RoPE in the
rotate-half layout, SwiGLU, grouped K/V, Mixtral top-k softmax routing); only
names and layouts differ. HF `nn.Linear` weights are [out, in]:

    q/k/v_proj.weight [H*E, D], [K*E, D]  -> attn/w_qkv [D, H + 2K, E]  (fused, heads q|k|v)
    o_proj.weight [D, H*E]                -> attn/w_o   [H, E, D]
    gate_proj, up_proj [F, D]; down [D, F]-> ffn/w_in [D, 2F] ([gate | up]), ffn/w_out [F, D]
    input_layernorm / post_attention_layernorm / model.norm -> attn_norm / ffn_norm / final_norm
    embed_tokens [V, D] -> embed;  lm_head [V, D] -> unembed [D, V] (absent when tied)

Mixtral experts come either as saved on disk (`block_sparse_moe.experts.{e}.w1`
gate, `w3` up, `w2` down, `block_sparse_moe.gate`) or as transformers v5
module state (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj`
[E, D, F], `mlp.gate.weight` [E, D]) and map to moe/w_in [E, D, 2F],
moe/w_out [E, F, D], moe/router/w_gate [D, E].

HF Mixtral routing (softmax over all E, top-k, renormalise) equals
softmax over the top-k logits, i.e. moe_gate='topk_softmax'; the loaded
config uses moe_dispatch='dropless' so no token is ever dropped.
Mistral's sliding window is exact for sequences up to the window, so it
bounds `max_seq_len`. DeepSeek-V3 (MLA + sigmoid-gated MoE with shared
experts) maps through model/hf_deepseek.py; `save_hf` (model/hf_export.py)
goes the other way.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from model import hf_deepseek
from model.config import ModelConfig
from model.hf_export import save_hf  # noqa: F401  (moelab -> HF, the other direction)
from model.transformer import Decoder

SUPPORTED = ("llama", "mistral", "mixtral", "deepseek_v3")


def _get(hf: Mapping[str, Any], key: str, default=None):
  return hf.get(key, default) if hf.get(key) is not None else default


def config_from_hf(hf_config, **overrides) -> ModelConfig:
  """ModelConfig of an HF Llama/Mistral/Mixtral/DeepSeek-V3 config (object or dict)."""
  hf = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
  kind = hf.get("model_type")
  if kind not in SUPPORTED:
    raise ValueError(f"hf_interop: model_type must be one of {SUPPORTED} (got {kind!r})")
  if _get(hf, "hidden_act", "silu") != "silu":
    raise ValueError(f"hf_interop: only SwiGLU (hidden_act='silu'), got {hf['hidden_act']!r}")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise ValueError(f"hf_interop: {flag}=True is not supported")
  rope = dict(_get(hf, "rope_parameters", {}) or {})
  scaling = _get(hf, "rope_scaling")
  rope_type = rope.get("rope_type", (scaling or {}).get("rope_type", "default"))
  if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in
                                (None, "default")):
    raise ValueError(f"hf_interop: only default RoPE is supported (got {rope_type!r}): "
                     "YaRN and other RoPE scaling (and DeepSeek's YaRN mscale of the "
                     "attention scale) are not implemented")
  theta = rope.get("rope_theta", _get(hf, "rope_theta", 10_000.0))
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = _get(hf, "head_dim", d // h)
  max_len = _get(hf, "max_position_embeddings", 2048)
  if _get(hf, "sliding_window") is not None:
    max_len = min(max_len, hf["sliding_window"])
  kw = dict(
      vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
      num_heads=h, num_kv_heads=_get(hf, "num_key_value_heads", h),
      head_dim=0 if head_dim == d // h else head_dim, ffn_dim=hf["intermediate_size"],
      rope_theta=float(theta), norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
      tie_embeddings=bool(_get(hf, "tie_word_embeddings", False)), max_seq_len=int(max_len),
      dtype="float32")
  if kind == "mixtral":
    kw.update(num_experts=hf["num_local_experts"], moe_top_k=hf["num_experts_per_tok"],
              moe_every=1, moe_mode="sparse", moe_gate="topk_softmax", moe_dispatch="dropless",
              router_noise="none")
  if kind == "deepseek_v3":
    kw.update(hf_deepseek.config_kwargs(hf))
  kw.update(overrides)
  return ModelConfig(**kw)


def _np(x) -> np.ndarray:
  """torch tensor (any dtype) / jax / numpy array -> float32 numpy."""
  if hasattr(x, "detach"):
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, np.float32)


def params_from_hf(state_dict: Mapping[str, Any], cfg: ModelConfig) -> dict:
  """moelab params of an HF state dict; checks every shape and that no weight
  is left over (rotary buffers and a tied lm_head excepted)."""
  sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
  used = set()

  def take(name):
    if name not in sd:
      raise KeyError(f"hf_interop: missing weight {name!r}")
    used.add(name)
    return _np(sd[name])

  h, k = cfg.num_heads, cfg.num_kv_heads
  params = {"embed": take("model.embed_tokens.weight"),
            "final_norm": {"scale": take("model.norm.weight")}}
  if not cfg.tie_embeddings:
    params["unembed"] = take("lm_head.weight").T
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    block = {"attn_norm": {"scale": take(pre + "input_layernorm.weight")},
             "ffn_norm": {"scale": take(pre + "post_attention_layernorm.weight")}}
    if cfg.attention == "mla":
      block["attn"] = hf_deepseek.mla_from_hf(take, pre, cfg)
    else:
      heads = lambda w, n: rearrange(w, "(n e) d -> d n e", n=n)
      w_qkv = np.concatenate([heads(take(pre + "self_attn.q_proj.weight"), h),
                              heads(take(pre + "self_attn.k_proj.weight"), k),
                              heads(take(pre + "self_attn.v_proj.weight"), k)], axis=1)
      w_o = rearrange(take(pre + "self_attn.o_proj.weight"), "d (h e) -> h e d", h=h)
      block["attn"] = {"w_qkv": w_qkv, "w_o": w_o}
    if cfg.is_moe_layer(i) and cfg.moe_gate == "sigmoid":
      block["moe"] = hf_deepseek.moe_from_hf(sd, take, pre, cfg)
    elif cfg.is_moe_layer(i):
      block["moe"] = _moe_from_hf(sd, take, pre, cfg.num_experts)
    else:
      block["ffn"] = {"w_in": np.concatenate([take(pre + "mlp.gate_proj.weight").T,
                                              take(pre + "mlp.up_proj.weight").T], axis=1),
                      "w_out": take(pre + "mlp.down_proj.weight").T}
    params[f"block_{i}"] = block
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  left = sorted(n for n in set(sd) - used - ignorable
                if "rotary_emb" not in n and 0 not in tuple(sd[n].shape))  # DeepSeek N_s=0: [0, D]
  if left:
    raise ValueError(f"hf_interop: unused HF weights {left[:8]}{' ...' if len(left) > 8 else ''}")
  _check_shapes(params, cfg)
  return jax.tree.map(jnp.asarray, params)


def _moe_from_hf(sd, take, pre: str, num_experts: int) -> dict:
  """Mixtral sparse-MoE block, legacy per-expert or v5 fused layout."""
  if pre + "mlp.experts.gate_up_proj" in sd:                      # transformers v5 modules
    return {"router": {"w_gate": take(pre + "mlp.gate.weight").T},
            "w_in": np.transpose(take(pre + "mlp.experts.gate_up_proj"), (0, 2, 1)),
            "w_out": np.transpose(take(pre + "mlp.experts.down_proj"), (0, 2, 1))}
  moe = pre + "block_sparse_moe."                                  # checkpoint files
  ex = lambda e, w: take(f"{moe}experts.{e}.{w}.weight")
  return {"router": {"w_gate": take(moe + "gate.weight").T},
          "w_in": np.stack([np.concatenate([ex(e, "w1").T, ex(e, "w3").T], axis=1)
                            for e in range(num_experts)]),
          "w_out": np.stack([ex(e, "w2").T for e in range(num_experts)])}


def _check_shapes(params, cfg: ModelConfig):
  want = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                  jnp.zeros((1, 1), jnp.int32))["params"])
  got_s = jax.tree_util.tree_structure(params)
  want_s = jax.tree_util.tree_structure(want)
  if got_s != want_s:
    raise ValueError(f"hf_interop: param tree mismatch:\n{got_s}\nvs\n{want_s}")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
    if a.shape != b.shape:
      raise ValueError(f"hf_interop: {jax.tree_util.keystr(path)} has shape {a.shape}, "
                       f"expected {b.shape}")


def load_safetensors(path: str) -> dict:
  """All tensors of a .safetensors file or of every *.safetensors in a directory."""
  from safetensors.flax import load_file  # jax arrays: bfloat16 checkpoints load too
  files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
  if not files:
    raise FileNotFoundError(f"hf_interop: no .safetensors under {path}")
  out = {}
  for f in files:
    out.update(load_file(f))
  return out


def load_hf(source, hf_config=None, **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) from an HF checkpoint.

  Args:
    source: a checkpoint directory (config.json + *.safetensors), a
      .safetensors file, or a state dict (name -> tensor/array).
    hf_config: HF config (object or dict); read from `source/config.json`
      when omitted and `source` is a directory (or a file beside one).
    overrides: ModelConfig fields to replace (e.g. dtype='bfloat16').
  """
  if hf_config is None:
    if not isinstance(source, str):
      raise ValueError("hf_interop: pass hf_config with a state dict")
    d = source if os.path.isdir(source) else os.path.dirname(source)
    with open(os.path.join(d, "config.json")) as f:
      hf_config = json.load(f)
  cfg = config_from_hf(hf_config, **overrides)
  sd = load_safetensors(source) if isinstance(source, str) else source
  return cfg, params_from_hf(sd, cfg)
