"""moelab == transformers on tiny random DeepSeek-V3 models (MLA + sigmoid MoE).

Each model has one dense first block, 8 routed experts in 4 groups (top-2
from the 2 best groups), a shared expert, a random non-zero
`e_score_correction_bias` and random router weights (HF initialises both to
zero), once with a query latent (q_lora_rank) and once with a full-rank W_Q.
Decoding runs the absorbed latent cache (the default).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from decode.generate import generate
from model.hf_interop import config_from_hf, load_hf, params_from_hf
from model.latent_cache import LatentCache
from model.kv_cache import ContiguousSpec
from model.transformer import Decoder

ARCH = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
            num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
            moe_intermediate_size=16, first_k_dense_replace=1, routed_scaling_factor=2.5,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
            num_mtp_layers=0, initializer_range=0.2, rms_norm_eps=1e-5,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=None)
PROMPTS = [[1, 7, 12, 30, 4, 9], [1, 22, 5], [1, 41, 3, 17, 28, 33, 2, 19, 11]]


def hf_deepseek(q_lora_rank, **kw):
  torch.manual_seed(0 if q_lora_rank else 1)
  hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
      **{**ARCH, "q_lora_rank": q_lora_rank, **kw})).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("mlp.gate.weight"):
        p.normal_(0.0, 0.5)
    for name, b in hf.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.uniform_(-0.3, 0.3)
  return hf


@pytest.fixture(scope="module", params=[12, None], ids=["q_lora", "full_rank_q"])
def twins(request):
  """(hf_model, cfg, params, eos): eos is the 4th greedy token of prompt 0."""
  hf = hf_deepseek(request.param)
  with torch.no_grad():
    out = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=4, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
  eos = int(out[0, -1])
  hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = eos, 0
  cfg = config_from_hf(hf.config)
  return hf, cfg, params_from_hf(hf.state_dict(), cfg), eos


def test_config_and_logits_match(twins):
  hf, cfg, params, _ = twins
  assert (cfg.attention, cfg.moe_gate, cfg.n_group, cfg.topk_group) == ("mla", "sigmoid", 4, 2)
  assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
  assert cfg.rope_interleave and cfg.routed_scaling_factor == 2.5
  assert np.abs(np.asarray(params["block_1"]["moe"]["router"]["bias"])).min() > 0
  ids = torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = hf(ids).logits.numpy()
  got, _ = jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(ids.numpy()))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


def test_greedy_identical_token_for_token(twins):
  hf, cfg, params, eos = twins
  max_new = 12
  ours = generate(cfg, params, PROMPTS, strategy="greedy", max_new_tokens=max_new,
                  eos_token_id=eos, pad_token_id=0)
  stopped = 0
  for r, prompt in enumerate(PROMPTS):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                        return_dict_in_generate=True, output_scores=True)
    ref = out.sequences[0, len(prompt):].tolist()
    assert ours.sequences()[r] == ref
    stopped += ref[-1] == eos and len(ref) < max_new
    logp = sum(torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, ref))
    np.testing.assert_allclose(ours.logprobs[r], logp, rtol=1e-4, atol=1e-4)
  assert stopped >= 1


def test_beam_search_sequences_and_scores(twins):
  hf, cfg, params, eos = twins
  prompts = [PROMPTS[0], [1, 3, 8, 44, 9, 16]]  # equal lengths: HF needs no padding
  max_new, beams = 8, 4
  for lp in (0.6, 1.0):
    with torch.no_grad():
      out = hf.generate(torch.tensor(prompts), num_beams=beams, num_return_sequences=beams,
                        max_new_tokens=max_new, length_penalty=lp, early_stopping=True,
                        do_sample=False, return_dict_in_generate=True, output_scores=True)
    ours = generate(cfg, params, prompts, strategy="beam", num_beams=beams,
                    num_return_sequences=beams, max_new_tokens=max_new, length_penalty=lp,
                    early_stopping=True, eos_token_id=eos, pad_token_id=0)
    ref = out.sequences[:, len(prompts[0]):].numpy()
    width = ref.shape[1]
    assert ours.lengths.max() == width
    filled = np.where(np.arange(width) < ours.lengths[:, None], ours.tokens[:, :width], eos)
    np.testing.assert_array_equal(filled, ref)
    np.testing.assert_allclose(ours.scores, out.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)


def test_decoding_uses_the_latent_cache(twins):
  _, cfg, _, _ = twins
  assert isinstance(ContiguousSpec().init(cfg, 1, 8), LatentCache)


def test_checkpoint_directory_loads(tmp_path):
  """save_pretrained writes the experts one by one; load_hf reads that layout."""
  hf = hf_deepseek(12)
  hf.save_pretrained(tmp_path)
  cfg, params = load_hf(str(tmp_path))
  ids = torch.tensor([PROMPTS[2]])
  with torch.no_grad():
    ref = hf(ids).logits.numpy()
  got, _ = jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(ids.numpy()))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("change, match", [
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 16, "mscale_all_dim": 1.0}),
     "YaRN"),
    (dict(num_nextn_predict_layers=1), "multi-token-prediction"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
])
def test_unsupported_configs_are_refused(change, match):
  hf = transformers.DeepseekV3Config(**{**ARCH, "q_lora_rank": None}).to_dict()
  with pytest.raises(ValueError, match=match):
    config_from_hf(json.loads(json.dumps({**hf, **change})))
