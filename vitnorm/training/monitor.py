"""The train metrics' divergence test and interval means, kept on the device (used by the loop).

The loop hands every step's metric arrays to `Monitor.add` (no transfer, no wait) and calls
`Monitor.sync` only at its sync points; see the Monitor docstring for how the first diverged
step is still named exactly.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SPIKE_WARMUP_STEPS = 20  # steps before the loss-spike test starts (the running mean settles)
SPIKE_MEAN_DECAY = 0.95  # decay of the running mean of the train loss for the spike test


# What stopped a diverged run (status.json 'divergence'): a non-finite loss (float16 too: DeiT's
# crash), a non-finite gradient with a finite loss (float32 / bfloat16 only: float16 skips those
# steps), or the loss-spike detector.
NON_FINITE_LOSS, NON_FINITE_GRADIENT, LOSS_SPIKE = "non_finite_loss", "non_finite_gradient", "loss_spike"


class TrainingDiverged(Exception):
  """The loss or gradient went non-finite, or the loss spiked (status.json says 'diverged');
  `kind` is NON_FINITE_LOSS, NON_FINITE_GRADIENT or LOSS_SPIKE."""

  def __init__(self, step: int, reason: str, kind: str = NON_FINITE_LOSS):
    self.step, self.reason, self.kind = step, reason, kind
    super().__init__(f"training diverged at step {step}: {reason}")


# Names of the monitor's device state (all scalars): the divergence test and the interval sums.
_MONITOR_FIELDS = dict(
    step=jnp.int32,  # the last step folded in
    observed=jnp.int32,  # finite steps folded in since this process started (the spike warm-up)
    running=jnp.float32,  # running mean of the loss (valid once observed > 0)
    bad_step=jnp.int32,  # the first diverged step; 0 while none
    bad_kind=jnp.int32,  # 1 non-finite loss or gradient norm, 2 loss spike
    bad_loss=jnp.float32, bad_grad_norm=jnp.float32, bad_running=jnp.float32,
    count=jnp.int32, sum_loss=jnp.float32, sum_top1=jnp.float32, sum_grad_norm=jnp.float32,
    last_loss=jnp.float32, last_top1=jnp.float32, last_grad_norm=jnp.float32, last_lr=jnp.float32,
    # float16 (loss scaling): steps skipped for non-finite gradients in the interval (their
    # gradient norm stays out of sum_grad_norm), the run's total and the last loss scale.
    interval_skipped=jnp.int32, total_skipped=jnp.int32, last_loss_scale=jnp.float32)
_STEP_METRICS = ("loss", "top1", "grad_norm", "lr", "finite")  # what the monitor reads of a step
_SCALER_METRICS = ("skipped", "skipped_steps", "loss_scale")  # and of a float16 step


def _fold_step(m: dict, metrics: dict, valid, spike_factor: float, chance_loss: float) -> dict:
  """One step into the monitor state (elementwise; `valid` False leaves it as it is).

  Once a step diverged the state freezes: the first bad step and the last finite metrics stay."""
  f32 = jnp.float32
  loss, grad_norm = metrics["loss"].astype(f32), metrics["grad_norm"].astype(f32)
  scaled = "skipped" in metrics
  skipped = metrics["skipped"].astype(bool) if scaled else jnp.zeros((), bool)
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
      sum_grad_norm=m["sum_grad_norm"] + jnp.where(good & ~skipped, grad_norm, 0),
      last_loss=keep(loss, m["last_loss"]), last_top1=keep(metrics["top1"].astype(f32), m["last_top1"]),
      last_grad_norm=jnp.where(good & ~skipped, grad_norm, m["last_grad_norm"]),
      last_lr=keep(metrics["lr"].astype(f32), m["last_lr"]),
      interval_skipped=m["interval_skipped"] + (good & skipped).astype(jnp.int32),
      total_skipped=keep(metrics["skipped_steps"].astype(jnp.int32), m["total_skipped"]) if scaled
      else m["total_skipped"],
      last_loss_scale=keep(metrics["loss_scale"].astype(f32), m["last_loss_scale"]) if scaled
      else m["last_loss_scale"])


def _fold_steps(m: dict, steps: list, valid, *, spike_factor: float, chance_loss: float) -> dict:
  """Folds a fixed-length list of steps' metrics (`valid` [L] masks the padding) in step order."""
  keys = _STEP_METRICS + tuple(k for k in _SCALER_METRICS if k in steps[0])
  stacked = {k: jnp.stack([jnp.reshape(s[k], ()) for s in steps]) for k in keys}

  def body(carry, xs):
    return _fold_step(carry, xs[0], xs[1], spike_factor, chance_loss), None

  return jax.lax.scan(body, m, (stacked, valid))[0]


_INTERVAL_SUMS = ("count", "sum_loss", "sum_top1", "sum_grad_norm", "interval_skipped")


def _reset_sums(m: dict) -> dict:
  return dict(m, **{k: jnp.zeros_like(m[k]) for k in _INTERVAL_SUMS})


# Module-level, so every run in a process (tests, sweeps) reuses the compiled monitor programs.
_fold_steps_jit = jax.jit(_fold_steps, static_argnames=("spike_factor", "chance_loss"))
_reset_sums_jit = jax.jit(_reset_sums)


class Monitor:
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
    self.loss_scaling = False  # set by the first float16 step (its metrics carry the loss scale)

  def add(self, metrics: dict):
    """Queues one step's metrics (device arrays, replicated or per device) without reading them."""
    keys = _STEP_METRICS
    if "loss_scale" in metrics:
      self.loss_scaling = True
      keys = keys + _SCALER_METRICS
    self._pending.append({k: _first_shard(metrics[k]) for k in keys})
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
      if self.loss_scaling:
        self.last_finite.update({"train/loss_scale": h["last_loss_scale"],
                                 "train/skipped_steps": h["total_skipped"]})
    if h["bad_step"]:
      if h["bad_kind"] == 1 and self.loss_scaling:
        kind = NON_FINITE_LOSS
        reason = (f"non-finite loss ({h['bad_loss']}) in float16 (loss scale {h['last_loss_scale']:g}; "
                  f"{h['total_skipped']} steps skipped for non-finite gradients before it)")
      elif h["bad_kind"] == 1:
        kind = NON_FINITE_LOSS if not math.isfinite(h["bad_loss"]) else NON_FINITE_GRADIENT
        reason = f"non-finite loss ({h['bad_loss']}) or gradient norm ({h['bad_grad_norm']})"
      else:
        kind = LOSS_SPIKE
        reason = (f"loss spiked to {h['bad_loss']:.4g}, more than {self.spike_factor:g}x its running mean "
                  f"{h['bad_running']:.4g} (config.loss_spike_factor)")
      raise TrainingDiverged(h["bad_step"], reason, kind)
    return h

  def observe(self, step: int, metrics: dict):
    """One step's metrics (host or device scalars) folded in and checked at once (tests)."""
    del step  # the state counts steps itself
    self.add({k: jnp.asarray(metrics[k]) for k in _STEP_METRICS + _SCALER_METRICS if k in metrics})
    self.sync()

  def interval_summary(self) -> dict:
    """Means over the steps folded in since the last call (call after sync)."""
    h = self.host
    out = {}
    if h["count"]:
      updates = h["count"] - h["interval_skipped"]
      out = {"train/loss": h["sum_loss"] / h["count"], "train/top1": h["sum_top1"] / h["count"],
             "train/grad_norm": h["sum_grad_norm"] / updates if updates else math.nan,
             "train/lr": h["last_lr"]}
      if self.loss_scaling:
        out.update({"train/loss_scale": h["last_loss_scale"], "train/skipped_steps": h["total_skipped"],
                    "train/skipped_in_interval": h["interval_skipped"]})
    self._state = self._reset(self._state)
    self.host = dict(h, **{k: 0 for k in _INTERVAL_SUMS})
    return out


def _first_shard(x):
  """The local copy of a replicated array, or the first device's entry of a pmap output (no copy)."""
  if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
    return x.addressable_data(0)
  return x
