"""Per-example host work of the Grain feed, in PIL and NumPy (no TensorFlow): decode and crop.

Train: decode -> channels -> random resized crop (timm / torchvision `RandomResizedCrop`, as DeiT:
area fraction uniform in [crop_scale_min, 1], log aspect ratio uniform in [log 3/4, log 4/3],
10 tries, else a centre crop of the whole image with its aspect ratio clamped to [3/4, 4/3]),
resized bicubic (PIL's, antialiased) to image_size; or, with inception_crop off, shorter-side
resize + centre crop; then the optional random shift (zero pad + random crop) and RandAugment
(vitnorm.data.pil_randaugment, fill = the normalization mean in 0..255, as timm). Out: uint8.
Eval: decode -> shorter side to round(image_size / eval_crop_fraction) -> centre crop. Out: uint8.

Flip, random erasing, normalization and Mixup / CutMix are per-batch work on the accelerator
(vitnorm.data.device_augment); every random draw here comes from the example's own generator
(vitnorm.data.global_order.example_rng), so an example's crop is a pure function of (seed, its
global stream position).
"""
import io
import math

import numpy as np
from PIL import Image

from vitnorm.data import pil_randaugment

RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10


def decode(data, channels: int) -> Image.Image:
  """Encoded bytes (JPEG, PNG, ...) or a uint8 array -> a PIL image in mode 'RGB' (3) or 'L' (1)."""
  if isinstance(data, np.ndarray):
    image = Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1 else data)
  else:
    image = Image.open(io.BytesIO(data))
  mode = "RGB" if channels == 3 else "L"
  return image if image.mode == mode else image.convert(mode)


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int, scale_min: float):
  """(left, top, crop width, crop height) of a random resized crop (torchvision's algorithm)."""
  area = width * height
  log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
  for _ in range(ATTEMPTS):
    target_area = area * rng.uniform(scale_min, 1.0)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * ratio)))
    h = int(round(math.sqrt(target_area / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height  # fallback: centre crop with the aspect ratio clamped into RATIO
  if in_ratio < RATIO[0]:
    w, h = width, int(round(width / RATIO[0]))
  elif in_ratio > RATIO[1]:
    w, h = int(round(height * RATIO[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def _resize_box(image: Image.Image, size: int, box) -> np.ndarray:
  left, top, w, h = box
  if (w, h) == (size, size):  # nothing to resample: a plain crop
    out = image.crop((left, top, left + w, top + h))
  else:
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
  array = np.asarray(out, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def center_crop(image: Image.Image, size: int, crop_fraction: float = 1.0) -> np.ndarray:
  """Resize the shorter side to round(size / crop_fraction), then the central size x size."""
  width, height = image.size
  small = round(size / crop_fraction)
  scale = small / min(width, height)
  new_w, new_h = max(round(width * scale), size), max(round(height * scale), size)
  if (new_w, new_h) != (width, height):
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  return _resize_box(image, size, ((new_w - size) // 2, (new_h - size) // 2, size, size))


def random_shift(image: np.ndarray, rng: np.random.Generator, pad: int) -> np.ndarray:
  """Zero-pads by `pad` pixels on every side and crops back at a random offset."""
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
  return padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]


def train_crop(data, rng: np.random.Generator, cfg, channels: int, fill=(0, 0, 0)) -> np.ndarray:
  """uint8 [image_size, image_size, channels]: decode, crop, resize (shift, RandAugment) one train
  image; `fill` is RandAugment's fill colour (0..255 per channel)."""
  image = decode(data, channels)
  if cfg.inception_crop:
    box = random_resized_crop_box(rng, image.size[0], image.size[1], cfg.crop_scale_min)
    out = _resize_box(image, cfg.image_size, box)
  else:
    out = center_crop(image, cfg.image_size)
  if cfg.random_shift_pad:
    out = random_shift(out, rng, cfg.random_shift_pad)
  if cfg.randaugment_layers:
    pil = Image.fromarray(out[..., 0] if channels == 1 else out)
    pil = pil_randaugment.randaugment(pil, rng, num_layers=cfg.randaugment_layers,
                                      magnitude=cfg.randaugment_magnitude,
                                      magnitude_std=cfg.randaugment_magnitude_std, fill=fill)
    out = np.asarray(pil, np.uint8).reshape(out.shape)
  return out


def eval_crop(data, cfg, channels: int) -> np.ndarray:
  """uint8 [image_size, image_size, channels]: decode, resize the shorter side, centre crop."""
  return center_crop(decode(data, channels), cfg.image_size, cfg.eval_crop_fraction)
