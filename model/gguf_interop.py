"""GGUF (llama.cpp) checkpoints -> moelab (ModelConfig, params), and their tokenizer.

    cfg, params = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")    # or dtype="bfloat16"
    tok = gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode(tok.apply_chat_template("Hi!"))

GGUF (github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one file of typed
metadata (the config and the tokenizer, under llama.cpp's key names) and
tensors. A tensor's ggml dims list ne[0], the fastest axis, first: reversed,
they are its numpy shape, so ggml [in, out] is numpy [out, in], HF's
nn.Linear layout. Each tensor is dequantized (`gguf.quants`), renamed to its
HF Llama/Mixtral name (the inverse of llama.cpp's convert_hf_to_gguf.py) and
mapped by model/hf_interop.py, so the params tree is `Decoder(cfg).init`'s.

llama.cpp rotates interleaved pairs (x0, x1), (x2, x3), ...; its converter
permutes the rows of q_proj / k_proj (`permute(w, n_head, n_head_kv)`: per head
[2, E/2] -> [E/2, 2]) so its RoPE equals HF's rotate-half. `_unpermute`
undoes that for moelab's rotate-half RoPE (model/rope.py).

The tokenizer (`tokenizer.ggml.model` 'gpt2': byte-level BPE) is rebuilt as an
HF `tokenizers.Tokenizer` as transformers does (integrations/gguf/
gguf_tokenizer_mapping.py): vocabulary, merges, control tokens special. The
pre-tokenizer follows `tokenizer.ggml.pre` as llama.cpp (llama-vocab.cpp),
the format's reference, reads it: 'smollm'/'starcoder' isolate each digit and
'llama-bpe' ignores merges for whole-word tokens, which transformers drops
(`transformers_compat=True` reproduces transformers exactly).
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any, Sequence

import numpy as np

from model.config import ModelConfig
from model.hf_interop import config_from_hf, params_from_hf
from model.params import cast_weights

DTYPES = ("float32", "bfloat16")
# ggml tensor types read (`gguf.quants.dequantize`); the tests write each one
# (the K-quants with llama.cpp's quantizer).
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# llama.* metadata keys understood; any other llama.* key is refused.
LLAMA_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
              "vocab_size", "attention.head_count", "attention.head_count_kv",
              "attention.layer_norm_rms_epsilon", "attention.key_length",
              "attention.value_length", "rope.freq_base", "rope.dimension_count",
              "rope.scaling.type", "rope.scaling.factor", "expert_count", "expert_used_count",
              "expert_feed_forward_length", "expert_gating_func", "expert_shared_count")
_REQUIRED = object()


def _reader(path_or_reader):
  import gguf
  if isinstance(path_or_reader, gguf.GGUFReader):
    return path_or_reader
  return gguf.GGUFReader(str(path_or_reader))


def _field(field) -> Any:
  """A metadata value: str, int, float, bool or a list of them."""
  from gguf import GGUFValueType as T
  kinds = [T(int(t)) for t in field.types]

  def one(part, kind):
    if kind == T.STRING:
      return bytes(part).decode("utf-8")
    if kind == T.ARRAY:
      raise ValueError(f"gguf_interop: nested array in metadata key {field.name!r}")
    v = part.tolist()[0]
    return bool(v) if kind == T.BOOL else v

  if kinds[0] == T.ARRAY:
    return [one(field.parts[i], kinds[-1]) for i in field.data]
  return one(field.parts[field.data[0]], kinds[0])


def _get(reader, key: str, default=_REQUIRED):
  if key not in reader.fields:
    if default is _REQUIRED:
      raise ValueError(f"gguf_interop: missing metadata key {key!r}")
    return default
  return _field(reader.fields[key])


# ----------------------------------------------------------------- weights
def hf_config_from_gguf(path_or_reader) -> dict:
  """HF-style Llama/Mixtral config dict of a llama-architecture GGUF."""
  r = _reader(path_or_reader)
  arch = _get(r, "general.architecture")
  if arch != "llama":
    raise ValueError(f"gguf_interop: general.architecture must be 'llama' (got {arch!r})")
  unknown = sorted(k for k in r.fields if k.startswith("llama.") and k[6:] not in LLAMA_KEYS)
  if unknown:
    raise ValueError(f"gguf_interop: unsupported metadata key(s) {unknown}")

  def g(key, default=_REQUIRED, kind=int):
    v = _get(r, "llama." + key, default)
    if not isinstance(v, kind) or isinstance(v, bool):
      raise ValueError(f"gguf_interop: llama.{key} must be a single {kind.__name__} (got {v!r})")
    return v

  scaling = _get(r, "llama.rope.scaling.type", "none")
  factor = _get(r, "llama.rope.scaling.factor", 1.0)
  if scaling not in ("none", "linear") or factor != 1.0:
    raise ValueError(f"gguf_interop: llama.rope.scaling.type={scaling!r} "
                     f"(llama.rope.scaling.factor={factor!r}) is not supported: unscaled RoPE only")
  d, h = g("embedding_length"), g("attention.head_count")
  e = g("attention.key_length", d // h)
  for key in ("attention.value_length", "rope.dimension_count"):
    if g(key, e) != e:  # moelab rotates whole heads; V and K heads are one width
      raise ValueError(f"gguf_interop: llama.{key}={g(key)} must equal the head width {e}")
  shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in r.tensors}
  if "token_embd.weight" not in shapes:
    raise ValueError("gguf_interop: missing tensor 'token_embd.weight'")
  vocab = shapes["token_embd.weight"][0]
  if g("vocab_size", vocab) != vocab:
    raise ValueError(f"gguf_interop: llama.vocab_size={g('vocab_size')} but token_embd.weight "
                     f"has {vocab} rows")
  hf = dict(model_type="llama", vocab_size=vocab, hidden_size=d, num_attention_heads=h,
            num_key_value_heads=g("attention.head_count_kv", h), head_dim=e,
            intermediate_size=g("feed_forward_length"), num_hidden_layers=g("block_count"),
            rope_theta=float(g("rope.freq_base", 10_000.0, float)),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", kind=float)),
            max_position_embeddings=g("context_length"),
            tie_word_embeddings="output.weight" not in shapes)
  experts = g("expert_count", 0)
  if experts:
    if g("expert_gating_func", 1) != 1:  # gguf.ExpertGatingFuncType.SOFTMAX
      raise ValueError(f"gguf_interop: llama.expert_gating_func={g('expert_gating_func')} "
                       "is not supported: softmax gating (1) only")
    if g("expert_shared_count", 0):
      raise ValueError("gguf_interop: llama.expert_shared_count > 0 (shared experts) is "
                       "not supported")
    hf.update(model_type="mixtral", num_local_experts=experts,
              num_experts_per_tok=g("expert_used_count"),
              intermediate_size=g("expert_feed_forward_length", hf["intermediate_size"]))
  return hf


def _unpermute(w_RxD, n_head: int):
  """Inverse of llama.cpp's `permute`: per head, rows [E/2, 2] -> [2, E/2]."""
  r = w_RxD.shape[0]
  return w_RxD.reshape(n_head, r // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w_RxD.shape)


def _state_dict(r, cfg: ModelConfig) -> dict:
  """HF-named float32 numpy weights (q/k unpermuted); refuses unused tensors."""
  import gguf
  tensors = {t.name: t for t in r.tensors}
  used = set()

  def take(name, shape):
    if name not in tensors:
      raise ValueError(f"gguf_interop: missing tensor {name!r}")
    t = tensors[name]
    used.add(name)
    kind = gguf.GGMLQuantizationType(int(t.tensor_type)).name
    if kind not in TENSOR_TYPES:
      raise ValueError(f"gguf_interop: tensor {name!r} has type {kind}, supported: {TENSOR_TYPES}")
    got = tuple(int(n) for n in reversed(t.shape))  # ne[0] (fastest) last
    if got != tuple(shape):
      raise ValueError(f"gguf_interop: tensor {name!r} has shape {got} (numpy order), "
                       f"expected {tuple(shape)}")
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)

  v, d, f = cfg.vocab_size, cfg.d_model, cfg.expert_ffn_dim
  h, k, e, x = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.num_experts
  sd = {"model.embed_tokens.weight": take("token_embd.weight", (v, d)),
        "model.norm.weight": take("output_norm.weight", (d,))}
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = take("output.weight", (v, d))
  for i in range(cfg.num_layers):
    b, p = f"blk.{i}.", f"model.layers.{i}."
    sd.update({
        p + "self_attn.q_proj.weight": _unpermute(take(b + "attn_q.weight", (h * e, d)), h),
        p + "self_attn.k_proj.weight": _unpermute(take(b + "attn_k.weight", (k * e, d)), k),
        p + "self_attn.v_proj.weight": take(b + "attn_v.weight", (k * e, d)),
        p + "self_attn.o_proj.weight": take(b + "attn_output.weight", (d, h * e)),
        p + "input_layernorm.weight": take(b + "attn_norm.weight", (d,)),
        p + "post_attention_layernorm.weight": take(b + "ffn_norm.weight", (d,))})
    if cfg.is_moe_layer(i):  # transformers v5 fused expert layout (model/hf_interop.py)
      sd[p + "mlp.gate.weight"] = take(b + "ffn_gate_inp.weight", (x, d))
      sd[p + "mlp.experts.gate_up_proj"] = np.concatenate(
          [take(b + "ffn_gate_exps.weight", (x, f, d)), take(b + "ffn_up_exps.weight", (x, f, d))],
          axis=1)
      sd[p + "mlp.experts.down_proj"] = take(b + "ffn_down_exps.weight", (x, d, f))
    else:
      sd.update({p + "mlp.gate_proj.weight": take(b + "ffn_gate.weight", (f, d)),
                 p + "mlp.up_proj.weight": take(b + "ffn_up.weight", (f, d)),
                 p + "mlp.down_proj.weight": take(b + "ffn_down.weight", (d, f))})
  left = sorted(set(tensors) - used)
  if left:
    why = ("biases are not supported" if any(n.endswith(".bias") for n in left) else
           "rope_freqs (llama3-style RoPE scaling) is not supported" if "rope_freqs.weight" in left
           else "not part of a llama/mixtral model")
    raise ValueError(f"gguf_interop: unsupported tensor(s) {left[:8]}: {why}")
  return sd


def load_gguf(path_or_reader, dtype: str = "float32", **overrides) -> tuple[ModelConfig, dict]:
  """(ModelConfig, params) of a llama-architecture GGUF (dense or Mixtral MoE).

  dtype: storage of the weight matrices, and the default ModelConfig.dtype
    (activations). 'bfloat16' keeps them as bf16 arrays (the model's
    `w.astype(dt)` is then a no-op); norm scales and router gates stay
    float32 (the model computes both in float32). For bf16 weights with f32
    activations pass dtype='bfloat16' and override dtype via `cfg.replace`.
  overrides: other ModelConfig fields (e.g. max_seq_len=4096).
  """
  if dtype not in DTYPES:
    raise ValueError(f"gguf_interop: dtype must be one of {DTYPES} (got {dtype!r})")
  r = _reader(path_or_reader)
  cfg = config_from_hf(hf_config_from_gguf(r), **{"dtype": dtype, **overrides})
  return cfg, cast_weights(params_from_hf(_state_dict(r, cfg), cfg), dtype)


# --------------------------------------------------------------- tokenizer
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regex, None: GPT-2's (ByteLevel's own); isolate
# digits first; ignore merges for whole-word tokens), as llama-vocab.cpp.
# A file without the key (older than llama.cpp's pre-tokenizer types) gets
# GPT-2's split, as in transformers.
PRE_TOKENIZERS = {"gpt-2": (None, False, False), "smollm": (None, True, False),
                  "starcoder": (None, True, False), "qwen2": (_QWEN2_SPLIT, False, False),
                  "llama-bpe": (_LLAMA3_SPLIT, False, True), "llama3": (_LLAMA3_SPLIT, False, True)}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _bytes_to_unicode() -> dict:
  """GPT-2's byte -> printable character map of byte-level BPE."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  cs = bs[:]
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + len(cs) - 188)
  return dict(zip(bs, map(chr, cs)))


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
  """Byte-level BPE of a GGUF's metadata (see `gguf_tokenizer`)."""

  tokenizer: Any  # tokenizers.Tokenizer
  tokens: tuple
  bos: int | None
  eos: int | None
  pad: int | None
  unk: int | None
  add_bos: bool
  add_eos: bool
  chat_template: str | None

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Ids of `text` (special tokens in it stay whole); BOS/EOS as the file says."""
    ids = self.tokenizer.encode(text, add_special_tokens=False).ids
    if add_special_tokens:
      ids = [self.bos] * (self.add_bos and self.bos is not None) + ids
      ids = ids + [self.eos] * (self.add_eos and self.eos is not None)
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
    """Renders `tokenizer.chat_template` (Jinja, sandboxed, as transformers).

    messages: [{'role': ..., 'content': ...}, ...], or one user prompt string.
    """
    if not self.chat_template:
      raise ValueError("gguf_interop: the file has no tokenizer.chat_template")
    try:
      import jinja2.ext
      import jinja2.sandbox
    except ImportError as err:
      raise ImportError("gguf_interop: apply_chat_template needs jinja2 "
                        "(pip install jinja2)") from err
    if isinstance(messages, str):
      messages = [{"role": "user", "content": messages}]

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    names = {n: self.tokens[i] if i is not None else None for n, i in
             (("bos_token", self.bos), ("eos_token", self.eos), ("pad_token", self.pad),
              ("unk_token", self.unk))}
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **names, **kwargs)


def gguf_tokenizer(path_or_reader, transformers_compat: bool = False) -> GGUFTokenizer:
  """The byte-level BPE tokenizer ('gpt2' model) a GGUF's metadata describes.

  transformers_compat: pre-tokenize exactly as transformers' GGUF loading
    (GPT-2 split for 'smollm'/'starcoder', merges never ignored) instead of
    as llama.cpp.
  """
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  r = _reader(path_or_reader)
  kind = _get(r, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"gguf_interop: tokenizer.ggml.model must be 'gpt2' (byte-level BPE), "
                     f"got {kind!r}")
  pre = _get(r, "tokenizer.ggml.pre", "gpt-2")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"gguf_interop: tokenizer.ggml.pre={pre!r} is not supported; "
                     f"supported: {sorted(PRE_TOKENIZERS)}")
  split, digits, ignore_merges = PRE_TOKENIZERS[pre]
  if transformers_compat:
    digits = ignore_merges = False
  tokens = _get(r, "tokenizer.ggml.tokens")
  types = _get(r, "tokenizer.ggml.token_type", [1] * len(tokens))
  merges = [tuple(m.split(" ")) for m in _get(r, "tokenizer.ggml.merges")]
  spelling = _bytes_to_unicode()
  alphabet = set(spelling.values())
  # Tokens outside the byte alphabet are respelled byte by byte (transformers).
  vocab = {t if set(t) <= alphabet else "".join(spelling[c] for c in t.encode("utf-8")): i
           for i, t in enumerate(tokens)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False, ignore_merges=ignore_merges))
  parts = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
  if split is None:
    parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False))
  else:
    parts += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
  tok.pre_tokenizer = parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(parts)
  tok.decoder = decoders.ByteLevel()
  ids = {n: _get(r, f"tokenizer.ggml.{key}_token_id", None) for n, key in
         (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
  # Control tokens (and the named ones) are special and matched whole; a
  # control token outside the byte alphabet is a llama.cpp mislabel (skipped,
  # as transformers does). User-defined tokens are matched whole, not special.
  special = [t for t, y in zip(tokens, types) if y == CONTROL and set(t) <= alphabet]
  special += [tokens[i] for i in ids.values() if i is not None and tokens[i] in vocab]
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                          for t in dict.fromkeys(special)])
  user = [t for t, y in zip(tokens, types) if y == USER_DEFINED and t in vocab]
  if user:
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
  return GGUFTokenizer(tokenizer=tok, tokens=tuple(tokens), **ids,
                       add_bos=bool(_get(r, "tokenizer.ggml.add_bos_token", False)),
                       add_eos=bool(_get(r, "tokenizer.ggml.add_eos_token", False)),
                       chat_template=_get(r, "tokenizer.chat_template", None))
