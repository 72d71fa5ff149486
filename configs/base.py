"""Every default of a moelab run. Other configs start from this one.

Run (a small dense model on the embedded corpus, the interpreter's stdlib):

  python -m experiments.train --config=configs/base.py --workdir=/tmp/moelab/base

Any field can be overridden from the command line, e.g.

  --config.model.num_experts=16 --config.train.steps=2000 --config.data.path='~/text/*.txt'

Sections:
  model       fields of model.config.ModelConfig (validated there)
  data        corpus, sequence length, batch size
  train       steps, eval/log cadence, seed
  optimizer   AdamW + warmup/cosine schedule + clipping
  checkpoint  Orbax CheckpointManager cadence
  mesh        device mesh axis sizes (product = number of devices)
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 259          # 256 bytes + BOS/EOS/PAD (train/tokenizer.py)
  m.d_model = 128
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4          # == heads: MHA; 1: MQA; in between: GQA
  m.head_dim = 0              # 0: d_model // num_heads
  m.ffn_dim = 512
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  m.tie_embeddings = True
  m.max_seq_len = 2048
  m.attention = "mha"
  m.dtype = "float32"
  # Mixture of Experts (num_experts=0: dense SwiGLU FFN everywhere).
  m.num_experts = 0
  m.moe_top_k = 2
  m.moe_every = 1             # MoE FFN in blocks i with (i+1) % moe_every == 0
  m.moe_ffn_dim = 0           # 0: ffn_dim
  m.moe_mode = "sparse"       # sparse | dense
  m.moe_dispatch = "capacity"  # capacity (token dropping) | dropless
  m.moe_gate = "topk_softmax"  # topk_softmax (Mixtral) | softmax_topk (Switch)
  m.moe_ep_exchange = "auto"  # expert-parallel dropless all-to-all: auto | ragged | padded
  m.capacity_factor = 1.25
  m.eval_capacity_factor = 2.0
  m.router_noise = "none"     # none | shazeer | jitter
  m.router_jitter_eps = 0.0
  m.router_noise_std = 0.0
  m.router_init_scale = 0.1
  m.aux_switch_coef = 1e-2
  m.aux_importance_coef = 0.0
  m.aux_load_coef = 0.0
  m.aux_z_coef = 1e-3

  c.data = d = ml_collections.ConfigDict()
  d.path = ""                 # glob of text files; "" = this interpreter's stdlib *.py
  d.val_percent = 5           # files whose crc32(path) % 100 < val_percent are validation
  d.seq_len = 128
  d.batch_size = 16

  c.train = t = ml_collections.ConfigDict()
  t.steps = 500
  t.seed = 0
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 8

  c.optimizer = o = ml_collections.ConfigDict()
  o.learning_rate = 3e-3
  o.warmup_steps = 50
  o.end_lr_ratio = 0.1        # cosine decays to learning_rate * end_lr_ratio
  o.b1 = 0.9
  o.b2 = 0.95
  o.weight_decay = 0.1
  o.grad_clip_norm = 1.0

  c.checkpoint = k = ml_collections.ConfigDict()
  k.every = 100
  k.keep = 3

  c.mesh = me = ml_collections.ConfigDict()
  me.data = -1  # every device the expert axis leaves (devices / expert)
  me.expert = 1
  return c
