"""Dynamic loss scaling for float16 training: jmp's DynamicLossScale with torch GradScaler's rule.

Active only when model.dtype is 'float16' (config.optim.loss_scale holds the settings, commented
in configs/common.py). The train step multiplies the loss by `scale` before the backward pass and
the gradients by 1/scale after it (after the average over micro-batches and devices, as DDP
averages the scaled gradients before GradScaler unscales them). Then, as GradScaler does:

  - any non-finite gradient element: the update is skipped (parameters and optimizer state stay
    as they were; the optimizer's own step count does not advance, as torch's optimizer.step()
    is not called), the scale is divided by `factor` and the good-step counter restarts;
  - finite gradients: the update is applied; after `growth_interval` consecutive finite steps the
    scale is multiplied by `factor`.

jmp keeps the scale at >= 1 (GradScaler has no floor; a scale below 1 would mean gradients
overflowing float32, which nothing here reaches). A skipped step still advances the train step
(the data order and the lr schedule's step), updates the BN running statistics (PyTorch's forward
pass already did) and the EMA, and is counted (LossScaleState.skipped_steps). A non-finite *loss* is
not a skipped step: it stops the run as diverged, as DeiT's `sys.exit(1)` does.

In checkpoints the scaler is the train item 'loss_scale': {'scale': f32, 'counter': i32,
'skipped_steps': i32}, so a resumed run continues with the same scale, bit for bit.
"""
from typing import Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import jmp
import numpy as np

from vitnorm.errors import ConfigError

CHECKPOINT_ITEM = "loss_scale"  # key in the checkpoint's train item
DEFAULTS = dict(init=2.0 ** 16, growth_interval=2000, factor=2)  # torch GradScaler's


def enabled(model) -> bool:
  """Whether a model (a vit.ModelSpec, or a model config) trains with loss scaling (compute dtype
  float16)."""
  if hasattr(model, "get"):
    return str(model.get("dtype") or "float32") == "float16"
  return jnp.dtype(model.dtype) == jnp.float16


def settings(optim_cfg: Mapping) -> dict:
  """optim.loss_scale validated: {init, growth_interval, factor}; ConfigError names the field."""
  section = optim_cfg.get("loss_scale") or {}
  out = {k: section.get(k, d) if section.get(k, d) is not None else d for k, d in DEFAULTS.items()}
  init = out["init"]
  if isinstance(init, bool) or not isinstance(init, (int, float, np.number)) or not (
      1.0 <= float(init) < float(np.finfo(np.float32).max)):
    raise ConfigError("optim.loss_scale.init", f"must be a finite number >= 1, got {init!r} "
                      "(GradScaler starts at 65536 = 2^16)")
  for key in ("growth_interval", "factor"):
    value, low = out[key], (1 if key == "growth_interval" else 2)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ConfigError(f"optim.loss_scale.{key}", f"must be an integer >= {low}, got {value!r} "
                        f"(GradScaler: {DEFAULTS[key]})")
  return dict(init=float(init), growth_interval=int(out["growth_interval"]), factor=int(out["factor"]))


@flax.struct.dataclass
class LossScaleState:
  """The scaler's part of the train state: plain arrays only (no validation when rebuilt, so the
  state can be mapped to shapes, shardings or lowering placeholders like any other pytree).
  `jmp.DynamicLossScale` is built from it inside the step (`scaler`) and folded back (`update`)."""

  scale: jax.Array  # float32: the current loss scale
  counter: jax.Array  # int32: consecutive finite steps since the last change (jmp's counter)
  skipped_steps: jax.Array  # int32: steps skipped for non-finite gradients in the whole run
  growth_interval: int = flax.struct.field(pytree_node=False, default=DEFAULTS["growth_interval"])
  factor: int = flax.struct.field(pytree_node=False, default=DEFAULTS["factor"])

  def scaler(self) -> jmp.DynamicLossScale:
    return jmp.DynamicLossScale(loss_scale=self.scale, counter=self.counter,
                                period=self.growth_interval, factor=self.factor)

  def update(self, grads_finite) -> "LossScaleState":
    """After a step: jmp's rule for the scale and counter; a non-finite gradient counts as skipped."""
    adjusted = self.scaler().adjust(grads_finite)
    return self.replace(scale=adjusted.loss_scale, counter=adjusted.counter.astype(jnp.int32),
                        skipped_steps=self.skipped_steps + (~grads_finite).astype(jnp.int32))


def create(optim_cfg: Mapping, model) -> Optional[LossScaleState]:
  """The initial scaler state of a float16 run (model: a vit.ModelSpec or model config), None for
  other dtypes."""
  if not enabled(model):
    return None
  s = settings(optim_cfg)
  return LossScaleState(scale=jnp.asarray(s["init"], jnp.float32), counter=jnp.zeros((), jnp.int32),
                        skipped_steps=jnp.zeros((), jnp.int32), growth_interval=s["growth_interval"],
                        factor=s["factor"])


def to_item(state: LossScaleState) -> dict:
  """The scaler state as the checkpoint's train item entry."""
  return {"scale": state.scale, "counter": state.counter, "skipped_steps": state.skipped_steps}


def item_target() -> dict:
  """The entry's structure and dtypes, for restoring it."""
  return {"scale": np.float32(0), "counter": np.int32(0), "skipped_steps": np.int32(0)}


def from_item(item: Mapping, like: LossScaleState) -> LossScaleState:
  """The scaler state restored from `to_item`'s dict, with `like`'s static settings."""
  return like.replace(scale=item["scale"], counter=item["counter"], skipped_steps=item["skipped_steps"])
