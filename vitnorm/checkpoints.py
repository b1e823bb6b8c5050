"""A run's checkpoints and config in its workdir (orbax CheckpointManager).

Layout of a workdir written by the trainer:

  WORKDIR/config.json            the run's config (written once, by process 0)
  WORKDIR/checkpoints/<step>/    one orbax checkpoint per saved step, two items:
      model/  {'params', ['batch_stats'], ['ema_params', ['ema_batch_stats']]}   what inference needs
      train/  {'step', 'opt_state', ['loss_scale']}          what only resuming needs (loss_scale:
                                                            float16 runs, vitnorm.training.loss_scale)
      vitnorm_manifest.json  size + SHA-256 of every file, written after the commit (integrity)
  WORKDIR/checkpoints/<step>.corrupt/   a step that failed verification, moved aside (never deleted)
  WORKDIR/lock.json              the run holding the workdir (vitnorm.training.workdir_lock)
  WORKDIR/metrics.jsonl, status.json, tensorboard/   (vitnorm.workdir)

Keeping the model in its own item lets `restore_variables` load a model without knowing the
optimizer, and lets evaluation and folding tools read any run. Orbax writes each step to a
temporary directory and renames it when complete, so a crash mid-save never leaves a corrupt
"latest" checkpoint; `Checkpointer.save` never overwrites an existing step. Damage after the
commit (truncated, deleted or flipped bytes) is caught by the manifest: the trainer resumes and
`restore_variables` reads only from steps that verify.
"""
import json
import logging
import sys
import threading
import time
from typing import Any, Callable, Mapping, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vitnorm import paths
from vitnorm.model import vit
from vitnorm.errors import UserError
from vitnorm import checkpoint_integrity as integrity

MODEL_ITEM = "model"
TRAIN_ITEM = "train"
EMA_BATCH_STATS = "ema_batch_stats"  # EMA of the BN statistics (beside ema_params; absent before 12/2026)
CONFIG_FILE = "config.json"

# Model config fields that may change between a run and its resumption (regularization and
# compute dtype); every other model field defines the architecture or its BN statistics.
RESUMABLE_MODEL_FIELDS = ("dropout_rate", "attention_dropout_rate", "drop_path_rate", "dtype",
                          "attention_logits", "attention_scale")


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints (a URL for a bucket workdir)."""
  return paths.join(workdir, "checkpoints")


_ONE_REPLICA_HANDLER = None  # registered once per process by _save_arrays_from_one_replica


def _save_arrays_from_one_replica():
  """With one process, orbax writes each jax.Array from one of its replicas, not in parts.

  Replica-parallel saving (orbax's default off GPUs) lets the hosts that hold replicas of an
  array each write a part of it. With one process every part is written here anyway, and each
  part costs an eager slice on its device: on the 8 CPU devices of the tests, a compiled slice per
  array shape (25 compilations, 0.8 s, for a three-array tree). Orbax already turns it off on GPUs.
  Several processes keep the default."""
  global _ONE_REPLICA_HANDLER
  if jax.process_count() > 1 or _ONE_REPLICA_HANDLER is not None:
    return
  # ArrayHandler's default metadata store (orbax's own registry passes the same).
  from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
  _ONE_REPLICA_HANDLER = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                                        array_metadata_store=array_metadata_store.Store())
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that it replaces its handler: we asked it to
  try:
    ocp.type_handlers.register_type_handler(jax.Array, _ONE_REPLICA_HANDLER, override=True)
  finally:
    absl_logger.setLevel(level)


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


def model_spec_differences(saved: vit.ModelSpec, new: vit.ModelSpec) -> list:
  """'field: saved -> new' for each architecture field that differs between two ModelSpecs; the
  fields in RESUMABLE_MODEL_FIELDS may differ."""
  a, b = saved.as_dict(), new.as_dict()
  diffs = []
  for key in sorted(a):
    if key in RESUMABLE_MODEL_FIELDS or a[key] == b[key]:
      continue
    if key == "norm_options":
      for field in sorted(vars(a[key])):
        x, y = getattr(a[key], field), getattr(b[key], field)
        if x != y:
          diffs.append(f"model.{field}: {x!r} -> {y!r}")
    else:
      diffs.append(f"model.{key}: {a[key]!r} -> {b[key]!r}")
  return diffs


def model_config_differences(saved: Mapping, new: Mapping) -> list:
  """model_spec_differences of two model configs (so variant 'S/16' equals the same sizes given
  explicitly)."""
  return model_spec_differences(vit.model_spec(saved), vit.model_spec(new))


# ----------------------------------------------------------------------------------------------
# Writing and reading checkpoints (the trainer)
# ----------------------------------------------------------------------------------------------


class Checkpointer:
  """The trainer's orbax CheckpointManager plus integrity manifests and manifest-aware rotation.

  Keeps the newest `keep` steps that have a manifest (and anything newer), never overwrites a
  step. The manifest of a step is written once orbax has committed it: at once for synchronous
  saves, by a background thread that waits for the commit for asynchronous ones (and at the
  latest in `wait` / `close`). Rotation runs only after a manifest is written, so it never deletes
  the newest verified checkpoint in favour of one that is still being written.
  All processes must call `save`, `restore` and `restorable_step` together (orbax coordinates
  multi-host writes); manifests, rotation and moving damaged steps aside are done by process 0.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, hashing: bool = True,
               warn: Optional[Callable[[str], None]] = None):
    self.directory = paths.resolve(checkpoint_dir(workdir))  # a bucket URL stays a URL
    self.keep, self.hashing = keep, hashing
    self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self._primary = jax.process_index() == 0
    self._async = async_save
    _save_arrays_from_one_replica()
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, enable_async_checkpointing=async_save))
    self._pending = []  # steps saved, manifest not written yet
    self._mutex = threading.Lock()
    self._worker = None
    self._worker_error = None
    self._flush = threading.Event()  # wait(): the worker stops, the caller writes what is left

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(int(step))

  def all_steps(self) -> list:
    return sorted(int(s) for s in ocp.path.step.checkpoint_steps(self.directory))

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def model_keys(self, step: int) -> set:
    """The collections stored in the model item at `step` ('params', 'batch_stats', ...)."""
    stored = self._manager.item_metadata(int(step))[MODEL_ITEM]
    return set(getattr(stored, "tree", stored) or {})

  def train_keys(self, step: int) -> set:
    """The entries stored in the train item at `step` ('step', 'opt_state', ['loss_scale'])."""
    stored = self._manager.item_metadata(int(step))[TRAIN_ITEM]
    return set(getattr(stored, "tree", stored) or {})

  def save(self, step: int, model_item: Mapping[str, Any], train_item: Mapping[str, Any]) -> bool:
    """Saves both items at `step` (asynchronously if enabled); False if that step already exists."""
    self._raise_worker_error()
    if step in self.all_steps():
      return False
    saved = self._manager.save(
        int(step), args=ocp.args.Composite(
            **{MODEL_ITEM: ocp.args.StandardSave(dict(model_item)),
               TRAIN_ITEM: ocp.args.StandardSave(dict(train_item))}),
        force=True)
    if saved and self._primary:
      with self._mutex:
        self._pending.append(int(step))
      if not self._async:
        self._write_pending()
      elif self._worker is None or not self._worker.is_alive():
        self._worker = threading.Thread(target=self._background, name="ckpt-manifest", daemon=True)
        self._worker.start()
    return bool(saved)

  # -- manifests and rotation (process 0) --------------------------------------------------------

  def _committed(self, step: int) -> bool:
    path = self._step_dir(step)
    return path.exists() and ocp.path.step.is_path_finalized(path)

  def _background(self):
    try:
      while not self._flush.is_set():
        with self._mutex:
          if not self._pending:
            return
          step = self._pending[0]
        if self._committed(step):
          self._write_pending(only=step)
        else:
          self._flush.wait(0.05)
    except BaseException as e:  # pylint: disable=broad-except
      self._worker_error = e

  def _write_pending(self, only: Optional[int] = None):
    with self._mutex:
      steps = [s for s in self._pending if only is None or s == only]
      for step in steps:
        if self._committed(step):  # a failed save left no step; orbax reports its error
          integrity.write_manifest(self._step_dir(step), hashing=self.hashing)
        self._pending.remove(step)
      if steps:
        self._rotate()

  def _rotate(self):
    steps = self.all_steps()
    verified = [s for s in steps if integrity.has_manifest(self._step_dir(s))]
    if len(verified) <= self.keep:
      return
    cutoff = verified[-self.keep]
    for step in steps:
      if step < cutoff:
        self._step_dir(step).rmtree(missing_ok=True)

  def _raise_worker_error(self):
    if self._worker_error is not None:
      err, self._worker_error = self._worker_error, None
      raise err

  # -- restoring ---------------------------------------------------------------------------------

  def restorable_step(self) -> Optional[int]:
    """The newest step that verifies against its manifest (None if there are no checkpoints).

    Each newer step that does not verify is moved aside to '<step>.corrupt' with a one-line
    warning. If checkpoints exist but none verifies: UserError, and nothing is moved.
    """
    steps = self.all_steps()
    if not steps:
      return None
    chosen, message = -1, ""
    if self._primary and integrity.predates_manifests(self.directory, steps):
      for step in steps:
        integrity.write_manifest(self._step_dir(step), hashing=self.hashing)
      self.warn(f"warning: the checkpoints in {self.directory} predate integrity manifests: recorded "
                f"manifests of steps {', '.join(map(str, steps))} as they are (not verified)")
    if self._primary:
      damaged = []
      for step in reversed(steps):
        why = integrity.damage(self._step_dir(step))
        if why is None:
          chosen = step
          break
        damaged.append((step, why))
      if chosen < 0:
        message = (f"workdir: none of the {len(steps)} checkpoints in {self.directory} verifies ("
                   + "; ".join(f"{s}: {w}" for s, w in damaged) + "); nothing was moved or deleted: "
                   "restore the checkpoints from a copy, or pass a new --workdir to start over")
      else:
        for step, why in damaged:
          moved = integrity.move_aside(self._step_dir(step))
          self.warn(f"warning: checkpoint {step} in {self.directory} is damaged ({why}); moved it to "
                    f"{moved}, resuming from step {chosen}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      chosen = int(multihost_utils.broadcast_one_to_all(np.int64(chosen)))
    if chosen < 0:
      raise UserError(message or f"workdir: no checkpoint in {self.directory} verifies (see process 0)")
    self._manager.reload()
    return chosen

  def restore(self, step: int, model_target: Mapping[str, Any], train_target: Mapping[str, Any]):
    """(model_item, train_item) at `step`, shaped and placed like the targets (arrays or
    jax.ShapeDtypeStruct with shardings)."""
    out = self._manager.restore(int(step), args=ocp.args.Composite(
        **{MODEL_ITEM: ocp.args.StandardRestore(dict(model_target)),
           TRAIN_ITEM: ocp.args.StandardRestore(dict(train_target))}))
    return out[MODEL_ITEM], out[TRAIN_ITEM]

  def wait(self):
    """Blocks until every pending save is committed and has its manifest."""
    try:
      self._manager.wait_until_finished()
    finally:
      self._flush.set()
      if self._worker is not None:
        self._worker.join()
        self._worker = None
      self._flush.clear()
    self._raise_worker_error()
    if self._primary:
      self._write_pending()

  def close(self):
    try:
      self.wait()
    finally:
      self._manager.close()


def discard_partial_saves(workdir: str, attempts: int = 20, pause_s: float = 0.25):
  """Removes the temporary directories of saves that failed (e.g. on a full disk); process 0 only.

  Orbax's writer threads may still be finishing their failed writes into such a directory, so a
  removal that races them ('directory not empty') is retried; a directory that still cannot be
  removed is left (orbax and `all_steps` ignore temporary directories) rather than raised.
  """
  directory = paths.as_path(paths.resolve(checkpoint_dir(workdir)))
  if jax.process_index() != 0 or not directory.is_dir():
    return
  for path in directory.glob("*.orbax-checkpoint-tmp*"):
    for attempt in range(attempts):
      try:
        path.rmtree(missing_ok=True)
        break
      except OSError:
        if attempt == attempts - 1:
          break
        time.sleep(pause_s)


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
  if step is not None and step not in steps:
    raise UserError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; available steps: "
                    f"{', '.join(map(str, steps))}")
  step = integrity.verified_step(paths.resolve(checkpoint_dir(workdir)), steps, step)
  with reader:
    stored = reader.item_metadata(step)[MODEL_ITEM]
    stored = getattr(stored, "tree", stored)
    if stored is None:
      raise UserError(f"checkpoint {step} in {checkpoint_dir(workdir)} has no '{MODEL_ITEM}' item; "
                      "it was not written by vitnorm.train")
    spec = vit.model_spec(config.model)  # the run's config.json, read from disk
    expected = vit.variable_shapes(vit.build_model(spec), spec.input_shape())
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
