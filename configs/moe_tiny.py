"""Tiny sparse MoE decoder: 8 experts, top-2 (Mixtral-style gates), MoE in every block.

Each expert has ffn_dim/2 hidden units, so with k=2 a token uses the FFN FLOPs
of dense_tiny (FLOP-matched) while the FFN holds 4x its parameters.

  python -m experiments.train --config=configs/moe_tiny.py --workdir=/tmp/moelab/moe_tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.num_experts = 8
  c.model.moe_top_k = 2
  c.model.moe_ffn_dim = 256
  c.model.moe_gate = "topk_softmax"
  c.model.capacity_factor = 1.25
  return c
