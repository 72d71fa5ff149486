"""Paged MLA decode attention (absorbed form): the Triton and Mosaic TPU kernels
against the plain-XLA reference (interpreted here, compiled with
MOELAB_KERNEL_TESTS_ON_DEVICE=1), the reference against float64 NumPy, both
kernels lowered for CUDA and TPU, and input validation.

Configs: DeepSeek-V2's C 512 + R 64 (scale 1 / sqrt(128 + 64), H 20 so that
heads are padded and, with block_h 16, split over two head blocks); the
smallest the Triton kernel takes (C 32 + R 16, H 3); and C 24 + R 8, which
only the reference and the TPU kernel take (Triton blocks are powers of two).
Lengths 0, 1, one page, not a multiple of the page size and the whole table;
NaN in every slot no row may read; shuffled block tables.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.mla_attention import mla_decode_attention, mla_decode_attention_reference

M = 5  # pages per row
# name: (H, C, R, dtype, S, scale)
CONFIGS = {"deepseek": (20, 512, 64, "bfloat16", 16, (128 + 64) ** -0.5),
           "small": (3, 32, 16, "float32", 8, 0.3),
           "odd": (3, 24, 8, "float32", 8, 0.3)}
SPLIT = dict(pages_per_block=2, num_splits=2)


def make_case(helpers, h, c, r, dtype, s, seed=0):
  lengths = [0, 1, s, 2 * s + 5, M * s]
  b, p = len(lengths), len(lengths) * M + 3
  tables, valid = helpers.page_layout(b, M, p, s, lengths, seed)
  rng = np.random.default_rng(seed)
  q_latent, q_rope = rng.standard_normal((b, h, c)), rng.standard_normal((b, h, r))
  kv_pages = rng.standard_normal((p, s, c + r))
  kv_pages[~valid] = np.nan
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q_latent), cast(q_rope), cast(kv_pages), jnp.asarray(tables),
          jnp.asarray(lengths, jnp.int32))


def numpy_mla(helpers, q_latent, q_rope, kv_pages, tables, lengths, scale):
  """float64 NumPy: row by row over the valid tokens; key [c_kv ; k_rope], value c_kv."""
  q_latent, q_rope, kv_pages = (np.asarray(x, np.float64) for x in (q_latent, q_rope, kv_pages))
  b, h, c = q_latent.shape
  s = kv_pages.shape[1]
  o = np.zeros((b, h, c))
  for row, n in enumerate(np.asarray(lengths)):
    kv = kv_pages[np.asarray(tables)[row, :-(-n // s)]].reshape(-1, kv_pages.shape[-1])[:n]
    q = np.concatenate([q_latent[row], q_rope[row]], axis=-1)
    o[row] = helpers.softmax_attend(scale * q @ kv.T, kv[:, :c])
  return o


@pytest.fixture(scope="module")
def cases(helpers):
  """name -> (args, scale, reference output as float32, tolerance)."""
  out = {}
  for name, (h, c, r, dtype, s, scale) in CONFIGS.items():
    args = make_case(helpers, h, c, r, dtype, s)
    ref = np.asarray(mla_decode_attention_reference(*args, scale=scale), np.float32)
    out[name] = args, scale, ref, helpers.tol[dtype]
  return out


@pytest.mark.parametrize("name", CONFIGS)
def test_reference_equals_float64_numpy(cases, name, helpers):
  args, scale, ref, tol = cases[name]
  np.testing.assert_allclose(ref, numpy_mla(helpers, *args, scale=scale), rtol=tol, atol=tol)
  assert not ref[0].any()  # length 0


@pytest.mark.parametrize("name,tuning", [("deepseek", {}), ("deepseek", dict(SPLIT, block_h=16)),
                                         ("small", {}), ("small", SPLIT)])
def test_gpu_kernel_equals_reference(cases, name, tuning, run_kernel):
  args, scale, ref, tol = cases[name]
  out = run_kernel(mla_decode_attention, "gpu", *args, scale=scale, **tuning)
  np.testing.assert_allclose(out.astype(np.float32), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("name,tuning", [("deepseek", SPLIT), ("odd", {})])
def test_tpu_kernel_equals_reference(cases, name, tuning, run_kernel):
  args, scale, ref, tol = cases[name]
  out = run_kernel(mla_decode_attention, "tpu", *args, scale=scale, **tuning)
  np.testing.assert_allclose(out.astype(np.float32), ref, rtol=tol, atol=tol)


def test_gpu_kernel_refuses_widths_triton_cannot_tile(cases):
  args, scale, _, _ = cases["odd"]
  with pytest.raises(ValueError, match="C and R powers of two >= 16"):
    mla_decode_attention(*args, scale=scale, impl="gpu", interpret=True)


@pytest.mark.parametrize("impl,platform,target,name", [
    ("gpu", "cuda", "__gpu$xla.gpu.triton", "deepseek"), ("gpu", "cuda", "__gpu$xla.gpu.triton",
                                                          "small"),
    ("tpu", "tpu", "tpu_custom_call", "deepseek"), ("tpu", "tpu", "tpu_custom_call", "odd")])
@pytest.mark.parametrize("tuning", [{}, dict(num_splits=4)], ids=["default", "split"])
def test_kernel_lowers_for_its_backend(impl, platform, target, name, tuning, helpers):
  """Lowering enforces what interpret mode does not (see test_paged_attention)."""
  h, c, r, dtype, s, scale = CONFIGS[name]
  b, p = 4, 64
  shapes = [jax.ShapeDtypeStruct(x, dtype) for x in ((b, h, c), (b, h, r), (p, s, c + r))]
  shapes += [jax.ShapeDtypeStruct((b, 16), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)]
  f = functools.partial(mla_decode_attention, scale=scale, impl=impl, **tuning)
  assert target in helpers.export_text(f, platform, shapes)


def good_args(**change):
  args = dict(q_latent_BxHxC=jnp.zeros((2, 4, 32)), q_rope_BxHxR=jnp.zeros((2, 4, 16)),
              kv_pages_PxSx_C_R=jnp.zeros((8, 16, 48)),
              block_tables_BxM=jnp.zeros((2, 3), jnp.int32), lengths_B=jnp.ones((2,), jnp.int32))
  return {**args, **change}


@pytest.mark.parametrize("change,kw,match", [
    ({}, dict(impl="triton"), "impl must be one of"),
    ({}, dict(num_warps=2.0), "num_warps must be a positive int"),
    ({}, dict(block_size=2), "unknown tuning"),
    ({}, dict(scale=0.0), "scale must be"),
    ({}, dict(impl="gpu", block_h=8), "block_h=8 must be a power of two >= 16"),
    ({}, dict(impl="tpu", num_splits=5), "num_splits=5 exceeds"),
    (dict(kv_pages_PxSx_C_R=jnp.zeros((8, 16, 40))), {}, "must be C \\+ R = 32 \\+ 16"),
    (dict(q_rope_BxHxR=jnp.zeros((2, 3, 16))), {}, "q_rope_BxHxR"),
    (dict(q_rope_BxHxR=jnp.zeros((2, 4, 16), jnp.bfloat16)), {}, "must share one dtype"),
    (dict(lengths_B=jnp.ones((3,), jnp.int32)), {}, "lengths_B must be"),
    (dict(kv_pages_PxSx_C_R=jnp.zeros((8, 16))), {}, "kv_pages_PxSx_C_R \\[P, S, C \\+ R\\]"),
    (dict(kv_pages_PxSx_C_R=jnp.zeros((8, 4, 48))), dict(impl="tpu"), "multiple of 8"),
])
def test_bad_input_raises_before_compiling(change, kw, match):
  with pytest.raises(ValueError, match=match):
    mla_decode_attention(**good_args(**change), **{"scale": 0.1, **kw})
