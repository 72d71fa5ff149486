"""How the model runs, apart from what it computes: implementation choices.

`ModelConfig` is the architecture; `ModelImpl` says which implementation of
the same function runs. decode/backend.py resolves it once per compile from
the backend and `GenerationConfig` (`attention_impl`, `moe_impl`); training
uses the defaults, the plain XLA forms that run well on every backend.

    attention  'xla'   grouped attention over the cache (`attention.attend_cached`)
               'cpu'   its block-diagonal form, which XLA:CPU runs faster
    moe        'xla'   dropless steps sort by expert + grouped matmul at every size
               'cpu'   decode-sized steps loop over the chosen experts (`dispatch.py`)
               'cpu_kernel'  decode-sized steps in the C++ expert kernel (kernels/moe_cpu.py)
    moe_threads  threads of that kernel (cores per device)
"""

from __future__ import annotations

import dataclasses

ATTENTION_IMPLS = ("xla", "cpu")
MOE_IMPLS = ("xla", "cpu", "cpu_kernel")


@dataclasses.dataclass(frozen=True)
class ModelImpl:
  attention: str = "xla"
  moe: str = "xla"
  moe_threads: int = 0

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"impl.attention: must be one of {ATTENTION_IMPLS} "
                       f"(got {self.attention!r})")
    if self.moe not in MOE_IMPLS:
      raise ValueError(f"impl.moe: must be one of {MOE_IMPLS} (got {self.moe!r})")
    if (self.moe == "cpu_kernel") != (self.moe_threads > 0):
      raise ValueError("impl.moe_threads: > 0 exactly when moe='cpu_kernel' "
                       f"(got {self.moe_threads} with moe={self.moe!r})")
