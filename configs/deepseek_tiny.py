"""Tiny DeepSeek-V3-style decoder (arXiv 2412.19437 sec. 2.1): MLA + a
sigmoid-gated MoE with a shared expert, group-limited routing and
auxiliary-loss-free bias balancing.

MLA as configs/mla_tiny.py plus a query latent of Q = 64. Block 0 is dense
(first_k_dense_replace = 1); blocks 1-3 hold 8 routed experts of width 128 in
4 groups (a token's top-2 experts come from its 2 best groups) and one shared
expert of width 128, so a token runs 3 x 128 FFN units (dense_tiny: 512).
No auxiliary loss but the small sequence-wise one (alpha = 1e-4, as
DeepSeek-V3). The selection bias moves by gamma = 1e-2 per step: DeepSeek-V3's
1e-3 is for a run of many thousands of steps and leaves a 200-step run
unbalanced.

  python -m experiments.train --config=configs/deepseek_tiny.py --workdir=/tmp/moelab/deepseek_tiny

Measured (embedded corpus, --config.train.steps=200, seed 0): validation
bits/byte 3.355, with the experts' max/mean load 1.20 over steps 160-200
(mean of the 3 MoE blocks); with gamma = 1e-3: 3.378 and max/mean 2.78;
with gamma = 0 (no balancing at all): 3.416 and 3.87.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(attention="mla", kv_lora_rank=64, rope_head_dim=16, q_lora_rank=64)
  c.model.update(num_experts=8, moe_top_k=2, moe_ffn_dim=128, moe_num_shared_experts=1,
                 moe_gate="sigmoid", moe_dispatch="dropless", n_group=4, topk_group=2,
                 first_k_dense_replace=1, router_bias_update_rate=1e-2, aux_seq_coef=1e-4,
                 aux_switch_coef=0.0, aux_z_coef=0.0)
  return c
