"""AdamW (Loshchilov & Hutter 2019) with linear warmup + cosine decay and
global-norm gradient clipping (optax).

    lr(s) = lr_max * s / warmup                                  s < warmup
    lr(s) = lr_end + (lr_max - lr_end) (1 + cos(pi t)) / 2       t = (s - warmup) / (steps - warmup)

Weight decay is applied to matrices only (ndim >= 2), not to norm scales.
"""

import jax
import optax

from train.config import OptimizerConfig


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=total_steps, end_value=cfg.learning_rate * cfg.end_lr_ratio)


def make(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip_norm) if cfg.grad_clip_norm > 0
      else optax.identity(),
      optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                  weight_decay=cfg.weight_decay, mask=decay_mask))
