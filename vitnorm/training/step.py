"""The train step (whole, on one screen) and the per-block diagnostics it can record.

Pure functions of (state, batch, rng): no host state, no hidden counters, so jit and pmap run the
same computation and a resumed run repeats an uninterrupted one bit for bit.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

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
  """
  if augment is not None:
    batch = augment(batch, state.step)
  rng = jax.random.fold_in(rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  mutable = ["batch_stats", "diagnostics"] if diagnostics else ["batch_stats"]

  def loss_fn(params, batch_stats, micro, micro_rng):
    # The step goes in as an argument (PRepBN's lam is a pure function of it; other norms ignore it).
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, micro["image"],
                                  train=True, step=state.step, rngs={"dropout": micro_rng},
                                  mutable=mutable)
    return jnp.mean(optax.softmax_cross_entropy(logits, micro["label"])), (logits, updates)

  def micro_step(carry, xs):  # one micro-batch: gradient summed, BN statistics carried on
    batch_stats, grad_sum = carry
    index, micro = xs
    if micro_sharding is not None:
      micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
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

  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if state.ema_params is not None:  # EMA of the weights and of the BN statistics, one decay
    new_state = new_state.replace(
        ema_params=optim.ema_update(state.ema_params, new_state.params, ema_decay),
        ema_batch_stats=optim.ema_update(state.ema_batch_stats, new_state.batch_stats, ema_decay))
  grad_norm = optim.global_norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  metrics.update(grad_norm=grad_norm, lr=schedule(state.step), finite=finite)
  if diagnostics:
    metrics.update(block_diagnostics(diags, grads, axis_name))
  return new_state, metrics


def block_diagnostics(diags, grads, axis_name: Optional[str] = None) -> dict:
  """Per block i: 'diag/block_i/{residual_rms, ffn_hidden_rms, max_attention_logit, grad_norm}'.

  `diags` is the sown `diagnostics` collection stacked over micro-batches. RMS values combine
  exactly over micro-batches and devices (root of the mean square); the logit is a maximum.
  """
  def rms(values):
    ms = jnp.mean(jnp.square(values))
    return jnp.sqrt(jax.lax.pmean(ms, axis_name) if axis_name else ms)

  def maximum(values):
    m = jnp.max(values)
    return jax.lax.pmax(m, axis_name) if axis_name else m

  out = {}
  blocks = diags["Transformer"]
  for name in blocks:
    i = int(name.rsplit("_", 1)[1])
    block = blocks[name]
    out[f"diag/block_{i}/residual_rms"] = rms(block["residual_rms"][0])
    out[f"diag/block_{i}/ffn_hidden_rms"] = rms(block["MlpBlock_0"]["ffn_hidden_rms"][0])
    out[f"diag/block_{i}/max_attention_logit"] = maximum(
        block["MultiHeadDotProductAttention_0"]["max_attention_logit"][0])
    out[f"diag/block_{i}/grad_norm"] = optim.global_norm(grads["Transformer"][name])
  return out

