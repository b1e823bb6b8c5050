"""A run's checkpoints and config in its workdir (orbax CheckpointManager).

Layout of a workdir written by the trainer:

  WORKDIR/config.json            the run's config (written once, by process 0)
  WORKDIR/checkpoints/<step>/    one orbax checkpoint per saved step, two items:
      model/  {'params', ['batch_stats'], ['ema_params', ['ema_batch_stats']]}   what inference needs
      train/  {'step', 'opt_state'}                         what only resuming needs
  WORKDIR/metrics.jsonl, status.json, tensorboard/   (vitnorm.workdir)

Keeping the model in its own item lets `restore_variables` load a model without knowing the
optimizer, and lets evaluation and folding tools read any run. Orbax writes each step to a
temporary directory and renames it when complete, so a crash mid-save never leaves a corrupt
"latest" checkpoint; `Checkpointer.save` never overwrites an existing step.
"""
import json
import sys
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vitnorm import paths
from vitnorm.model import vit
from vitnorm.errors import UserError

MODEL_ITEM = "model"
TRAIN_ITEM = "train"
EMA_BATCH_STATS = "ema_batch_stats"  # EMA of the BN statistics (beside ema_params; absent before 12/2026)
CONFIG_FILE = "config.json"

# Model config fields that may change between a run and its resumption (regularization and
# compute dtype); every other model field defines the architecture or its BN statistics.
RESUMABLE_MODEL_FIELDS = ("dropout_rate", "attention_dropout_rate", "drop_path_rate", "dtype")


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints (a URL for a bucket workdir)."""
  return paths.join(workdir, "checkpoints")


def _handlers():
  return {MODEL_ITEM: ocp.StandardCheckpointHandler(), TRAIN_ITEM: ocp.StandardCheckpointHandler()}


def _reader(workdir: str) -> Optional[ocp.CheckpointManager]:
  directory = checkpoint_dir(workdir)
  if not paths.is_dir(directory):
    return None
  return ocp.CheckpointManager(
      paths.resolve(directory), item_handlers=_handlers(),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def all_steps(workdir: str) -> list:
  """Sorted steps of the complete checkpoints in WORKDIR/checkpoints ([] if none)."""
  directory = checkpoint_dir(workdir)
  if not paths.is_dir(directory):
    return []
  return sorted(int(s) for s in ocp.path.step.checkpoint_steps(paths.as_path(directory)))


def latest_step(workdir: str) -> Optional[int]:
  """The newest complete checkpoint's step, or None."""
  steps = all_steps(workdir)
  return steps[-1] if steps else None


# ----------------------------------------------------------------------------------------------
# The run config
# ----------------------------------------------------------------------------------------------


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes WORKDIR/config.json atomically (vitnorm.paths.write_text_atomic); returns its path.
  Call on process 0 only."""
  paths.makedirs(workdir)
  path = paths.join(workdir, CONFIG_FILE)
  paths.write_text_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
  return path


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the trainer wrote to WORKDIR/config.json (UserError if there is none)."""
  path = paths.join(workdir, CONFIG_FILE)
  if not paths.is_file(path):
    raise UserError(f"{path} does not exist: {workdir} is not a vitnorm training workdir; pass the "
                    "--workdir of a run started with python -m vitnorm.train")
  try:
    raw = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f"{path} is not readable JSON ({e}); restore it or train into a new workdir") from e
  return ml_collections.ConfigDict(raw)


def model_config_differences(saved: Mapping, new: Mapping) -> list:
  """'field: saved -> new' for each architecture field that differs between two model configs.

  Both are resolved first (so variant 'S/16' equals the same sizes given explicitly); the fields
  in RESUMABLE_MODEL_FIELDS may differ.
  """
  a, b = vit.resolve_model_config(saved), vit.resolve_model_config(new)
  diffs = []
  for key in sorted(set(a) | set(b)):
    if key in RESUMABLE_MODEL_FIELDS or a.get(key) == b.get(key):
      continue
    if key == "norm_options":
      for field in sorted(vars(a[key])):
        x, y = getattr(a[key], field), getattr(b[key], field)
        if x != y:
          diffs.append(f"model.{field}: {x!r} -> {y!r}")
    else:
      diffs.append(f"model.{key}: {a.get(key)!r} -> {b.get(key)!r}")
  return diffs


# ----------------------------------------------------------------------------------------------
# Writing and reading checkpoints (the trainer)
# ----------------------------------------------------------------------------------------------


class Checkpointer:
  """The trainer's orbax CheckpointManager: keeps the last `keep` steps, never overwrites a step.

  All processes must call `save` and `restore` together (orbax coordinates multi-host writes:
  each array shard is written once, metadata by the primary process).
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = paths.resolve(checkpoint_dir(workdir))
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save))

  def all_steps(self) -> list:
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def model_keys(self, step: int) -> set:
    """The collections stored in the model item at `step` ('params', 'batch_stats', ...)."""
    stored = self._manager.item_metadata(int(step))[MODEL_ITEM]
    return set(getattr(stored, "tree", stored) or {})

  def save(self, step: int, model_item: Mapping[str, Any], train_item: Mapping[str, Any]) -> bool:
    """Saves both items at `step` (asynchronously if enabled); False if that step already exists."""
    if step in self.all_steps():
      return False
    saved = self._manager.save(
        int(step), args=ocp.args.Composite(
            **{MODEL_ITEM: ocp.args.StandardSave(dict(model_item)),
               TRAIN_ITEM: ocp.args.StandardSave(dict(train_item))}),
        force=True)
    return bool(saved)

  def restore(self, step: int, model_target: Mapping[str, Any], train_target: Mapping[str, Any]):
    """(model_item, train_item) at `step`, shaped and placed like the targets (arrays or
    jax.ShapeDtypeStruct with shardings)."""
    out = self._manager.restore(int(step), args=ocp.args.Composite(
        **{MODEL_ITEM: ocp.args.StandardRestore(dict(model_target)),
           TRAIN_ITEM: ocp.args.StandardRestore(dict(train_target))}))
    return out[MODEL_ITEM], out[TRAIN_ITEM]

  def wait(self):
    """Blocks until every pending asynchronous save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


# ----------------------------------------------------------------------------------------------
# Reading a model back (evaluation, folding, benchmarks)
# ----------------------------------------------------------------------------------------------


def _flat_shapes(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in flat}


def _shape_differences(expected: Mapping, found: Mapping, collection: str) -> list:
  want, have = _flat_shapes(expected), _flat_shapes(found)
  diffs = [f"{collection}/{k} missing from the checkpoint" for k in sorted(set(want) - set(have))]
  diffs += [f"{collection}/{k} in the checkpoint but not in the model" for k in sorted(set(have) - set(want))]
  diffs += [f"{collection}/{k} has shape {have[k]} in the checkpoint, {want[k]} in the model"
            for k in sorted(set(want) & set(have)) if want[k] != have[k]]
  return diffs


def restore_variables(workdir: str, step: Optional[int] = None, *, use_ema: bool = False):
  """({'params': ..., ['batch_stats': ...]}, step) of a trained run, as arrays on one local device.

  step None -> the latest checkpoint. use_ema -> the EMA of the weights and of the BN statistics
  instead of the live ones (a checkpoint written before vitnorm kept the EMA of the statistics
  gives the live statistics, with a warning on stderr). Raises UserError if WORKDIR has no config or checkpoint, the
  step does not exist, or the checkpoint does not match the model of the run's config.
  """
  config = load_run_config(workdir)
  reader = _reader(workdir)
  steps = [] if reader is None else sorted(int(s) for s in reader.all_steps())
  if not steps:
    raise UserError(f"no checkpoint in {checkpoint_dir(workdir)}: the run saved none yet; train "
                    f"longer or pass another --workdir")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise UserError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; available steps: "
                    f"{', '.join(map(str, steps))}")
  with reader:
    stored = reader.item_metadata(step)[MODEL_ITEM]
    stored = getattr(stored, "tree", stored)
    if stored is None:
      raise UserError(f"checkpoint {step} in {checkpoint_dir(workdir)} has no '{MODEL_ITEM}' item; "
                      "it was not written by vitnorm.train")
    model = vit.build_model(config.model)
    expected = vit.variable_shapes(model, vit.input_shape(config.model))
    diffs = _shape_differences(expected["params"], stored.get("params", {}), "params")
    diffs += _shape_differences(expected.get("batch_stats", {}), stored.get("batch_stats", {}),
                                "batch_stats")
    if diffs:
      raise UserError(f"checkpoint {step} in {workdir} does not match the model of its config.json "
                      f"({len(diffs)} differences, first: {'; '.join(diffs[:3])})")
    if use_ema and "ema_params" not in stored:
      raise UserError(f"the run in {workdir} kept no EMA of the weights (optim.ema_decay was 0); "
                      "restore without use_ema")
    device = jax.local_devices()[0]
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype),
                                       sharding=jax.sharding.SingleDeviceSharding(device)), stored)
    restored = reader.restore(step, args=ocp.args.Composite(
        **{MODEL_ITEM: ocp.args.StandardRestore(target)}))[MODEL_ITEM]
  variables = {"params": restored["ema_params"] if use_ema else restored["params"]}
  if restored.get("batch_stats"):
    variables["batch_stats"] = restored["batch_stats"]
    if use_ema and restored.get(EMA_BATCH_STATS):
      variables["batch_stats"] = restored[EMA_BATCH_STATS]
    elif use_ema:
      print(f"warning: checkpoint {step} in {workdir} has no EMA of the BatchNorm statistics (saved by "
            "an older vitnorm): the EMA weights are evaluated with the live statistics",
            file=sys.stderr, flush=True)
  return variables, step
