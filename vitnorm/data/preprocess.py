"""Per-example preprocessing in TensorFlow, with stateless randomness.

Train (DeiT order): decode -> channels -> geometry (inception crop, for which JPEGs decode only
the crop window; or shorter-side resize and centre crop) -> random shift (pad + crop) ->
horizontal flip -> RandAugment -> /255, normalize -> random erasing.
Eval: decode -> channels -> resize the shorter side to image_size / eval_crop_fraction ->
centre crop -> /255, normalize.

Every random draw of one example comes from one shape-[2] int64 seed, so an example's augmentation
is a pure function of (its seed, the config): the pipeline derives that seed from
(run seed, process, position in the example stream), see pipeline.py.
Resizing is bicubic with antialiasing (PIL-like, as DeiT), clipped to 0..255; a resize to the
size an image already has is skipped, so e.g. 28x28 MNIST reaches a 28x28 model untouched.
"""
import tensorflow as tf

from vitnorm.data import randaugment as randaugment_lib


def decode(image, channels: int):
  """Encoded bytes (any tfds image format) or a uint8 [H, W, C] tensor -> uint8 [H, W, channels].

  Decoding converts gray<->RGB itself; decoded tensors go through `convert_channels`."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])
  return convert_channels(image, channels)


def convert_channels(image, channels: int):
  """[H, W, C] -> [H, W, channels]: gray->RGB repeats, RGB->gray uses ITU-R 601 luma, RGBA drops alpha."""
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return tf.tile(image, [1, 1, 3])
  if have in (3, 4) and channels == 1:
    return tf.image.rgb_to_grayscale(image[..., :3])
  if have == 4 and channels == 3:
    return image[..., :3]
  raise ValueError(f"cannot convert {have} channels to {channels}")


def _resize(image, height, width):
  """Bicubic, antialiased resize of float/uint8 [H, W, C] to float32 0..255; no-op at equal size."""
  image = tf.cast(image, tf.float32)
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))

  def resize():
    out = tf.image.resize(image, tf.stack([height, width]), method="bicubic", antialias=True)
    return tf.clip_by_value(out, 0.0, 255.0)

  out = tf.cond(same, lambda: image, resize)
  if isinstance(height, int) and isinstance(width, int):
    out = tf.ensure_shape(out, [height, width, image.shape[-1]])
  return out


def resize_small_and_center_crop(image, size: int, crop_fraction: float = 1.0):
  """Resize the shorter side to round(size / crop_fraction), then take the central size x size."""
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  small = tf.cast(tf.round(size / crop_fraction), tf.float32)
  scale = small / tf.minimum(h, w)
  new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), size)
  new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), size)
  image = _resize(image, new_h, new_w)
  top = (new_h - size) // 2
  left = (new_w - size) // 2
  image = image[top:top + size, left:left + size]
  return tf.ensure_shape(image, [size, size, image.shape[-1]])


def _sample_crop(shape, seed, area_min):
  """(offset_y, offset_x, height, width) of an inception crop of an image of `shape` [H, W, C]."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
      area_range=(area_min, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin[0], begin[1], crop_size[0], crop_size[1]


def inception_crop(image, seed, size: int, area_min: float):
  """Random resized crop: area fraction in [area_min, 1], aspect ratio in [3/4, 4/3] (10 tries, else
  the whole image), resized to size x size. Returns float32 0..255."""
  top, left, height, width = _sample_crop(tf.shape(image), seed, area_min)
  image = tf.ensure_shape(image[top:top + height, left:left + width], [None, None, image.shape[-1]])
  return _resize(image, size, size)


def decode_and_inception_crop(encoded, seed, size: int, area_min: float, channels: int):
  """`inception_crop(decode(encoded))`, but JPEGs decode only the crop window (same crop, less work)."""

  def jpeg():
    top, left, height, width = _sample_crop(tf.image.extract_jpeg_shape(encoded), seed, area_min)
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, left, height, width]), channels=channels)

  def other():
    image = decode(encoded, channels)
    top, left, height, width = _sample_crop(tf.shape(image), seed, area_min)
    return image[top:top + height, left:left + width]

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  return _resize(tf.ensure_shape(image, [None, None, channels]), size, size)


def random_shift(image, seed, pad: int):
  """Zero-pads by `pad` pixels on every side and crops back to the original size at a random offset."""
  shape = tf.shape(image)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  offsets = tf.random.stateless_uniform([2], seed, 0, 2 * pad + 1, dtype=tf.int32)
  out = tf.slice(padded, tf.stack([offsets[0], offsets[1], 0]), shape)
  return tf.ensure_shape(out, image.shape)


def normalize(image, mean, std):
  """float 0..255 -> (x / 255 - mean) / std per channel."""
  mean = tf.constant(mean, tf.float32)
  std = tf.constant(std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def random_erasing(image, seed, prob: float, *, area_range=(0.02, 1.0 / 3.0), log_aspect=(-1.2039728, 1.2039728),
                   attempts: int = 10):
  """timm RandomErasing(mode='pixel', count 1) on a normalized image: with probability `prob`,
  a box of area in area_range (fraction) and aspect ratio in [0.3, 1/0.3] gets N(0, 1) noise per
  pixel and channel. Of `attempts` candidate boxes the first that fits is used (none: no erase)."""
  s_apply, s_area, s_aspect, s_top, s_left, s_noise = tf.unstack(
      tf.random.experimental.stateless_split(seed, 6))
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  area = tf.random.stateless_uniform([attempts], s_area, area_range[0], area_range[1]) * hf * wf
  aspect = tf.exp(tf.random.stateless_uniform([attempts], s_aspect, log_aspect[0], log_aspect[1]))
  box_h = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  box_w = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = tf.logical_and(box_h < h, box_w < w)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  do_erase = tf.logical_and(tf.reduce_any(fits), tf.random.stateless_uniform([], s_apply) < prob)
  bh, bw = box_h[first], box_w[first]
  # top in [0, h - bh] inclusive, like random.randint in timm.
  top = tf.cast(tf.floor(tf.random.stateless_uniform([], s_top) * tf.cast(h - bh + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(tf.random.stateless_uniform([], s_left) * tf.cast(w - bw + 1, tf.float32)), tf.int32)

  def erase():
    # Noise only for the box, padded into place: the box is at most a third of the image.
    noise = tf.random.stateless_normal(tf.stack([bh, bw, shape[2]]), s_noise)
    paddings = tf.stack([[top, h - top - bh], [left, w - left - bw], [0, 0]])
    inside = tf.pad(tf.ones([bh, bw, 1], tf.bool), paddings[:, :], constant_values=False)
    return tf.where(inside, tf.pad(noise, paddings), image)

  return tf.cond(do_erase, erase, lambda: image)


class TrainPreprocess:
  """Callable (image, seed) -> normalized float32 [size, size, C] train image; with
  cfg.augment_on_device the uint8 crop (after shift and RandAugment; flip, normalization and
  erasing then run on the accelerator)."""

  def __init__(self, cfg, channels, mean, std):
    self.cfg = cfg
    self.channels = channels
    self.mean = mean
    self.std = std
    self.fill = tuple(min(max(round(255.0 * m), 0), 255) for m in mean)  # RandAugment fill, as timm

  def __call__(self, image, seed):
    cfg = self.cfg
    s_crop, s_shift, s_flip, s_ra, s_erase = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    if cfg.inception_crop and image.dtype == tf.string:
      image = decode_and_inception_crop(image, s_crop, cfg.image_size, cfg.crop_scale_min, self.channels)
    elif cfg.inception_crop:
      image = inception_crop(decode(image, self.channels), s_crop, cfg.image_size, cfg.crop_scale_min)
    else:
      image = resize_small_and_center_crop(decode(image, self.channels), cfg.image_size, 1.0)
    if cfg.random_shift_pad:
      image = random_shift(image, s_shift, cfg.random_shift_pad)
    if cfg.hflip and not cfg.augment_on_device:
      image = tf.image.stateless_random_flip_left_right(image, s_flip)
    if cfg.randaugment_layers:
      image = randaugment_lib.randaugment(
          tf.round(image), s_ra, num_layers=cfg.randaugment_layers,
          magnitude=cfg.randaugment_magnitude, magnitude_std=cfg.randaugment_magnitude_std,
          fill=self.fill)
    if cfg.augment_on_device:  # the rest runs in the train step (vitnorm.data.device_augment)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
      return tf.ensure_shape(image, [cfg.image_size, cfg.image_size, self.channels])
    image = normalize(image, self.mean, self.std)
    if cfg.random_erasing_prob > 0:
      image = random_erasing(image, s_erase, cfg.random_erasing_prob)
    return tf.ensure_shape(image, [cfg.image_size, cfg.image_size, self.channels])


class EvalPreprocess:
  """Callable image -> normalized float32 [size, size, C] eval image (resize small + centre crop)."""

  def __init__(self, cfg, channels, mean, std):
    self.cfg = cfg
    self.channels = channels
    self.mean = mean
    self.std = std

  def __call__(self, image):
    image = decode(image, self.channels)
    image = resize_small_and_center_crop(image, self.cfg.image_size, self.cfg.eval_crop_fraction)
    return normalize(image, self.mean, self.std)
