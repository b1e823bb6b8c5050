"""Where the step runs: 'jit' (one Mesh over all devices, sharded batch) or 'pmap' (axis 'batch').

Both placements expose the same interface (put_state, put_batch, step, step_function,
metrics_to_host, global_state), so the loop never knows which one it drives.
"""
import functools

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from vitnorm import parallel
from vitnorm.data import device as data_device
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
    step = functools.partial(
        train_step, model=vit.build_model(cfg.model), schedule=make_schedule(plan),
        accum_steps=cfg.accum_steps, ema_decay=float(cfg.optim.ema_decay), micro_sharding=shard)
    self._steps = cached("jit", plan, lambda: {
        flag: jax.jit(functools.partial(step, diagnostics=flag), donate_argnums=0,
                      in_shardings=(rep, shard, rep), out_shardings=(rep, rep))
        for flag in (False, True)}, mesh)
    self._copy = cached("copy", plan, lambda: jax.jit(lambda s: jax.tree.map(jnp.copy, s),
                                                       out_shardings=rep), mesh)

  def put_state(self, state: TrainState) -> TrainState:
    # A copy: the step donates its input, and the caller's arrays must stay valid.
    return self._copy(state)

  def put_batch(self, batch):
    return data_device.to_global_arrays(batch, self._shard)

  def step(self, state, batch, rng, diagnostics: bool):
    return self._steps[diagnostics](state, batch, rng)

  def step_function(self, diagnostics: bool = False):
    """The jitted / pmapped step itself (`.lower(state, batch, rng)` for cost analysis, benchmarks)."""
    return self._steps[diagnostics]

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
    self._steps = cached("pmap", plan, lambda: {
        flag: jax.pmap(functools.partial(step, diagnostics=flag), axis_name=parallel.PMAP_AXIS,
                       in_axes=(0, 0, None), donate_argnums=0)
        for flag in (False, True)}, tuple(jax.local_devices()))

  def put_state(self, state: TrainState) -> TrainState:
    return flax.jax_utils.replicate(jax.tree.map(parallel.host_copy, state))

  def put_batch(self, batch):
    return data_device.shard_for_pmap(batch)

  def step(self, state, batch, rng, diagnostics: bool):
    return self._steps[diagnostics](state, batch, rng)

  def step_function(self, diagnostics: bool = False):
    """The jitted / pmapped step itself (`.lower(state, batch, rng)` for cost analysis, benchmarks)."""
    return self._steps[diagnostics]

  def metrics_to_host(self, metrics) -> dict:
    return {k: np.asarray(v.addressable_data(0)).reshape(-1)[0].item() for k, v in metrics.items()}

  def global_state(self, state: TrainState) -> TrainState:
    first = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), state)
    return jax.device_put(first, self._rep)


def make_placement(plan: Plan, mesh=None):
  mesh = mesh if mesh is not None else parallel.data_mesh()
  return (JitPlacement if plan.config.parallelism == "jit" else PmapPlacement)(plan, mesh)

