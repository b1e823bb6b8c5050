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
from vitnorm.model import vit
from vitnorm import checkpoints, evaluation
from vitnorm.training import disk_full, header, loss_scale, workdir_lock
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
    if nan_step is not None and step == nan_step:  # float32 NaN images, also where the feed ships uint8
      batch = dict(batch, image=np.full(np.shape(batch["image"]), np.nan, np.float32))
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
  run = _Run(plan, workdir, started)
  done = run.restore_or_init()
  if done is not None:
    return done
  try:
    status = run.step_loop()
  except TrainingDiverged as err:
    run.record_divergence(err)
    raise
  finally:
    run.close()
  return run.finish(status)


class _Run:
  """One training run in pieces: restore or init, the step loop, evaluate, save, finish."""

  def __init__(self, plan, workdir: str, started: float):
    self.plan, self.cfg, self.workdir, self.started = plan, plan.config, workdir, started
    self.is_main = parallel.is_main_process()
    self.ckpt = None
    self.step = 0
    self.final, self.eval_results = {}, {}
    self.train_time, self.train_examples = 0.0, 0

  # -- restore or init -------------------------------------------------------------------------

  def restore_or_init(self) -> Optional[dict]:
    """Builds the state (restored, pretrained or fresh) and the run's writers; returns the summary
    of a run that had already completed (then nothing else happens), else None."""
    plan, cfg, workdir = self.plan, self.cfg, self.workdir
    if checkpoints.latest_step(workdir):  # verify before anything trusts the latest step
      self.ckpt = self._checkpointer()
      self.step = self.ckpt.restorable_step() or 0  # damaged newer steps are moved aside
    self.start_step = self.step
    done = _already_completed(workdir, self.step, plan)
    if done is not None:
      self.ckpt.close()
      return done
    if self.is_main:
      print(header.start_header(plan, workdir, self.step), flush=True)
    self.mesh = parallel.data_mesh()
    self.placement = make_placement(plan, self.mesh)
    self.eval_model = vit.build_model(plan.model)
    key = jax.random.PRNGKey(cfg.seed)
    init_rng, self.dropout_rng = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    state = create_train_state(plan, init_rng)
    if not self.step and cfg.get("init_from"):  # before checkpoints/ exists: a failure leaves none
      state = load_pretrained(state, cfg.init_from, self.eval_model)
    if self.ckpt is None:
      self.ckpt = self._checkpointer()
    if self.step:
      if self.is_main:
        print(f"Resuming {workdir} from step {self.step}.", flush=True)
      state = _restore(self.ckpt, self.step, state, self.mesh)
    self.state = self.placement.put_state(state)
    if self.is_main:
      checkpoints.write_run_config(workdir, cfg)
      workdir_lib.truncate_metrics(workdir, self.step)
      workdir_lib.write_status(workdir, "running", self.step, {}, num_steps=plan.num_steps)
    self.logger = workdir_lib.RunLogger(workdir, total_steps=plan.num_steps, start_step=self.step,
                                        is_main=self.is_main, progress_bar=cfg.progress_bar)
    self.logger.write_config(header.hparams(plan), header.config_text(cfg))
    self.monitor = _Monitor(float(cfg.loss_spike_factor or 0.0), math.log(plan.num_classes), self.step,
                            max_pending=min(cfg.log_every, MAX_PENDING_STEPS))
    return None

  def _checkpointer(self):
    return checkpoints.Checkpointer(self.workdir, keep=self.cfg.keep_checkpoints,
                                    async_save=self.cfg.async_checkpoints)

  # -- evaluate and save -----------------------------------------------------------------------

  def evaluate(self, step: int) -> dict:
    """eval/{top1,loss} (and eval_ema/ with the EMA weights and EMA BN statistics) at `step`."""
    host = self.placement.global_state(self.state)
    results = {}
    for prefix, params, stats in (("eval", host.params, host.batch_stats),
                                  ("eval_ema", host.ema_params, host.ema_batch_stats)):
      if params is None:
        continue
      r = evaluation.evaluate_classifier(
          vit.at_step(self.eval_model, step), {"params": params, "batch_stats": stats},  # PRepBN: lam(step)
          data.eval_batches(self.cfg.data, global_batch_size=self.plan.eval_batch_size), mesh=self.mesh)
      results.update({f"{prefix}/top1": r["top1"], f"{prefix}/loss": r["loss"]})
      if prefix == "eval" and self.cfg.diagnostics_every and self.plan.model.uses_batch_stats:
        r = evaluation.evaluate_classifier(  # BN's train/eval mismatch: each batch's own statistics
            vit.at_step(self.eval_model, step), {"params": params, "batch_stats": stats},
            data.eval_batches(self.cfg.data, global_batch_size=self.plan.eval_batch_size), mesh=self.mesh,
            batch_statistics=True)
        results.update({"eval/top1_batch_stats": r["top1"], "eval/loss_batch_stats": r["loss"]})
    self.logger.write(step, results)
    self.logger.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    self.eval_results = dict(results, **{"eval/step": step})
    return self.eval_results

  def save(self, step: int):
    host = self.placement.global_state(self.state)
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
    self.ckpt.save(step, model_item, train_item)

  # -- the step loop ---------------------------------------------------------------------------

  def _batches(self):
    cfg = self.cfg
    batches = data.train_batches(cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed,
                                 start_step=self.start_step, num_classes=self.plan.num_classes)
    self._feed = batches  # closed by close(): Grain's worker processes and threads end with the run
    # Made and placed by a background thread, two batches ahead; close() stops it first.
    self._prefetched = data_device.prefetch(
        _inject_nan(batches, cfg.debug.inject_nan_at_step, self.start_step), self.placement.put_batch, size=2)
    return self._prefetched

  def step_loop(self) -> str:
    """Trains to num_steps (or to a preemption); returns 'completed' or 'preempted'.

    Per step the host fetches a placed batch, dispatches the step and queues its metric arrays; it
    reads nothing back except at log / eval / save / diagnostics steps, and waits only when
    STEPS_IN_FLIGHT steps are unfinished (bounded run-ahead: memory, and XLA:CPU collectives can
    starve with too many queued runs). Several processes stop at the same step (`_should_stop`).
    """
    cfg, plan = self.cfg, self.plan
    with _PreemptionGuard() as preemption:
      batches = self._batches() if self.step < plan.num_steps else None
      in_flight, stop_flags = collections.deque(), _StopFlags(self.placement)
      interval = _Interval()
      while self.step < plan.num_steps:
        diagnose = bool(cfg.diagnostics_every) and (self.step + 1) % cfg.diagnostics_every == 0
        self.state, metrics = self.placement.step(self.state, next(batches), self.dropout_rng, diagnose,
                                                  stop=preemption.requested)
        self.step += 1
        interval.steps += 1
        self.monitor.add(metrics)
        in_flight.append(metrics["finite"])
        if len(in_flight) > STEPS_IN_FLIGHT:
          in_flight.popleft().block_until_ready()
        self.logger.advance(self.step)
        if cfg.debug.preempt_at_step is not None and self.step == cfg.debug.preempt_at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        stop = stop_flags.should_stop(metrics, preemption.requested)
        log_now = self.step % cfg.log_every == 0 or self.step == plan.num_steps
        eval_now = self.step == plan.num_steps or (cfg.eval_every and self.step % cfg.eval_every == 0)
        save_now = self.step == plan.num_steps or self.step % cfg.checkpoint_every == 0 or stop
        if not (log_now or eval_now or save_now or diagnose or stop):
          continue
        self.monitor.sync()  # waits for the step; raises TrainingDiverged naming the first bad step
        in_flight.clear()
        self.train_time += interval.lap()
        if diagnose:
          self.logger.write(self.step, self.placement.metrics_to_host(
              {k: v for k, v in metrics.items() if k.startswith("diag/")}))
        if log_now:
          self._log(interval)
        if save_now:
          self.save(self.step)
        if eval_now:
          self.evaluate(self.step)
        if stop:
          self.logger.print(f"{preemption.signal_name or 'preemption'} received: saved a checkpoint at "
                            f"step {self.step}; run the same command again to resume (exit code 75).")
          self.train_examples += interval.steps * cfg.batch_size
          return "preempted"
        interval.restart()  # evaluation and checkpoint time stay out of the throughput
      self.train_examples += interval.steps * cfg.batch_size
      if self.step >= plan.num_steps and not self.eval_results:
        self.evaluate(self.step)
        self.save(self.step)
    return "completed"

  def _log(self, interval: "_Interval"):
    cfg = self.cfg
    scalars = self.monitor.interval_summary()
    scalars.update({"train/img_per_s": interval.steps * cfg.batch_size / interval.time,
                    "train/step_time_s": interval.time / interval.steps,
                    "train/epoch": self.step / self.plan.steps_per_epoch})
    self.final.update(scalars)
    self.logger.write(self.step, scalars)
    self.logger.report(self.step, scalars)
    self.train_examples += interval.steps * cfg.batch_size
    interval.time, interval.steps = 0.0, 0

  # -- finish ----------------------------------------------------------------------------------

  def record_divergence(self, err: TrainingDiverged):
    self.ckpt.wait()  # pending saves hold finite values: let them finish
    if self.is_main:
      workdir_lib.write_status(self.workdir, "diverged", err.step, self.monitor.last_finite,
                               reason=err.reason, divergence=err.kind,
                               last_checkpoint_step=self.ckpt.latest_step())

  def close(self):
    if getattr(self, "_prefetched", None) is not None:
      self._prefetched.close()  # stops the prefetch thread before its feed closes
    if hasattr(getattr(self, "_feed", None), "close"):
      self._feed.close()
    self.logger.close()
    self.ckpt.close()

  def finish(self, status: str) -> dict:
    """The run's summary (written to status.json by the main process)."""
    metrics = {**self.monitor.last_finite, **self.final, **self.eval_results}
    if self.train_time > 0:
      metrics["train/img_per_s_overall"] = self.train_examples / self.train_time
    summary = dict(status=status, step=self.step, metrics=metrics, workdir=self.workdir,
                   checkpoint_dir=self.ckpt.directory,
                   last_checkpoint_step=checkpoints.latest_step(self.workdir),
                   train_seconds=self.train_time, wall_seconds=time.time() - self.started)
    if self.is_main:
      workdir_lib.write_status(self.workdir, status, self.step, metrics,
                               last_checkpoint_step=summary["last_checkpoint_step"],
                               train_seconds=self.train_time)
    return summary


class _Interval:
  """Steps and train-step time since the last log (evaluation and checkpoint time excluded)."""

  def __init__(self):
    self.steps, self.time, self._tick = 0, 0.0, time.time()

  def lap(self) -> float:
    """Adds the time since the last (re)start to this interval and returns it."""
    now = time.time()
    elapsed, self._tick = now - self._tick, now
    self.time += elapsed
    return elapsed

  def restart(self):
    self._tick = time.time()


class _StopFlags:
  """Whether to stop after this step. One process: when it was signalled. Several: each step
  carries this process's flag and returns the max over all processes; every process reads the
  previous step's value (computed while this one runs), so all stop at the same step, at most two
  steps after the signal."""

  def __init__(self, placement):
    self.placement, self.previous = placement, None

  def should_stop(self, metrics, requested: bool) -> bool:
    if jax.process_count() == 1:
      return requested
    stop = self.previous is not None and bool(self.placement.metrics_to_host({"stop": self.previous})["stop"])
    self.previous = metrics["stop"]
    return stop


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
  workdir = paths.resolve(workdir)  # a bucket URL stays a URL
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
