"""Per-batch augmentation on the accelerator, inside the compiled train step.

With data.augment_on_device (always for the Grain feed, opt-in for the tf.data feed) the host
ships uint8 crops and int labels (vitnorm.data.grain_feed, vitnorm.data.pipeline); the step turns the global
batch into what the model trains on, in DeiT / timm order:
  horizontal flip (per example, p = 0.5, if data.hflip) -> /255, normalize (per channel) ->
  random erasing (per example: timm RandomErasing mode 'pixel', one box, prob
  data.random_erasing_prob) -> Mixup / CutMix of the batch with its reverse (one draw per batch,
  timm Mixup mode 'batch', as vitnorm.data.mixup) -> label smoothing.
Randomness is keyed by (run seed, optimizer step) and each example's global row, so a resumed run
(step k) draws what an uninterrupted one draws, on any number of devices or processes.

Two halves, so that a NumPy reference can check the arithmetic from the same draws:
  draw(key, shape, cfg)                  every random number of one batch (a dict of arrays)
  apply(images, labels, draws, ...)      deterministic: flip, normalize, erase, mix, targets
`make_augment(cfg, num_classes, seed)` is the step's hook: (batch, step) -> batch, or None when the
host augments (the tf.data feed unless data.augment_on_device=True).
"""
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

ERASE_AREA = (0.02, 1.0 / 3.0)  # timm RandomErasing defaults: area fraction, aspect 0.3 .. 1/0.3
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))
ERASE_ATTEMPTS = 10
_SALT = 0xDE


def step_key(seed: int, step) -> jax.Array:
  """The key of one training step's augmentation."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(int(seed)), _SALT), step)


def draw(key, shape: Sequence[int], cfg) -> dict:
  """All random numbers of a batch of `shape` (B, H, W, C) for the data config `cfg`."""
  batch, height, width, channels = shape
  k_flip, k_erase, k_mix = jax.random.split(key, 3)
  rows = jnp.arange(batch)
  per_row = lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(rows)  # noqa: E731

  def erase_draws(k):
    ks = jax.random.split(k, 6)
    return dict(apply_u=jax.random.uniform(ks[0]),
                area=jax.random.uniform(ks[1], (ERASE_ATTEMPTS,), minval=ERASE_AREA[0], maxval=ERASE_AREA[1]),
                log_aspect=jax.random.uniform(ks[2], (ERASE_ATTEMPTS,), minval=ERASE_LOG_ASPECT[0],
                                              maxval=ERASE_LOG_ASPECT[1]),
                top_u=jax.random.uniform(ks[3]), left_u=jax.random.uniform(ks[4]),
                noise=jax.random.normal(ks[5], (height, width, channels)))

  ks = jax.random.split(k_mix, 5)
  switch_u = jax.random.uniform(ks[1])
  # One Beta draw, with the alpha of the method this batch uses (as vitnorm.data.mixup).
  alpha = jnp.where(_use_cutmix(switch_u, cfg), cfg.cutmix_alpha, cfg.mixup_alpha)
  out = dict(flip=jax.vmap(lambda k: jax.random.bernoulli(k))(per_row(k_flip)),
             mix_u=jax.random.uniform(ks[0]), switch_u=switch_u,
             lam=jax.random.beta(ks[2], jnp.maximum(alpha, 1e-6), jnp.maximum(alpha, 1e-6)),
             box_cy=jax.random.randint(ks[3], (), 0, height), box_cx=jax.random.randint(ks[4], (), 0, width))
  if cfg.random_erasing_prob > 0:
    out["erase"] = jax.vmap(erase_draws)(per_row(k_erase))
  return out


def _use_cutmix(switch_u, cfg):
  """CutMix (True) or mixup (False) for this batch: by switch_u when both are on."""
  if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
    return switch_u < cfg.mixup_switch_prob
  return jnp.asarray(cfg.cutmix_alpha > 0)


def _erase_box(d, height, width):
  """(apply, top, left, box_h, box_w) from one example's erasing draws (timm's first fitting try)."""
  area = d["area"] * height * width
  aspect = jnp.exp(d["log_aspect"])
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (box_h < height) & (box_w < width)
  first = jnp.argmax(fits)
  bh, bw = box_h[first], box_w[first]
  top = jnp.floor(d["top_u"] * (height - bh + 1)).astype(jnp.int32)
  left = jnp.floor(d["left_u"] * (width - bw + 1)).astype(jnp.int32)
  return jnp.any(fits), top, left, bh, bw


def _box_mask(height, width, top, bottom, left, right):
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def cutmix_box(lam, cy, cx, height, width):
  """timm rand_bbox: (top, bottom, left, right), side fraction sqrt(1 - lam), centre (cy, cx)."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h = (height * cut).astype(jnp.int32)
  cut_w = (width * cut).astype(jnp.int32)
  return (jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
          jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width))


def apply(images, labels, draws: dict, cfg, *, num_classes: int, mean, std):
  """uint8 images [B, H, W, C], int labels [B] -> (float32 normalized images, targets [B, K])."""
  _, height, width, _ = images.shape
  x = images.astype(jnp.float32)
  if cfg.hflip:
    x = jnp.where(draws["flip"][:, None, None, None], x[:, :, ::-1], x)
  x = (x / 255.0 - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  if cfg.random_erasing_prob > 0:
    def erase(image, d):
      fits, top, left, bh, bw = _erase_box(d, height, width)
      on = fits & (d["apply_u"] < cfg.random_erasing_prob)
      inside = _box_mask(height, width, top, top + bh, left, left + bw) & on
      return jnp.where(inside[:, :, None], d["noise"], image)
    x = jax.vmap(erase)(x, draws["erase"])
  off = cfg.label_smoothing / num_classes
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - cfg.label_smoothing) + off
  if not cfg.mixing:
    return x, targets
  do_mix = draws["mix_u"] < cfg.mixup_prob
  use_cutmix = _use_cutmix(draws["switch_u"], cfg)
  reverse, reverse_targets = x[::-1], targets[::-1]
  top, bottom, left, right = cutmix_box(draws["lam"], draws["box_cy"], draws["box_cx"], height, width)
  box = _box_mask(height, width, top, bottom, left, right)
  kept = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
  lam_mixup = draws["lam"]
  mixed = jnp.where(use_cutmix, jnp.where(box[None, :, :, None], reverse, x),
                    lam_mixup * x + (1.0 - lam_mixup) * reverse)
  lam = jnp.where(do_mix, jnp.where(use_cutmix, kept, lam_mixup), 1.0)
  x = jnp.where(do_mix, mixed, x)
  return x, lam * targets + (1.0 - lam) * reverse_targets


def make_augment(data_cfg, *, num_classes: int, seed: int) -> Optional[Callable]:
  """The train step's batch hook for `data_cfg`: (batch of uint8 images and int labels, step) ->
  batch of normalized images and soft targets; None when the host augments (data.augment_on_device
  False, the tf.data feed's default)."""
  from vitnorm.data import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.resolve_data_config(data_cfg)
  if not cfg.augment_on_device:
    return None

  def augment(batch, step):
    images = batch["image"]
    mean, std = config_lib.check_normalization(cfg, images.shape[-1])
    draws = draw(step_key(seed, step), images.shape, cfg)
    x, targets = apply(images, batch["label"], draws, cfg, num_classes=num_classes, mean=mean, std=std)
    return dict(batch, image=x, label=targets)

  return augment


def cache_key(data_cfg, num_classes: int, seed: int):
  """What the compiled step's augmentation depends on (None for the tf.data feed)."""
  from vitnorm.data import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.resolve_data_config(data_cfg)
  return (repr(cfg), int(num_classes), int(seed)) if cfg.augment_on_device else None
