"""Train state, loss and the pure, jitted train / eval steps.

    loss = CE(next token) + aux          aux = mean over MoE blocks of the
                                          weighted routing losses
                                          (model/routing_losses.py)

Bits per byte (eval): sum of next-token cross-entropy (nats) over targets that
are bytes, / (ln 2 * number of byte targets). BOS/EOS targets count in the
loss but not in bits/byte.

`train_step(state, batch_BxL1)` is a pure function: the router-noise key is
derived from (seed, step) inside the step, so the same seed gives the same
run and a resumed run continues bit for bit. Use `jit_train_step` to get it
compiled with the state donated.
"""

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import optax

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
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), rng=jax.random.key_data(rng))


def token_losses(logits_BxLxV, targets_BxL):
  """Per-token next-token cross-entropy in nats, [B, L]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)


def loss_fn(params, model: Decoder, batch_BxL1, rng, train: bool):
  inputs, targets = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
  logits, aux = model.apply({"params": params}, inputs, train=train,
                            rngs={"router": rng} if train else {})
  ce = token_losses(logits, targets).mean()
  return ce + aux["loss"], (ce, aux)


def train_step(state: TrainState, batch_BxL1, *, model: Decoder,
               tx: optax.GradientTransformation):
  """One AdamW step. Returns (new_state, metrics)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  grads, (ce, aux) = jax.grad(loss_fn, has_aux=True)(
      state.params, model, batch_BxL1, rng, True)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": ce + aux["loss"], "ce": ce, "aux_loss": aux["loss"],
             "grad_norm": optax.global_norm(grads)}
  if "stats" in aux:
    metrics["moe"] = aux["stats"]          # RouterStats, leading axis = MoE layer
    metrics["moe_losses"] = aux["losses"]
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(model: Decoder, tx: optax.GradientTransformation, **jit_kw):
  return jax.jit(functools.partial(train_step, model=model, tx=tx), donate_argnums=0,
                 **jit_kw)


def eval_step(params, batch_BxL1, *, model: Decoder):
  """Sums for one batch: (nats over all targets, #targets, nats over bytes, #bytes, aux)."""
  inputs, targets = batch_BxL1[:, :-1], batch_BxL1[:, 1:]
  logits, aux = model.apply({"params": params}, inputs, train=False)
  nats_BxL = token_losses(logits, targets)
  byte = tokenizer.is_byte(targets)
  return {"nats": nats_BxL.sum(), "tokens": jnp.asarray(nats_BxL.size, jnp.float32),
          "byte_nats": jnp.where(byte, nats_BxL, 0).sum(),
          "bytes": byte.sum().astype(jnp.float32), "aux_loss": aux["loss"]}


def summarize_eval(sums: list[dict]) -> dict:
  tot = jax.tree.map(lambda *x: float(sum(x)), *sums)
  return {"loss": tot["nats"] / tot["tokens"],
          "bits_per_byte": tot["byte_nats"] / (math.log(2) * max(tot["bytes"], 1.0)),
          "aux_loss": tot["aux_loss"] / len(sums)}
