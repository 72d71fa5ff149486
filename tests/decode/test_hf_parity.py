"""moelab `generate` == transformers `generate` on the same tiny random models."""

import numpy as np
import pytest
import torch

from decode.generate import generate


def test_greedy_identical_token_for_token(hf_twins, prompts):
  hf, cfg, params, eos = hf_twins
  max_new = 16
  ours = generate(cfg, params, prompts, strategy="greedy", max_new_tokens=max_new,
                  eos_token_id=eos, pad_token_id=0)
  stopped = 0
  for r, prompt in enumerate(prompts):  # HF alone per prompt; moelab batched, unequal lengths
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                        return_dict_in_generate=True, output_scores=True)
    ref = out.sequences[0, len(prompt):].tolist()
    assert ours.sequences()[r] == ref
    stopped += ref[-1] == eos and len(ref) < max_new
    logp = sum(torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, ref))
    np.testing.assert_allclose(ours.logprobs[r], logp, rtol=1e-4, atol=1e-4)
    assert (ours.tokens[r, len(ref):] == 0).all()
    if r == 0:  # alone: batch 1 (Mixtral on CPU: the expert kernel with all threads)
      solo = generate(cfg, params, [prompt], strategy="greedy", max_new_tokens=max_new,
                      eos_token_id=eos, pad_token_id=0)
      assert solo.sequences()[0] == ref
      np.testing.assert_allclose(solo.logprobs[0], logp, rtol=1e-4, atol=1e-4)
  assert stopped >= 1  # the EOS path is exercised


def test_beam_search_sequences_and_scores(hf_twins, prompts):
  hf, cfg, params, eos = hf_twins
  prompts = [prompts[0], [1, 3, 8, 44, 9, 16]]  # equal lengths: HF needs no padding
  max_new, beams = 10, 4
  results = {}
  for early_stopping in (True, False):
    for lp in (0.6, 1.0, 2.0):
      with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), num_beams=beams, num_return_sequences=beams,
                          max_new_tokens=max_new, length_penalty=lp,
                          early_stopping=early_stopping, do_sample=False,
                          return_dict_in_generate=True, output_scores=True)
      ours = generate(cfg, params, prompts, strategy="beam", num_beams=beams,
                      num_return_sequences=beams, max_new_tokens=max_new, length_penalty=lp,
                      early_stopping=early_stopping, eos_token_id=eos, pad_token_id=0)
      ref = out.sequences[:, len(prompts[0]):].numpy()
      width = ref.shape[1]
      assert ours.lengths.max() == width
      # HF fills after a hypothesis ends with `pad_token_id or eos` (0 is falsy: eos).
      filled = np.where(np.arange(width) < ours.lengths[:, None], ours.tokens[:, :width], eos)
      np.testing.assert_array_equal(filled, ref)
      assert all(t[n:].tolist() == [0] * (max_new - n) for t, n in zip(ours.tokens, ours.lengths))
      np.testing.assert_allclose(ours.scores, out.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
      results[early_stopping, lp] = ours.sequences()
  lengths = {len(s) for seqs in results.values() for s in seqs}
  assert min(lengths) < max_new  # some hypotheses finished on EOS
  assert len({str(v) for v in results.values()}) > 1  # the settings matter
