"""The trainer's start header (printed before compiling, like big_vision's) and its TensorBoard hparams.

`start_header(plan, workdir, resume_step)` says what is about to run: the variant and its norms,
the parameter count, devices and processes, global and per-device batch, steps and epochs, the lr
schedule, the workdir and whether it resumes. `hparams(plan)` is the flat dict of the main
hyperparameters written to TensorBoard's hparams plugin; `config_text(config)` the whole config.
"""
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vitnorm import variants
from vitnorm.training import loss_scale
from vitnorm.model import vit
from vitnorm.training.plan import Plan


def count_params(plan: Plan) -> int:
  """Trainable parameters of the planned model (shapes only: nothing is computed)."""
  shapes = vit.variable_shapes(vit.build_model(plan.model), plan.model.input_shape(1))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"])))


def _count(n: int) -> str:
  return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def start_header(plan: Plan, workdir: str, resume_step: Optional[int] = None,
                 num_params: Optional[int] = None) -> str:
  """The lines printed before compiling."""
  c, m, o = plan.config, plan.model, plan.optim
  num_params = count_params(plan) if num_params is None else num_params
  devices, processes = jax.device_count(), jax.process_count()
  per_device = c.batch_size // devices
  accum = f", {c.accum_steps} micro-batches of {per_device // c.accum_steps}" if c.accum_steps > 1 else ""
  clip = o.grad_clip_norm
  if resume_step:
    where = f"{workdir} (resuming from step {resume_step:,} of {plan.num_steps:,})"
  else:
    where = f"{workdir} (new run" + (f", weights from {c.init_from})" if c.get("init_from") else ")")
  return "\n".join([
      f"variant    {variants.describe(m.as_dict())}",
      f"model      {m.num_layers} blocks, width {m.hidden_size}, {m.num_heads} heads, patch "
      f"{m.patch_size}, {m.image_size} px, {m.num_classes} classes: {_count(num_params)} "
      f"parameters ({jnp.dtype(m.dtype).name})",
      f"devices    {devices} x {jax.devices()[0].platform} in {processes} process"
      f"{'es' if processes > 1 else ''}, parallelism {c.parallelism}",
      f"batch      global {c.batch_size}, per device {per_device}{accum}; eval {plan.eval_batch_size}",
      f"length     {plan.num_steps:,} steps = {plan.num_steps / plan.steps_per_epoch:.4g} epochs of "
      f"{plan.num_train_examples:,} {c.data.name} images ({plan.steps_per_epoch:.4g} steps/epoch)",
      f"lr         peak {o.peak_lr:.3g}, linear warm-up {o.warmup_steps:,} steps, cosine to "
      f"{o.min_lr:.3g} at step {o.num_steps:,}; AdamW wd {o.weight_decay:g}, "
      f"clip {'off' if clip is None else f'{clip:g}'}",
      *_precision_line(plan),
      f"workdir    {where}",
  ])


def _precision_line(plan: Plan) -> list:
  """float16 or non-default attention knobs: where the logits are computed and the loss scale."""
  m = plan.model
  logits, scale, dtype = m.attention_logits, m.attention_scale, jnp.dtype(m.dtype).name
  if dtype != "float16" and (logits, scale) == ("float32", "query"):
    return []
  line = f"precision  {dtype} matmuls, attention logits in {logits}, 1/sqrt(d) on the {scale}"
  if loss_scale.enabled(m):
    s = loss_scale.settings(plan.config.optim)
    line += (f"; loss scale {s['init']:g}, x{s['factor']} after {s['growth_interval']:,} good steps, "
             f"/{s['factor']} and skip on a non-finite gradient")
  return [line]


def hparams(plan: Plan) -> dict:
  """The main hyperparameters, flat and scalar, for TensorBoard's hparams plugin."""
  c, m, o = plan.config, plan.model, plan.optim
  return {
      "variant": variants.name_of(m.as_dict()), "norm": m.norm, "ffn_norm": m.ffn_norm,
      "ffn_norm_position": m.ffn_norm_position, "size": str(c.model.variant),
      "image_size": m.image_size, "dataset": c.data.name, "batch_size": c.batch_size,
      "num_steps": plan.num_steps, "warmup_steps": plan.warmup_steps,
      "peak_lr": o.peak_lr, "min_lr": o.min_lr, "weight_decay": o.weight_decay,
      "grad_clip_norm": -1.0 if o.grad_clip_norm is None else o.grad_clip_norm,
      "drop_path_rate": m.drop_path_rate, "seed": c.seed,
  }


def config_text(config: ml_collections.ConfigDict) -> str:
  """The resolved config as text (YAML-like, sorted), for --print_config and TensorBoard."""
  return str(config)
