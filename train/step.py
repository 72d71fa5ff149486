"""Train state, loss and the pure, jitted train / eval steps.

    loss = CE(next token) + aux          aux = mean over MoE blocks of the
                                          weighted routing losses
                                          (model/routing_losses.py)

Bits per byte (eval): sum of next-token cross-entropy (nats) over targets that
cover bytes, / (ln 2 * number of bytes they cover): one byte per byte id, or
a BPE token's bytes (train/bpe.py). BOS/EOS targets count in the loss but
not in bits/byte; PAD targets (padded task rows) count in neither.

`train_step(state, batch_BxL1)` is a pure function: the router-noise key is
derived from (seed, step) inside the step, so the same seed gives the same
run and a resumed run continues bit for bit. Use `jit_train_step` to get it
compiled with the state donated.

Routers with sigmoid gates hold a selection bias b_i (model/router.py) in
`params`, so checkpoints, `restore_params`, evaluation and decoding carry it
with no extra state; the optimizer never sees it (its state is built for the
params without it, `split_router_bias`). After the optimizer's update every
step moves it by auxiliary-loss-free balancing, b_i += gamma * sign(mean load
- load_i) (DeepSeek-V3 arXiv 2412.19437 sec. 2.1.2; `router_bias_update_rate`
= gamma), and reports it as metrics['router_bias'] [MoE layer, X]. Models
without it have the same state structure as before.

Gradient accumulation (`grad_accum_steps` = N > 1): the batch's rows are N
microbatches (microbatch i = rows i, i + N, ..., so each stays split over the
data axis like the batch), and a `lax.scan` inside the step sums their
gradients before the one optimizer update. The cross-entropy of each is
divided by the whole batch's target count, so the summed gradient is the
whole batch's. The MoE aux loss is the mean over microbatches of each one's
aux loss (from that microbatch's routing statistics): the whole batch's for
losses that are token means (router z-loss), not exactly for the balance
losses, which are products of token means (Switch f_i P_i, CV^2). The routing
statistics, the metrics and the router bias update take the mean over
microbatches: with dropless or dense dispatch that is the whole batch's load,
so b_i moves once per update exactly as for the whole batch. Capacity
dispatch sizes each expert's buffer for a microbatch, and router noise is
drawn per microbatch (fold_in(key, i)).
"""

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

from model.router import merge_router_bias, split_router_bias, update_router_bias
from model.transformer import Decoder
from train import tokenizer


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array                      # base key; per-step keys are fold_in(rng, step)


def init_state(model: Decoder, tx: optax.GradientTransformation, seed: int,
               seq_len: int) -> TrainState:
  init_key, rng = jax.random.split(jax.random.key(seed))
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(init_key, tokens)["params"]
  trainable, _ = split_router_bias(params)  # the optimizer never sees the routers' b_i
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(trainable), rng=jax.random.key_data(rng))


def balance_router_bias(biases: dict, stats, rate: float) -> dict:
  """Auxiliary-loss-free balancing of every MoE block's b_i from this step's loads.

  `biases` maps block names to b_X (`split_router_bias`); `stats` is the
  RouterStats of the MoE blocks stacked in block order (`aux['stats']`).
  """
  names = sorted(biases, key=lambda n: int(n.rsplit("_", 1)[1]))
  return {n: update_router_bias(biases[n], stats.expert_frac_X[j], rate)
          for j, n in enumerate(names)}


def token_losses(logits_BxLxV, targets_BxL):
  """Per-token next-token cross-entropy in nats, [B, L]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)


def num_targets(batch_BxL1):
  """Non-PAD next-token targets of a batch (at least 1): the cross-entropy's divisor."""
  return jnp.maximum((batch_BxL1[:, 1:] != tokenizer.PAD).sum(), 1)


def loss_fn(params, model: Decoder, batch_BxL1, rng, train: bool, router_bias=None,
            targets_total=None, aux_weight: float = 1.0):
  """router_bias: the routers' b_i held out of `params` (`split_router_bias`), or None.

  targets_total, aux_weight: the CE divisor (default this batch's `num_targets`)
  and the aux loss weight; a microbatch of gradient accumulation passes the
  whole batch's count and 1 / N.
  """
  inputs, targets = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
  if router_bias:
    params = merge_router_bias(params, router_bias)
  logits, aux = model.apply({"params": params}, inputs, train=train,
                            rngs={"router": rng} if train else {})
  real_BxL = targets != tokenizer.PAD  # padded task rows (train/tasks.py): PAD is no target
  total = num_targets(batch_BxL1) if targets_total is None else targets_total
  ce = jnp.where(real_BxL, token_losses(logits, targets), 0).sum() / total
  return ce + aux_weight * aux["loss"], (ce, aux)


def accumulated_grads(trainable, model: Decoder, batch_BxL1, rng, router_bias, n: int):
  """(grads, ce, aux) of the whole batch from n microbatches in a `lax.scan`
  (module docstring): grads and ce summed, aux averaged over microbatches.

  Shapes: Ga = n microbatches of Bm = B / n rows.
  """
  rows = batch_BxL1.shape[0]
  micro_GaxBmxL1 = batch_BxL1.reshape(rows // n, n, -1).swapaxes(0, 1)  # i: rows i, i + n, ..
  total = num_targets(batch_BxL1)

  def one(grads, i_micro):
    i, micro_BmxL1 = i_micro
    g, (ce, aux) = jax.grad(loss_fn, has_aux=True)(
        trainable, model, micro_BmxL1, jax.random.fold_in(rng, i), True, router_bias,
        total, 1.0 / n)
    return jax.tree.map(jnp.add, grads, g), (ce, aux)

  zeros = jax.tree.map(jnp.zeros_like, trainable)
  grads, (ce_Ga, aux_Ga) = jax.lax.scan(one, zeros, (jnp.arange(n), micro_GaxBmxL1))
  return grads, ce_Ga.sum(), jax.tree.map(lambda x: x.mean(0), aux_Ga)


def train_step(state: TrainState, batch_BxL1, *, model: Decoder,
               tx: optax.GradientTransformation, grad_accum_steps: int = 1):
  """One AdamW step (and the routers' bias balancing). Returns (new_state, metrics).

  grad_accum_steps: microbatches per update (module docstring); divides the rows.
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  trainable, router_bias = split_router_bias(state.params)
  if grad_accum_steps == 1:
    grads, (ce, aux) = jax.grad(loss_fn, has_aux=True)(
        trainable, model, batch_BxL1, rng, True, router_bias)
  elif batch_BxL1.shape[0] % grad_accum_steps:
    raise ValueError(f"train.grad_accum_steps: must divide the batch's "
                     f"{batch_BxL1.shape[0]} rows (got {grad_accum_steps})")
  else:
    grads, ce, aux = accumulated_grads(trainable, model, batch_BxL1, rng, router_bias,
                                       grad_accum_steps)
  updates, opt_state = tx.update(grads, state.opt_state, trainable)
  params = optax.apply_updates(trainable, updates)
  metrics = {"loss": ce + aux["loss"], "ce": ce, "aux_loss": aux["loss"],
             "grad_norm": optax.global_norm(grads)}
  if "stats" in aux:
    metrics["moe"] = aux["stats"]          # RouterStats, leading axis = MoE layer
    metrics["moe_losses"] = aux["losses"]
  if router_bias:
    if model.cfg.router_bias_update_rate > 0:
      router_bias = balance_router_bias(router_bias, aux["stats"],
                                        model.cfg.router_bias_update_rate)
    names = sorted(router_bias, key=lambda n: int(n.rsplit("_", 1)[1]))
    metrics["router_bias"] = jnp.stack([router_bias[n] for n in names])  # [MoE layer, X]
    params = merge_router_bias(params, router_bias)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


# XLA:CPU's default (concurrency-optimised) scheduler runs a checkpointed block's
# recomputation early, so its activations stay alive anyway; the memory-optimised
# one defers it to the backward pass (docs/performance.md, "Training memory").
CPU_REMAT_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def jit_train_step(model: Decoder, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                   **jit_kw):
  return jax.jit(functools.partial(train_step, model=model, tx=tx,
                                   grad_accum_steps=grad_accum_steps),
                 donate_argnums=0, **jit_kw)


def eval_step(params, batch_BxL1, *, model: Decoder, token_bytes_V=None):
  """Sums for one batch: (nats over the non-PAD targets, their number, nats over
  targets that cover bytes, #bytes covered, aux).

  token_bytes_V: bytes each id covers (a BPE's `token_bytes()`); None is the
  byte tokenizer (1 per byte id, 0 for BOS/EOS/PAD).
  """
  inputs, targets = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
  logits, aux = model.apply({"params": params}, inputs, train=False)
  nats_BxL = token_losses(logits, targets)
  real = targets != tokenizer.PAD
  if token_bytes_V is None:
    nbytes_BxL = tokenizer.is_byte(targets).astype(jnp.float32)
  else:
    nbytes_BxL = jnp.asarray(token_bytes_V, jnp.float32)[targets]
  return {"nats": jnp.where(real, nats_BxL, 0).sum(), "tokens": real.sum().astype(jnp.float32),
          "byte_nats": jnp.where(nbytes_BxL > 0, nats_BxL, 0).sum(),
          "bytes": nbytes_BxL.sum(), "aux_loss": aux["loss"]}


def summarize_eval(sums: list[dict]) -> dict:
  tot = jax.tree.map(lambda *x: float(sum(x)), *sums)
  return {"loss": tot["nats"] / max(tot["tokens"], 1.0),
          "bits_per_byte": tot["byte_nats"] / (math.log(2) * max(tot["bytes"], 1.0)),
          "aux_loss": tot["aux_loss"] / len(sums)}
