"""How the model runs, apart from what it computes: implementation choices.

`ModelConfig` is the architecture; `ModelImpl` says which implementation of
the same function runs. decode/backend.py resolves it once per compile from
the backend and `GenerationConfig` (`attention_impl`, `moe_impl`); training
uses the defaults, the plain XLA forms that run well on every backend.

    attention  'xla'   grouped attention over the cache (`attention.attend_cached`)
               'cpu'   its block-diagonal form, which XLA:CPU runs faster
               'pallas'  one-token decode steps of the paged cache in the Pallas kernels
                         (kernels/paged_attention.py, kernels/mla_attention.py; through
                         model/paged_cache.py), multi-token steps as 'xla'
    attention_kernel  'pallas' only: the kernel, 'gpu' (Triton) or 'tpu' (Mosaic TPU)
    interpret  'pallas' only: that kernel in Pallas interpret mode, so it runs on a CPU
               (decode/backend.py sets it from the platform)
    moe        'xla'   dropless steps sort by expert + grouped matmul at every size
               'cpu'   decode-sized steps loop over the chosen experts (`dispatch.py`)
               'cpu_kernel'  decode-sized steps in the C++ expert kernel (kernels/moe_cpu.py)
    moe_threads  threads of that kernel (cores per device)
    mla        'absorbed'  MLA decode steps attend in latent space over a cache of
                           [c_kv ; k_rope] per token (model/mla.py, model/latent_cache.py)
               'expanded'  over a cache of per-head K and V up-projected from the latent
    matmul     'xla'   weight products as XLA dots
               'cpu_kernel'  decode-sized weight products (model/linear.py) in the C++
                             matrix kernel (kernels/matmul_cpu.py)
    matmul_threads  threads of that kernel (cores per device)
    matmul_packed  'cpu_kernel' only: each [K, M] weight goes to the kernel laid out in
               blocks of 32 columns (`matmul_cpu.pack_km`), which it reads as one
               sequential stream; laid out once per set of weights where the caller
               passes the "packed" collection (model/linear.py `packed_km`), else by an
               XLA op on the weight, which XLA hoists out of a decode while loop
               (decode/backend.py `loop_impl` sets it for the loops of decode/generate.py
               and decode/engine.py)
    rope_table  RoPE's cos and sin gathered from a table of cfg.max_seq_len positions,
               computed once per program (`rope.apply_rope` table_len), instead of per
               element of q and k, where XLA:CPU fuses them; for loops whose positions
               are checked below max_seq_len (decode/config.py `check_request`):
               decode/backend.py `loop_impl` sets it on CPU
    remat      'none'  training keeps every activation the backward pass needs
               'block' each block under `jax.checkpoint` with `nothing_saveable`: only
                       the block's inputs are kept; its forward is recomputed in the
                       backward pass (Chen et al. 2016 arXiv 1604.06174)
               'full'  'block' plus its attention and its FFN / MoE sub-layers each
                       checkpointed the same way inside it (model/transformer.py)
               Training sets it from `train.remat` (train/config.py); decoding, which
               never differentiates, leaves it 'none'.
"""

from __future__ import annotations

import dataclasses

ATTENTION_IMPLS = ("xla", "cpu", "pallas")
PALLAS_KERNELS = ("gpu", "tpu")
MOE_IMPLS = ("xla", "cpu", "cpu_kernel")
MLA_IMPLS = ("absorbed", "expanded")
MATMUL_IMPLS = ("xla", "cpu_kernel")
REMAT_IMPLS = ("none", "block", "full")


def resolve_mla(choice: str) -> str:
  """'auto' -> 'absorbed' (GenerationConfig.mla_impl; the cache spec and the backend agree)."""
  return "absorbed" if choice == "auto" else choice


@dataclasses.dataclass(frozen=True)
class ModelImpl:
  attention: str = "xla"
  moe: str = "xla"
  moe_threads: int = 0
  mla: str = "absorbed"
  matmul: str = "xla"
  matmul_threads: int = 0
  matmul_packed: bool = False
  rope_table: bool = False
  remat: str = "none"
  attention_kernel: str = ""
  interpret: bool = False

  def __post_init__(self):
    if self.mla not in MLA_IMPLS:
      raise ValueError(f"impl.mla: must be one of {MLA_IMPLS} (got {self.mla!r})")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"impl.attention: must be one of {ATTENTION_IMPLS} "
                       f"(got {self.attention!r})")
    pallas = self.attention == "pallas"
    if pallas != (self.attention_kernel in PALLAS_KERNELS) or (self.interpret and not pallas):
      raise ValueError(f"impl.attention_kernel, impl.interpret: a kernel of {PALLAS_KERNELS} "
                       "exactly when attention='pallas', interpret only then (got "
                       f"{self.attention_kernel!r}, {self.interpret} with "
                       f"attention={self.attention!r})")
    if self.moe not in MOE_IMPLS:
      raise ValueError(f"impl.moe: must be one of {MOE_IMPLS} (got {self.moe!r})")
    if (self.moe == "cpu_kernel") != (self.moe_threads > 0):
      raise ValueError("impl.moe_threads: > 0 exactly when moe='cpu_kernel' "
                       f"(got {self.moe_threads} with moe={self.moe!r})")
    if self.matmul not in MATMUL_IMPLS:
      raise ValueError(f"impl.matmul: must be one of {MATMUL_IMPLS} (got {self.matmul!r})")
    if (self.matmul == "cpu_kernel") != (self.matmul_threads > 0):
      raise ValueError("impl.matmul_threads: > 0 exactly when matmul='cpu_kernel' "
                       f"(got {self.matmul_threads} with matmul={self.matmul!r})")
    if self.matmul_packed and self.matmul != "cpu_kernel":
      raise ValueError(f"impl.matmul_packed: only with matmul='cpu_kernel' "
                       f"(got matmul={self.matmul!r})")
    if self.remat not in REMAT_IMPLS:
      raise ValueError(f"impl.remat: must be one of {REMAT_IMPLS} (got {self.remat!r})")
