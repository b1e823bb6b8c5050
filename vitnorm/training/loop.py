"""The training loop: resume, logging, evaluation, checkpoints, divergence and preemption.

`train_and_evaluate(config, workdir)` trains (or resumes) the run in `workdir`. Re-running it
resumes from the latest checkpoint; the data order continues exactly, so a resumed run ends where
an uninterrupted one would.
"""
import collections
import math
import os
import signal
import sys
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vitnorm import data, parallel, paths, workdir as workdir_lib
from vitnorm.data import device as data_device
from vitnorm.model import norms, vit
from vitnorm.training import checkpoints, disk_full, evaluation, header, loss_scale, workdir_lock
from vitnorm.training.monitor import (SPIKE_MEAN_DECAY, SPIKE_WARMUP_STEPS,  # noqa: F401 (re-exported)
                                     Monitor as _Monitor, TrainingDiverged)
from vitnorm.training.placement import make_placement
from vitnorm.training.plan import prepare
from vitnorm.training.state import TrainState, create_train_state, load_pretrained

STEPS_IN_FLIGHT = 2  # dispatched, unfinished train steps before the host waits for the oldest
MAX_PENDING_STEPS = 64  # steps' metrics queued on the host before the monitor folds them on device


class _PreemptionGuard:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and exits cleanly. A second
  SIGINT interrupts at once (orbax never leaves a half-written checkpoint as the latest)."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)




def _inject_nan(batches, nan_step: Optional[int], start_step: int):
  """Debug: the batch of step `nan_step` (1-based, the step it produces) gets NaN images."""
  for step, batch in enumerate(batches, start=start_step + 1):
    if nan_step is not None and step == nan_step:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    yield batch


class WorkdirFull(Exception):
  """The workdir ran out of space (status.json says 'failed'); free space and re-run to resume."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns its summary dict.

  Raises UserError for bad input or a workdir held by another run (before writing anything),
  TrainingDiverged after writing status.json when the run diverges, WorkdirFull after writing
  status.json when the disk fills up. Returns normally when completed or preempted
  (summary['status'] says which).
  """
  started = time.time()
  workdir = paths.resolve(workdir)  # a bucket URL stays a URL
  plan = prepare(config, workdir)
  disk_full.quiet_out_of_space_noise()
  with workdir_lock.held_by_the_run(workdir):
    try:
      return _train_and_evaluate(plan, workdir, started)
    except Exception as err:  # pylint: disable=broad-except
      if not disk_full.out_of_space(err):
        raise
      step = disk_full.record_in_status(workdir)
      raise WorkdirFull(f"no space left on the device of {workdir} (newest checkpoint that verifies: "
                        f"step {step}); free space and run the same command again to resume") from None


def _train_and_evaluate(plan, workdir: str, started: float) -> dict:
  cfg = plan.config
  is_main = parallel.is_main_process()
  ckpt = None
  start_step = 0
  if checkpoints.latest_step(workdir):  # verify before anything trusts the latest step
    ckpt = checkpoints.Checkpointer(workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
    start_step = ckpt.restorable_step() or 0  # damaged newer steps are moved aside
  done = _already_completed(workdir, start_step, plan)
  if done is not None:
    ckpt.close()
    return done
  if is_main:
    print(header.start_header(plan, workdir, start_step), flush=True)
  mesh = parallel.data_mesh()
  placement = make_placement(plan, mesh)
  eval_model = vit.build_model(cfg.model)
  key = jax.random.PRNGKey(cfg.seed)
  init_rng, dropout_rng = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

  state = create_train_state(plan, init_rng)
  if not start_step and cfg.get("init_from"):  # before checkpoints/ exists: a failure leaves none
    state = load_pretrained(state, cfg.init_from, eval_model)
  if ckpt is None:
    ckpt = checkpoints.Checkpointer(workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
  if start_step and is_main:
    print(f"Resuming {workdir} from step {start_step}.", flush=True)
  if start_step:
    state = _restore(ckpt, start_step, state, mesh)
  state = placement.put_state(state)
  if is_main:
    checkpoints.write_run_config(workdir, cfg)
    workdir_lib.truncate_metrics(workdir, start_step)
    workdir_lib.write_status(workdir, "running", start_step, {}, num_steps=plan.num_steps)
  logger = workdir_lib.RunLogger(workdir, total_steps=plan.num_steps, start_step=start_step,
                                 is_main=is_main, progress_bar=cfg.progress_bar)
  logger.write_config(header.hparams(plan), header.config_text(cfg))
  monitor = _Monitor(float(cfg.loss_spike_factor or 0.0), math.log(plan.num_classes), start_step,
                     max_pending=min(cfg.log_every, MAX_PENDING_STEPS))

  uses_batch_stats = any(norms.uses_batch_stats(getattr(eval_model, k)) for k in ("norm", "ffn_norm"))

  def evaluate(step):
    host = placement.global_state(state)
    results = {}
    for prefix, params, stats in (("eval", host.params, host.batch_stats),
                                  ("eval_ema", host.ema_params, host.ema_batch_stats)):
      if params is None:
        continue
      r = evaluation.evaluate_classifier(
          vit.at_step(eval_model, step), {"params": params, "batch_stats": stats},  # PRepBN: lam(step);
          # EMA weights are evaluated with the EMA of the BN statistics
          data.eval_batches(cfg.data, global_batch_size=plan.eval_batch_size), mesh=mesh)
      results.update({f"{prefix}/top1": r["top1"], f"{prefix}/loss": r["loss"]})
      if prefix == "eval" and cfg.diagnostics_every and uses_batch_stats:  # BN train/eval mismatch
        r = evaluation.evaluate_classifier(
            vit.at_step(eval_model, step), {"params": params, "batch_stats": stats},
            data.eval_batches(cfg.data, global_batch_size=plan.eval_batch_size), mesh=mesh,
            batch_statistics=True)
        results.update({"eval/top1_batch_stats": r["top1"], "eval/loss_batch_stats": r["loss"]})
    logger.write(step, results)
    logger.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    return dict(results, **{"eval/step": step})

  def save(step):
    host = placement.global_state(state)
    model_item = {"params": host.params}
    if host.batch_stats:
      model_item["batch_stats"] = host.batch_stats
    if host.ema_params is not None:
      model_item["ema_params"] = host.ema_params
      if host.ema_batch_stats:
        model_item[checkpoints.EMA_BATCH_STATS] = host.ema_batch_stats
    train_item = {"step": host.step, "opt_state": host.opt_state}
    if host.loss_scale is not None:  # float16: the loss scale resumes where it was
      train_item[loss_scale.CHECKPOINT_ITEM] = loss_scale.to_item(host.loss_scale)
    ckpt.save(step, model_item, train_item)

  step, final, eval_results, status = start_step, {}, {}, "completed"
  train_time, train_examples = 0.0, 0
  try:
    with _PreemptionGuard() as preemption:
      if step < plan.num_steps:
        batches = data.train_batches(cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed,
                                     start_step=start_step, num_classes=plan.num_classes)
        batches = data_device.prefetch(_inject_nan(batches, cfg.debug.inject_nan_at_step, start_step),
                                       placement.put_batch, size=2)
      # Per step the host only fetches a placed batch, dispatches the step and queues its metric
      # arrays; it reads nothing back. It waits only when STEPS_IN_FLIGHT steps are unfinished
      # (bounded run-ahead: memory, and XLA:CPU collectives can starve with too many queued runs;
      # on XLA:CPU the dispatch itself already waits for the previous step, whose output it donates).
      in_flight = collections.deque()
      # Several processes: each step carries this process's preemption flag and returns the max over
      # all processes ('stop'); every process reads the previous step's value (already computed while
      # this one runs) and all stop at the same step, at most two steps after the signal.
      previous_stop = None
      tick, interval_time, interval_steps = time.time(), 0.0, 0
      while step < plan.num_steps:
        diagnose = bool(cfg.diagnostics_every) and (step + 1) % cfg.diagnostics_every == 0
        state, metrics = placement.step(state, next(batches), dropout_rng, diagnose,
                                        stop=preemption.requested)
        step += 1
        interval_steps += 1
        monitor.add(metrics)
        in_flight.append(metrics["finite"])
        if len(in_flight) > STEPS_IN_FLIGHT:
          in_flight.popleft().block_until_ready()
        logger.advance(step)
        if cfg.debug.preempt_at_step is not None and step == cfg.debug.preempt_at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        # One process: stop now. Several: stop at this step once the previous step's shared flag
        # says some process was signalled (at most two steps after the signal, on every process).
        if jax.process_count() > 1:
          stop = previous_stop is not None and bool(placement.metrics_to_host({"stop": previous_stop})["stop"])
          previous_stop = metrics["stop"]
        else:
          stop = preemption.requested
        log_now = step % cfg.log_every == 0 or step == plan.num_steps
        eval_now = step == plan.num_steps or (cfg.eval_every and step % cfg.eval_every == 0)
        save_now = step == plan.num_steps or step % cfg.checkpoint_every == 0 or stop
        if not (log_now or eval_now or save_now or diagnose or stop):
          continue
        monitor.sync()  # waits for the step; raises TrainingDiverged naming the first bad step
        in_flight.clear()
        now = time.time()
        interval_time += now - tick
        train_time += now - tick
        if diagnose:
          logger.write(step, placement.metrics_to_host(
              {k: v for k, v in metrics.items() if k.startswith("diag/")}))
        if log_now:
          scalars = monitor.interval_summary()
          scalars.update({"train/img_per_s": interval_steps * cfg.batch_size / interval_time,
                          "train/step_time_s": interval_time / interval_steps,
                          "train/epoch": step / plan.steps_per_epoch})
          final.update(scalars)
          logger.write(step, scalars)
          logger.report(step, scalars)
          train_examples += interval_steps * cfg.batch_size
          interval_time, interval_steps = 0.0, 0
        if save_now:
          save(step)
        if eval_now:
          eval_results = evaluate(step)
        if stop:
          status = "preempted"
          logger.print(f"{preemption.signal_name or 'preemption'} received: saved a checkpoint at step "
                       f"{step}; run the same command again to resume (exit code 75).")
          break
        tick = time.time()  # evaluation and checkpoint time stay out of the throughput
      train_examples += interval_steps * cfg.batch_size
      if step >= plan.num_steps and not eval_results:
        eval_results = evaluate(step)
        save(step)
  except TrainingDiverged as err:
    ckpt.wait()  # pending saves hold finite values: let them finish
    if is_main:
      workdir_lib.write_status(workdir, "diverged", err.step, monitor.last_finite, reason=err.reason,
                               divergence=err.kind, last_checkpoint_step=ckpt.latest_step())
    logger.close()
    ckpt.close()
    raise
  except BaseException:
    logger.close()
    ckpt.close()
    raise
  ckpt.close()
  metrics = {**monitor.last_finite, **final, **eval_results}
  if train_time > 0:
    metrics["train/img_per_s_overall"] = train_examples / train_time
  summary = dict(status=status, step=step, metrics=metrics, workdir=workdir,
                 checkpoint_dir=ckpt.directory, last_checkpoint_step=checkpoints.latest_step(workdir),
                 train_seconds=train_time, wall_seconds=time.time() - started)
  if is_main:
    workdir_lib.write_status(workdir, status, step, metrics, last_checkpoint_step=summary["last_checkpoint_step"],
                             train_seconds=train_time)
  logger.close()
  return summary


def _already_completed(workdir: str, latest: int, plan) -> Optional[dict]:
  """The summary of a run that completed its plan.num_steps before (nothing is changed), else None."""
  status = workdir_lib.read_status(workdir) or {}
  if not (latest and latest >= plan.num_steps and status.get("status") == "completed"
          and status.get("step") == latest):
    return None
  return dict(status="completed", already=True, step=latest, metrics=status.get("metrics") or {},
              workdir=workdir, checkpoint_dir=checkpoints.checkpoint_dir(workdir),
              last_checkpoint_step=latest, train_seconds=0.0, wall_seconds=0.0)


def describe_run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """--print_config: the resolved config and the start header; reads the workdir, writes nothing."""
  workdir = os.path.abspath(workdir)
  plan = prepare(config, workdir)
  resume = checkpoints.latest_step(workdir) or 0
  text = header.config_text(plan.config).rstrip()
  note = ""
  if _already_completed(workdir, resume, plan) is not None:
    note = f"\n(already completed at step {resume:,}: running it changes nothing)"
  return f"{text}\n\n{header.start_header(plan, workdir, resume)}{note}"


def _restore(ckpt: checkpoints.Checkpointer, step: int, state: TrainState, mesh) -> TrainState:
  rep = parallel.replicated_sharding(mesh)
  target = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=rep), tree)
  model_target = {"params": target(state.params)}
  if state.batch_stats:
    model_target["batch_stats"] = target(state.batch_stats)
  if state.ema_params is not None:
    model_target["ema_params"] = target(state.ema_params)
  old_ema_stats = False
  if state.ema_batch_stats:
    old_ema_stats = checkpoints.EMA_BATCH_STATS not in ckpt.model_keys(step)
    if old_ema_stats:
      print(f"warning: checkpoint {step} in {ckpt.directory} has no EMA of the BatchNorm statistics "
            "(saved by an older vitnorm); it restarts from the live statistics of that step",
            file=sys.stderr, flush=True)
    else:
      model_target[checkpoints.EMA_BATCH_STATS] = target(state.ema_batch_stats)
  train_target = {"step": target(state.step), "opt_state": target(state.opt_state)}
  # --- float16 loss scale (vitnorm.training.loss_scale): restored when saved, whatever the dtype now
  scaler_key = loss_scale.CHECKPOINT_ITEM
  if scaler_key in ckpt.train_keys(step):
    train_target[scaler_key] = target(loss_scale.item_target())
  elif state.loss_scale is not None:
    print(f"warning: checkpoint {step} in {ckpt.directory} has no loss scale (it was not trained in "
          "float16); the loss scale starts at optim.loss_scale.init", file=sys.stderr, flush=True)
  model_item, train_item = ckpt.restore(step, model_target, train_target)
  scaler = {}
  if state.loss_scale is not None and scaler_key in train_item:
    scaler = dict(loss_scale=loss_scale.from_item(train_item[scaler_key], state.loss_scale))
  # ---
  batch_stats = model_item.get("batch_stats", {})
  ema_stats = (jax.tree.map(jnp.copy, batch_stats) if old_ema_stats
               else model_item.get(checkpoints.EMA_BATCH_STATS, state.ema_batch_stats))
  return state.replace(step=train_item["step"], opt_state=train_item["opt_state"],
                       params=model_item["params"], batch_stats=batch_stats,
                       ema_params=model_item.get("ema_params"), ema_batch_stats=ema_stats, **scaler)


# ==============================================================================================
# 5. Command line
# ==============================================================================================


def summary_text(summary: dict) -> str:
  """The final summary printed by the CLI: accuracy, throughput, where results are."""
  m, w = summary["metrics"], summary["workdir"]
  if summary.get("already"):
    lines = [f"Run already completed at step {summary['step']}; nothing changed (to train longer on "
             f"purpose: a new --workdir with --config.init_from={w})."]
  else:
    lines = [f"Run {summary['status']} at step {summary['step']} in "
             f"{workdir_lib.format_duration(summary.get('wall_seconds', 0))} "
             f"({workdir_lib.format_duration(summary.get('train_seconds', 0))} in train steps)."]
  if "eval/top1" in m:
    lines.append(f"  eval top-1 {100 * m['eval/top1']:.2f}%  loss {m['eval/loss']:.4f} at step "
                 f"{m.get('eval/step', summary['step'])}" +
                 (f"  (EMA top-1 {100 * m['eval_ema/top1']:.2f}%)" if "eval_ema/top1" in m else ""))
  if "train/img_per_s_overall" in m:
    lines.append(f"  train throughput {m['train/img_per_s_overall']:.0f} img/s (including compilation)")
  lines.append(f"  metrics: {w}/metrics.jsonl, status: {w}/status.json, "
               f"TensorBoard: tensorboard --logdir {w}/tensorboard")
  lines.append(f"  checkpoints: {summary['checkpoint_dir']} (latest step {summary['last_checkpoint_step']}); "
               f"evaluate: python -m vitnorm.evaluate --workdir {w}")
  return "\n".join(lines)
