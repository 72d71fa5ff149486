"""GPU-sized sparse MoE decoder for one H100 / H200: 8 experts top-2, sequence 1,024, bf16.

12 blocks of d_model 768 (12 query heads and 4 kv heads of width 64), an MoE
FFN in every block: 8 SwiGLU experts of width 1,024, top-2 (Mixtral gates),
dropless (sort + grouped matmul, `jax.lax.ragged_dot` on GPU). Byte tokens,
16 rows of 1,024 per step. Computed with train/flops.py (and checked against
the initialised model in tests/train/test_flops.py):

  total parameters      245.7M  (245,658,624; the experts 226.5M)
  active per token       75.8M  (two experts, attention, router, unembedding)
  training FLOPs/token  567.9M  (6 * N_active + the attention term at T = 1,024)

configs/dense_gpu.py is its dense counterpart at the same active FLOPs per
token (SwiGLU width 2,048 = 2 x 1,024; 0.08% fewer: no router).

  python -m experiments.train --config=configs/moe_gpu.py --workdir=/tmp/moelab/moe_gpu
  python -m experiments.train --config=configs/moe_gpu.py --workdir=/tmp/moelab/moe_gpu_remat \\
      --config.train.remat=block

Expected steps/s, tokens/s and MFU: not yet measured on a GPU (there was none
in the session that wrote this config). `bash experiments/gpu_check.sh
train_moe_gpu` measures them (50 steps, with and without remat); the target
of issue 29 on an H100 / H200 in bf16 is MFU >= 35% (dense_gpu: >= 45%).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.update(d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, ffn_dim=2048,
                 dtype="bfloat16", num_experts=8, moe_top_k=2, moe_ffn_dim=1024,
                 moe_gate="topk_softmax", moe_dispatch="dropless")
  c.data.update(seq_len=1024, batch_size=16)
  c.train.update(steps=2000, eval_every=500, eval_batches=4)
  c.optimizer.update(learning_rate=1e-3, warmup_steps=100)
  c.checkpoint.update(every=500)
  return c
