"""The normalization choice, in one place.

The ViT asks for a norm by name with `make_norm(kind, ...)`; every kind is listed in NORM_KINDS:

  layer  LayerNorm over channels (the standard ViT; reference checkpoints load into it)
  batch  BatchNorm over tokens: per-channel statistics over (batch, tokens), see TokenBatchNorm
  rms    RMSNorm over channels (scale only)
  none   identity (the norm-free floor that a folded BN model should reach at inference)
  dyt    Dynamic Tanh (Zhu et al., CVPR 2025): scale * tanh(alpha * x) + bias, alpha one learnable
         scalar (init NormOptions.dyt_alpha_init); no statistics, not foldable (elementwise tanh)
  prepbn progressive re-parameterized BN (SLAB, Guo et al., ICML 2024): lam * LN(x) +
         (1 - lam) * RepBN(x), RepBN(x) = BN(x) + eta * x (token BN as `batch`, eta init 1); lam
         is `prepbn_lam(step)`: 1 for the first warm-up steps, then linear to 0 at decay_steps
         (by default after SLAB's 16% of training, `slab_decay_steps`).
         With lam == 0 only RepBN runs, an affine map that folds like BN (vitnorm.model.fold)

Every norm returned by `make_norm` is called as `norm(x, train)`. PRepBN's lam is a pure function
of the optimizer step (no hidden counter): the ViT computes it from the step it is given and
passes it to `make_norm(..., lam=...)`; a Python float 0.0 (training finished) skips the LN branch.
"""
import dataclasses
import math
import numbers
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_KINDS = ("layer", "batch", "rms", "none", "dyt", "prepbn")
# Other spellings accepted wherever a norm kind is given (configs, command-line overrides).
NORM_ALIASES = {"ln": "layer", "layernorm": "layer", "bn": "batch", "batchnorm": "batch",
                "rmsnorm": "rms", "identity": "none", "dynamic_tanh": "dyt", "dynamictanh": "dyt",
                "slab": "prepbn", "repbn": "prepbn"}
# Per-head norms of queries and keys before the dot product (model.qk_norm; ViT-22B).
QK_NORM_KINDS = ("none", "layer", "rms")


def canonical_kind(name: str) -> str:
  """'bn' -> 'batch', 'LN' -> 'layer', 'batch' -> 'batch'; unknown names are returned unchanged."""
  key = str(name).strip().lower()
  return NORM_ALIASES.get(key, key)

# Parameter-tree names of each kind. "layer" keeps the reference ViT names (LayerNorm_0, ...).
_MODULE_PREFIX = {"layer": "LayerNorm", "batch": "BatchNorm", "rms": "RMSNorm", "dyt": "DyT",
                  "prepbn": "PRepBN"}

NormFn = Callable[[jax.Array, bool], jax.Array]


@dataclasses.dataclass(frozen=True)
class NormOptions:
  """Knobs shared by all norms of one model (the BatchNorm ablation knobs live here)."""

  ln_epsilon: float = 1e-6  # LayerNorm / RMSNorm epsilon (reference ViT: 1e-6).
  bn_momentum: float = 0.9  # Decay of BN running averages: ra = m * ra + (1 - m) * batch.
  bn_epsilon: float = 1e-5  # BN epsilon (PyTorch / timm default).
  bn_include_cls: bool = True  # Whether the CLS token joins the BN statistics.
  bn_group_size: Optional[int] = None  # Ghost batches of this many examples; None: whole batch.
  bn_axis_name: Optional[str] = None  # pmap axis to average statistics over; None under jit.
  dyt_alpha_init: float = 0.5  # DyT's initial alpha (the DyT paper's ViT default).
  prepbn_warmup_steps: int = 0  # PRepBN: lam = 1 (LN only) for steps < this (SLAB default 0).
  prepbn_decay_steps: Optional[int] = None  # PRepBN: lam reaches 0 at this step; None: unresolved.


# SLAB's schedule length (xinghaochen/SLAB, classification/models/slab_deit.py and prepbn.py):
# `LinearNorm(..., step=60000)` counts lam down from 1 to 0 over 60,000 training iterations and
# holds it at 0 after; its DeiT recipe is 300 epochs at global batch 8 x 128 = 1,024 on ImageNet
# (its train loader drops the last partial batch of each GPU's ceil(1,281,167 / 8) images: 1,251
# steps an epoch, 375,300 steps), so lam reaches 0 after 16% of training (epoch 48) and RepBN
# alone trains for the remaining 84%. The trainer keeps that fraction for any run length.
SLAB_DECAY_STEPS, SLAB_TOTAL_STEPS = 60_000, 300 * (math.ceil(1_281_167 / 8) // 128)
SLAB_DECAY_FRACTION = SLAB_DECAY_STEPS / SLAB_TOTAL_STEPS


def slab_decay_steps(num_steps: int, warmup_steps: int = 0) -> int:
  """The step at which lam reaches 0 for a run of num_steps: warm-up plus SLAB's fraction of the
  steps after it (rounded up, at least one step of decay, at most num_steps)."""
  ramp = max(1, math.ceil(SLAB_DECAY_FRACTION * (num_steps - warmup_steps)))
  return min(num_steps, warmup_steps + ramp)


def module_name(kind: str, index: int) -> str:
  """Name of the index-th norm of `kind` inside a module: LayerNorm_0, BatchNorm_1, RMSNorm_0."""
  return f"{_MODULE_PREFIX[kind]}_{index}" if kind in _MODULE_PREFIX else f"Identity_{index}"


def is_foldable(kind: str) -> bool:
  """Whether a norm of this kind is an affine map with fixed coefficients at inference.

  PRepBN is, once its lam has reached 0 (vitnorm.model.fold checks the step)."""
  return kind in ("batch", "none", "prepbn")


def uses_batch_stats(kind: str) -> bool:
  """Whether the norm keeps BN running statistics (and takes the BN options: sync, ghost, CLS)."""
  return kind in ("batch", "prepbn")


def prepbn_lam(step, warmup_steps: int, decay_steps: int):
  """PRepBN's weight of the LN branch at optimizer step `step` (0-based: the step being taken).

  1 for step < warmup_steps, then linear down to 0 at step decay_steps, 0 after. A Python int
  gives a Python float; a traced step gives a float32 scalar (same values).
  """
  if decay_steps is None:
    raise ValueError("model.prepbn.decay_steps is unset: the trainer resolves it to num_steps "
                     "(vitnorm.training.plan.prepare); set it to evaluate at a given step")
  span = decay_steps - warmup_steps
  if isinstance(step, numbers.Integral) and not isinstance(step, bool):
    step = int(step)
    if step < warmup_steps:
      return 1.0
    return 0.0 if step >= decay_steps else (decay_steps - step) / span
  step = jnp.asarray(step, jnp.float32)
  ramp = (decay_steps - step) / max(span, 1)
  lam = jnp.where(step < warmup_steps, 1.0, jnp.where(step >= decay_steps, 0.0, ramp))
  return lam.astype(jnp.float32)


class TokenBatchNorm(nn.Module):
  """BatchNorm for token sequences: per-channel statistics over (batch, tokens).

  Input (batch, tokens, channels) or (batch, channels). In training the batch statistics
  normalize the input and update the running averages in the `batch_stats` collection
  (`mean`, `var`); in evaluation the running averages are used, so each example's output is
  independent of the rest of the batch.

  - `num_excluded_tokens`: leading tokens (the CLS token) left out of the statistics; they are
    still normalized with them.
  - `group_size`: ghost batches. Statistics are computed over groups of that many consecutive
    examples, each group normalized with its own statistics. The running mean is the mean of the
    group means and the running variance the mean of the group variances (the variance that
    training actually normalized with). None: one group, the whole global batch.
  - `axis_name`: under pmap, whole-batch statistics are averaged over this axis, so they equal
    those of one device on the global batch (two passes: global mean, then the global mean of
    squared deviations -- not a mean of per-device variances). With groups, each device holds
    whole groups and only the running averages are averaged across devices.
  Under jit with a sharded batch, leave axis_name None: XLA computes global statistics.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  num_excluded_tokens: int = 0
  group_size: Optional[int] = None
  axis_name: Optional[str] = None
  dtype: Optional[Any] = jnp.float32  # output dtype; None: the input's (torch batch_norm under autocast)
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    out_dtype = x.dtype if self.dtype is None else self.dtype
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

    x32 = jnp.asarray(x, jnp.float32)
    if not train:
      inv = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
      y = (x32 - ra_mean.value) * inv + bias
      return y.astype(out_dtype)

    batch = x.shape[0]
    group = self.group_size or batch
    if batch % group:
      raise ValueError(
          f"model.bn_group_size: {group} does not divide the per-step batch of {batch} examples"
          " (per device under pmap); choose a divisor of it or leave it unset.")
    # (groups, group, [tokens,] channels); statistics over every axis but groups and channels.
    xg = x32.reshape((batch // group, group) + x.shape[1:])
    stats_x = xg[:, :, self.num_excluded_tokens:] if (x.ndim == 3 and self.num_excluded_tokens) else xg
    axes = tuple(range(1, xg.ndim - 1))
    sync = self.axis_name if self.group_size is None else None

    def mean(v):
      m = jnp.mean(v, axis=axes, keepdims=True)
      return jax.lax.pmean(m, sync) if sync else m

    mu = mean(stats_x)
    var = mean(jnp.square(stats_x - mu))
    y = (xg - mu) * jax.lax.rsqrt(var + self.epsilon) * scale + bias

    if not self.is_initializing():
      batch_mean = jnp.mean(mu, axis=(0,) + axes)
      batch_var = jnp.mean(var, axis=(0,) + axes)
      if self.axis_name is not None and sync is None:  # groups: keep running stats in sync.
        batch_mean, batch_var = jax.lax.pmean((batch_mean, batch_var), self.axis_name)
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * batch_mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * batch_var
    return y.reshape(x.shape).astype(out_dtype)


class DyT(nn.Module):
  """Dynamic Tanh: scale * tanh(alpha * x) + bias; alpha a learnable scalar, scale/bias per channel."""

  alpha_init: float = 0.5
  dtype: Optional[Any] = jnp.float32  # output dtype; None: float32 (PyTorch's promotion with the params)
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (), self.param_dtype)
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    x32 = jnp.asarray(x, jnp.float32)
    return (jnp.tanh(alpha * x32) * scale + bias).astype(self.dtype or jnp.float32)


class PRepBN(nn.Module):
  """lam * LayerNorm(x) + (1 - lam) * (BN(x) + eta * x); children `LayerNorm`, `BatchNorm`, param `eta`.

  `lam` is given per call (see prepbn_lam). In training both branches run (the BN running
  statistics are updated from the first step, even while lam is 1; the output is the same as
  SLAB's LN-only warm-up). In evaluation a Python lam of 0.0 or 1.0 skips the branch whose
  weight is 0 (at initialization both are built).
  """

  options: NormOptions = NormOptions()
  num_excluded_tokens: int = 0
  dtype: Optional[Any] = jnp.float32  # output dtype; None: float32 (its LayerNorm's, as under autocast)

  @nn.compact
  def __call__(self, x, train: bool, lam):
    o = self.options
    eta = self.param("eta", nn.initializers.ones, (), jnp.float32)
    static = isinstance(lam, (int, float))
    init = self.is_initializing()
    x32 = jnp.asarray(x, jnp.float32)
    out = 0.0
    if init or train or not static or lam != 1.0:
      rep = TokenBatchNorm(momentum=o.bn_momentum, epsilon=o.bn_epsilon,
                           num_excluded_tokens=self.num_excluded_tokens, group_size=o.bn_group_size,
                           axis_name=o.bn_axis_name, dtype=jnp.float32, name="BatchNorm")(x, train)
      rep = rep + eta * x32
      out = rep if (static and lam == 0.0) else (1.0 - lam) * rep
    if init or not static or lam != 0.0:
      ln = nn.LayerNorm(epsilon=o.ln_epsilon, dtype=jnp.float32, name="LayerNorm")(x32)
      out = out + lam * ln
    return jnp.asarray(out).astype(self.dtype or jnp.float32)


def make_norm(kind: str, *, name: str, options: NormOptions, dtype: Optional[Any] = jnp.float32,
              num_cls_tokens: int = 0, lam=0.0) -> NormFn:
  """Returns the norm `kind` as a function `norm(x, train)`.

  `dtype`: the output dtype; None is float16 autocast's rule (vitnorm.model.precision): BatchNorm
  returns its input's dtype, the others float32.

  Call inside a compact method: the module becomes a child named `name`. `num_cls_tokens` is
  the number of leading CLS tokens of x (BatchNorm leaves them out of its statistics when
  options.bn_include_cls is False). `lam`: PRepBN's LN weight (see prepbn_lam); 0.0 = RepBN only.
  """
  if kind == "none":
    return lambda x, train: x
  if kind == "layer":
    ln = nn.LayerNorm(epsilon=options.ln_epsilon, dtype=dtype, name=name)
    return lambda x, train: ln(x)
  if kind == "rms":
    rms = nn.RMSNorm(epsilon=options.ln_epsilon, dtype=dtype, name=name)
    return lambda x, train: rms(x)
  if kind == "dyt":
    dyt = DyT(alpha_init=options.dyt_alpha_init, dtype=dtype, name=name)
    return lambda x, train: dyt(x)
  if kind == "prepbn":
    prep = PRepBN(options=options, num_excluded_tokens=0 if options.bn_include_cls else num_cls_tokens,
                  dtype=dtype, name=name)
    return lambda x, train: prep(x, train, lam)
  if kind == "batch":
    bn = TokenBatchNorm(
        momentum=options.bn_momentum,
        epsilon=options.bn_epsilon,
        num_excluded_tokens=0 if options.bn_include_cls else num_cls_tokens,
        group_size=options.bn_group_size,
        axis_name=options.bn_axis_name,
        dtype=dtype,
        name=name)
    return lambda x, train: bn(x, train)
  raise ValueError(f"unknown norm kind {kind!r}; choose one of {', '.join(NORM_KINDS)}")
