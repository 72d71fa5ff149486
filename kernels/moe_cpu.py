"""Top-k SwiGLU experts of a decode step as a CPU kernel (XLA FFI, C++).

    y[n] = sum_j gate[n, j] * SwiGLU_{expert[n, j]}(x[n])          (Shazeer 2017 eq. 1,
    SwiGLU_e(x) = (silu(x W_in[e][:, :F]) * x W_in[e][:, F:]) W_out[e]  top-k gates)

`moe_ffn` reads every chosen expert once, in place in the stacked weights,
for all of its rows, split over the threads of XLA's intra-op pool
(`kernels/moe_cpu.cc` explains the split). XLA:CPU itself either reads an
expert once per row or packs (copies) it for a product with several rows;
a decode step, bound by reading expert weights, is what this speeds up.
`moe_ffn_reference` is the same computation in plain XLA, the one the
kernel is tested against.

The C++ source is compiled on first use and cached (kernels/cpu_build.py).
`available()` says whether that worked (`build_error()` why not); callers
fall back to XLA when it did not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# cache_dir and cpu_flags are also used by kernels/paged_attention_cpu.py.
from kernels.cpu_build import CppKernel, cache_dir as _cache_dir, cpu_flags as _cpu_flags  # noqa: F401

TARGET = "moelab_moe_ffn"
_KERNEL = CppKernel("moe_cpu.cc", {TARGET: "MoeFfn"})


def build_error() -> str:
  """Why the kernel is not available ('' if it is)."""
  return _KERNEL.build_error()


def available() -> bool:
  """Whether `moe_ffn` can run: a CPU backend and a built kernel."""
  return _KERNEL.available()


def moe_ffn(x_NxD, expert_NxA, gate_NxA, w_in_XxDx2F, w_out_XxFxD, threads: int = 1):
  """y_NxD (see the module docstring); float32 only.

  threads: threads of XLA's intra-op pool that share every expert's read
  (each streams 1/threads of it).
  """
  if not available():
    raise RuntimeError(f"moe_cpu kernel unavailable: {build_error() or 'not the CPU backend'}")
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x_NxD.shape, jnp.float32),
                          vmap_method="sequential")
  return call(x_NxD.astype(jnp.float32), expert_NxA.astype(jnp.int32),
              gate_NxA.astype(jnp.float32), w_in_XxDx2F, w_out_XxFxD, threads=np.int64(threads))


def moe_ffn_reference(x_NxD, expert_NxA, gate_NxA, w_in_XxDx2F, w_out_XxFxD):
  """Plain XLA: every (row, choice) through its expert, gate-weighted sum."""
  h_NxAx2F = jnp.einsum("nd,nkdf->nkf", x_NxD, w_in_XxDx2F[expert_NxA])
  g, u = jnp.split(h_NxAx2F, 2, axis=-1)
  y_NxAxD = jnp.einsum("nkf,nkfd->nkd", jax.nn.silu(g) * u, w_out_XxFxD[expert_NxA])
  return jnp.einsum("nk,nkd->nd", gate_NxA.astype(y_NxAxD.dtype), y_NxAxD)
