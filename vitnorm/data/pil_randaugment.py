"""RandAugment on PIL images for the Grain feed: timm's 'rand-mM-mstdS-inc1' (DeiT), as timm does it.

The same 15 'increasing' ops, level-to-argument maps, op probability 0.5, random signs and
magnitude noise as vitnorm/data/randaugment.py (the tf.data feed's version, which imitates these
PIL operations in TensorFlow); here they are PIL's own (ImageOps, ImageEnhance, affine transforms
with bilinear resampling and a constant fill), like timm's auto_augment.py. Every draw comes from
the example's NumPy generator, so an image's augmentation is a pure function of (seed, its global
stream position). In the Grain feed the flip runs later, on the accelerator: flipping commutes
with every op here up to the op's random sign, so the distribution of augmented images is DeiT's.
"""
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

OP_NAMES = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
            "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
            "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
            "TranslateYRel")
MAX_LEVEL = 10.0
OP_PROB = 0.5


def _affine(image, matrix, fill):
  return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.BILINEAR,
                         fillcolor=fill)


def _solarize_add(image, addition, threshold=128):
  lut = [min(255, i + addition) if i < threshold else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def apply_op(image: Image.Image, name: str, level: float, sign: float, fill) -> Image.Image:
  """Op `name` at `level` in [0, 10] with `sign` (+-1) on a PIL image ('RGB' or 'L')."""
  frac = level / MAX_LEVEL
  enhance = 1.0 + sign * 0.9 * frac
  width, height = image.size
  if name == "AutoContrast":
    return ImageOps.autocontrast(image)
  if name == "Equalize":
    return ImageOps.equalize(image)
  if name == "Invert":
    return ImageOps.invert(image)
  if name == "Rotate":
    return image.rotate(sign * 30.0 * frac, resample=Image.Resampling.BILINEAR, fillcolor=fill)
  if name == "PosterizeIncreasing":
    return ImageOps.posterize(image, 4 - int(frac * 4))
  if name == "SolarizeIncreasing":
    return ImageOps.solarize(image, 256 - int(frac * 256))
  if name == "SolarizeAdd":
    return _solarize_add(image, int(frac * 110))
  if name == "ColorIncreasing":
    return ImageEnhance.Color(image).enhance(enhance)
  if name == "ContrastIncreasing":
    return ImageEnhance.Contrast(image).enhance(enhance)
  if name == "BrightnessIncreasing":
    return ImageEnhance.Brightness(image).enhance(enhance)
  if name == "SharpnessIncreasing":
    return ImageEnhance.Sharpness(image).enhance(enhance)
  if name == "ShearX":
    return _affine(image, (1, sign * 0.3 * frac, 0, 0, 1, 0), fill)
  if name == "ShearY":
    return _affine(image, (1, 0, 0, sign * 0.3 * frac, 1, 0), fill)
  if name == "TranslateXRel":
    return _affine(image, (1, 0, sign * 0.45 * frac * width, 0, 1, 0), fill)
  if name == "TranslateYRel":
    return _affine(image, (1, 0, 0, 0, 1, sign * 0.45 * frac * height), fill)
  raise ValueError(f"unknown RandAugment op {name!r}")


def randaugment(image: Image.Image, rng: np.random.Generator, *, num_layers: int, magnitude: float,
                magnitude_std: float, fill: Sequence[int]) -> Image.Image:
  """`num_layers` ops drawn uniformly with replacement, each applied with probability 0.5 at a
  magnitude N(magnitude, magnitude_std) clipped to [0, 10] and a random sign."""
  fill = tuple(fill) if image.mode == "RGB" else int(fill[0])
  for _ in range(num_layers):
    name = OP_NAMES[int(rng.integers(len(OP_NAMES)))]
    apply, noise, sign_u = rng.random(), rng.standard_normal(), rng.random()
    if apply >= OP_PROB:
      continue
    level = magnitude + magnitude_std * noise if magnitude_std > 0 else magnitude
    level = min(max(level, 0.0), MAX_LEVEL)
    image = apply_op(image, name, level, -1.0 if sign_u < 0.5 else 1.0, fill)
  return image
