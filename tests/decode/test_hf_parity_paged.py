"""HF parity with kv_cache='paged' (pages of 4 tokens) on the GQA Llama and the MoE
Mixtral twins of conftest.py: greedy tokens and log-probabilities, beam sequences and
scores (test_hf_parity.py checks the contiguous cache the same way)."""

import numpy as np
import torch

from decode.generate import generate

PAGED = dict(kv_cache="paged", page_size=4, pad_token_id=0)


def test_greedy_identical_token_for_token_with_pages(hf_twins, prompts):
  hf, cfg, params, eos = hf_twins
  ours = generate(cfg, params, prompts, strategy="greedy", max_new_tokens=16, eos_token_id=eos,
                  **PAGED)
  stopped = 0
  for r, prompt in enumerate(prompts):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                        return_dict_in_generate=True, output_scores=True)
    ref = out.sequences[0, len(prompt):].tolist()
    assert ours.sequences()[r] == ref
    stopped += ref[-1] == eos and len(ref) < 16
    logp = sum(torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, ref))
    np.testing.assert_allclose(ours.logprobs[r], logp, rtol=1e-4, atol=1e-4)
  assert stopped >= 1


def test_beam_search_sequences_and_scores_with_shared_pages(hf_twins, prompts):
  hf, cfg, params, eos = hf_twins
  prompts = [prompts[0], [1, 3, 8, 44, 9, 16]]  # equal lengths: HF needs no padding
  with torch.no_grad():
    out = hf.generate(torch.tensor(prompts), num_beams=4, num_return_sequences=4,
                      max_new_tokens=10, length_penalty=0.6, do_sample=False,
                      return_dict_in_generate=True, output_scores=True)
  ours = generate(cfg, params, prompts, strategy="beam", num_beams=4, num_return_sequences=4,
                  max_new_tokens=10, length_penalty=0.6, eos_token_id=eos, **PAGED)
  ref = out.sequences[:, len(prompts[0]):].numpy()
  width = ref.shape[1]
  filled = np.where(np.arange(width) < ours.lengths[:, None], ours.tokens[:, :width], eos)
  np.testing.assert_array_equal(filled, ref)
  np.testing.assert_allclose(ours.scores, out.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
  assert ours.lengths.min() < 10  # some hypotheses ended on EOS
