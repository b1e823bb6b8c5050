"""The training loop: resume, logging, evaluation, checkpoints, divergence and preemption.

`train_and_evaluate(config, workdir)` trains (or resumes) the run in `workdir`. Re-running it
resumes from the latest checkpoint; the data order continues exactly, so a resumed run ends where
an uninterrupted one would.
"""
import math
import os
import signal
import threading
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vitnorm import data, parallel, workdir as workdir_lib
from vitnorm.data import device as data_device
from vitnorm.model import vit
from vitnorm.training import checkpoints, evaluation
from vitnorm.training.placement import make_placement
from vitnorm.training.plan import prepare
from vitnorm.training.state import TrainState, create_train_state, load_pretrained

EXIT_PREEMPTED = 75  # exit code of a preempted run (checkpoint saved; re-run to resume); os.EX_TEMPFAIL
SPIKE_WARMUP_STEPS = 20  # steps before the loss-spike test starts (the running mean settles)
SPIKE_MEAN_DECAY = 0.95  # decay of the running mean of the train loss for the spike test


class TrainingDiverged(Exception):
  """The loss or gradient went non-finite, or the loss spiked (status.json says 'diverged')."""

  def __init__(self, step: int, reason: str):
    self.step, self.reason = step, reason
    super().__init__(f"training diverged at step {step}: {reason}")



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


class _Monitor:
  """Host side of the step metrics: divergence test, averages over the log interval."""

  def __init__(self, spike_factor: float, chance_loss: float, start_step: int):
    self.spike_factor = spike_factor
    self.chance_loss = chance_loss
    self.start_step = start_step
    self.running_loss = None
    self.last_finite = {}
    self.sums, self.count = {}, 0
    self.diagnostics = {}

  def observe(self, step: int, metrics: dict):
    """Raises TrainingDiverged for a non-finite step or a loss spike."""
    loss = metrics["loss"]
    if not metrics["finite"]:
      raise TrainingDiverged(step, f"non-finite loss ({loss}) or gradient norm ({metrics['grad_norm']})")
    if (self.spike_factor and self.running_loss is not None and
        step - self.start_step > SPIKE_WARMUP_STEPS and
        loss > self.spike_factor * self.running_loss and loss > self.chance_loss):
      raise TrainingDiverged(step, f"loss spiked to {loss:.4g}, more than {self.spike_factor:g}x its "
                             f"running mean {self.running_loss:.4g} (config.loss_spike_factor)")
    self.running_loss = loss if self.running_loss is None else (
        SPIKE_MEAN_DECAY * self.running_loss + (1 - SPIKE_MEAN_DECAY) * loss)
    for key in ("loss", "top1", "grad_norm"):
      self.sums[key] = self.sums.get(key, 0.0) + metrics[key]
    self.count += 1
    self.last_finite = {f"train/{k}": v for k, v in metrics.items() if k in ("loss", "top1", "grad_norm", "lr")}
    self.diagnostics = {k: v for k, v in metrics.items() if k.startswith("diag/")}
    self.lr = metrics["lr"]

  def interval_summary(self) -> dict:
    """Means over the steps observed since the last call."""
    out = {f"train/{k}": v / self.count for k, v in self.sums.items()} if self.count else {}
    if self.count:
      out["train/lr"] = self.lr
    self.sums, self.count = {}, 0
    return out


def exit_code(summary: dict) -> int:
  """The trainer's exit code for a finished call: 0 completed, EXIT_PREEMPTED preempted."""
  return EXIT_PREEMPTED if summary["status"] == "preempted" else 0


def _inject_nan(batches, nan_step: Optional[int], start_step: int):
  """Debug: the batch of step `nan_step` (1-based, the step it produces) gets NaN images."""
  for step, batch in enumerate(batches, start=start_step + 1):
    if nan_step is not None and step == nan_step:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    yield batch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns its summary dict.

  Raises UserError for bad input (before compiling), TrainingDiverged after writing
  status.json when the run diverges. Returns normally when completed or preempted
  (summary['status'] says which).
  """
  started = time.time()
  workdir = os.path.abspath(workdir)
  plan = prepare(config, workdir)
  cfg = plan.config
  is_main = parallel.is_main_process()
  mesh = parallel.data_mesh()
  placement = make_placement(plan, mesh)
  eval_model = vit.build_model(cfg.model)
  key = jax.random.PRNGKey(cfg.seed)
  init_rng, dropout_rng = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)

  ckpt = checkpoints.Checkpointer(workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
  state = create_train_state(plan, init_rng)
  start_step = ckpt.latest_step() or 0
  if start_step:
    state = _restore(ckpt, start_step, state, mesh)
  elif cfg.get("init_from"):
    state = load_pretrained(state, cfg.init_from, eval_model)
  state = placement.put_state(state)
  if is_main:
    checkpoints.write_run_config(workdir, cfg)
    workdir_lib.truncate_metrics(workdir, start_step)
    workdir_lib.write_status(workdir, "running", start_step, {}, num_steps=plan.num_steps)
  logger = workdir_lib.RunLogger(workdir, total_steps=plan.num_steps, start_step=start_step,
                                 is_main=is_main, progress_bar=cfg.progress_bar)
  monitor = _Monitor(float(cfg.loss_spike_factor or 0.0), math.log(plan.num_classes), start_step)
  if start_step:
    logger.print(f"Resuming {workdir} from step {start_step}.")

  def evaluate(step):
    host = placement.global_state(state)
    variables = {"params": host.params, "batch_stats": host.batch_stats}
    results = {}
    for prefix, params in (("eval", host.params), ("eval_ema", host.ema_params)):
      if params is None:
        continue
      r = evaluation.evaluate_classifier(
          eval_model, dict(variables, params=params),
          data.eval_batches(cfg.data, global_batch_size=plan.eval_batch_size), mesh=mesh)
      results.update({f"{prefix}/top1": r["top1"], f"{prefix}/loss": r["loss"]})
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
    ckpt.save(step, model_item, {"step": host.step, "opt_state": host.opt_state})

  step, final, eval_results, status = start_step, {}, {}, "completed"
  train_time, train_examples = 0.0, 0
  try:
    with _PreemptionGuard() as preemption:
      if step < plan.num_steps:
        batches = data.train_batches(cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed,
                                     start_step=start_step, num_classes=plan.num_classes)
        batches = data_device.prefetch(_inject_nan(batches, cfg.debug.inject_nan_at_step, start_step),
                                       placement.put_batch, size=2)
      pending = None  # (step, device metrics) of the last step, read while the next one runs
      # Several processes: each step carries this process's preemption flag and returns the max
      # over all processes ('stop'); all read it one step later and stop at the same step.
      peers_stop = [False]

      def observe(pending):
        host_metrics = placement.metrics_to_host(pending[1])
        peers_stop[0] = peers_stop[0] or bool(host_metrics.get("stop", 0))
        monitor.observe(pending[0], host_metrics)

      tick, interval_time, interval_steps = time.time(), 0.0, 0
      while step < plan.num_steps:
        diagnose = bool(cfg.diagnostics_every) and (step + 1) % cfg.diagnostics_every == 0
        state, metrics = placement.step(state, next(batches), dropout_rng, diagnose,
                                        stop=preemption.requested)
        step += 1
        interval_steps += 1
        if pending is not None:
          observe(pending)
          logger.advance(pending[0])
        pending = (step, metrics)
        if cfg.debug.preempt_at_step is not None and step == cfg.debug.preempt_at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        # One process: stop now. Several: stop at this step once the previous step's shared flag
        # says some process was signalled (at most two steps after the signal, on every process).
        stop = peers_stop[0] if jax.process_count() > 1 else preemption.requested
        log_now = step % cfg.log_every == 0 or step == plan.num_steps
        eval_now = step == plan.num_steps or (cfg.eval_every and step % cfg.eval_every == 0)
        save_now = step == plan.num_steps or step % cfg.checkpoint_every == 0 or stop
        if not (log_now or eval_now or save_now or diagnose or stop):
          continue
        observe(pending)  # waits for the step
        pending = None
        now = time.time()
        interval_time += now - tick
        train_time += now - tick
        if diagnose:
          logger.write(step, monitor.diagnostics)
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
                       f"{step}; run the same command again to resume.")
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
                               last_checkpoint_step=ckpt.latest_step())
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


def _restore(ckpt: checkpoints.Checkpointer, step: int, state: TrainState, mesh) -> TrainState:
  rep = parallel.replicated_sharding(mesh)
  target = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype, sharding=rep), tree)
  model_target = {"params": target(state.params)}
  if state.batch_stats:
    model_target["batch_stats"] = target(state.batch_stats)
  if state.ema_params is not None:
    model_target["ema_params"] = target(state.ema_params)
  model_item, train_item = ckpt.restore(
      step, model_target, {"step": target(state.step), "opt_state": target(state.opt_state)})
  return state.replace(step=train_item["step"], opt_state=train_item["opt_state"],
                       params=model_item["params"], batch_stats=model_item.get("batch_stats", {}),
                       ema_params=model_item.get("ema_params"))


# ==============================================================================================
# 5. Command line
# ==============================================================================================


def summary_text(summary: dict) -> str:
  """The final summary printed by the CLI: accuracy, throughput, where results are."""
  m, w = summary["metrics"], summary["workdir"]
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
