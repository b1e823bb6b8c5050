"""vitnorm.data.imagenet_like: JPEGs at ImageNet sizes and quality from scikit-learn's photos."""
import io

import numpy as np
import pytest
from PIL import Image

from vitnorm.data import imagenet_like


@pytest.fixture(scope="module")
def photos():
  return imagenet_like._photos()  # pylint: disable=protected-access


def test_examples_are_quality_90_jpegs_at_imagenet_sizes_and_deterministic(photos):
  sizes = set()
  for i in range(12):
    data = imagenet_like.make_jpeg(photos, i)
    assert data == imagenet_like.make_jpeg(photos, i)  # a pure function of the index
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size in imagenet_like.SIZES
    sizes.add(image.size)
    # PIL's quality-90 luminance table: the first coefficient of the IJG table (16) scaled by 0.2.
    assert image.quantization[0][0] == 3
    pixels = np.asarray(image, np.float32)
    assert pixels.std() > 20  # photo content, not a flat fill
  assert len(sizes) >= 2
  assert imagenet_like.make_jpeg(photos, 0, 1) != imagenet_like.make_jpeg(photos, 0, 0)


def test_prepared_dataset_has_its_config_sizes_and_labels(tmp_path):
  builder = imagenet_like.prepare("tiny", str(tmp_path))
  assert builder.info.splits["train"].num_examples == 48
  assert builder.info.splits["validation"].num_examples == 16
  assert builder.info.features["label"].num_classes == 10
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  ds = builder.as_dataset(split="train[:12]", decoders={"image": tfds.decode.SkipDecoding()})
  photos = imagenet_like._photos()  # pylint: disable=protected-access
  for ex in tfds.as_numpy(ds):
    label = int(ex["label"])
    # examples are stored as generated: the JPEG bytes of some index i with label i % 10
    assert any(ex["image"] == imagenet_like.make_jpeg(photos, i) for i in range(label, 48, 10))


def test_photos_are_scikit_learns_sample_images_read_without_importing_it():
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  photos = imagenet_like._photos()  # pylint: disable=protected-access
  reference = load_sample_images().images
  assert len(photos) == len(reference) == 2
  for ours, theirs in zip(photos, reference):
    assert ours.dtype == np.uint8 and ours.shape == (427, 640, 3)
    np.testing.assert_array_equal(ours, theirs)
  # Reading them imports no scikit-learn (~2 s in every process that prepares the dataset).
  probe = ("import sys; from vitnorm.data import imagenet_like; imagenet_like._photos(); "
           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_builders_of_unprepared_datasets_leave_no_temporary_directory(tmp_path, monkeypatch):
  """tfds made an empty '<tmp>/tmp*tfds' directory (its GCS look-up, skipped offline) for every
  builder made before its data was prepared, and never removed it: LocalDatasetInfo skips it."""
  import tempfile  # pylint: disable=import-outside-toplevel
  from vitnorm.data import offline  # pylint: disable=import-outside-toplevel
  scratch = tmp_path / "tmp"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(scratch))
  for make in (lambda d: imagenet_like.ImagenetLike(config="tiny", data_dir=d),
               lambda d: offline.Digits(data_dir=d), lambda d: offline.Mnist5k(data_dir=d)):
    builder = make(str(tmp_path / "data"))
    assert not builder.data_path.exists()  # not prepared: tfds would have looked in its bucket
  assert list(scratch.iterdir()) == []
