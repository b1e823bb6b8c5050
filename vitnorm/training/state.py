"""The train state (Flax TrainState plus BN statistics and EMA), its creation and the lr schedule.

Also an in-process cache of the optimizer and compiled functions of an identical setup, so tests,
notebooks and sweeps that run several trainings in one process compile each setup once.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from vitnorm.model import pretrained, vit
from vitnorm import checkpoints
from vitnorm.training import loss_scale
from vitnorm.training.plan import Plan, init_source


class TrainState(train_state.TrainState):
  """Flax TrainState plus the BN running statistics and the optional EMA of the weights.

  The EMA covers the BN running statistics too (as timm's ModelEmaV2 averages buffers): EMA
  weights are evaluated and folded with `ema_batch_stats`, statistics that followed the averaged
  weights, not with the live ones (which track only the last few steps' weights).
  """

  batch_stats: Any = None  # {} for models without BatchNorm
  ema_params: Any = None  # None when optim.ema_decay is 0
  ema_batch_stats: Any = None  # EMA of batch_stats, same decay; None when optim.ema_decay is 0
  # float16 only, else None: the dynamic loss scale, its good-step counter and the count of steps
  # skipped for non-finite gradients (vitnorm.training.loss_scale.LossScaleState).
  loss_scale: Any = None


# In-process reuse (tests, notebooks, several runs in one process): the optimizer and the
# compiled steps of an identical setup are built once. The optimizer is part of the state's
# static structure, so a new (unequal) optax object would force a new compilation.
_CACHE = {}
# How many (kind, setup) entries it keeps, oldest dropped first: one training setup takes about
# four (init, train step, eval step, diagnostics). The test suite raises it (tests/conftest.py),
# so its ~30 in-process trainings of a few tiny setups compile each setup once.
MAX_CACHED = 16


def cached(kind: str, plan: Plan, build, *extra):
  """build(), once per (kind, model spec, optim spec, batch split, extra): configs that resolve to
  the same specs share it."""
  key = (kind, plan.model, plan.optim, plan.config.batch_size, plan.config.accum_steps) + extra
  if key not in _CACHE:
    if len(_CACHE) >= MAX_CACHED:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = build()
  return _CACHE[key]


def create_train_state(plan: Plan, rng: jax.Array) -> TrainState:
  """Initial state. The model is built without a pmap axis: initialization needs none."""
  model = vit.build_model(plan.model)
  shape = plan.model.input_shape(1)
  init = cached("init", plan, lambda: jax.jit(
      lambda r: model.init(r, jnp.zeros(shape, jnp.float32), train=False)))
  variables = init(rng)
  params = variables["params"]
  tx = cached("tx", plan, lambda: plan.optim.optimizer(make_schedule(plan)))
  # apply_fn stays None: the step calls the model it was built with, and a bound method
  # (compared by identity) in the state's static structure would defeat the compilation cache.
  batch_stats = variables.get("batch_stats", {})
  ema = bool(plan.optim.ema_decay)
  state = TrainState.create(
      apply_fn=None, params=params, tx=tx, batch_stats=batch_stats,
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if ema else None,
      loss_scale=loss_scale.create(plan.config.optim, plan.model))
  # A strongly typed step counter, like the restored one, so resuming reuses the compiled step.
  return state.replace(step=jnp.zeros((), jnp.int32))


def load_pretrained(state: TrainState, path: str, model: vit.ViT) -> TrainState:
  """The state with its params (and EMA) replaced by those of `path`, fitted to `model`.

  `path` is a reference .npz checkpoint, a vitnorm workdir (its latest checkpoint) or one of its
  checkpoints/STEP folders. Position embeddings are resized to the model's image size, the head is
  new when the class count differs, and BN statistics of matching shape are kept (a workdir's).
  """
  kind, source, step = init_source(path)
  stats = {}
  if kind == "npz":
    loaded = pretrained.load_npz(source)
  else:
    variables, _ = checkpoints.restore_variables(source, step)
    loaded, stats = variables["params"], variables.get("batch_stats", {})
  params = pretrained.adapt_to_model(loaded, state.params, num_cls_tokens=model.num_cls_tokens)
  params = jax.tree.map(jnp.asarray, params)
  ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
  return state.replace(params=params, ema_params=ema,
                       batch_stats=_fit_batch_stats(stats, state.batch_stats))


def _fit_batch_stats(loaded, init):
  """init's BN statistics, each replaced by the loaded one of the same name and shape."""
  if not init:
    return init
  src = flax.traverse_util.flatten_dict(jax.device_get(loaded or {}), sep="/")
  dst = flax.traverse_util.flatten_dict(jax.device_get(init), sep="/")
  out = {k: jnp.asarray(src[k]) if k in src and np.shape(src[k]) == np.shape(v) else jnp.asarray(v)
         for k, v in dst.items()}
  return flax.traverse_util.unflatten_dict(out, sep="/")


def make_schedule(plan: Plan) -> optax.Schedule:
  return plan.optim.schedule()

