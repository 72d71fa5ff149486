"""Tiny Switch Transformer: 8 experts, top-1, capacity factor 1.25, token dropping.

Gates are softmax over all experts then top-1 (Fedus et al. 2021); tokens over
an expert's capacity skip the FFN through the residual connection.
Experts have ffn_dim hidden units: FLOP-matched with dense_tiny.

  python -m experiments.train --config=configs/switch_tiny.py --workdir=/tmp/moelab/switch_tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.num_experts = 8
  c.model.moe_top_k = 1
  c.model.moe_ffn_dim = 512
  c.model.moe_gate = "softmax_topk"
  c.model.moe_dispatch = "capacity"
  c.model.capacity_factor = 1.25
  return c
