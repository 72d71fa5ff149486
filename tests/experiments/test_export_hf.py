"""experiments.export_hf: a moelab workdir -> a directory transformers loads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from configs import base
from experiments.export_hf import export
from model.transformer import Decoder
from train import checkpoint, optimizer
from train import step as step_lib
from train import tokenizer
from train.config import RunConfig


def make_workdir(path, with_checkpoint=True, **model):
  """A workdir holding config.json and a step-1 checkpoint, as a training run
  leaves it: random params (and router bias) in the state restore_params expects."""
  c = base.get_config()
  c.model.update(d_model=32, num_layers=2, num_heads=4, ffn_dim=32, **model)
  run = RunConfig.from_config(c)
  checkpoint.write_config(str(path), run.to_dict())
  if not with_checkpoint:
    return run.model, None
  tx = optimizer.make(run.optimizer, run.train.steps)
  abstract = jax.eval_shape(lambda: step_lib.init_state(Decoder(run.model), tx, 0, 8))
  rng = np.random.default_rng(0)
  fill = lambda x: (rng.normal(0, 0.3, x.shape) if x.ndim > 1 else
                    1 + rng.uniform(-0.3, 0.3, x.shape)).astype(x.dtype)
  state = abstract.replace(params=jax.tree.map(fill, abstract.params),
                           opt_state=jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                                                  abstract.opt_state),
                           step=np.int32(1), rng=np.zeros(abstract.rng.shape, abstract.rng.dtype))
  ckpts = checkpoint.Checkpoints(str(path), every=1, keep=1)
  ckpts.save(1, state, force=True)
  ckpts.close()
  return run.model, state.params


def test_export_of_a_deepseek_style_run_loads_with_the_same_logits(tmp_path):
  cfg, params = make_workdir(tmp_path / "run", attention="mla", kv_lora_rank=16,
                             rope_head_dim=8, num_experts=4, moe_top_k=2, moe_ffn_dim=16,
                             moe_gate="sigmoid", moe_dispatch="dropless",
                             first_k_dense_replace=1, moe_num_shared_experts=1)
  kind, notes = export(str(tmp_path / "run"), str(tmp_path / "hf"))
  assert kind == "deepseek_v3" and any("aux_switch_coef" in n for n in notes)
  assert np.abs(params["block_1"]["moe"]["router"]["bias"]).min() > 0
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
  assert hf.config.eos_token_id == tokenizer.EOS
  tokens = np.random.default_rng(0).integers(0, 256, (1, 9))
  with torch.no_grad():
    got = hf(torch.tensor(tokens)).logits.numpy()
  ref, _ = jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(got, np.asarray(ref), atol=1e-4, rtol=0)


def test_an_inexpressible_run_is_refused_before_anything_is_written(tmp_path):
  make_workdir(tmp_path / "run", with_checkpoint=False, num_kv_heads=4, num_experts=4,
               moe_gate="softmax_topk")
  with pytest.raises(ValueError, match="model.moe_gate="):
    export(str(tmp_path / "run"), str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists()
