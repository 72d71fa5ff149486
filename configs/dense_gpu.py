"""Dense counterpart of configs/moe_gpu.py at the same active FLOPs per token.

moe_gpu's blocks with one SwiGLU FFN of width 2,048 (= its 2 active experts
of 1,024) instead of the MoE. Computed with train/flops.py (checked against
the initialised model in tests/train/test_flops.py):

  total parameters      75.7M  (75,715,584; 75.7M active: all but the norm scales)
  training FLOPs/token  567.4M (moe_gpu: 567.9M, the difference is its router)

  python -m experiments.train --config=configs/dense_gpu.py --workdir=/tmp/moelab/dense_gpu

Expected steps/s, tokens/s and MFU: not yet measured on a GPU (there was none
in the session that wrote this config). `bash experiments/gpu_check.sh
train_dense_gpu` measures them; the target of issue 29 on an H100 / H200 in
bf16 is MFU >= 45%.
"""

from configs import moe_gpu


def get_config():
  c = moe_gpu.get_config()
  c.model.num_experts = 0
  return c
