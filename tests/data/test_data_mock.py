"""The same pipelines over tfds.testing.mock_data for cifar10 and imagenet2012 (no files needed).

imagenet2012's mock images have random sizes, so the train crop and the eval resize + centre
crop really run on variable shapes. The mock ignores split slicing, so per-process parts are
tested on the real offline datasets (test_data_pipeline.py).
"""
import numpy as np
import pytest
import tensorflow_datasets as tfds

import vitnorm.data as data
from vitnorm.errors import ConfigError

DEIT = dict(inception_crop=True, hflip=True, randaugment_layers=2, randaugment_magnitude=9.0,
            randaugment_magnitude_std=0.5, random_erasing_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0,
            label_smoothing=0.1)
IMAGENET_LOW = (0.0 - 0.485) / 0.229  # smallest normalized value (black, red channel)
IMAGENET_HIGH = (1.0 - 0.406) / 0.225  # largest (white, blue channel)


@pytest.fixture
def mock_17():
  with tfds.testing.mock_data(num_examples=17, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


@pytest.mark.parametrize("name, classes, split, cache", [
    ("cifar10", 10, "test", False), ("imagenet2012", 1000, "validation", True)])
def test_deit_train_and_eval_pipelines(mock_17, name, classes, split, cache):
  cfg = data.default_data_config(name=name, data_dir="/nonexistent", image_size=16, eval_split=split,
                                 cache=cache, **DEIT)
  info = data.dataset_info(cfg)
  assert (info.num_classes, info.image_shape, info.num_train_examples, info.num_eval_examples) == (
      classes, (16, 16, 3), 17, 17)
  batches = data.train_batches(cfg, global_batch_size=8, seed=3)
  for _, batch in zip(range(3), batches):  # 3 batches of 8 cross the epoch boundary at 17
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8, classes) and batch["label"].dtype == np.float32
    np.testing.assert_allclose(batch["label"].sum(1), 1.0, rtol=1e-5)
    assert batch["label"].min() >= 0.1 / classes * 0.999
    assert np.isfinite(batch["image"]).all()
  resumed = next(data.train_batches(cfg, global_batch_size=8, seed=3, start_step=2))
  np.testing.assert_array_equal(resumed["image"], batch["image"])
  np.testing.assert_array_equal(resumed["label"], batch["label"])

  evals = list(data.eval_batches(cfg, global_batch_size=8))
  assert len(evals) == data.num_eval_batches(cfg, global_batch_size=8) == 3
  masks = np.concatenate([b["mask"] for b in evals])
  np.testing.assert_array_equal(masks, [1.0] * 17 + [0.0] * 7)
  images = np.concatenate([b["image"] for b in evals])[:17]
  labels = np.concatenate([b["label"] for b in evals])[:17]
  assert images.shape == (17, 16, 16, 3) and labels.dtype == np.int32
  assert IMAGENET_LOW - 1e-4 <= images.min() and images.max() <= IMAGENET_HIGH + 1e-4
  assert labels.min() >= 0 and labels.max() < classes


def test_mock_model_check_and_plain_train_values(mock_17):
  cfg = data.default_data_config(name="cifar10", image_size=32, inception_crop=False, hflip=False)
  data.check_model_compatible(cfg, {"image_size": 32, "num_classes": 10})
  batch = next(data.train_batches(cfg, global_batch_size=4, seed=0))
  # Without mixing or smoothing the targets are exact one-hot rows.
  assert set(np.unique(batch["label"])) == {0.0, 1.0}
  np.testing.assert_array_equal(batch["label"].sum(1), 1.0)
  assert IMAGENET_LOW - 1e-4 <= batch["image"].min() and batch["image"].max() <= IMAGENET_HIGH + 1e-4


def test_imagenet_test_split_has_no_labels(mock_17):
  with pytest.raises(ConfigError, match=r"data.eval_split: imagenet2012's 'test' split has no labels"):
    data.dataset_info({"name": "imagenet2012"})
