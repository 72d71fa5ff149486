"""Backend choices for decoding, resolved in one place, once per compile.

`resolve(cfg, gen, num_rows)` turns the `auto | <name>` choices of a
GenerationConfig into a `Backend`: which implementation of each piece runs
(model/impl.py), over how many devices the rows are split, and which
compiler options the loop is compiled with. The generic algorithm (the
model, the loops) never asks which backend it is on; the CPU variants live
beside their references and are chosen only here. `GenerateOutput.backend`
records the choice.

    attention  auto: 'pallas' on GPU / TPU with a paged cache whose shapes the kernel
               takes, else 'cpu' (block-diagonal cached attention) on the CPU backend
               and 'xla' (grouped) elsewhere; 'pallas' runs the platform's Pallas kernel,
               on CPU the Triton one in interpret mode (`resolve_attention`)
    moe        auto: on CPU, sparse float32 MoE runs decode steps in the C++ expert
               kernel ('cpu_kernel') when it builds, else the expert loop ('cpu');
               'xla' elsewhere
    mla        auto: 'absorbed' (latent cache; the contiguous spec builds the same
               layout from GenerationConfig.mla_impl), or 'expanded'
    matmul     auto: on CPU, decode-step weight products in the C++ matrix kernel
               ('cpu_kernel', kernels/matmul_cpu.py) for bfloat16 weights and for
               steps of several rows, when it builds; else 'xla'
    devices    0: with the matmul kernel one device (its threads share every weight
               read); else the most local devices that divide the rows (on CPU, one
               per core: decode/data_parallel.py); the kernels get the cores of their
               device
    cache      on CPU a bfloat16 model with attention 'cpu' keeps its K/V cache as bfloat16
               bits (uint16, model/cache.py's BF16_BITS), other caches in float32; else
               the model's dtype
    compiler   XLA:CPU: COMPILER_OPTIONS, plus ROW_SPLIT_OPTIONS when the rows are
               split over devices; none elsewhere

docs/performance.md has the measurements behind each CPU choice.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from decode import data_parallel
from decode.config import GenerationConfig
from kernels import matmul_cpu, moe_cpu
from kernels.cpu_build import cores, last_level_cache_bytes
from model.cache import BF16_BITS, CACHE_KINDS
from model.config import ModelConfig
from model.impl import ModelImpl, resolve_mla
from model.paged_cache import PagedSpec

BITS = np.dtype(BF16_BITS).name  # Backend.cache_dtype of a cache of bfloat16 bits ('uint16')

# XLA:CPU debug options (decode loops only). Region-analysis copy insertion
# proves the step's cache read precedes its in-place write and inserts no
# whole-cache copy per layer and step; without the tree-reduction rewriter
# every norm / softmax reduction is one kernel instead of two; YNNPACK fuses
# dots only (a prefill's), as its fusion of a step's [B, D] norm reduction
# costs ~12 us a call where XLA's own loop takes a few.
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True,
                    "xla_disable_hlo_passes": "tree_reduction_rewriter",
                    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
# With the rows split over CPU devices (one per core), YNNPACK fusions would
# spread an op over the shared intra-op threads and wait for the other
# device's core; an empty list of fusion types turns them off.
ROW_SPLIT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@dataclasses.dataclass(frozen=True)
class Backend:
  """The resolved choices (hashable: part of what `decode_fn` compiles for)."""

  platform: str
  impl: ModelImpl
  num_devices: int
  compiler_options: tuple = ()   # sorted (name, value) pairs
  cache_dtype: str | None = None  # KV cache storage; None: the model's dtype; 'uint16':
                                  # bfloat16 bits (model/cache.py BF16_BITS)

  def loop_impl(self) -> ModelImpl:
    """`impl` for a decode while loop, which reads the same weights every step: the matrix
    kernel's weights laid out for it (ModelImpl.matmul_packed): once per set of weights
    where the caller passes decode/generate.py `packed_weights`, else in the program
    (XLA hoists the layout out of the loop): decode/generate.py's program and the
    serving engine's (decode/engine.py). A step function called from Python each step
    keeps `impl`. On CPU, RoPE's cos and sin come from a table (ModelImpl.rope_table)."""
    impl = self.impl
    if self.platform == "cpu":
      impl = dataclasses.replace(impl, rope_table=True)
    if impl.matmul == "cpu_kernel":
      impl = dataclasses.replace(impl, matmul_packed=True)
    return impl

  def describe(self) -> str:
    opts = ", ".join(f"{k}={v!r}" for k, v in self.compiler_options) or "none"
    kernel = self.impl.attention_kernel + " interpret" * self.impl.interpret
    cache = "bfloat16 bits" if self.cache_dtype == BITS else self.cache_dtype
    return (f"backend={self.platform} attention={self.impl.attention}"
            f"{f' ({kernel})' if kernel else ''} moe={self.impl.moe}"
            f"{f' ({self.impl.moe_threads} threads)' if self.impl.moe_threads else ''} "
            f"mla={self.impl.mla} matmul={self.impl.matmul}"
            f"{f' ({self.impl.matmul_threads} threads)' if self.impl.matmul_threads else ''} "
            f"devices={self.num_devices}"
            f"{f' cache={cache}' if cache else ''} compiler_options: {opts}")


def resolve(cfg: ModelConfig, gen: GenerationConfig, num_rows: int) -> Backend:
  """The Backend for decoding `num_rows` rows (prompts for beam search) of `cfg`."""
  platform = jax.default_backend()
  on_cpu = platform == "cpu"
  step_rows = num_rows * (gen.num_beams if gen.strategy == "beam" else 1)
  matmul = resolve_matmul(cfg, gen.matmul_impl, step_rows)
  # The matmul kernel shares each weight read among its device's threads: one
  # device reads the weights once a step, a device per core once per device.
  devices = gen.num_devices or (1 if matmul == "cpu_kernel"
                                else data_parallel.auto_num_devices(num_rows))
  if num_rows % devices:
    raise ValueError(f"generation.num_devices: {devices} must divide the {num_rows} rows "
                     "(prompts for beam search)")
  moe = gen.moe_impl
  kernel_ok = (on_cpu and cfg.num_experts > 0 and cfg.moe_mode == "sparse"
               and cfg.dtype == "float32" and moe_cpu.available())
  if moe == "auto":
    moe = ("cpu_kernel" if kernel_ok else "cpu") if on_cpu else "xla"
  if moe == "cpu_kernel" and not kernel_ok:
    why = moe_cpu.build_error() or f"needs the CPU backend and a float32 sparse MoE ({platform})"
    raise ValueError(f"generation.moe_impl: 'cpu_kernel' is not available: {why}")
  threads = max(1, cores() // devices) if moe == "cpu_kernel" else 0
  matmul_threads = max(1, cores() // devices) if matmul == "cpu_kernel" else 0
  options = cpu_compiler_options(devices) if on_cpu else {}
  # XLA:CPU widens a bfloat16 cache to float32 around every write and every
  # attention product of a step. A uint16 buffer of its bits is written in place and
  # read by the CPU attention kernel (K/V caches, contiguous or paged); others float32.
  cache_dtype = "float32" if on_cpu and cfg.dtype == "bfloat16" else None
  attention, kernel, interpret = resolve_attention(cfg, gen, platform, cache_dtype)
  if cache_dtype and attention == "cpu" and cfg.attention != "mla":
    cache_dtype = BITS
  return Backend(platform=platform,
                 impl=ModelImpl(attention, moe, threads, resolve_mla(gen.mla_impl), matmul,
                                matmul_threads, attention_kernel=kernel, interpret=interpret),
                 num_devices=devices, compiler_options=tuple(sorted(options.items())),
                 cache_dtype=cache_dtype)


# The Pallas kernel of each platform (kernels/paged_attention.py's impl); on others
# (CPU) the Triton one runs in Pallas interpret mode, the faster of the two there.
PALLAS_KERNEL = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}


def resolve_attention(cfg: ModelConfig, gen: GenerationConfig, platform: str,
                      cache_dtype: str | None = None) -> tuple[str, str, bool]:
  """GenerationConfig.attention_impl -> ModelImpl (attention, attention_kernel, interpret).

  'pallas' needs a paged cache (the kernels read its pages) and shapes the kernel
  takes; else a ValueError naming the field, before anything compiles.
  """
  spec = CACHE_KINDS[gen.kv_cache].from_config(gen)
  paged = isinstance(spec, PagedSpec)
  kernel, interpret = PALLAS_KERNEL.get(platform, "gpu"), platform not in PALLAS_KERNEL
  dtype = cache_dtype or cfg.dtype
  if gen.attention_impl == "auto":
    if (not interpret and paged
        and not spec.kernel_error(cfg, dtype, kernel, interpret=False)):
      return "pallas", kernel, False
    return ("cpu" if platform == "cpu" else "xla"), "", False
  if gen.attention_impl != "pallas":
    return gen.attention_impl, "", False
  if not paged:
    raise ValueError(f"generation.attention_impl: 'pallas' attends over the pages of the paged "
                     f"cache; kv_cache={gen.kv_cache!r} has none (use kv_cache='paged', or "
                     "attention_impl='xla')")
  why = spec.kernel_error(cfg, dtype, kernel, interpret)
  if why:
    raise ValueError(f"generation.attention_impl: 'pallas' cannot run this model's decode "
                     f"steps (the {kernel} kernel, page_size={spec.page_size}, {dtype}): {why}")
  return "pallas", kernel, interpret


def resolve_matmul(cfg: ModelConfig, choice: str, step_rows: int) -> str:
  """GenerationConfig.matmul_impl -> ModelImpl.matmul for decode steps of `step_rows` rows.

  'auto' is the C++ kernel on CPU when it builds, for bfloat16 weights (XLA:CPU
  widens them in a pass of their own), for float32 steps of several rows (one
  device reading each weight once beats two devices that each read all of it)
  and for 1-row float32 steps whose weights outgrow the last-level cache (the
  decode loop's packed weights read faster than XLA's matrix-vector product,
  SmolLM2); a 1-row float32 step of a model that fits in the cache stays XLA,
  where the kernel's per-call cost dominates (the toy models, ~1.8x slower;
  docs/performance.md). 'cpu_kernel' where it cannot run is an error.
  """
  ok = (jax.default_backend() == "cpu" and cfg.dtype in ("float32", "bfloat16")
        and matmul_cpu.available())
  if choice == "auto":
    big = dense_weight_bytes(cfg) > last_level_cache_bytes()
    return "cpu_kernel" if ok and (cfg.dtype == "bfloat16" or step_rows > 1 or big) else "xla"
  if choice == "cpu_kernel" and not ok:
    why = matmul_cpu.build_error() or (f"needs the CPU backend and float32 or bfloat16 weights "
                                       f"({jax.default_backend()}, {cfg.dtype})")
    raise ValueError(f"generation.matmul_impl: 'cpu_kernel' is not available: {why}")
  return choice


def dense_weight_bytes(cfg: ModelConfig) -> int:
  """float32 bytes of the attention and dense FFN weights of all blocks and the unembedding:
  what a 1-row step reads besides the experts (an estimate from the widths)."""
  d, e = cfg.d_model, cfg.dim_per_head
  attention = d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) * e
  dense = sum(not cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  return 4 * (cfg.num_layers * attention + dense * 3 * d * cfg.ffn_dim + cfg.vocab_size * d)


def cpu_compiler_options(num_devices: int) -> dict:
  """COMPILER_OPTIONS, plus ROW_SPLIT_OPTIONS with several devices; options
  this jaxlib does not know are left out (they are XLA debug options)."""
  options = dict(COMPILER_OPTIONS, **(ROW_SPLIT_OPTIONS if num_devices > 1 else {}))
  return {k: v for k, v in options.items() if _cpu_option_known(k, v)}


@functools.lru_cache(maxsize=None)
def _cpu_option_known(name: str, value) -> bool:
  """Whether XLA:CPU accepts compiler option `name` = `value` (a trial compile)."""
  try:
    jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options={name: value})
  except jax.errors.JaxRuntimeError:
    return False
  return True
