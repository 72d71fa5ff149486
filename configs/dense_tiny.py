"""Tiny dense decoder (SwiGLU FFN in every block), the baseline for moe_tiny.

  python -m experiments.train --config=configs/dense_tiny.py --workdir=/tmp/moelab/dense_tiny
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.num_experts = 0
  return c
