"""The training loop: resume, logging, evaluation, checkpoints, divergence and preemption.

`train_and_evaluate(config, workdir)` trains (or resumes) the run in `workdir`. Re-running it
resumes from the latest checkpoint; the data order continues exactly, so a resumed run ends where
an uninterrupted one would.
"""
import collections
import functools
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

SPIKE_WARMUP_STEPS = 20  # steps before the loss-spike test starts (the running mean settles)
SPIKE_MEAN_DECAY = 0.95  # decay of the running mean of the train loss for the spike test
STEPS_IN_FLIGHT = 2  # dispatched, unfinished train steps before the host waits for the oldest
MAX_PENDING_STEPS = 64  # steps' metrics queued on the host before the monitor folds them on device


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


# Names of the monitor's device state (all scalars): the divergence test and the interval sums.
_MONITOR_FIELDS = dict(
    step=jnp.int32,  # the last step folded in
    observed=jnp.int32,  # finite steps folded in since this process started (the spike warm-up)
    running=jnp.float32,  # running mean of the loss (valid once observed > 0)
    bad_step=jnp.int32,  # the first diverged step; 0 while none
    bad_kind=jnp.int32,  # 1 non-finite loss or gradient norm, 2 loss spike
    bad_loss=jnp.float32, bad_grad_norm=jnp.float32, bad_running=jnp.float32,
    count=jnp.int32, sum_loss=jnp.float32, sum_top1=jnp.float32, sum_grad_norm=jnp.float32,
    last_loss=jnp.float32, last_top1=jnp.float32, last_grad_norm=jnp.float32, last_lr=jnp.float32)
_STEP_METRICS = ("loss", "top1", "grad_norm", "lr", "finite")  # what the monitor reads of a step


def _fold_step(m: dict, metrics: dict, valid, spike_factor: float, chance_loss: float) -> dict:
  """One step into the monitor state (elementwise; `valid` False leaves it as it is).

  Once a step diverged the state freezes: the first bad step and the last finite metrics stay."""
  f32 = jnp.float32
  loss, grad_norm = metrics["loss"].astype(f32), metrics["grad_norm"].astype(f32)
  live = valid & (m["bad_step"] == 0)
  observed = m["observed"] + 1
  finite = metrics["finite"].astype(bool)
  spike = ((spike_factor > 0) & (m["observed"] > 0) & (observed > SPIKE_WARMUP_STEPS) &
           (loss > spike_factor * m["running"]) & (loss > chance_loss))
  bad = live & (~finite | spike)
  good = live & ~bad
  step = jnp.where(valid, m["step"] + 1, m["step"])
  keep = lambda new, old: jnp.where(good, new, old)  # noqa: E731
  running = jnp.where(m["observed"] > 0, SPIKE_MEAN_DECAY * m["running"] + (1 - SPIKE_MEAN_DECAY) * loss, loss)
  return dict(
      step=step, observed=keep(observed, m["observed"]), running=keep(running, m["running"]),
      bad_step=jnp.where(bad, step, m["bad_step"]),
      bad_kind=jnp.where(bad, jnp.where(finite, 2, 1), m["bad_kind"]),
      bad_loss=jnp.where(bad, loss, m["bad_loss"]), bad_grad_norm=jnp.where(bad, grad_norm, m["bad_grad_norm"]),
      bad_running=jnp.where(bad, m["running"], m["bad_running"]),
      count=m["count"] + good.astype(jnp.int32),
      sum_loss=m["sum_loss"] + jnp.where(good, loss, 0), sum_top1=m["sum_top1"] + jnp.where(good, metrics["top1"], 0),
      sum_grad_norm=m["sum_grad_norm"] + jnp.where(good, grad_norm, 0),
      last_loss=keep(loss, m["last_loss"]), last_top1=keep(metrics["top1"].astype(f32), m["last_top1"]),
      last_grad_norm=keep(grad_norm, m["last_grad_norm"]), last_lr=keep(metrics["lr"].astype(f32), m["last_lr"]))


def _fold_steps(m: dict, steps: list, valid, *, spike_factor: float, chance_loss: float) -> dict:
  """Folds a fixed-length list of steps' metrics (`valid` [L] masks the padding) in step order."""
  stacked = {k: jnp.stack([jnp.reshape(s[k], ()) for s in steps]) for k in _STEP_METRICS}

  def body(carry, xs):
    return _fold_step(carry, xs[0], xs[1], spike_factor, chance_loss), None

  return jax.lax.scan(body, m, (stacked, valid))[0]


def _reset_sums(m: dict) -> dict:
  return dict(m, **{k: jnp.zeros_like(m[k]) for k in ("count", "sum_loss", "sum_top1", "sum_grad_norm")})


# Module-level, so every run in a process (tests, sweeps) reuses the compiled monitor programs.
_fold_steps_jit = jax.jit(_fold_steps, static_argnames=("spike_factor", "chance_loss"))
_reset_sums_jit = jax.jit(_reset_sums)


class _Monitor:
  """The train metrics' divergence test and interval means, computed on the device.

  The host never reads a step's metrics on the way: the loop hands each step's metric arrays to
  `add` (no transfer, no wait), and at its sync points (log, eval, checkpoint, diagnostics and
  stop steps; at least every log_every steps) calls `sync`, which folds the pending steps into a
  small device state in one compiled call (a scan in step order) and reads that state back in one
  transfer. The state records the first step whose loss or gradient norm was non-finite, or whose
  loss spiked (> spike_factor x the running mean and above chance level, after
  SPIKE_WARMUP_STEPS steps), so `sync` raises TrainingDiverged naming exactly that step, with the
  metrics of the last finite step before it. The train step leaves the state unchanged on a
  non-finite step, and the loop saves only after a sync, so no checkpoint holds a diverged step.
  """

  def __init__(self, spike_factor: float, chance_loss: float, start_step: int, max_pending: int = 64):
    self.spike_factor = float(spike_factor or 0.0)
    self.chance_loss = float(chance_loss)
    self.max_pending = max(1, int(max_pending))  # sequence length of one fold (padded)
    self._fold = functools.partial(_fold_steps_jit, spike_factor=self.spike_factor,
                                   chance_loss=self.chance_loss)
    self._reset = _reset_sums_jit
    self._state = {k: jnp.asarray(start_step if k == "step" else 0, dtype) for k, dtype in _MONITOR_FIELDS.items()}
    self._pending = []
    self.host = {k: 0 for k in _MONITOR_FIELDS}
    self.last_finite = {}

  def add(self, metrics: dict):
    """Queues one step's metrics (device arrays, replicated or per device) without reading them."""
    self._pending.append({k: _first_shard(metrics[k]) for k in _STEP_METRICS})
    if len(self._pending) >= self.max_pending:
      self._flush()

  def _flush(self):
    if not self._pending:
      return
    n, pad = len(self._pending), self.max_pending - len(self._pending)
    valid = np.arange(self.max_pending) < n
    self._state = self._fold(self._state, self._pending + [self._pending[-1]] * pad, valid)
    self._pending = []

  def sync(self) -> dict:
    """Folds the pending steps, reads the state (waits for them); raises TrainingDiverged."""
    self._flush()
    self.host = {k: v.item() for k, v in jax.device_get(self._state).items()}
    h = self.host
    if h["observed"]:
      self.last_finite = {"train/loss": h["last_loss"], "train/top1": h["last_top1"],
                          "train/grad_norm": h["last_grad_norm"], "train/lr": h["last_lr"]}
    if h["bad_step"]:
      if h["bad_kind"] == 1:
        reason = f"non-finite loss ({h['bad_loss']}) or gradient norm ({h['bad_grad_norm']})"
      else:
        reason = (f"loss spiked to {h['bad_loss']:.4g}, more than {self.spike_factor:g}x its running mean "
                  f"{h['bad_running']:.4g} (config.loss_spike_factor)")
      raise TrainingDiverged(h["bad_step"], reason)
    return h

  def observe(self, step: int, metrics: dict):
    """One step's metrics (host or device scalars) folded in and checked at once (tests)."""
    del step  # the state counts steps itself
    self.add({k: jnp.asarray(metrics[k]) for k in _STEP_METRICS})
    self.sync()

  def interval_summary(self) -> dict:
    """Means over the steps folded in since the last call (call after sync)."""
    h = self.host
    out = {}
    if h["count"]:
      out = {"train/loss": h["sum_loss"] / h["count"], "train/top1": h["sum_top1"] / h["count"],
             "train/grad_norm": h["sum_grad_norm"] / h["count"], "train/lr": h["last_lr"]}
    self._state = self._reset(self._state)
    self.host = dict(h, count=0, sum_loss=0.0, sum_top1=0.0, sum_grad_norm=0.0)
    return out


def _first_shard(x):
  """The local copy of a replicated array, or the first device's entry of a pmap output (no copy)."""
  if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
    return x.addressable_data(0)
  return x


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(multihost_utils.process_allgather(np.int32(flag)).max())


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
  monitor = _Monitor(float(cfg.loss_spike_factor or 0.0), math.log(plan.num_classes), start_step,
                     max_pending=min(cfg.log_every, MAX_PENDING_STEPS))
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
      # Per step the host only fetches a placed batch, dispatches the step and queues its metric
      # arrays; it reads nothing back. It waits only when STEPS_IN_FLIGHT steps are unfinished
      # (bounded run-ahead: memory, and XLA:CPU collectives can starve with too many queued runs).
      in_flight = collections.deque()
      tick, interval_time, interval_steps = time.time(), 0.0, 0
      while step < plan.num_steps:
        diagnose = bool(cfg.diagnostics_every) and (step + 1) % cfg.diagnostics_every == 0
        state, metrics = placement.step(state, next(batches), dropout_rng, diagnose)
        step += 1
        interval_steps += 1
        monitor.add(metrics)
        in_flight.append(metrics["finite"])
        if len(in_flight) > STEPS_IN_FLIGHT:
          in_flight.popleft().block_until_ready()
        logger.advance(step)
        if cfg.debug.preempt_at_step is not None and step == cfg.debug.preempt_at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        stop = preemption.requested
        if jax.process_count() > 1:  # every process must stop at the same step
          stop = step % cfg.log_every == 0 and _any_process(stop)
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
