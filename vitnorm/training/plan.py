"""Config validation: a ConfigDict in, a frozen Plan out (one-line errors before anything compiles).

`prepare` checks every field that can be checked without compiling (parallelism, batch splits over
devices and micro-batches, BN ghost groups, step counts, init_from, resume compatibility) and
derives the step counts; everything after it may trust the Plan.
"""
import copy
import dataclasses
import math
from typing import Optional

import jax
import ml_collections
import numpy as np

from vitnorm import data, paths
from vitnorm.errors import ConfigError, UserError
from vitnorm.model import norms, vit
from vitnorm.training import checkpoints, optim

PARALLELISM = ("jit", "pmap")
PROGRESS_BAR = ("auto", "on", "off")



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

  if config.get("init_from") and not paths.is_file(config.init_from):
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
