"""vitnorm.data.pil_randaugment (the Grain feed's RandAugment, timm's PIL ops) agrees op by op with
vitnorm.data.randaugment (the tf.data feed's TensorFlow imitation of the same PIL ops)."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vitnorm.data import imagenet_like, pil_randaugment, randaugment

FILL = (124, 116, 104)
# Mean |PIL - TF| / 255 allowed per op: point ops agree up to rounding; resampling ops differ in
# interpolation details (PIL's bilinear with fixed point vs TF's float), mostly at edges.
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


@pytest.fixture(scope="module")
def photo():
  data = imagenet_like.make_jpeg(imagenet_like._photos(), 3)  # pylint: disable=protected-access
  return Image.open(io.BytesIO(data)).convert("RGB").resize((64, 48))


@pytest.mark.parametrize("index,name", list(enumerate(pil_randaugment.OP_NAMES)))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_each_op_matches_the_tensorflow_version(photo, index, name, sign):
  assert randaugment.OP_NAMES[index] == name
  ours = np.asarray(pil_randaugment.apply_op(photo, name, 9.0, sign, FILL), np.float32)
  theirs = randaugment.apply_op(tf.constant(np.asarray(photo, np.float32)), tf.constant(index), tf.constant(9.0),
                                tf.constant(sign), tf.constant(FILL, tf.float32)).numpy()
  difference = np.mean(np.abs(ours - theirs)) / 255
  changed = np.mean(np.abs(ours - np.asarray(photo, np.float32))) / 255
  assert difference < (0.01 if name in GEOMETRIC else 0.004), (name, difference)
  assert changed > 0.005, name  # the op did something


def test_randaugment_is_a_function_of_the_generator(photo):
  def run(seed):
    rng = np.random.default_rng(seed)
    return np.asarray(pil_randaugment.randaugment(photo, rng, num_layers=2, magnitude=9, magnitude_std=0.5,
                                                  fill=FILL))
  np.testing.assert_array_equal(run(1), run(1))
  outs = [run(s) for s in range(12)]
  assert sum(np.array_equal(o, np.asarray(photo)) for o in outs) in range(1, 8)  # P(no op) = 1/4
