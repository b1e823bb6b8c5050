"""Masked top-1 accuracy and loss over padded evaluation batches.

Used by the trainer's periodic evaluation and by `python -m vitnorm.evaluate`. Eval batches come
from `vitnorm.data.eval_batches`: {image f32 [b, H, W, C], label int [b], mask f32 [b]}, where the
last batch is padded and its padding has mask 0. Padding counts for nothing, so every example
of the split is counted exactly once (unlike the Flax ImageNet example, which drops the
remainder). Per batch one jit-compiled step returns the number of correct predictions, the
summed cross-entropy and the number of real examples; the host adds them up exactly (integers in
Python, the loss in float64).
"""
import functools
from typing import Any, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from vitnorm import parallel
from vitnorm.errors import UserError


def _batch_sums(model, variables, image, label, mask, batch_statistics=False):
  if batch_statistics:  # BN normalizes with this batch's statistics; the updated averages are dropped
    logits, _ = model.apply(variables, image, train=True, mutable=["batch_stats"])
  else:
    logits = model.apply(variables, image, train=False)
  label = label.astype(jnp.int32)
  mask = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, axis=-1) == label).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
  # Padding may hold anything (even NaN images): select, do not multiply.
  real = mask > 0
  return dict(correct=jnp.sum(jnp.where(real, correct, 0.0).astype(jnp.int32)),
              loss=jnp.sum(jnp.where(real, loss, 0.0)),
              count=jnp.sum(real.astype(jnp.int32)))


@functools.lru_cache(maxsize=32)
def _compiled_step(model, mesh: Optional[Mesh], batch_statistics: bool = False):
  if batch_statistics:  # training mode for BN only: no dropout, no stochastic depth
    model = model.clone(dropout_rate=0.0, attention_dropout_rate=0.0, drop_path_rate=0.0)
  fn = functools.partial(_batch_sums, model, batch_statistics=batch_statistics)
  if mesh is None:
    return jax.jit(fn)
  rep, shard = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  return jax.jit(fn, in_shardings=(rep, shard, shard, shard), out_shardings=rep)


def evaluate_classifier(model, variables: Mapping[str, Any], batches: Iterable[Mapping[str, np.ndarray]],
                        *, mesh: Optional[Mesh] = None, batch_statistics: bool = False) -> dict:
  """Top-1 accuracy and mean cross-entropy of `model` over `batches` (masked examples excluded).

  Args:
    model: a flax module called as `model.apply(variables, images, train=False)` -> logits.
    variables: {'params': ..., ['batch_stats': ...]} (host or device arrays).
    batches: iterable of dicts with 'image', 'label' (int class index) and optionally 'mask'
      (1 real, 0 padding; all real if absent). With several processes each process passes its
      own part of every global batch, as `vitnorm.data.eval_batches` yields it.
    mesh: if given, each batch is split over the mesh's 'data' axis (the local batch size must be
      divisible by the number of local devices) and the variables are replicated over it;
      otherwise everything runs on the default device.

    batch_statistics: BatchNorm normalizes each eval batch with that batch's own statistics (as
      in training) instead of the running averages: the train/eval mismatch diagnostic. The last
      batch is left out (on every process, so all run the same batches): its padding would enter
      the statistics. Dropout and stochastic depth stay off.

  Returns:
    dict(top1=float, loss=float, num_examples=int); top1 and loss are NaN if no real example.
  """
  step = _compiled_step(model, mesh, batch_statistics)
  if batch_statistics:
    batches = _all_but_last(batches)
  if mesh is not None:
    variables = jax.device_put(variables, parallel.replicated_sharding(mesh))
    sharding = parallel.batch_sharding(mesh)
    local_devices = len(mesh.local_devices)
  sums = []  # device results, read once at the end so batches are not serialized by host reads
  for batch in batches:
    image = np.asarray(batch["image"])
    label = np.asarray(batch["label"])
    if label.ndim != 1:
      raise UserError(f"evaluation batches need integer class labels of shape [batch], got shape "
                      f"{label.shape}; use vitnorm.data.eval_batches (not train_batches)")
    mask = np.asarray(batch["mask"], np.float32) if "mask" in batch else np.ones(label.shape, np.float32)
    if mesh is not None:
      if image.shape[0] % local_devices:
        raise UserError(f"eval batch of {image.shape[0]} examples per process does not split over "
                        f"{local_devices} local devices; use an eval batch size divisible by the "
                        "device count")
      image, label, mask = (jax.make_array_from_process_local_data(sharding, a)
                            for a in (image, label, mask))
    sums.append(step(variables, image, label, mask))
  # A replicated result is fully present on each process: read this process's copy.
  correct = sum(int(parallel.host_copy(s["correct"])) for s in sums)
  loss_sum = sum(float(parallel.host_copy(s["loss"])) for s in sums)
  count = sum(int(parallel.host_copy(s["count"])) for s in sums)
  if count == 0:
    return dict(top1=float("nan"), loss=float("nan"), num_examples=0)
  return dict(top1=correct / count, loss=loss_sum / count, num_examples=count)


def _all_but_last(batches):
  previous = None
  for batch in batches:
    if previous is not None:
      yield previous
    previous = batch
