"""Mixup / CutMix with label smoothing on a batch, in TensorFlow (timm `Mixup`, mode 'batch').

One draw per batch, as DeiT does per GPU: with probability `mixup_prob` the batch is mixed with
its own reverse (example i with example B-1-i); when both alphas are positive, CutMix is chosen
with probability `switch_prob`, else mixup. Mixup: lam ~ Beta(a, a), x = lam x + (1-lam) x_rev.
CutMix: lam ~ Beta(a, a), a box of side fraction sqrt(1 - lam) centred uniformly (clipped at the
border) is pasted from x_rev, and lam becomes the exact kept area fraction. Targets are the
smoothed one-hot labels mixed with the same lam, so every row sums to 1.

Randomness is stateless from one shape-[2] seed per batch (the pipeline derives it from
(run seed, step)). When the batch is one process's slice of a global batch, the pipeline passes
the mirrored rows (global rows B-1-i) as `mirror_images` / `mirror_labels`, so the slices of all
processes together are exactly the mixed global batch.
"""
import tensorflow as tf


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """int labels [B] -> float32 [B, K]: 1 - s + s/K on the label, s/K elsewhere."""
  off = smoothing / num_classes
  return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off, dtype=tf.float32)


def _sample_beta(seed, alpha):
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  g1 = tf.random.stateless_gamma([], s1, alpha=alpha)
  g2 = tf.random.stateless_gamma([], s2, alpha=alpha)
  return g1 / tf.maximum(g1 + g2, 1e-12)


def cutmix_box(seed, lam, height, width):
  """timm rand_bbox: (top, bottom, left, right) of a box with side fraction sqrt(1 - lam)."""
  s_y, s_x = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  cut = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(height, tf.float32) * cut, tf.int32)
  cut_w = tf.cast(tf.cast(width, tf.float32) * cut, tf.int32)
  cy = tf.random.stateless_uniform([], s_y, 0, height, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], s_x, 0, width, dtype=tf.int32)
  top = tf.clip_by_value(cy - cut_h // 2, 0, height)
  bottom = tf.clip_by_value(cy + cut_h // 2, 0, height)
  left = tf.clip_by_value(cx - cut_w // 2, 0, width)
  right = tf.clip_by_value(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def mix_batch(images, labels, seed, *, num_classes: int, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, switch_prob: float = 0.5, mix_prob: float = 1.0,
              smoothing: float = 0.0, mirror_images=None, mirror_labels=None):
  """images float32 [B, H, W, C], int labels [B] -> (mixed images, soft targets [B, K]).

  Row i is mixed with row i of `mirror_images` / `mirror_labels` (default: the batch reversed)."""
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if mix_prob <= 0 or (mixup_alpha <= 0 and cutmix_alpha <= 0):
    return images, targets
  s_mix, s_switch, s_lam, s_box = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  do_mix = tf.random.stateless_uniform([], s_mix) < mix_prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], s_switch) < switch_prob
  else:
    use_cutmix = tf.constant(cutmix_alpha > 0)
  alpha = tf.where(use_cutmix, cutmix_alpha, mixup_alpha)
  lam = _sample_beta(s_lam, tf.maximum(alpha, 1e-6))
  reverse = tf.reverse(images, [0]) if mirror_images is None else mirror_images
  reverse_targets = (tf.reverse(targets, [0]) if mirror_labels is None else
                     smooth_one_hot(mirror_labels, num_classes, smoothing))
  shape = tf.shape(images)
  height, width = shape[1], shape[2]

  def cutmix():
    top, bottom, left, right = cutmix_box(s_box, lam, height, width)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    mixed = tf.where(box[None, :, :, None], reverse, images)
    kept = 1.0 - tf.cast((bottom - top) * (right - left), tf.float32) / tf.cast(height * width, tf.float32)
    return mixed, kept

  def mixup():
    return lam * images + (1.0 - lam) * reverse, lam

  def no_mix():
    return images, tf.constant(1.0)

  mixed, lam_used = tf.cond(do_mix, lambda: tf.cond(use_cutmix, cutmix, mixup), no_mix)
  targets = lam_used * targets + (1.0 - lam_used) * reverse_targets
  return mixed, targets
