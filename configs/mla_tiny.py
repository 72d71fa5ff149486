"""Tiny dense decoder with multi-head latent attention (DeepSeek-V2 arXiv 2405.04434 sec. 2.1).

base's model (d_model 128, 4 blocks of 4 heads of width 32, SwiGLU FFN 512)
with MLA: a KV latent of C = 64 and a shared RoPE key of R = 16 (full-rank
queries, per-head nope and value widths 32, scale 1/sqrt(32 + 16)): 67.6k
attention parameters per block against MHA's 65.5k, 1.09M in all. The decode
cache holds (C + R) x 4 blocks = 320 values (1280 bytes) per token, against
MHA's 1024 and GQA-2's 512 (model/kv_accounting.py).

  python -m experiments.train --config=configs/mla_tiny.py --workdir=/tmp/moelab/mla_tiny

Measured (embedded corpus, --config.train.steps=200, seeds 0 / 1): validation
bits/byte 3.380 / 3.428, against 3.165 / 3.197 for MHA (dense_tiny with
ffn_dim=517, 1.09M parameters) and 3.202 / 3.199 for GQA with 2 kv heads
(ffn_dim=562, 1.09M): at this size and length the latent costs about 0.2
bits/byte for a 3.2x smaller cache than MHA.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.attention = "mla"
  c.model.kv_lora_rank = 64
  c.model.rope_head_dim = 16
  return c
