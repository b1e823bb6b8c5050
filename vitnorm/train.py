r"""The trainer: python -m vitnorm.train --config configs/<file>.py[:args] --workdir DIR [--config.x=y].

Re-running the same command resumes from the latest checkpoint in DIR; the data order continues
exactly, so a resumed run ends where an uninterrupted one would.

Sections of this file:
  1. Config      validation (one-line errors before anything compiles) and derived step counts
  2. Train step  TrainState with batch_stats, the whole step on one screen, block diagnostics
  3. Placement   'jit' (one Mesh over all devices, sharded batch) or 'pmap' (axis 'batch')
  4. Loop        resume, logging, evaluation, checkpoints, divergence and preemption
  5. CLI         absl + ml_collections config_flags, `run()` is the console entry point

Exit codes of the CLI: 0 completed or preempted (checkpoint saved, re-run to resume),
2 bad input (one line 'error: ...'), 3 training diverged (status.json says where).
"""
import copy
import dataclasses
import functools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import flax.jax_utils
from flax.training import train_state

from vitnorm import checkpoints, data, evaluation, norms, optim, parallel, pretrained, run_logging, vit
from vitnorm.data import device as data_device
from vitnorm.errors import ConfigError, UserError, exit_on_user_error

PARALLELISM = ("jit", "pmap")
PROGRESS_BAR = ("auto", "on", "off")
SPIKE_WARMUP_STEPS = 20  # steps before the loss-spike test starts (the running mean settles)
SPIKE_MEAN_DECAY = 0.95  # decay of the running mean of the train loss for the spike test


class TrainingDiverged(Exception):
  """The loss or gradient went non-finite, or the loss spiked (status.json says 'diverged')."""

  def __init__(self, step: int, reason: str):
    self.step, self.reason = step, reason
    super().__init__(f"training diverged at step {step}: {reason}")


# ==============================================================================================
# 1. Config
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated config plus what follows from it and the dataset."""

  config: ml_collections.ConfigDict  # canonical copy: norm names resolved, num_steps set
  num_steps: int
  warmup_steps: int
  steps_per_epoch: float
  eval_batch_size: int
  num_classes: int
  num_train_examples: int
  num_eval_examples: int


def _positive_int(config, field, allow_zero=False):
  value = config
  for part in field.split("."):
    value = value[part]
  ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ConfigError(field, f"must be a {'non-negative' if allow_zero else 'positive'} integer, "
                      f"got {value!r}")
  return int(value)


def canonical_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with short norm names (bn, ln) expanded; the caller's config is left as it is."""
  config = copy.deepcopy(config)
  for key in ("norm", "ffn_norm"):
    config.model[key] = norms.canonical_kind(config.model[key])
  return config


def prepare(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> Plan:
  """Validates everything that can be checked without compiling; UserError names the bad field."""
  config = canonical_config(config)
  if config.parallelism not in PARALLELISM:
    raise ConfigError("parallelism", f"unknown value {config.parallelism!r}; choose jit or pmap")
  if config.progress_bar not in PROGRESS_BAR:
    raise ConfigError("progress_bar", f"unknown value {config.progress_bar!r}; choose auto, on or off")
  model_kwargs = vit.resolve_model_config(config.model)
  optim.validate(config.optim)
  batch = _positive_int(config, "batch_size")
  accum = _positive_int(config, "accum_steps")
  for field in ("log_every", "checkpoint_every", "keep_checkpoints"):
    _positive_int(config, field)
  for field in ("eval_every", "diagnostics_every"):
    _positive_int(config, field, allow_zero=True)
  if not float(config.loss_spike_factor or 0.0) >= 0:
    raise ConfigError("loss_spike_factor", "must be >= 0 (0 = off)")

  devices = jax.device_count()
  if batch % (devices * accum):
    raise ConfigError("batch_size", f"{batch} does not split into {accum} micro-batches (accum_steps) "
                      f"on each of {devices} devices; use a multiple of {devices * accum}")
  micro_per_device = batch // devices // accum
  group = model_kwargs["norm_options"].bn_group_size
  uses_bn = "batch" in (model_kwargs["norm"], model_kwargs["ffn_norm"])
  if uses_bn and group is not None and micro_per_device % group:
    raise ConfigError("model.bn_group_size", f"{group} does not divide the per-device micro-batch of "
                      f"{micro_per_device} (batch_size {batch} / {devices} devices / accum_steps "
                      f"{accum}); choose a divisor of {micro_per_device}")
  eval_batch = config.eval_batch_size or batch // accum
  if eval_batch <= 0 or eval_batch % devices:
    raise ConfigError("eval_batch_size", f"{eval_batch} is not a positive multiple of the {devices} "
                      f"devices; use a multiple of {devices}")

  info = data.dataset_info(config.data)
  data.check_model_compatible(config.data, config.model)
  steps_per_epoch = info.num_train_examples / batch
  if config.num_steps is None:
    if not float(config.num_epochs or 0) > 0:
      raise ConfigError("num_epochs", "must be positive when num_steps is not set")
    num_steps = max(1, math.ceil(float(config.num_epochs) * steps_per_epoch))
  else:
    num_steps = _positive_int(config, "num_steps")
  if config.optim.warmup_steps is not None:
    warmup = _positive_int(config, "optim.warmup_steps", allow_zero=True)
  else:
    if not float(config.optim.warmup_epochs) >= 0:
      raise ConfigError("optim.warmup_epochs", "must be >= 0")
    warmup = int(round(float(config.optim.warmup_epochs) * steps_per_epoch))
  config.num_steps = num_steps
  config.optim.warmup_steps = min(warmup, num_steps)

  if config.get("init_from") and not os.path.isfile(config.init_from):
    raise ConfigError("init_from", f"{config.init_from!r} is not a file; give the path of a reference "
                      "ViT / AugReg .npz checkpoint, or leave it unset for random initialization")
  if workdir is not None:
    check_resume_compatible(config, workdir)
  return Plan(config=config, num_steps=num_steps, warmup_steps=config.optim.warmup_steps,
              steps_per_epoch=steps_per_epoch, eval_batch_size=eval_batch,
              num_classes=info.num_classes, num_train_examples=info.num_train_examples,
              num_eval_examples=info.num_eval_examples)


def check_resume_compatible(config: ml_collections.ConfigDict, workdir: str):
  """Refuses to resume a workdir whose checkpoints belong to a different model."""
  if not checkpoints.all_steps(workdir):
    return
  saved = checkpoints.load_run_config(workdir)
  diffs = checkpoints.model_config_differences(canonical_config(saved).model, config.model)
  if diffs:
    raise UserError(f"{workdir} holds checkpoints of a different model ({'; '.join(diffs)}); resume "
                    "with the original config, or pass a new --workdir")


# ==============================================================================================
# 2. Train state and train step
# ==============================================================================================


class TrainState(train_state.TrainState):
  """Flax TrainState plus the BN running statistics and the optional EMA of the weights."""

  batch_stats: Any = None  # {} for models without BatchNorm
  ema_params: Any = None  # None when optim.ema_decay is 0


# In-process reuse (tests, notebooks, several runs in one process): the optimizer and the
# compiled steps of an identical setup are built once. The optimizer is part of the state's
# static structure, so a new (unequal) optax object would force a new compilation.
_CACHE = {}


def _cached(kind: str, plan: Plan, build, *extra):
  c = plan.config
  key = (kind, json.dumps(dict(model=c.model.to_dict(), optim=c.optim.to_dict(), batch=c.batch_size,
                               accum=c.accum_steps, steps=plan.num_steps, warmup=plan.warmup_steps),
                          sort_keys=True, default=str)) + extra
  if key not in _CACHE:
    if len(_CACHE) >= 16:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = build()
  return _CACHE[key]


def create_train_state(plan: Plan, rng: jax.Array) -> TrainState:
  """Initial state. The model is built without a pmap axis: initialization needs none."""
  cfg = plan.config
  model = vit.build_model(cfg.model)
  shape = vit.input_shape(cfg.model, 1)
  init = _cached("init", plan, lambda: jax.jit(
      lambda r: model.init(r, jnp.zeros(shape, jnp.float32), train=False)))
  variables = init(rng)
  params = variables["params"]
  tx = _cached("tx", plan, lambda: optim.make_optimizer(cfg.optim, make_schedule(plan)))
  # apply_fn stays None: the step calls the model it was built with, and a bound method
  # (compared by identity) in the state's static structure would defeat the compilation cache.
  state = TrainState.create(
      apply_fn=None, params=params, tx=tx,
      batch_stats=variables.get("batch_stats", {}),
      ema_params=jax.tree.map(jnp.copy, params) if cfg.optim.ema_decay else None)
  # A strongly typed step counter, like the restored one, so resuming reuses the compiled step.
  return state.replace(step=jnp.zeros((), jnp.int32))


def load_pretrained(state: TrainState, path: str, model: vit.ViT) -> TrainState:
  """The state with its params (and EMA) replaced by a reference .npz checkpoint's, fitted to model."""
  params = pretrained.adapt_to_model(pretrained.load_npz(path), state.params,
                                     num_cls_tokens=model.num_cls_tokens)
  params = jax.tree.map(jnp.asarray, params)
  ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
  return state.replace(params=params, ema_params=ema)


def make_schedule(plan: Plan) -> optax.Schedule:
  return optim.learning_rate_schedule(plan.config.optim, global_batch_size=plan.config.batch_size,
                                      num_steps=plan.num_steps, warmup_steps=plan.warmup_steps)


def train_step(state: TrainState, batch, rng, *, model, schedule, accum_steps: int, ema_decay: float,
               axis_name: Optional[str] = None, micro_sharding=None, diagnostics: bool = False):
  """One optimizer step: mean gradient of `accum_steps` micro-batches -> clip -> AdamW [-> EMA].

  batch: {image [b, H, W, C], label [b, classes] soft targets}; b is the global batch under jit,
  the per-device batch under pmap (then gradients, metrics and BN statistics are averaged over
  `axis_name`). A step whose loss or gradient is not finite leaves the state unchanged (so no
  non-finite value can ever reach a checkpoint) and reports finite=False.
  """
  rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  mutable = ["batch_stats", "diagnostics"] if diagnostics else ["batch_stats"]

  def loss_fn(params, batch_stats, micro, micro_rng):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, micro["image"],
                                  train=True, rngs={"dropout": micro_rng}, mutable=mutable)
    return jnp.mean(optax.softmax_cross_entropy(logits, micro["label"])), (logits, updates)

  def micro_step(carry, xs):  # one micro-batch: gradient summed, BN statistics carried on
    batch_stats, grad_sum = carry
    index, micro = xs
    if micro_sharding is not None:
      micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch_stats, micro, jax.random.fold_in(rng, index))
    top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(micro["label"], -1))
    carry = (updates.get("batch_stats", batch_stats), jax.tree.map(jnp.add, grad_sum, grads))
    return carry, (loss, top1, updates.get("diagnostics", {}))

  # Micro-batch j = examples j, j+k, j+2k, ...: every micro-batch spans every device's shard.
  micro_batches = jax.tree.map(
      lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (batch_stats, grad_sum), (losses, top1s, diags) = jax.lax.scan(
      micro_step, (state.batch_stats, zeros), (jnp.arange(accum_steps), micro_batches))
  grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
  metrics = {"loss": jnp.mean(losses), "top1": jnp.mean(top1s)}
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)

  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if ema_decay:
    new_state = new_state.replace(ema_params=optim.ema_update(state.ema_params, new_state.params, ema_decay))
  grad_norm = optim.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics.update(grad_norm=grad_norm, lr=schedule(state.step), finite=finite)
  if diagnostics:
    metrics.update(block_diagnostics(diags, grads, axis_name))
  return new_state, metrics


def block_diagnostics(diags, grads, axis_name: Optional[str] = None) -> dict:
  """Per block i: 'diag/block_i/{residual_rms, ffn_hidden_rms, max_attention_logit, grad_norm}'.

  `diags` is the sown `diagnostics` collection stacked over micro-batches. RMS values combine
  exactly over micro-batches and devices (root of the mean square); the logit is a maximum.
  """
  def rms(values):
    ms = jnp.mean(jnp.square(values))
    return jnp.sqrt(jax.lax.pmean(ms, axis_name) if axis_name else ms)

  def maximum(values):
    m = jnp.max(values)
    return jax.lax.pmax(m, axis_name) if axis_name else m

  out = {}
  blocks = diags["Transformer"]
  for name in blocks:
    i = int(name.rsplit("_", 1)[1])
    block = blocks[name]
    out[f"diag/block_{i}/residual_rms"] = rms(block["residual_rms"][0])
    out[f"diag/block_{i}/ffn_hidden_rms"] = rms(block["MlpBlock_0"]["ffn_hidden_rms"][0])
    out[f"diag/block_{i}/max_attention_logit"] = maximum(
        block["MultiHeadDotProductAttention_0"]["max_attention_logit"][0])
    out[f"diag/block_{i}/grad_norm"] = optim.global_norm(grads["Transformer"][name])
  return out


# ==============================================================================================
# 3. Placement: jit (sharded global arrays) or pmap (per-device copies)
# ==============================================================================================


class JitPlacement:
  """One data-parallel Mesh over every device of every process; BN statistics are global
  because XLA computes them over the sharded batch (the model has no axis name)."""

  def __init__(self, plan: Plan, mesh):
    cfg = plan.config
    self.mesh = mesh
    rep, shard = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    self._rep, self._shard = rep, shard
    step = functools.partial(
        train_step, model=vit.build_model(cfg.model), schedule=make_schedule(plan),
        accum_steps=cfg.accum_steps, ema_decay=float(cfg.optim.ema_decay), micro_sharding=shard)
    self._steps = _cached("jit", plan, lambda: {
        flag: jax.jit(functools.partial(step, diagnostics=flag), donate_argnums=0,
                      in_shardings=(rep, shard, rep), out_shardings=(rep, rep))
        for flag in (False, True)}, mesh)
    self._copy = _cached("copy", plan, lambda: jax.jit(lambda s: jax.tree.map(jnp.copy, s),
                                                       out_shardings=rep), mesh)

  def put_state(self, state: TrainState) -> TrainState:
    # A copy: the step donates its input, and the caller's arrays must stay valid.
    return self._copy(state)

  def put_batch(self, batch):
    return data_device.to_global_arrays(batch, self._shard)

  def step(self, state, batch, rng, diagnostics: bool):
    return self._steps[diagnostics](state, batch, rng)

  def metrics_to_host(self, metrics) -> dict:
    return {k: parallel.host_copy(v).item() for k, v in metrics.items()}

  def global_state(self, state: TrainState) -> TrainState:
    """The state as arrays replicated over the mesh (for checkpoints and evaluation)."""
    return state


class PmapPlacement:
  """pmap over the local devices with axis 'batch': the model averages BN statistics over it,
  the step averages gradients and metrics."""

  def __init__(self, plan: Plan, mesh):
    cfg = plan.config
    self.mesh = mesh
    self._rep = parallel.replicated_sharding(mesh)
    step = functools.partial(
        train_step, model=vit.build_model(cfg.model, bn_axis_name=parallel.PMAP_AXIS),
        schedule=make_schedule(plan), accum_steps=cfg.accum_steps,
        ema_decay=float(cfg.optim.ema_decay), axis_name=parallel.PMAP_AXIS)
    self._steps = _cached("pmap", plan, lambda: {
        flag: jax.pmap(functools.partial(step, diagnostics=flag), axis_name=parallel.PMAP_AXIS,
                       in_axes=(0, 0, None), donate_argnums=0)
        for flag in (False, True)}, tuple(jax.local_devices()))

  def put_state(self, state: TrainState) -> TrainState:
    return flax.jax_utils.replicate(jax.tree.map(parallel.host_copy, state))

  def put_batch(self, batch):
    return data_device.shard_for_pmap(batch)

  def step(self, state, batch, rng, diagnostics: bool):
    return self._steps[diagnostics](state, batch, rng)

  def metrics_to_host(self, metrics) -> dict:
    return {k: np.asarray(v.addressable_data(0)).reshape(-1)[0].item() for k, v in metrics.items()}

  def global_state(self, state: TrainState) -> TrainState:
    first = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), state)
    return jax.device_put(first, self._rep)


def make_placement(plan: Plan, mesh=None):
  mesh = mesh if mesh is not None else parallel.data_mesh()
  return (JitPlacement if plan.config.parallelism == "jit" else PmapPlacement)(plan, mesh)


# ==============================================================================================
# 4. The loop
# ==============================================================================================


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
    run_logging.truncate_metrics(workdir, start_step)
    run_logging.write_status(workdir, "running", start_step, {}, num_steps=plan.num_steps)
  logger = run_logging.RunLogger(workdir, total_steps=plan.num_steps, start_step=start_step,
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
      tick, interval_time, interval_steps = time.time(), 0.0, 0
      while step < plan.num_steps:
        diagnose = bool(cfg.diagnostics_every) and (step + 1) % cfg.diagnostics_every == 0
        state, metrics = placement.step(state, next(batches), dropout_rng, diagnose)
        step += 1
        interval_steps += 1
        if pending is not None:
          monitor.observe(pending[0], placement.metrics_to_host(pending[1]))
          logger.advance(pending[0])
        pending = (step, metrics)
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
        monitor.observe(pending[0], placement.metrics_to_host(pending[1]))  # waits for the step
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
      run_logging.write_status(workdir, "diverged", err.step, monitor.last_finite, reason=err.reason,
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
    run_logging.write_status(workdir, status, step, metrics, last_checkpoint_step=summary["last_checkpoint_step"],
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
           f"{run_logging.format_duration(summary.get('wall_seconds', 0))} "
           f"({run_logging.format_duration(summary.get('train_seconds', 0))} in train steps)."]
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


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally with :args, e.g. configs/deit.py:variant=S/16,norm=bn. "
      "Override fields with --config.FIELD=VALUE.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics); re-use it to resume.")
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir


_FLAGS = None


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}; use --config FILE --workdir DIR "
                    "[--config.FIELD=VALUE ...]")
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it touches at INFO
    logging.set_verbosity(logging.WARNING)
  workdir = _FLAGS[1].value
  try:  # config_flags reports a config file it could not load only when the config is used
    config = _FLAGS[0].value
    config.get("num_cpu_devices")
  except (OSError, ValueError) as e:
    raise UserError(f"--config: {_last_error_line(str(e))}") from None
  parallel.use_all_cpu_cores(config.num_cpu_devices)
  parallel.maybe_initialize_distributed(
      config.distributed.coordinator_address, config.distributed.num_processes,
      config.distributed.process_id, auto=bool(config.distributed.auto))
  try:
    summary = train_and_evaluate(config, workdir)
  except TrainingDiverged as err:
    print(f"error: {err} (status.json in {workdir}; the last good checkpoint is kept)",
          file=sys.stderr, flush=True)
    sys.exit(3)
  if parallel.is_main_process():
    print(summary_text(summary), flush=True)


def _last_error_line(message: str) -> str:
  """The useful line of a config_flags error (which may embed a whole traceback)."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  if "Traceback (most recent call last)" in message and lines:
    last = lines[-1]
    return last.split(": ", 1)[1] if re.match(r"^\w+(Error|Exception): ", last) else last
  if any("No such file" in l for l in lines):  # config file missing: say which and why
    return next(l for l in lines if "No such file" in l)
  return " ".join(message.split())


def _parse_flags(argv):
  """absl flag parsing with one-line errors (unknown --config.field, bad config file args)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError, OSError, UserError) as e:
    message = _last_error_line(str(e))
    if isinstance(e, (AttributeError, KeyError)):  # an override names a field the config lacks
      key = message.strip("\"'")
      override = next((a for a in argv[1:] if a.startswith("--config.") and
                       re.search(rf"[.]{re.escape(key)}$", a.split("=")[0])), None)
      field = override.split("=")[0][2:] if override else key
      message = (f"{field}: no such config field; fix the name (fields and their comments: "
                 "configs/common.py)")
    elif "Traceback" in str(e):
      message = f"--config: {message}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run():
  """Console entry point (vitnorm-train)."""
  global _FLAGS
  from absl import app  # pylint: disable=g-import-not-at-top
  if _FLAGS is None:
    _FLAGS = _define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
