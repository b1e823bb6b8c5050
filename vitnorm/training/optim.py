"""Optimizer: AdamW with linear warm-up then cosine decay, gradient clipping, masked weight decay,
plus the EMA of the weights.

Everything comes from `config.optim` (fields documented in configs/common.py); nothing is
hard-coded. Gradient accumulation happens inside the train step (vitnorm.train), which averages
the gradients of `accum_steps` micro-batches before one optimizer update.
"""
import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from vitnorm.errors import ConfigError
from vitnorm.training import loss_scale

# Parameters that take weight decay: the kernels of Dense and Conv layers. Norm scales / biases,
# all biases, the position embeddings and the CLS token do not (DeiT / timm convention).
DECAYED_PARAM_NAMES = ("kernel",)


def peak_learning_rate(optim_cfg: Mapping, global_batch_size: int) -> float:
  """base_lr * global_batch / lr_scaling_batch (DeiT: 5e-4 x batch / 512); no scaling if unset."""
  scaling = optim_cfg.get("lr_scaling_batch")
  lr = float(optim_cfg["base_lr"])
  return lr * global_batch_size / scaling if scaling else lr


def learning_rate_schedule(optim_cfg: Mapping, *, global_batch_size: int, num_steps: int,
                           warmup_steps: int) -> optax.Schedule:
  """0 -> peak linearly over `warmup_steps`, then cosine to `min_lr` at `num_steps`."""
  peak = peak_learning_rate(optim_cfg, global_batch_size)
  min_lr = float(optim_cfg.get("min_lr") or 0.0)
  if warmup_steps >= num_steps:
    return optax.linear_schedule(0.0, peak, max(num_steps, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps, decay_steps=num_steps,
      end_value=min_lr)


def weight_decay_mask(params) -> Any:
  """Pytree of bools like `params`: True where weight decay applies (DECAYED_PARAM_NAMES)."""
  def decayed(path, _):
    last = path[-1]
    name = getattr(last, "key", getattr(last, "name", str(last)))
    return name in DECAYED_PARAM_NAMES
  return jax.tree_util.tree_map_with_path(decayed, params)


def validate(optim_cfg: Mapping):
  """ConfigError naming the field for impossible optimizer settings."""
  def positive(key):
    if not float(optim_cfg[key]) > 0:
      raise ConfigError(f"optim.{key}", f"must be positive, got {optim_cfg[key]!r}")
  positive("base_lr")
  positive("eps")
  for key in ("b1", "b2"):
    if not 0.0 <= float(optim_cfg[key]) < 1.0:
      raise ConfigError(f"optim.{key}", f"must be in [0, 1), got {optim_cfg[key]!r}")
  if float(optim_cfg["weight_decay"]) < 0:
    raise ConfigError("optim.weight_decay", f"must be >= 0, got {optim_cfg['weight_decay']!r}")
  clip = optim_cfg.get("grad_clip_norm")
  if clip is not None and not float(clip) > 0:
    raise ConfigError("optim.grad_clip_norm", f"must be positive or None (no clipping), got {clip!r}")
  ema = float(optim_cfg.get("ema_decay") or 0.0)
  if not 0.0 <= ema < 1.0:
    raise ConfigError("optim.ema_decay", f"must be in [0, 1) (0 = no EMA), got {ema!r}")
  scaling = optim_cfg.get("lr_scaling_batch")
  if scaling is not None and not int(scaling) > 0:
    raise ConfigError("optim.lr_scaling_batch", f"must be a positive batch size or None, got {scaling!r}")
  if float(optim_cfg.get("min_lr") or 0.0) < 0:
    raise ConfigError("optim.min_lr", "must be >= 0")
  loss_scale.settings(optim_cfg)  # optim.loss_scale (used with model.dtype float16)


def make_optimizer(optim_cfg: Mapping, schedule: optax.Schedule) -> optax.GradientTransformation:
  """[clip_by_global_norm] -> AdamW(schedule, weight decay on kernels only)."""
  parts = []
  clip = optim_cfg.get("grad_clip_norm")
  if clip:
    parts.append(optax.clip_by_global_norm(float(clip)))
  parts.append(optax.adamw(
      learning_rate=schedule, b1=float(optim_cfg["b1"]), b2=float(optim_cfg["b2"]),
      eps=float(optim_cfg["eps"]), weight_decay=float(optim_cfg["weight_decay"]),
      mask=weight_decay_mask))
  return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  """config.optim resolved once for one run (peak lr scaled by the global batch, warm-up in steps)."""

  peak_lr: float  # base_lr x global_batch / lr_scaling_batch
  min_lr: float  # the cosine's end value at num_steps
  warmup_steps: int
  num_steps: int
  b1: float
  b2: float
  eps: float
  weight_decay: float  # AdamW, on kernels only
  grad_clip_norm: Optional[float]  # None: no clipping
  ema_decay: float  # 0: no EMA of the weights

  def schedule(self) -> optax.Schedule:
    return learning_rate_schedule(dict(base_lr=self.peak_lr, min_lr=self.min_lr), global_batch_size=1,
                                  num_steps=self.num_steps, warmup_steps=self.warmup_steps)

  def optimizer(self, schedule: optax.Schedule) -> optax.GradientTransformation:
    return make_optimizer(dataclasses.asdict(self), schedule)


def optim_spec(optim_cfg: Mapping, *, global_batch_size: int, num_steps: int,
               warmup_steps: int) -> OptimSpec:
  """The OptimSpec of a validated config.optim (see `validate`)."""
  clip = optim_cfg.get("grad_clip_norm")
  return OptimSpec(peak_lr=peak_learning_rate(optim_cfg, global_batch_size),
                   min_lr=float(optim_cfg.get("min_lr") or 0.0), warmup_steps=int(warmup_steps),
                   num_steps=int(num_steps), b1=float(optim_cfg["b1"]), b2=float(optim_cfg["b2"]),
                   eps=float(optim_cfg["eps"]), weight_decay=float(optim_cfg["weight_decay"]),
                   grad_clip_norm=None if clip is None else float(clip),
                   ema_decay=float(optim_cfg.get("ema_decay") or 0.0))


def ema_update(ema_params, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params (in the parameters' dtype)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)


def global_norm(tree) -> jax.Array:
  """sqrt(sum of squares) of every leaf, in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
