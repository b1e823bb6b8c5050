"""RandAugment in TensorFlow with stateless randomness, following timm's 'rand-mM-mstdS-inc1' (DeiT).

Per image, `num_layers` ops are drawn uniformly with replacement from the 15 'increasing' ops of
timm (AutoContrast, Equalize, Invert, Rotate, PosterizeIncreasing, SolarizeIncreasing, SolarizeAdd,
ColorIncreasing, ContrastIncreasing, BrightnessIncreasing, SharpnessIncreasing, ShearX, ShearY,
TranslateXRel, TranslateYRel); each is applied with probability 0.5, at a magnitude drawn from
N(magnitude, magnitude_std) clipped to [0, 10]. Levels map to arguments as in timm: rotate
30 deg * m/10, shear 0.3 * m/10, translate 0.45 * m/10 of the side, enhance factors
1 +- 0.9 * m/10, posterize 4 - int(4 m/10) bits, solarize threshold 256 - m/10*256, solarize-add
110 * m/10; geometric ops and enhance factors take a random sign. Geometric ops fill uncovered
pixels with `fill` (the dataset mean in 0..255, as timm's img_mean) and interpolate bilinearly.

Images are float32 [H, W, C] in 0..255 (C = 1 or 3); each op ends rounded and clipped to
0..255, like timm's uint8 PIL images. Every random draw comes from the `seed` argument
(a shape-[2] int tensor), so an image's augmentation is a pure function of its seed.
"""
import math

import tensorflow as tf

# timm's op list, level range and op probability: one definition for both feeds.
from vitnorm.data.pil_randaugment import MAX_LEVEL, OP_NAMES, OP_PROB  # noqa: E402,F401


def _finish(image):
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def _grayscale(image):
  """PIL 'L' conversion (ITU-R 601-2 luma) for RGB; identity for one channel. Keeps C channels."""
  if image.shape[-1] == 3:
    gray = tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
    return tf.broadcast_to(tf.round(gray), tf.shape(image))
  return image


def _blend(degenerate, image, factor):
  return degenerate + factor * (image - degenerate)


def auto_contrast(image):
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1e-6), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return (image - offset) * scale


def _equalize_channel(channel):
  """PIL ImageOps.equalize for one channel of values 0..255."""
  values = tf.cast(channel, tf.int32)
  hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  last = nonzero[-1]
  step = (tf.reduce_sum(hist) - last) // 255

  def equalized():
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.cast(tf.gather(lut, values), tf.float32)

  return tf.cond(step > 0, equalized, lambda: channel)


def equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def _transform(image, matrix, fill):
  """Output->input affine map `matrix` (8 floats, PIL/TF convention); per-channel constant fill."""
  ones = tf.ones_like(image[..., :1])
  stacked = tf.concat([image, ones], axis=-1)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=stacked, transforms=tf.cast(matrix, tf.float32)[None],
      output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR",
      fill_mode="CONSTANT")[0]
  covered = out[..., -1:]
  return out[..., :-1] + (1.0 - covered) * fill


def rotate(image, degrees, fill):
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  angle = degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
  y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
  return _transform(image, tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0]), fill)


def shear(image, amount, fill, axis):
  zero, one = tf.constant(0.0), tf.constant(1.0)
  if axis == "x":
    matrix = tf.stack([one, amount, zero, zero, one, zero, zero, zero])
  else:
    matrix = tf.stack([one, zero, zero, amount, one, zero, zero, zero])
  return _transform(image, matrix, fill)


def translate(image, pixels, fill, axis):
  zero, one = tf.constant(0.0), tf.constant(1.0)
  if axis == "x":
    matrix = tf.stack([one, zero, pixels, zero, one, zero, zero, zero])
  else:
    matrix = tf.stack([one, zero, zero, zero, one, pixels, zero, zero])
  return _transform(image, matrix, fill)


def posterize(image, bits):
  shift = tf.cast(8 - bits, tf.float32)
  return tf.floor(image / 2.0 ** shift) * 2.0 ** shift


def solarize(image, threshold):
  return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
  return tf.where(image < threshold, tf.minimum(image + addition, 255.0), image)


def color(image, factor):
  return _blend(_grayscale(image), image, factor)


def contrast(image, factor):
  mean = tf.round(tf.reduce_mean(_grayscale(image)[..., 0]))
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL ImageEnhance.Sharpness: blend with a 3x3 smoothing (centre 5, rest 1) of the inner pixels."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.round(smooth)
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  inner = tf.pad(tf.ones([h - 2, w - 2, channels]), [[1, 1], [1, 1], [0, 0]])
  degenerate = inner * smooth + (1.0 - inner) * image
  return _blend(degenerate, image, factor)


def apply_op(image, op_index, level, sign, fill):
  """Applies op number `op_index` (into OP_NAMES) at `level` in [0, 10] with `sign` (+-1)."""
  frac = level / MAX_LEVEL
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  enhance = 1.0 + sign * 0.9 * frac
  branches = [
      lambda: auto_contrast(image),
      lambda: equalize(image),
      lambda: 255.0 - image,
      lambda: rotate(image, sign * 30.0 * frac, fill),
      lambda: posterize(image, 4 - tf.cast(tf.floor(frac * 4.0), tf.int32)),
      lambda: solarize(image, 256.0 - tf.floor(frac * 256.0)),
      lambda: solarize_add(image, tf.floor(frac * 110.0)),
      lambda: color(image, enhance),
      lambda: contrast(image, enhance),
      lambda: brightness(image, enhance),
      lambda: sharpness(image, enhance),
      lambda: shear(image, sign * 0.3 * frac, fill, "x"),
      lambda: shear(image, sign * 0.3 * frac, fill, "y"),
      lambda: translate(image, sign * 0.45 * frac * w, fill, "x"),
      lambda: translate(image, sign * 0.45 * frac * h, fill, "y"),
  ]
  assert len(branches) == len(OP_NAMES)
  out = tf.switch_case(op_index, branches)
  return tf.ensure_shape(_finish(out), image.shape)


def randaugment(image, seed, *, num_layers, magnitude, magnitude_std, fill):
  """timm RandAugment ('inc1' ops) on a float32 [H, W, C] image in 0..255; `seed` shape [2]."""
  return _randaugment_function(image, seed, int(num_layers), float(magnitude), float(magnitude_std),
                               tuple(float(f) for f in fill))


# Traced once per process for each image shape and setting, then called (not traced again) by every
# tf.data pipeline that uses it: tracing the 15 ops' switch takes ~2 s. No autograph: the ops use
# tf.cond / tf.switch_case themselves, and converting their source took seconds more per process.
@tf.function(autograph=False)
def _randaugment_function(image, seed, num_layers, magnitude, magnitude_std, fill):
  fill = tf.constant(fill, tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, num=num_layers)
  for layer in range(num_layers):
    s_op, s_apply, s_mag, s_sign = tf.unstack(tf.random.experimental.stateless_split(seeds[layer], 4))
    op_index = tf.random.stateless_uniform([], s_op, 0, len(OP_NAMES), dtype=tf.int32)
    apply = tf.random.stateless_uniform([], s_apply) < OP_PROB
    level = magnitude
    if magnitude_std > 0:
      level = magnitude + magnitude_std * tf.random.stateless_normal([], s_mag)
    level = tf.clip_by_value(tf.cast(level, tf.float32), 0.0, MAX_LEVEL)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    image = tf.cond(apply, lambda img=image, i=op_index, lv=level, sg=sign: apply_op(img, i, lv, sg, fill),
                    lambda img=image: img)
  return image
