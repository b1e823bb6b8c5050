"""Config validation: a ConfigDict in, a frozen Plan out (one-line errors before anything compiles).

`prepare` checks every field that can be checked without compiling (parallelism, batch splits over
devices and micro-batches, BN ghost groups, step counts, init_from, resume compatibility) and
derives the step counts; everything after it may trust the Plan.
"""
import copy
import dataclasses
import math
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from vitnorm import data, paths
from vitnorm.errors import ConfigError, UserError
from vitnorm.model import norms, vit
from vitnorm import checkpoints
from vitnorm.training import optim

PARALLELISM = ("jit", "pmap")
PROGRESS_BAR = ("auto", "on", "off")



@dataclasses.dataclass(frozen=True)
class Plan:
  """A validated config plus what follows from it and the dataset, resolved once.

  `config` is what the user wrote (canonical: norm names resolved, num_steps set) and what
  config.json records; everything below the CLIs reads the typed parts: `model` (what
  build_model builds and checkpoint compatibility compares), `optim` (the lr schedule and the
  optimizer), and the run's lengths below.
  """

  config: ml_collections.ConfigDict  # canonical copy: norm names resolved, num_steps set
  num_steps: int
  warmup_steps: int
  steps_per_epoch: float
  eval_batch_size: int
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  model: "vit.ModelSpec" = dataclasses.field(init=False)  # config.model, resolved
  optim: "optim.OptimSpec" = dataclasses.field(init=False)  # config.optim for this batch and length

  def __post_init__(self):
    object.__setattr__(self, "model", vit.model_spec(self.config.model))
    object.__setattr__(self, "optim", optim.optim_spec(
        self.config.optim, global_batch_size=self.config.batch_size, num_steps=self.num_steps,
        warmup_steps=self.warmup_steps))


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
  for key in ("norm", "ffn_norm", "qk_norm"):
    if key in config.model:
      config.model[key] = norms.canonical_kind(config.model[key])
  return config


def check_finite(config, prefix: str = ""):
  """ConfigError for the first float (alone or in a list) that is NaN or infinite."""
  for key, value in config.items():
    field = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      check_finite(value, field + ".")
      continue
    for item in (value if isinstance(value, (list, tuple)) else [value]):
      if isinstance(item, (float, np.floating)) and not math.isfinite(item):
        raise ConfigError(field, f"must be a finite number, got {value!r}; give a finite value")


def check_workdir(workdir: Optional[str]):
  """A workdir that is a file or a read-only directory is refused before anything is read."""
  if workdir is None or "://" in str(workdir):
    return  # object stores: the workdir lock is the write test
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError("workdir", f"{workdir} is a file, not a directory; pass a directory (new or a "
                      "run's) as --workdir")
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing) or "."
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError("workdir", f"{existing} is not writable; pass a --workdir you can write to")


def prepare(config: ml_collections.ConfigDict, workdir: Optional[str] = None) -> Plan:
  """Validates everything that can be checked without compiling; UserError names the bad field."""
  check_workdir(workdir)
  check_finite(config)
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
  uses_bn = any(norms.uses_batch_stats(model_kwargs[k]) for k in ("norm", "ffn_norm"))
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
    total = float(config.num_epochs) * steps_per_epoch
    if not total < 2**62:
      raise ConfigError("num_epochs", f"{config.num_epochs!r} epochs is more than 2^62 steps; give a "
                        "realistic number of epochs, or set num_steps")
    num_steps = max(1, math.ceil(total))
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
  if "prepbn" in (model_kwargs["norm"], model_kwargs["ffn_norm"]):  # lam reaches 0 by the end
    _resolve_prepbn_decay(config, num_steps, model_kwargs["norm_options"].prepbn_warmup_steps)

  if config.get("init_from"):
    init_source(config.init_from)
  if workdir is not None:
    check_resume_compatible(config, workdir)
    check_rerun(config, workdir)
  return Plan(config=config, num_steps=num_steps, warmup_steps=config.optim.warmup_steps,
              steps_per_epoch=steps_per_epoch, eval_batch_size=eval_batch,
              num_classes=info.num_classes, num_train_examples=info.num_train_examples,
              num_eval_examples=info.num_eval_examples)


def _resolve_prepbn_decay(config, num_steps: int, warmup: int):
  """model.prepbn.decay_steps None -> SLAB's schedule: lam reaches 0 after 16% of the steps after
  warm-up (vitnorm.model.norms.slab_decay_steps), and RepBN alone trains for the rest."""
  if config.model.get("prepbn") is None:  # a config from before the field existed
    with config.model.unlocked():
      config.model.prepbn = ml_collections.ConfigDict(
          dict(warmup_steps=warmup, decay_steps=norms.slab_decay_steps(num_steps, warmup)))
  elif config.model.prepbn.get("decay_steps") is None:
    config.model.prepbn.decay_steps = norms.slab_decay_steps(num_steps, warmup)
  if config.model.prepbn.decay_steps > num_steps:
    raise ConfigError("model.prepbn.decay_steps", f"{config.model.prepbn.decay_steps} is after the "
                      f"last step ({num_steps}): lam would not reach 0, and the trained model would "
                      "keep its LayerNorm branch; use at most num_steps, or leave it unset")
  vit.resolve_model_config(config.model)  # decay_steps >= warmup_steps


def init_source(path: str) -> tuple:
  """What config.init_from names: ('npz', path, None) for a reference .npz file, or
  ('workdir', WORKDIR, step or None) for a vitnorm workdir or one of its checkpoints/STEP folders."""
  path = paths.resolve(path)  # a bucket URL stays a URL
  if paths.is_file(path):
    return "npz", path, None
  fix = ("give a reference ViT / AugReg .npz file, a vitnorm workdir or its checkpoints/STEP folder, "
         "or leave it unset for random initialization")
  if not paths.is_dir(path):
    raise ConfigError("init_from", f"{path} does not exist; {fix}")
  run, step = path, None
  name, parent = path.rstrip("/").rsplit("/", 1)[-1], path.rstrip("/").rsplit("/", 1)[0]
  if name.isdigit() and parent.rsplit("/", 1)[-1] == "checkpoints":
    run, step = parent.rsplit("/", 1)[0], int(name)
  if not paths.is_file(paths.join(run, checkpoints.CONFIG_FILE)):
    raise ConfigError("init_from", f"{path} is a folder but not a vitnorm workdir (no "
                      f"{checkpoints.CONFIG_FILE}); {fix}")
  steps = checkpoints.all_steps(run)
  if not steps or (step is not None and step not in steps):
    raise ConfigError("init_from", f"{path} holds no complete checkpoint"
                      f"{'' if step is None else f' at step {step}'} (steps: "
                      f"{', '.join(map(str, steps)) or 'none'}); train it first or {fix}")
  return "workdir", run, step


def check_rerun(config: ml_collections.ConfigDict, workdir: str):
  """Refuses num_steps below the latest checkpoint, and extending a finished run (its cosine
  schedule would restart near its peak): a new workdir with init_from continues on purpose."""
  latest = checkpoints.latest_step(workdir)
  if not latest:
    return
  if latest > config.num_steps:
    raise ConfigError("num_steps", f"{config.num_steps:,} is below step {latest:,} of the latest "
                      f"checkpoint in {workdir}; use num_steps >= {latest} or a new --workdir")
  saved_steps = checkpoints.load_run_config(workdir).get("num_steps")
  if saved_steps and latest >= saved_steps and config.num_steps > saved_steps:
    raise ConfigError("num_steps", f"{workdir} finished its {saved_steps:,} steps; training it on to "
                      f"{config.num_steps:,} would restart its lr schedule near the peak. To train longer "
                      f"on purpose, start a new run from its weights: --workdir NEW_DIR "
                      f"--config.init_from={workdir}")


def check_resume_compatible(config: ml_collections.ConfigDict, workdir: str):
  """Refuses to resume a workdir whose checkpoints belong to a different model."""
  if not checkpoints.all_steps(workdir):
    return
  saved = checkpoints.load_run_config(workdir)
  diffs = checkpoints.model_spec_differences(vit.model_spec(canonical_config(saved).model),
                                             vit.model_spec(config.model))
  if diffs:
    raise UserError(f"{workdir} holds checkpoints of a different model ({'; '.join(diffs)}); resume "
                    "with the original config, or pass a new --workdir")


# ==============================================================================================
# 2. Train state and train step
# ==============================================================================================
