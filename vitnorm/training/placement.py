"""Where the step runs: 'jit' (one Mesh over all devices, sharded batch) or 'pmap' (axis 'batch').

Both placements expose the same interface (put_state, put_batch, step, lower_step,
metrics_to_host, global_state), so the loop never knows which one it drives.

Preemption. `step(..., stop=flag)` also takes this process's preemption flag and returns, as
metric 'stop', its maximum over every device of every process: the flag rides on the step's own
all-reduce (one more scalar), so sharing it every step costs no extra synchronisation, and every
process reads the same value when it reads the step's metrics.
"""
import functools

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vitnorm import parallel
from vitnorm.data import device as data_device
from vitnorm.data import device_augment
from vitnorm.errors import ConfigError
from vitnorm.model import vit
from vitnorm.training.plan import Plan
from vitnorm.training.state import TrainState, cached, make_schedule
from vitnorm.training.step import train_step


class JitPlacement:
  """One data-parallel Mesh over every device of every process; BN statistics are global
  because XLA computes them over the sharded batch (the model has no axis name)."""

  def __init__(self, plan: Plan, mesh):
    cfg = plan.config
    self.mesh = mesh
    rep, shard = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
    self._rep, self._shard = rep, shard
    augment = device_augment.make_augment(cfg.data, num_classes=plan.num_classes, seed=cfg.seed)
    step = functools.partial(
        train_step, model=vit.build_model(plan.model), schedule=make_schedule(plan),
        accum_steps=cfg.accum_steps, ema_decay=plan.optim.ema_decay, micro_sharding=shard,
        augment=augment)
    self._steps = cached("jit", plan, lambda: {
        flag: jax.jit(functools.partial(_step_with_stop, step, flag, None), donate_argnums=0,
                      in_shardings=(rep, shard, rep, shard), out_shardings=(rep, rep))
        for flag in (False, True)}, mesh, device_augment.cache_key(cfg.data, plan.num_classes, cfg.seed))
    local = len(mesh.local_devices)
    self._stop = {v: data_device.to_global_arrays(np.full(local, v, np.int32), shard) for v in (0, 1)}
    self._copy = cached("copy", plan, lambda: jax.jit(lambda s: jax.tree.map(jnp.copy, s),
                                                       out_shardings=rep), mesh)

  def put_state(self, state: TrainState) -> TrainState:
    # A copy: the step donates its input, and the caller's arrays must stay valid.
    return self._copy(state)

  def put_batch(self, batch):
    return data_device.to_global_arrays(batch, self._shard)

  def step(self, state, batch, rng, diagnostics: bool, stop: bool = False):
    return self._steps[diagnostics](state, batch, rng, self._stop[int(bool(stop))])

  def lower_step(self, state, batch, rng, diagnostics: bool = False):
    """The step lowered for these arguments (`.compile()` it for cost analysis and benchmarks);
    the compiled program is called as compiled(state, batch, rng, placement.no_stop)."""
    return self._steps[diagnostics].lower(state, batch, rng, self._stop[0])

  @property
  def no_stop(self):
    """The step's preemption-flag argument when no process is stopping."""
    return self._stop[0]

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
    self._rows = parallel.batch_sharding(mesh)  # one row per device: global_state's stacked copies
    self._own_row = cached("own_row", plan, lambda: jax.jit(jax.shard_map(
        lambda tree: jax.tree.map(lambda x: x[0], tree), mesh=mesh,
        in_specs=P(parallel.DATA_AXIS), out_specs=P(), check_vma=False)), mesh)
    if device_augment.make_augment(cfg.data, num_classes=plan.num_classes, seed=cfg.seed):
      raise ConfigError("parallelism", "'pmap' cannot run the per-batch augmentation on the device "
                        "(data.reader='grain' or data.augment_on_device=True), which works on the "
                        "global batch inside the jit step; set parallelism='jit'")
    step = functools.partial(
        train_step, model=vit.build_model(plan.model, bn_axis_name=parallel.PMAP_AXIS),
        schedule=make_schedule(plan), accum_steps=cfg.accum_steps,
        ema_decay=plan.optim.ema_decay, axis_name=parallel.PMAP_AXIS)
    self._steps = cached("pmap", plan, lambda: {
        flag: jax.pmap(functools.partial(_step_with_stop, step, flag, parallel.PMAP_AXIS),
                       axis_name=parallel.PMAP_AXIS, in_axes=(0, 0, None, 0), donate_argnums=0)
        for flag in (False, True)}, tuple(jax.local_devices()))
    local = jax.local_device_count()
    self._stop = {v: data_device.shard_for_pmap(np.full(local, v, np.int32)) for v in (0, 1)}

  def put_state(self, state: TrainState) -> TrainState:
    return flax.jax_utils.replicate(jax.tree.map(parallel.host_copy, state))

  def put_batch(self, batch):
    return data_device.shard_for_pmap(batch)

  def step(self, state, batch, rng, diagnostics: bool, stop: bool = False):
    return self._steps[diagnostics](state, batch, rng, self._stop[int(bool(stop))])

  def lower_step(self, state, batch, rng, diagnostics: bool = False):
    """The step lowered for these arguments (`.compile()` it for cost analysis and benchmarks);
    the compiled program is called as compiled(state, batch, rng, placement.no_stop)."""
    return self._steps[diagnostics].lower(state, batch, rng, self._stop[0])

  @property
  def no_stop(self):
    """The step's preemption-flag argument when no process is stopping."""
    return self._stop[0]

  def metrics_to_host(self, metrics) -> dict:
    return {k: np.asarray(v.addressable_data(0)).reshape(-1)[0].item() for k, v in metrics.items()}

  def global_state(self, state: TrainState) -> TrainState:
    """The state as arrays replicated over the mesh, from the per-device copies the pmap step left
    on each local device (pmap keeps them identical; no data moves between devices or hosts): their
    [1, ...] buffers become the rows of one [devices, ...] array sharded over the mesh, and one
    compiled program per state structure drops the row axis on every device (a shard_map that
    declares the identical results replicated, so XLA adds no collective). Reshaping each buffer
    eagerly instead cost a small compiled program per leaf shape and device, and leaves x devices
    dispatches per call."""
    return self._own_row(jax.tree.map(self._stacked, state))

  def _stacked(self, x):
    shape = (self.mesh.size,) + x.shape[1:]
    per_device = {s.device: s.data for s in x.addressable_shards}
    order = self._rows.addressable_devices_indices_map(shape)
    return jax.make_array_from_single_device_arrays(shape, self._rows, [per_device[d] for d in order])


def _step_with_stop(step, diagnostics, axis_name, state, batch, rng, stop):
  """The train step, plus metric 'stop': the maximum of every device's preemption flag."""
  state, metrics = step(state, batch, rng, diagnostics=diagnostics)
  stop = jax.lax.pmax(stop, axis_name) if axis_name else stop
  return state, dict(metrics, stop=jnp.max(stop))


def make_placement(plan: Plan, mesh=None):
  mesh = mesh if mesh is not None else parallel.data_mesh()
  return (JitPlacement if plan.config.parallelism == "jit" else PmapPlacement)(plan, mesh)

