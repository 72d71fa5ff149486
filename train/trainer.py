"""The training loop: data -> jitted train_step -> metrics, eval, checkpoints.

`train_and_evaluate(config, workdir)` runs a whole experiment and resumes
automatically from the newest intact checkpoint in `workdir/checkpoints`
(train/checkpoint.py verifies it and falls back past corrupt ones). Because the
batch of step s and the router-noise key of step s are pure functions of
(seed, s), a run that is killed and resumed ends with bitwise the same
parameters as one that ran straight through (on the same backend).

A failed run never damages the workdir: the config is checked against the
stored one (train/workdir.py) before anything compiles, and `config.json` is
written only once the restore succeeded. A stop request (train/preemption.py:
SIGINT/SIGTERM under `preemption.handle_signals()`) ends the run after the
current step with a checkpoint at that step (`summary["interrupted"]`). A
non-finite loss or state raises DivergenceError; a non-finite state is never
saved, so the newest checkpoint stays the last good one. The loss is checked
at log steps, where the metrics reach the host anyway (no extra sync per
step), and the whole state right before every save.

`train.remat` rematerialises the training model only (eval and the task
predictions run the same parameters without it); `train.grad_accum_steps`
scans microbatches inside the jitted step (train/step.py).

Throughput: every train row of metrics.jsonl (and the progress bar) has
`flops_per_token` and, once timed, `tokens_per_s`, `flops_per_s` and on
chips of train/flops.py's table `mfu` (model FLOPs, train/flops.py).

Outputs in `workdir`: config.json, metrics.jsonl, tb/ (TensorBoard),
checkpoints/ (Orbax + checksum manifests).
"""

import functools
import math
import signal
import time

import jax
from absl import logging
from tqdm import tqdm

from model.routing_losses import load_metrics
from model.impl import ModelImpl
from model.transformer import Decoder
from train import checkpoint, data, flops, optimizer, preemption, tasks
from train import mesh as mesh_lib
from train import workdir as workdir_lib
from train import step as step_lib
from train.config import RunConfig
from train.metrics import MetricWriter


class DivergenceError(RuntimeError):
  """The loss or the state became NaN/Inf; the run stopped without saving it."""


def moe_metrics(stats, losses) -> dict:
  """Per-MoE-layer routing metrics, flattened to names like 'moe1/load_cv'."""
  out = {}
  per_layer = jax.vmap(load_metrics)(stats)
  for i in range(stats.dropped.shape[0]):
    for k, v in per_layer.items():
      out[f"moe{i}/{k}"] = v[i]
    for k in ("switch", "importance", "load", "z", "seq"):
      out[f"moe{i}/aux_{k}"] = losses[k][i]
  out["dropped_frac"] = stats.dropped.mean()
  out["load_cv"] = per_layer["load_cv"].mean()
  return out


def evaluate(eval_fn, params, ds: data.Dataset, run: RunConfig, predict_fn=None) -> dict:
  """Eval loss and bits/byte; with a task (`predict_fn`), its `exact_match` (train/tasks.py)."""
  sums = [eval_fn(params, b) for b in
          data.val_batches(ds, run.train.eval_batches, run.data.batch_size)]
  out = step_lib.summarize_eval(sums)
  if predict_fn is not None:
    out["exact_match"] = tasks.exact_match_rate(predict_fn, params, data.val_task_batches(
        ds, run.train.eval_batches, run.data.batch_size))
  return out


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None,
                       progress: bool = True) -> dict:
  """Trains `config` in `workdir`. Returns a summary (throughput, last eval,
  `interrupted`: the signal name if a stop request ended it early, else None).

  stop_after: stop once this many steps are done, without a final save (used
    to simulate a killed run in tests); the run resumes from its last
    checkpoint next time.
  Raises ValueError (invalid config, or an architecture change in a workdir
  with checkpoints: workdir.WorkdirConfigError), checkpoint.CheckpointError
  (no intact checkpoint to resume from) or DivergenceError.
  """
  run = RunConfig.from_config(config)
  notes = workdir_lib.check_config(workdir, run)  # before anything compiles or is written
  mesh = mesh_lib.make_mesh(run.mesh, run.model.num_experts)
  mesh_lib.check_batch_size(run.data.batch_size, mesh)
  micro = run.data.batch_size // run.train.grad_accum_steps
  if micro % mesh.size:  # each microbatch is split over the devices like the batch
    raise ValueError(f"train.grad_accum_steps: leaves microbatches of {micro} rows, not "
                     f"divisible by the {mesh.size} devices (got {run.train.grad_accum_steps})")
  with jax.set_mesh(mesh):  # MoE layers traced under it use expert parallelism
    return _train_and_evaluate(run, mesh, workdir, stop_after, progress, notes)


def _diverged(what: str, step: int, ckpts: checkpoint.Checkpoints) -> DivergenceError:
  last = ckpts.latest_step()
  kept = (f"the newest checkpoint, step {last} in {ckpts.directory}, is the last good state"
          if last is not None else "no checkpoint was saved")
  return DivergenceError(
      f"training diverged: {what} at step {step}; stopped without saving it, and {kept}. "
      f"Lower optimizer.learning_rate or set optimizer.grad_clip_norm > 0, then resume.")


def _train_and_evaluate(run: RunConfig, mesh, workdir: str, stop_after: int | None,
                        progress: bool, notes: list[str]) -> dict:
  writes_files = jax.process_index() == 0  # one writer for the run's metrics and config
  ds = data.load_run(run.data, workdir, write=writes_files)  # corpus or task; BPE in workdir
  logging.info("corpus: %d train files (%d tokens), %d val files", ds.num_train_files,
               ds.num_train_tokens, ds.num_val_files)

  model = Decoder(run.model)
  tx = optimizer.make(run.optimizer, run.train.steps)
  # Sharded by train/mesh.py's rules; a restore lands on these shardings (any mesh).
  state, state_shardings = mesh_lib.init_sharded(
      lambda: step_lib.init_state(model, tx, run.train.seed, run.data.seq_len), mesh)
  ckpts = checkpoint.Checkpoints(workdir, run.checkpoint.every, run.checkpoint.keep)
  writer = None
  aborted = False
  try:
    if ckpts.latest_step() is not None:
      state = ckpts.restore(state)
      logging.info("resumed from step %d", int(state.step))
    start = int(state.step)
    if notes:
      logging.warning("continuing %s with changed settings: %s", workdir, "; ".join(notes))
    if writes_files:  # only now: the config is checked and the restore succeeded
      checkpoint.write_config(workdir, run.to_dict())
    writer = MetricWriter(workdir, enabled=writes_files, resume_step=start)
    summary = _loop(run, mesh, ds, model, tx, state, state_shardings, ckpts, writer, start,
                    stop_after, progress)
  except KeyboardInterrupt:  # a second Ctrl-C: abort without waiting for saves
    aborted = True
    raise
  finally:
    if not aborted:
      ckpts.close()
      if writer is not None:
        writer.close()
  summary["checkpoint_step"] = ckpts.latest_step()
  return summary


def _loop(run: RunConfig, mesh, ds, model, tx, state, state_shardings, ckpts, writer, start,
          stop_after, progress) -> dict:
  # Only the differentiated model is rematerialised; eval and tasks use `model` (remat 'none').
  train_model = Decoder(run.model, ModelImpl(remat=run.train.remat))
  remat_on_cpu = run.train.remat != "none" and mesh.devices.flat[0].platform == "cpu"
  train_step = step_lib.jit_train_step(
      train_model, tx, grad_accum_steps=run.train.grad_accum_steps,
      out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
      **({"compiler_options": step_lib.CPU_REMAT_COMPILER_OPTIONS} if remat_on_cpu else {}))
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model,
                                      token_bytes_V=ds.token_bytes_V))
  predict_fn = tasks.predict_fn(model) if ds.val_answer_WxL is not None else None
  tokens_per_step = run.data.batch_size * run.data.seq_len
  flops_token = flops.flops_per_token(run.model, run.data.seq_len)  # train/flops.py
  peak = flops.peak_flops(mesh.devices.flat[0].device_kind, run.model.dtype, mesh.devices.size)
  lr_schedule = optimizer.schedule(run.optimizer, run.train.steps)
  last = min(run.train.steps, stop_after) if stop_after is not None else run.train.steps
  summary = {"start_step": start, "interrupted": None}
  stop = preemption.StopCheck()

  def save(step, force=False):
    try:
      ckpts.save(step, state, force=force)
    except checkpoint.NonFiniteStateError as e:
      raise _diverged(f"the state became non-finite ({e})", step, ckpts) from None

  bar = tqdm(total=last, initial=start, disable=not progress, unit="step")
  t_window, steps_window, compile_s, train_s, timed_steps = time.perf_counter(), 0, None, 0.0, 0
  for step in range(start, last):
    batch = mesh_lib.shard_batch(
        data.train_batch(ds, step, run.data.batch_size, run.train.seed), mesh)
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch)
    if compile_s is None:  # first call: compile + one step
      jax.block_until_ready(state)
      compile_s = time.perf_counter() - t0
      t_window, steps_window = time.perf_counter(), 0
    else:
      steps_window += 1
    done = step + 1
    at_log = done % run.train.log_every == 0 or done == last
    if at_log:
      metrics = jax.device_get(metrics)
      loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise _diverged(f"loss {loss}, grad_norm {grad_norm}", done, ckpts)
      dt = time.perf_counter() - t_window
      if steps_window:
        train_s, timed_steps = train_s + dt, timed_steps + steps_window
        rates = {"steps_per_s": steps_window / dt,
                 "tokens_per_s": steps_window * tokens_per_step / dt}
      else:
        rates = {}
      rates.update(flops.throughput(flops_token, rates.get("tokens_per_s"), peak))
      scalars = {k: v for k, v in metrics.items() if k not in ("moe", "moe_losses")}
      if "moe" in metrics:
        scalars.update(moe_metrics(metrics["moe"], metrics["moe_losses"]))
      scalars["learning_rate"] = lr_schedule(step)
      writer.write(done, "train", {**scalars, **rates})
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rates.get('tokens_per_s', 0):.0f}",
                      flop_s=f"{rates.get('flops_per_s', 0):.3g}",
                      **({"mfu": f"{rates['mfu']:.1%}"} if "mfu" in rates else {}))
      t_window, steps_window = time.perf_counter(), 0
    if done % run.train.eval_every == 0 or done == run.train.steps:
      ev = evaluate(eval_fn, state.params, ds, run, predict_fn)
      writer.write(done, "eval", ev)
      summary["eval"] = ev
      logging.info("step %d eval %s", done, ev)
      t_window, steps_window = time.perf_counter(), 0  # keep eval out of throughput
    save(done, force=done == run.train.steps)
    ckpts.poll()  # seals committed steps in the background
    bar.update(1)
    signum = stop.check(done, at_log)
    if signum is not None:
      if ckpts.latest_step() != done:
        save(done, force=True)
      summary["interrupted"] = signal.Signals(signum).name
      logging.warning("%s: stopped after step %d with a checkpoint at it",
                      summary["interrupted"], done)
      break
  bar.close()
  summary.update(final_step=int(state.step), compile_s=compile_s,
                 steps_per_s=timed_steps / train_s if train_s else None,
                 tokens_per_s=timed_steps * tokens_per_step / train_s if train_s else None)
  summary.update(flops.throughput(flops_token, summary["tokens_per_s"], peak))
  summary["state"] = state
  return summary
