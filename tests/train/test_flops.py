"""Model FLOPs per token (train/flops.py) against hand counts and the real parameters."""

import math

import jax
import jax.numpy as jnp
import pytest

from model.config import ModelConfig
from model.transformer import Decoder
from train import flops
from train.config import RunConfig


def _real_param_count(cfg):
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 8), jnp.int32)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def test_dense_flops_by_hand():
  # D=64, 2 layers, H=4, K=2, E=16, F=128, V=259, T=32.
  cfg = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128)
  attn = 64 * (4 + 2 * 2) * 16 + 4 * 16 * 64          # w_qkv + w_o = 8192 + 4096
  ffn = 3 * 64 * 128                                    # 24576
  active = 2 * (attn + ffn) + 259 * 64                  # + unembedding (tied: counted once)
  assert flops.param_counts(cfg).active == active == 90304
  assert flops.flops_per_token(cfg, 32) == 6 * active + 12 * 2 * 32 * 4 * 16
  assert flops.attention_flops_per_token(cfg, 32) == 12 * 2 * 32 * 64


def test_moe_counts_only_active_experts():
  dense = ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=256)
  moe = dense.replace(num_experts=8, moe_top_k=2, moe_ffn_dim=128)
  d, m = flops.param_counts(dense), flops.param_counts(moe)
  # Top-2 of 128-wide experts: the dense FFN's FLOPs plus the router (D * X per layer).
  assert m.active - d.active == 2 * 64 * 8
  assert m.total - d.total == 2 * (8 * 3 * 64 * 128 - 3 * 64 * 256 + 64 * 8)
  assert flops.flops_per_token(moe, 64) - flops.flops_per_token(dense, 64) == 6 * 2 * 64 * 8
  # Shazeer noise adds W_noise; dense-mode MoE runs every expert.
  noisy = moe.replace(router_noise="shazeer")
  assert flops.param_counts(noisy).active - m.active == 2 * 64 * 8
  every = moe.replace(moe_mode="dense")
  assert flops.param_counts(every).active - m.active == 2 * 6 * 3 * 64 * 128


@pytest.mark.parametrize("cfg", [
    ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128),
    ModelConfig(d_model=64, num_layers=3, num_heads=4, num_kv_heads=1, ffn_dim=128,
                num_experts=4, moe_top_k=2, router_noise="shazeer", moe_every=2,
                moe_num_shared_experts=1, tie_embeddings=False),
    ModelConfig(d_model=64, num_layers=2, num_heads=4, ffn_dim=128, attention="mla",
                kv_lora_rank=32, rope_head_dim=8, q_lora_rank=16, num_experts=4,
                moe_gate="sigmoid", first_k_dense_replace=1),
], ids=["dense_gqa", "moe_shazeer_shared_untied", "mla_sigmoid"])
def test_total_count_matches_the_model(cfg):
  assert flops.param_counts(cfg).total == _real_param_count(cfg)


def test_mla_attention_term_uses_qk_and_v_widths():
  cfg = ModelConfig(d_model=64, num_layers=2, num_heads=4, ffn_dim=128, attention="mla",
                    kv_lora_rank=32, rope_head_dim=8, nope_head_dim=16, v_head_dim=8)
  assert flops.attention_flops_per_token(cfg, 10) == 6 * 2 * 10 * 4 * ((16 + 8) + 8)


def test_peaks_and_mfu():
  assert flops.chip_name("NVIDIA H100 80GB HBM3") == "H100 SXM"
  assert flops.chip_name("NVIDIA H100 PCIe") is None
  assert flops.chip_name("NVIDIA H200") == "H200"
  assert flops.chip_name("NVIDIA A100-SXM4-40GB") == "A100"
  assert flops.chip_name("TPU v5 lite") == "TPU v5e"
  assert flops.chip_name("TPU v5") == "TPU v5p"
  assert flops.chip_name("TPU v4") == "TPU v4"
  assert flops.chip_name("cpu") is None
  assert flops.peak_flops("NVIDIA H200", "bfloat16", 8) == 8 * 989.4e12
  assert flops.peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 156e12
  out = flops.throughput(1e6, 2e5, 1e12)
  assert out == {"flops_per_token": 1e6, "flops_per_s": 2e11, "mfu": 0.2}
  assert flops.throughput(1e6, None, 1e12) == {"flops_per_token": 1e6}
  assert "mfu" not in flops.throughput(1e6, 2e5, None)


def test_run_reports_flops_and_mfu_with_remat_and_accumulation(tiny_config, tmp_path,
                                                                 monkeypatch):
  """metrics.jsonl rows and the progress bar carry flops_per_s and mfu (a known chip's
  peak, patched in: this CPU has none), here for a run with remat and accumulation."""
  from train import metrics, trainer
  postfixes = []

  class Bar:
    def __init__(self, *a, **kw):
      pass

    def set_postfix(self, **kw):
      postfixes.append(kw)

    update = close = lambda self, *a: None

  monkeypatch.setattr(trainer, "tqdm", Bar)
  built = []
  jit_train_step = trainer.step_lib.jit_train_step

  def spy(model, tx, grad_accum_steps=1, **kw):
    built.append((model.impl.remat, grad_accum_steps, kw.get("compiler_options")))
    return jit_train_step(model, tx, grad_accum_steps, **kw)

  monkeypatch.setattr(trainer.step_lib, "jit_train_step", spy)
  monkeypatch.setattr(trainer.flops, "peak_flops", lambda kind, dtype, chips: 1e12)
  tiny_config.model.update(num_layers=1)
  tiny_config.train.update(steps=3, log_every=1, eval_every=3, remat="block",
                           grad_accum_steps=2)
  tiny_config.optimizer.update(warmup_steps=1)
  summary = trainer.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  rows = [r for r in metrics.read(str(tmp_path / "run")) if r["split"] == "train"]
  timed = [r for r in rows if "tokens_per_s" in r]
  assert len(rows) == 3 and len(timed) == 2   # the first step also compiles: no rate
  want = flops.flops_per_token(RunConfig.from_config(tiny_config).model, 32)
  for r in timed:
    assert r["flops_per_token"] == want
    assert r["flops_per_s"] == pytest.approx(want * r["tokens_per_s"])
    assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e12)
  assert [p["mfu"] for p in postfixes[1:]] == [f"{r['mfu']:.1%}" for r in timed]
  assert all(float(p["flop_s"]) > 0 for p in postfixes[1:])
  assert summary["mfu"] == pytest.approx(summary["flops_per_s"] / 1e12)
  cpu = jax.default_backend() == "cpu"
  assert built == [("block", 2, trainer.step_lib.CPU_REMAT_COMPILER_OPTIONS if cpu else None)]


def test_gpu_configs_sizes():
  """configs/moe_gpu.py: 150-300M parameters (its docstring's counts, from the initialised
  shapes); configs/dense_gpu.py: the same training FLOPs per token within 0.1%."""
  from configs import dense_gpu, moe_gpu
  moe, dense = (RunConfig.from_config(m.get_config()) for m in (moe_gpu, dense_gpu))
  assert moe.model.num_experts in range(8, 17) and moe.model.moe_top_k == 2
  assert moe.model.moe_dispatch == "dropless" and moe.model.dtype == "bfloat16"
  assert moe.data.seq_len == dense.data.seq_len == 1024
  assert 150e6 <= _real_param_count(moe.model) == flops.param_counts(moe.model).total \
      == 245_658_624 <= 300e6
  assert _real_param_count(dense.model) == flops.param_counts(dense.model).total == 75_715_584
  f_moe, f_dense = (flops.flops_per_token(r.model, 1024) for r in (moe, dense))
  assert (f_moe, f_dense) == (567_866_880, 567_424_512)
  assert abs(f_moe - f_dense) < 1e-3 * f_moe
