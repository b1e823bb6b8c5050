"""vitnorm.data.device_augment: the accelerator's flip / normalize / erasing / Mixup-CutMix /
label smoothing equal a NumPy reference computed from the same draws, for fixed keys."""
import math

import jax
import numpy as np
import pytest

from vitnorm.data import config as config_lib
from vitnorm.data import device_augment

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cfg(**overrides):
  base = dict(name="x", reader="grain", hflip=True, random_erasing_prob=0.5, mixup_alpha=0.8,
              cutmix_alpha=1.0, mixup_switch_prob=0.5, mixup_prob=1.0, label_smoothing=0.1)
  return config_lib.resolve_data_config({**base, **overrides})


def _reference(images, labels, d, cfg, num_classes):
  """Plain NumPy, one example at a time, from the draws `d` (float32 like the device)."""
  d = jax.tree.map(np.asarray, d)
  batch, height, width, _ = images.shape
  x = images.astype(np.float32)
  out = np.empty_like(x)
  for i in range(batch):
    image = x[i][:, ::-1] if (cfg.hflip and d["flip"][i]) else x[i]
    image = (image / np.float32(255) - np.float32(MEAN)) / np.float32(STD)
    if cfg.random_erasing_prob > 0:
      e = {k: v[i] for k, v in d["erase"].items()}
      for a in range(device_augment.ERASE_ATTEMPTS):  # timm: the first box that fits
        area = np.float32(e["area"][a]) * np.float32(height * width)
        aspect = np.exp(np.float32(e["log_aspect"][a]))
        bh = int(np.round(np.sqrt(area * aspect)))
        bw = int(np.round(np.sqrt(area / aspect)))
        if bh < height and bw < width:
          if e["apply_u"] < cfg.random_erasing_prob:
            top = int(np.floor(np.float32(e["top_u"]) * np.float32(height - bh + 1)))
            left = int(np.floor(np.float32(e["left_u"]) * np.float32(width - bw + 1)))
            image = image.copy()
            image[top:top + bh, left:left + bw] = e["noise"][top:top + bh, left:left + bw]
          break
    out[i] = image
  s = cfg.label_smoothing
  targets = np.full((batch, num_classes), s / num_classes, np.float32)
  targets[np.arange(batch), labels] = 1 - s + s / num_classes
  if not cfg.mixing or not d["mix_u"] < cfg.mixup_prob:
    return out, targets
  use_cutmix = (d["switch_u"] < cfg.mixup_switch_prob) if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0 \
      else cfg.cutmix_alpha > 0
  reverse = out[::-1]
  if use_cutmix:
    lam = float(d["lam"])
    cut = math.sqrt(1 - lam)
    cut_h, cut_w = int(height * np.float32(cut)), int(width * np.float32(cut))
    cy, cx = int(d["box_cy"]), int(d["box_cx"])
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    mixed = out.copy()
    mixed[:, top:bottom, left:right] = reverse[:, top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (height * width)
  else:
    lam = np.float32(d["lam"])
    mixed = lam * out + (1 - lam) * reverse
  return mixed, lam * targets + (1 - lam) * targets[::-1]


@pytest.mark.parametrize("overrides", [{}, dict(mixup_prob=0.0, random_erasing_prob=1.0, hflip=False)])
def test_device_augmentation_equals_the_numpy_reference(overrides):
  cfg = _cfg(**overrides)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 12, 10, 3), dtype=np.uint8)
  labels = rng.integers(0, 5, 8).astype(np.int32)
  augment = device_augment.make_augment(cfg, num_classes=5, seed=3)
  both = jax.jit(lambda batch, step: (augment(batch, step), device_augment.draw(
      device_augment.step_key(3, step), images.shape, cfg)))
  switched, erased = set(), 0
  for step in range(5):
    out, d = both({"image": images, "label": labels}, step)
    want_x, want_t = _reference(images, labels, d, cfg, 5)
    np.testing.assert_allclose(np.asarray(out["image"]), want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["label"]), want_t, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["label"]).sum(-1), 1.0, rtol=1e-5)
    switched.add(bool(d["switch_u"] < 0.5))
    if cfg.random_erasing_prob:
      erased += int(np.sum(np.asarray(d["erase"]["apply_u"]) < cfg.random_erasing_prob))
    if cfg.hflip:
      assert 0 < int(np.sum(d["flip"])) < 8  # both branches exercised
  assert len(switched) == 2 or not (cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0)
  assert erased > 0 or not cfg.random_erasing_prob


def test_draws_are_a_function_of_seed_and_step_only():
  cfg = _cfg()
  draw = jax.jit(lambda step: device_augment.draw(device_augment.step_key(3, step), (8, 12, 10, 3), cfg))
  a, b, c = draw(4), draw(4), draw(5)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))
  assert not np.array_equal(a["erase"]["noise"], c["erase"]["noise"])
  other_seed = jax.jit(lambda step: device_augment.draw(device_augment.step_key(4, step), (8, 12, 10, 3), cfg))(4)
  assert not np.array_equal(a["erase"]["noise"], other_seed["erase"]["noise"])


def test_the_tf_data_feed_gets_no_device_hook():
  assert device_augment.make_augment(_cfg(reader="tf_data"), num_classes=5, seed=0) is None


def test_tf_data_feed_with_augment_on_device_ships_the_uint8_crops_of_the_host_path(tmp_path):
  """Same crops and RandAugment; the host path normalizes them, the device path ships them."""
  from vitnorm.data import imagenet_like, pipeline  # pylint: disable=import-outside-toplevel
  imagenet_like.prepare("tiny", str(tmp_path))
  base = dict(name="imagenet_like/tiny", data_dir=str(tmp_path), image_size=16, hflip=False,
              randaugment_layers=2, label_smoothing=0.0)
  host = next(pipeline.train_batches(base, global_batch_size=8, seed=1, process_index=0, process_count=1))
  device = next(pipeline.train_batches(dict(base, augment_on_device=True), global_batch_size=8, seed=1,
                                       process_index=0, process_count=1))
  assert device["image"].dtype == np.uint8 and device["label"].dtype == np.int32
  np.testing.assert_array_equal(device["label"], host["label"].argmax(-1))
  normalized = (device["image"].astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)
  np.testing.assert_allclose(normalized, host["image"], rtol=0, atol=1e-5)
  # ... and the step's hook turns them into the trained batch (flip off, nothing random left).
  cfg = config_lib.resolve_data_config(dict(base, augment_on_device=True))
  out = jax.jit(device_augment.make_augment(cfg, num_classes=10, seed=1))(device, 0)
  np.testing.assert_allclose(np.asarray(out["image"]), host["image"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out["label"]), host["label"])


def test_augment_on_device_defaults_and_refusals():
  assert config_lib.resolve_data_config(dict(name="x", reader="grain")).augment_on_device
  assert not config_lib.resolve_data_config(dict(name="x")).augment_on_device
  with pytest.raises(config_lib.ConfigError, match=r"data\.augment_on_device"):
    config_lib.resolve_data_config(dict(name="x", reader="grain", augment_on_device=False))
