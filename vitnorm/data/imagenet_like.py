"""`imagenet_like`: a tfds dataset of JPEGs at ImageNet's typical sizes and quality, offline.

ImageNet's train images are mostly 500 px on the long side (500x375, 500x333, 375x500, ...), JPEG
at quality around 90, about 110 KB each. Decode and crop cost depends on exactly that, so input
benchmarks and tests need such files, not 28x28 digits. This builder cuts random windows out of the
two real photographs scikit-learn ships (`sklearn.datasets.load_sample_images`: china.jpg and
flower.jpg, 640x427), rescales each to an ImageNet-typical size and encodes it with PIL at
quality 90: real image content, real decode cost, no download.

Configs (`imagenet_like/NAME`), each with a 'train' and a 'validation' split:
  tiny    48 train / 16 validation images, 10 classes (tests: a few MB)
  bench   1,024 train / 64 validation images, 1,000 classes (the input benchmark: about 80 MB)
Labels are `index % num_classes`. Everything is a pure function of the example index, so every
machine writes the same files. Nothing is committed: `prepare(config, data_dir, file_format)`
writes it where asked (`file_format='array_record'` for random access, see vitnorm/data/grain_feed.py).
"""
import dataclasses
import io
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from vitnorm.data import offline

# (width, height) of ImageNet-typical images and how often each is drawn.
SIZES = ((500, 375), (500, 333), (375, 500), (500, 400), (500, 500), (333, 500))
SIZE_WEIGHTS = (0.45, 0.2, 0.15, 0.08, 0.07, 0.05)
JPEG_QUALITY = 90
_SPLIT_SALT = {"train": 0, "validation": 1}
PHOTO_FILES = ("china.jpg", "flower.jpg")  # what load_sample_images() reads, in its (sorted) order


@dataclasses.dataclass
class ImagenetLikeConfig(tfds.core.BuilderConfig):
  """A size of the dataset."""
  num_train: int = 0
  num_validation: int = 0
  num_classes: int = 0


def _photos():
  """The photos of sklearn.datasets.load_sample_images(), read as it reads them (its sorted JPEGs,
  decoded by PIL) without importing scikit-learn."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from vitnorm.data import arrays  # pylint: disable=import-outside-toplevel
  photos = []
  for name in PHOTO_FILES:
    with open(arrays.sklearn_data_file("datasets", "images", name, what="imagenet_like"), "rb") as f:
      photos.append(np.asarray(Image.open(f), np.uint8))
  return photos


def make_jpeg(photos, index: int, split_salt: int = 0) -> bytes:
  """JPEG bytes of example `index`: a random window of one photo, rescaled to an ImageNet size."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng([index, split_salt, 0x1A6E])
  photo = photos[int(rng.integers(len(photos)))]
  width, height = SIZES[int(rng.choice(len(SIZES), p=SIZE_WEIGHTS))]
  ph, pw = photo.shape[:2]
  # A window of 70..100% of the photo's side with the target's aspect ratio, anywhere in the photo.
  scale = rng.uniform(0.7, 1.0)
  win_w = min(pw, int(round(scale * min(pw, ph * width / height))))
  win_h = min(ph, int(round(win_w * height / width)))
  top = int(rng.integers(ph - win_h + 1))
  left = int(rng.integers(pw - win_w + 1))
  window = Image.fromarray(photo[top:top + win_h, left:left + win_w])
  if rng.random() < 0.5:
    window = window.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  image = window.resize((width, height), Image.Resampling.BICUBIC)
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


class ImagenetLike(tfds.core.GeneratorBasedBuilder):
  """JPEGs at ImageNet sizes and quality cut from scikit-learn's sample photos."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ImagenetLikeConfig(name="tiny", description="48 train / 16 validation, 10 classes",
                         num_train=48, num_validation=16, num_classes=10),
      ImagenetLikeConfig(name="bench", description="1,024 train / 64 validation, 1,000 classes",
                         num_train=1024, num_validation=64, num_classes=1000),
  ]

  def _info(self):
    return offline.LocalDatasetInfo(
        builder=self,
        description=__doc__.split("\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=self.builder_config.num_classes),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the photos ship with scikit-learn
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train),
            "validation": self._generate_examples("validation", cfg.num_validation)}

  def _generate_examples(self, split, count):
    photos = _photos()
    for i in range(count):
      yield i, {"image": make_jpeg(photos, i, _SPLIT_SALT[split]),
                "label": i % self.builder_config.num_classes}


def prepare(config: str = "tiny", data_dir: Optional[str] = None, file_format: str = "tfrecord"):
  """Writes `imagenet_like/<config>` into data_dir (once) and returns its builder."""
  from vitnorm.data import offline  # pylint: disable=import-outside-toplevel
  with offline._quiet_tfds():  # pylint: disable=protected-access
    builder = tfds.builder(f"imagenet_like/{config}", data_dir=data_dir, file_format=file_format)
    if not builder.is_prepared():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
