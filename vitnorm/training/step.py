"""The train step (whole, on one screen) and the per-block diagnostics it can record.

Pure functions of (state, batch, rng): no host state, no hidden counters, so jit and pmap run the
same computation and a resumed run repeats an uninterrupted one bit for bit.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import jmp
import optax

from vitnorm.model import precision
from vitnorm.training import optim
from vitnorm.training.state import TrainState


def train_step(state: TrainState, batch, rng, *, model, schedule, accum_steps: int, ema_decay: float,
               axis_name: Optional[str] = None, micro_sharding=None, diagnostics: bool = False,
               augment: Optional[Callable] = None):
  """One optimizer step: mean gradient of `accum_steps` micro-batches -> clip -> AdamW [-> EMA].

  batch: {image [b, H, W, C], label [b, classes] soft targets}; b is the global batch under jit,
  the per-device batch under pmap (then gradients, metrics and BN statistics are averaged over
  `axis_name`). A step whose loss or gradient is not finite leaves the state unchanged (so no
  non-finite value can ever reach a checkpoint) and reports finite=False.
  augment: (batch, step) -> batch, the Grain feed's per-batch work on the global batch
  (vitnorm.data.device_augment: uint8 crops and int labels in, normalized images and targets out).

  float16 (state.loss_scale set; vitnorm.training.loss_scale): the loss is scaled before the
  backward pass and the gradients unscaled after the average; a step with a finite loss but a
  non-finite gradient is skipped (parameters and optimizer state kept, the scale divided, metric
  skipped=True, state.loss_scale.skipped_steps + 1) and still reports finite=True: only a non-finite loss
  leaves the state unchanged and reports finite=False (DeiT stops there).
  """
  if augment is not None:
    batch = augment(batch, state.step)
  rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  mutable = ["batch_stats", "diagnostics"] if diagnostics else ["batch_stats"]
  scaler = None if state.loss_scale is None else state.loss_scale.scaler()  # float16 only

  def loss_fn(params, batch_stats, micro, micro_rng):
    # The step goes in as an argument (PRepBN's lam is a pure function of it; other norms ignore it).
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, micro["image"],
                                  train=True, step=state.step, rngs={"dropout": micro_rng},
                                  mutable=mutable)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, micro["label"]))
    scaled = loss if scaler is None else scaler.scale(loss)
    return scaled, (loss, logits, updates)

  def micro_step(carry, xs):  # one micro-batch: gradient summed, BN statistics carried on
    batch_stats, grad_sum = carry
    index, micro = xs
    if micro_sharding is not None:
      micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
    (_, (loss, logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch_stats, micro, jax.random.fold_in(rng, index))
    top1 = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(micro["label"], -1))
    carry = (updates.get("batch_stats", batch_stats), jax.tree.map(jnp.add, grad_sum, grads))
    return carry, (loss, top1, updates.get("diagnostics", {}))

  # Micro-batch j = examples j, j+k, j+2k, ...: every micro-batch spans every device's shard.
  micro_batches = jax.tree.map(
      lambda x: x.reshape((-1, accum_steps) + x.shape[1:]).swapaxes(0, 1), batch)
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (batch_stats, grad_sum), (losses, top1s, diags) = jax.lax.scan(
      micro_step, (state.batch_stats, zeros), (jnp.arange(accum_steps), micro_batches))
  grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
  metrics = {"loss": jnp.mean(losses), "top1": jnp.mean(top1s)}
  if axis_name is not None:
    grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
  skipped = jnp.zeros((), bool)
  if scaler is not None:
    grads = scaler.unscale(grads)
    skipped = ~jmp.all_finite(grads) & jnp.isfinite(metrics["loss"])  # a non-finite loss is no skip

  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if scaler is not None:  # a skipped step keeps the parameters and the optimizer state
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(skipped, b, a), new, old)  # noqa: E731
    new_state = new_state.replace(
        params=keep(new_state.params, state.params), opt_state=keep(new_state.opt_state, state.opt_state),
        loss_scale=state.loss_scale.update(~skipped))
  if state.ema_params is not None:  # EMA of the weights and of the BN statistics, one decay
    new_state = new_state.replace(
        ema_params=optim.ema_update(state.ema_params, new_state.params, ema_decay),
        ema_batch_stats=optim.ema_update(state.ema_batch_stats, new_state.batch_stats, ema_decay))
  grad_norm = optim.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"])
  if scaler is None:
    finite &= jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics.update(grad_norm=grad_norm, lr=schedule(state.step), finite=finite, skipped=skipped)
  if scaler is not None:
    metrics.update(loss_scale=scaler.loss_scale, skipped_steps=new_state.loss_scale.skipped_steps)
  if diagnostics:
    metrics.update(block_diagnostics(diags, grads, axis_name))
    metrics.update(model_diagnostics(diags, axis_name, precision.policy(model.dtype).max_finite))
  return new_state, metrics


def _rms(values, axis_name):
  """Root of the mean square of per-micro-batch RMS values, over micro-batches and devices."""
  ms = jnp.mean(jnp.square(values))
  return jnp.sqrt(jax.lax.pmean(ms, axis_name) if axis_name else ms)


def _max(values, axis_name):
  m = jnp.max(values)
  return jax.lax.pmax(m, axis_name) if axis_name else m


def _mean(values, axis_name):
  m = jnp.mean(values)
  return jax.lax.pmean(m, axis_name) if axis_name else m


# Per-block diagnostics: metric name -> (module path inside the block, sown name, combination).
BLOCK_DIAGNOSTICS = {
    "residual_rms": ((), "residual_rms", _rms),
    "ffn_hidden_rms": (("MlpBlock_0",), "ffn_hidden_rms", _rms),
    "ffn_pre_norm_rms": (("MlpBlock_0",), "ffn_pre_norm_rms", _rms),
    "ffn_pre_norm_max_abs": (("MlpBlock_0",), "ffn_pre_norm_max_abs", _max),
    "ffn_out_rms": (("MlpBlock_0",), "ffn_out_rms", _rms),
    "ffn_out_max_abs": (("MlpBlock_0",), "ffn_out_max_abs", _max),
    "max_attention_logit": (("MultiHeadDotProductAttention_0",), "max_attention_logit", _max),
    "max_abs_qk": (("MultiHeadDotProductAttention_0",), "max_abs_qk", _max),
}


def block_diagnostics(diags, grads, axis_name: Optional[str] = None) -> dict:
  """Per block i: 'diag/block_i/NAME' for NAME in BLOCK_DIAGNOSTICS, plus max_abs_matmul (the
  largest |x| at any matmul output of the block: q, k, v, q.k, weights.v, out, Dense_0, Dense_1)
  and grad_norm (of the block's parameters).

  `diags` is the sown `diagnostics` collection stacked over micro-batches. RMS values combine
  exactly over micro-batches and devices (root of the mean square); maxima are maxima.
  """
  out = {}
  blocks = diags["Transformer"]
  for name in blocks:
    i = int(name.rsplit("_", 1)[1])
    block = blocks[name]
    for metric, (path, sown, combine) in BLOCK_DIAGNOSTICS.items():
      node = block
      for part in path:
        node = node[part]
      out[f"diag/block_{i}/{metric}"] = combine(node[sown][0], axis_name)
    out[f"diag/block_{i}/max_abs_matmul"] = jnp.maximum(
        _max(block["MultiHeadDotProductAttention_0"]["max_abs_matmul"][0], axis_name),
        _max(block["MlpBlock_0"]["max_abs_matmul"][0], axis_name))
    out[f"diag/block_{i}/grad_norm"] = optim.global_norm(grads["Transformer"][name])
  return out


def model_diagnostics(diags, axis_name: Optional[str], dtype_max: float) -> dict:
  """Whole-model diagnostics: max |x| of the patch embedding and of the head's logits, the largest
  |x| at any matmul output ('diag/max_abs_matmul') next to the compute dtype's largest finite value
  ('diag/compute_dtype_max', 65,504 for float16), and the head's log-partition (logsumexp of the
  logits; mean and max over the examples)."""
  out = {"diag/embedding_max_abs": _max(diags["embedding_max_abs"][0], axis_name),
         "diag/head_max_abs": _max(diags["head_max_abs"][0], axis_name),
         "diag/head_log_partition_mean": _mean(diags["head_log_partition_mean"][0], axis_name),
         "diag/head_log_partition_max": _max(diags["head_log_partition_max"][0], axis_name)}
  matmul = [out["diag/embedding_max_abs"], out["diag/head_max_abs"]]
  for block in diags["Transformer"].values():
    for module in ("MultiHeadDotProductAttention_0", "MlpBlock_0"):
      matmul.append(_max(block[module]["max_abs_matmul"][0], axis_name))
  out["diag/max_abs_matmul"] = jnp.max(jnp.stack(matmul))
  out["diag/compute_dtype_max"] = jnp.float32(dtype_max)
  return out
