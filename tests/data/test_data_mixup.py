"""Mixup / CutMix / label smoothing: targets sum to 1 and match the pixels actually mixed."""
import numpy as np
import tensorflow as tf

from vitnorm.data import mixup

B, H, W, K = 6, 8, 8, 5
LABELS = tf.constant([0, 1, 2, 3, 4, 0])


def _images():
  # Image i is constant i + 1, so every pixel tells where it came from.
  return tf.constant(np.broadcast_to(np.arange(1, B + 1, dtype=np.float32)[:, None, None, None],
                                     (B, H, W, 3)).copy())


def test_label_smoothing_values():
  t = mixup.smooth_one_hot(LABELS, K, 0.1).numpy()
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(t[0], [0.92, 0.02, 0.02, 0.02, 0.02], rtol=1e-6)


def test_no_mixing_gives_smoothed_one_hot():
  images = _images()
  out, t = mixup.mix_batch(images, LABELS, tf.constant([1, 2], tf.int64), num_classes=K, mixup_alpha=0.8,
                           mix_prob=0.0, smoothing=0.1)
  np.testing.assert_array_equal(out.numpy(), images.numpy())
  np.testing.assert_allclose(t.numpy(), mixup.smooth_one_hot(LABELS, K, 0.1).numpy())


def test_mixup_targets_match_pixel_weights_and_sum_to_one():
  images = _images()
  for s in range(10):
    out, t = mixup.mix_batch(images, LABELS, tf.constant([s, 0], tf.int64), num_classes=K,
                             mixup_alpha=0.8, smoothing=0.0)
    out, t = out.numpy(), t.numpy()
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-5)
    # pixel = lam * (i + 1) + (1 - lam) * (B - i); recover lam from image 0 (mixed with image B-1).
    lam = (out[0, 0, 0, 0] - B) / (1 - B)
    assert 0.0 <= lam <= 1.0
    np.testing.assert_allclose(out[0], lam * 1 + (1 - lam) * B, rtol=1e-5)
    expected = np.zeros(K)
    expected[0] += lam
    expected[0] += 1 - lam  # image B-1 has label 0 too
    np.testing.assert_allclose(t[0], expected, atol=1e-5)
    np.testing.assert_allclose(t[1, 1], lam, atol=1e-5)
    np.testing.assert_allclose(t[1, 4], 1 - lam, atol=1e-5)


def test_cutmix_target_equals_pasted_area_and_sums_to_one():
  images = _images()
  seen_partial = False
  for s in range(20):
    out, t = mixup.mix_batch(images, LABELS, tf.constant([s, 9], tf.int64), num_classes=K,
                             cutmix_alpha=1.0, smoothing=0.1)
    out, t = out.numpy(), t.numpy()
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-5)
    pasted = (out[1, ..., 0] == B - 1).mean()  # image 1 gets pixels of image B-2 (label 4)
    assert np.all((out[1, ..., 0] == 2) | (out[1, ..., 0] == B - 1))
    smooth = mixup.smooth_one_hot(LABELS, K, 0.1).numpy()
    np.testing.assert_allclose(t[1], (1 - pasted) * smooth[1] + pasted * smooth[4], atol=1e-5)
    seen_partial |= 0 < pasted < 1
  assert seen_partial


def test_switch_between_mixup_and_cutmix():
  images = _images()
  kinds = set()
  for s in range(30):
    out, _ = mixup.mix_batch(images, LABELS, tf.constant([s, 5], tf.int64), num_classes=K,
                             mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    values = np.unique(out.numpy()[0])
    kinds.add("cutmix" if set(values) <= {1.0, float(B)} else "mixup")
  assert kinds == {"cutmix", "mixup"}
