"""A tiny run config shared by the training tests (corpus: tests/conftest.py)."""

import pytest

from configs import base


@pytest.fixture
def tiny_config(corpus):
  c = base.get_config()
  c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64,
                 num_experts=4, moe_top_k=2, router_noise="jitter", router_jitter_eps=0.1)
  c.data.update(path=corpus, seq_len=32, batch_size=4, val_percent=20)
  c.train.update(steps=6, log_every=2, eval_every=3, eval_batches=2)
  c.optimizer.update(warmup_steps=2)
  c.checkpoint.update(every=2, keep=5)
  return c
