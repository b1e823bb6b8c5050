"""Preprocessing and RandAugment ops: numerical checks, several against PIL (what timm/DeiT run)."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from vitnorm.data import preprocess
from vitnorm.data import randaugment as ra
from vitnorm.data.config import default_data_config, resolve_data_config

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
SEED = tf.constant([3, 4], tf.int64)


def _tf(op, image=RGB, *args):
  return op(tf.constant(image, tf.float32), *args).numpy()


@pytest.mark.parametrize("name, ours, pil", [
    ("autocontrast", lambda x: _tf(ra.auto_contrast, x), ImageOps.autocontrast),
    ("equalize", lambda x: _tf(ra.equalize, x), ImageOps.equalize),
    ("invert", lambda x: 255.0 - x, ImageOps.invert),
    ("posterize2", lambda x: _tf(ra.posterize, x, tf.constant(2)), lambda im: ImageOps.posterize(im, 2)),
    ("solarize100", lambda x: _tf(ra.solarize, x, tf.constant(100.0)), lambda im: ImageOps.solarize(im, 100)),
    ("color1.7", lambda x: _tf(ra.color, x, tf.constant(1.7)), lambda im: ImageEnhance.Color(im).enhance(1.7)),
    ("contrast0.4", lambda x: _tf(ra.contrast, x, tf.constant(0.4)),
     lambda im: ImageEnhance.Contrast(im).enhance(0.4)),
    ("brightness1.5", lambda x: _tf(ra.brightness, x, tf.constant(1.5)),
     lambda im: ImageEnhance.Brightness(im).enhance(1.5)),
    ("sharpness1.8", lambda x: _tf(ra.sharpness, x, tf.constant(1.8)),
     lambda im: ImageEnhance.Sharpness(im).enhance(1.8)),
])
def test_randaugment_ops_match_pil(name, ours, pil):
  expected = np.asarray(pil(Image.fromarray(RGB))).astype(np.float32)
  got = np.clip(np.round(ours(RGB.astype(np.float32))), 0, 255)
  # PIL rounds in fixed point; 1 grey level of difference is allowed, nothing more.
  assert np.max(np.abs(got - expected)) <= 1.0, name


def test_geometric_ops_move_pixels_and_fill_with_given_colour():
  img = np.arange(25, dtype=np.float32).reshape(5, 5, 1)
  fill = tf.constant([99.0])
  moved = _tf(ra.translate, img, tf.constant(2.0), fill, "x")[..., 0]
  np.testing.assert_allclose(moved[:, :3], img[:, 2:, 0])
  np.testing.assert_allclose(moved[:, 3:], 99.0)
  rotated = _tf(ra.rotate, img, tf.constant(90.0), fill)[..., 0]
  np.testing.assert_allclose(rotated, np.rot90(img[..., 0]), atol=1e-4)
  sheared = _tf(ra.shear, img, tf.constant(0.0), fill, "y")
  np.testing.assert_allclose(sheared, img)


def test_every_randaugment_op_keeps_shape_range_and_integrality():
  for channels in (1, 3):
    img = tf.constant(RGB[..., :channels], tf.float32)
    for op in range(len(ra.OP_NAMES)):
      for sign in (-1.0, 1.0):
        out = ra.apply_op(img, tf.constant(op), tf.constant(9.0), tf.constant(sign),
                          tf.constant([124.0] * channels)).numpy()
        assert out.shape == img.shape
        assert out.min() >= 0 and out.max() <= 255
        np.testing.assert_array_equal(out, np.round(out))


def test_randaugment_is_a_function_of_its_seed():
  img = tf.constant(RGB, tf.float32)
  kwargs = dict(num_layers=3, magnitude=9.0, magnitude_std=0.5, fill=(124, 116, 104))
  a = ra.randaugment(img, SEED, **kwargs).numpy()
  b = ra.randaugment(img, SEED, **kwargs).numpy()
  np.testing.assert_array_equal(a, b)
  others = [ra.randaugment(img, tf.constant([3, s], tf.int64), **kwargs).numpy() for s in range(5, 11)]
  assert any(not np.array_equal(a, o) for o in others)


def test_randaugment_is_traced_once_per_setting_not_once_per_pipeline():
  """Every tf.data pipeline with RandAugment calls one traced function (tracing its 15-op switch
  took ~2 s per pipeline): a second pipeline with the same settings and image shape traces nothing
  new and yields the same images; another setting traces its own."""
  kwargs = dict(num_layers=2, magnitude=7.0, magnitude_std=0.5, fill=(1, 2, 3))
  image = tf.constant(RGB, tf.float32)

  def pipeline(**overrides):
    ds = tf.data.Dataset.range(6).map(
        lambda i: ra.randaugment(image, tf.stack([i, 7 * i]), **{**kwargs, **overrides}))
    return np.stack(list(ds.as_numpy_iterator()))

  traced_function = ra._randaugment_function  # pylint: disable=protected-access
  first = pipeline()
  traced = traced_function.experimental_get_tracing_count()
  np.testing.assert_array_equal(pipeline(), first)
  assert traced_function.experimental_get_tracing_count() == traced
  np.testing.assert_array_equal(first[3], ra.randaugment(image, tf.constant([3, 21], tf.int64), **kwargs))
  pipeline(num_layers=1)
  assert traced_function.experimental_get_tracing_count() == traced + 1


def test_eval_resize_and_center_crop():
  # 20x40 image, crop fraction 0.5 for size 8: shorter side -> 16, i.e. 16x32, centre 8x8.
  img = np.zeros((20, 40, 1), np.uint8)
  img[7:13, 17:23] = 200  # centred 6x6 square -> rows/cols 1.6..6.4 of the crop
  img[:, :4] = 255  # far left: cut away by the centre crop
  out = preprocess.resize_small_and_center_crop(tf.constant(img), 8, 0.5).numpy()
  assert out.shape == (8, 8, 1)
  assert out[3:5, 3:5].min() > 190 and out[0, 0] < 20 and out[:, 0].max() < 20
  # Same size and fraction 1: untouched pixels.
  same = preprocess.resize_small_and_center_crop(tf.constant(RGB[:10]), 10, 1.0).numpy()
  np.testing.assert_array_equal(same, RGB[:10].astype(np.float32))


def test_eval_preprocess_normalizes_and_converts_channels():
  cfg = resolve_data_config(default_data_config(name="x", image_size=10, eval_crop_fraction=1.0,
                                                normalize_mean=(0.5,), normalize_std=(0.25,)))
  fn = preprocess.EvalPreprocess(cfg, 3, (0.5,) * 3, (0.25,) * 3)
  gray = np.full((10, 10, 1), 255, np.uint8)
  out = fn(tf.constant(gray)).numpy()
  assert out.shape == (10, 10, 3)
  np.testing.assert_allclose(out, 2.0)  # (1 - 0.5) / 0.25
  encoded = tf.io.encode_png(tf.constant(RGB[:10]))
  gray_out = preprocess.EvalPreprocess(cfg, 1, (0.5,), (0.25,))(encoded).numpy()
  assert gray_out.shape == (10, 10, 1)


def test_random_shift_is_a_shifted_copy():
  img = tf.constant(np.arange(1, 37, dtype=np.float32).reshape(6, 6, 1))
  for s in range(10):
    out = preprocess.random_shift(img, tf.constant([s, 1], tf.int64), 2).numpy()[..., 0]
    padded = np.pad(img.numpy()[..., 0], 2)
    matches = [(dy, dx) for dy in range(5) for dx in range(5)
               if np.array_equal(padded[dy:dy + 6, dx:dx + 6], out)]
    assert matches


def test_inception_crop_shape_and_range():
  for s in range(5):
    out = preprocess.inception_crop(tf.constant(RGB), tf.constant([s, 0], tf.int64), 7, 0.08).numpy()
    assert out.shape == (7, 7, 3) and out.min() >= 0 and out.max() <= 255


def test_random_erasing_fills_one_box_with_noise():
  img = tf.zeros([32, 32, 3])
  erased = [preprocess.random_erasing(img, tf.constant([s, 7], tf.int64), 1.0).numpy() for s in range(20)]
  for out in erased:
    changed = np.any(out != 0, axis=-1)
    rows, cols = np.nonzero(changed)
    assert rows.size > 0
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    # The changed pixels form one box of area in [0.02, 1/3] of the image.
    assert changed.sum() == box and 0.02 * 1024 * 0.8 <= box <= 1024 / 3 * 1.2
    assert 0.5 < np.std(out[changed]) < 1.5
  untouched = preprocess.random_erasing(img, tf.constant([1, 7], tf.int64), 0.0).numpy()
  assert not untouched.any()


def test_train_preprocess_without_randomness_is_eval_geometry():
  cfg = resolve_data_config(default_data_config(name="x", image_size=10, inception_crop=False, hflip=False,
                                                eval_crop_fraction=1.0))
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  train = preprocess.TrainPreprocess(cfg, 3, mean, std)(tf.constant(RGB), SEED).numpy()
  evaluated = preprocess.EvalPreprocess(cfg, 3, mean, std)(tf.constant(RGB)).numpy()
  np.testing.assert_allclose(train, evaluated, atol=1e-6)


def test_jpeg_partial_decode_gives_the_same_crop_as_full_decode():
  smooth = np.clip(np.add.outer(np.arange(48) * 4, np.arange(40) * 3)[..., None] + [0, 40, 80], 0, 255)
  for encode in (tf.io.encode_jpeg, tf.io.encode_png):
    encoded = encode(tf.constant(smooth.astype(np.uint8)))
    for s in range(4):
      seed = tf.constant([s, 2], tf.int64)
      fast = preprocess.decode_and_inception_crop(encoded, seed, 16, 0.08, 3).numpy()
      full = preprocess.inception_crop(preprocess.decode(encoded, 3), seed, 16, 0.08).numpy()
      assert fast.shape == (16, 16, 3)
      np.testing.assert_allclose(fast, full, atol=1.0)


# Each random op really does something: a no-op implementation fails these.
LOW_CONTRAST = RNG.integers(60, 140, size=(40, 40, 3)).astype(np.float32)  # big enough for equalize


def test_every_randaugment_op_changes_the_image():
  img = tf.constant(LOW_CONTRAST)
  for op, name in enumerate(ra.OP_NAMES):
    out = ra.apply_op(img, tf.constant(op), tf.constant(9.0), tf.constant(1.0),
                      tf.constant([124.0] * 3)).numpy()
    assert not np.array_equal(out, np.round(LOW_CONTRAST)), name


def test_shear_and_rotation_of_known_magnitude():
  img = np.arange(1, 31, dtype=np.float32).reshape(5, 6, 1)
  fill = tf.constant([99.0])
  sheared = _tf(ra.shear, img, tf.constant(1.0), fill, "x")[..., 0]
  expected = np.array([[img[y, x + y, 0] if x + y < 6 else 99.0 for x in range(6)] for y in range(5)])
  np.testing.assert_allclose(sheared, expected, atol=1e-4)  # output (x, y) <- input (x + y, y)
  # Level 10 of RandAugment's rotate is 30 degrees (timm: 30 * level / 10), sign +1 counter-clockwise.
  square = np.arange(49, dtype=np.float32).reshape(7, 7, 1)
  rotate_op = list(ra.OP_NAMES).index("Rotate")
  by_op = ra.apply_op(tf.constant(square), tf.constant(rotate_op), tf.constant(10.0), tf.constant(1.0),
                      tf.constant([0.0])).numpy()
  np.testing.assert_array_equal(by_op, np.clip(np.round(_tf(ra.rotate, square, tf.constant(30.0),
                                                            tf.constant([0.0]))), 0, 255))
  assert not np.array_equal(by_op, square)
  np.testing.assert_allclose(_tf(ra.rotate, square, tf.constant(-90.0), tf.constant([0.0]))[..., 0],
                             np.rot90(square[..., 0], k=-1), atol=1e-4)


def test_random_shift_and_inception_crop_vary_with_the_seed():
  img = tf.constant(np.arange(1, 37, dtype=np.float32).reshape(6, 6, 1))
  shifted = {preprocess.random_shift(img, tf.constant([s, 1], tf.int64), 2).numpy().tobytes()
             for s in range(10)}
  assert len(shifted) >= 3  # several offsets, not only the centred copy
  whole = preprocess.inception_crop(tf.constant(RGB), tf.constant([0, 0], tf.int64), 7, 1.0).numpy()
  crops = [preprocess.inception_crop(tf.constant(RGB), tf.constant([s, 0], tf.int64), 7, 0.08).numpy()
           for s in range(6)]
  assert len({c.tobytes() for c in crops}) >= 4
  assert any(np.max(np.abs(c - whole)) > 10 for c in crops)  # crops of part of the image
