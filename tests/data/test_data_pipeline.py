"""Pipelines over the real offline datasets (mnist5k, digits), prepared into a temporary data_dir.

Shapes, dtypes, value ranges; determinism for (seed, step) and exact resume; cached global
batches independent of the process count; streamed per-process parts disjoint and covering; eval
sees every example exactly once; clear errors for bad input.
"""
import collections
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

import vitnorm.data as data
from vitnorm.data import arrays, offline
from vitnorm.errors import ConfigError

# Pixel-space output: normalize to x / 255 / (1 / 255) = x, so images identify examples.
RAW = dict(normalize_mean=(0.0,), normalize_std=(1.0 / 255.0,), inception_crop=False, hflip=False,
           eval_crop_fraction=1.0)
HEAVY_AUG = dict(inception_crop=True, crop_scale_min=0.5, hflip=True, random_shift_pad=1,
                 randaugment_layers=2, random_erasing_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0,
                 label_smoothing=0.1, normalize_mean=(0.5,), normalize_std=(0.5,))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def cfg(data_dir, name="digits", **kw):
  base = dict(name=name, data_dir=data_dir, image_size=8 if name == "digits" else 28, **RAW)
  base.update(kw)
  return data.default_data_config(**base)


def _rows(images, labels):
  """Multiset of (pixels, label) rows."""
  pixels = np.round(np.asarray(images)).astype(np.uint8)
  return collections.Counter((p.tobytes(), int(l)) for p, l in zip(pixels, labels))


def _split_rows(data_dir, name, split):
  ds = tfds.builder(name, data_dir=data_dir).as_dataset(split=split, batch_size=-1)
  arrays = tfds.as_numpy(ds)
  return _rows(arrays["image"], arrays["label"])


def test_offline_builders_prepare_real_data_with_fixed_split(data_dir):
  t = time.time()
  mnist = data.dataset_info(cfg(data_dir, "mnist5k"))
  digits = data.dataset_info(cfg(data_dir, "digits"))
  assert time.time() - t < 60
  assert mnist == data.DatasetInfo("mnist5k", 10, (28, 28, 1), 4000, 1000)
  assert digits == data.DatasetInfo("digits", 10, (8, 8, 1), 1437, 360)
  # tfds sees them by name; the test split holds exactly the rows the seeded stratified split picks.
  images, labels = offline.load_mnist5k_arrays()
  train_idx, test_idx = offline.stratified_split(labels, 100)
  assert not set(train_idx) & set(test_idx) and len(train_idx) + len(test_idx) == 5000
  assert _split_rows(data_dir, "mnist5k", "test") == _rows(images[test_idx], labels[test_idx])
  assert np.all(np.bincount(labels[test_idx]) == 100)
  d_images, d_labels = offline.load_digits_arrays()
  assert d_images.dtype == np.uint8 and d_images.max() == 255
  _, d_test = offline.stratified_split(d_labels, 36)
  assert _split_rows(data_dir, "digits", "test") == _rows(d_images[d_test], d_labels[d_test])


def test_train_batches_shapes_dtypes_and_ranges(data_dir):
  c = cfg(data_dir, "mnist5k", cache=True, channels=3, normalize_mean=(0.5,), normalize_std=(0.5,),
          random_shift_pad=2, label_smoothing=0.1)
  batch = next(data.train_batches(c, global_batch_size=16, seed=0))
  assert batch["image"].shape == (16, 28, 28, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16, 10) and batch["label"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])  # gray -> RGB
  np.testing.assert_allclose(batch["label"].sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(batch["label"].max(1), 0.91, rtol=1e-6)
  heavy = next(data.train_batches(cfg(data_dir, **HEAVY_AUG), global_batch_size=32, seed=0, num_classes=12))
  assert heavy["image"].shape == (32, 8, 8, 1) and np.isfinite(heavy["image"]).all()
  assert heavy["label"].shape == (32, 12)
  np.testing.assert_allclose(heavy["label"].sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("cache, randaugment_layers", [(True, 2), (False, 0)])
def test_batches_are_a_function_of_seed_and_step_and_resume_exactly(data_dir, cache, randaugment_layers):
  # RandAugment is on for one mode only: it is per-example like the rest, and slow to trace.
  c = cfg(data_dir, cache=cache, shuffle_buffer=300, **{**HEAVY_AUG, "randaugment_layers": randaugment_layers})
  # digits: 1,437 / 4 processes -> 360 examples for process 0, 11.25 batches of 32: step 12 is
  # in epoch 1.
  kw = dict(global_batch_size=128, seed=7, process_index=0, process_count=4)
  first = [b for _, b in zip(range(14), data.train_batches(c, **kw))]
  resumed = [b for _, b in zip(range(2), data.train_batches(c, start_step=12, **kw))]
  for a, b in zip(first[12:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other_seed = next(data.train_batches(c, **{**kw, "seed": 8}))
  assert not np.array_equal(other_seed["image"], first[0]["image"])
  other_process = next(data.train_batches(c, **{**kw, "process_index": 1}))
  assert not np.array_equal(other_process["image"], first[0]["image"])


def test_cached_global_batches_do_not_depend_on_the_process_count(data_dir):
  # Mixup and CutMix on: each process's slice must be mixed with the mirrored rows of the global
  # batch. Steps 29-31 of batch 48 cross the end of digits' first epoch (1,437 examples).
  c = cfg(data_dir, cache=True, **{**HEAVY_AUG, "randaugment_layers": 0})
  kw = dict(global_batch_size=48, seed=3, start_step=29)
  whole = [b for _, b in zip(range(3), data.train_batches(c, process_index=0, process_count=1, **kw))]
  for count in (2, 3):
    parts = [[b for _, b in zip(range(3), data.train_batches(c, process_index=p, process_count=count, **kw))]
             for p in range(count)]
    for k in range(3):
      for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([part[k][key] for part in parts]), whole[k][key])
  # The global stream visits every example once per epoch, in a new order each epoch.
  c = cfg(data_dir, cache=True)
  n = 1437
  stream = [b for _, b in zip(range(60), data.train_batches(c, global_batch_size=48, seed=1, process_index=0,
                                                             process_count=1))]
  images = np.concatenate([b["image"] for b in stream])
  labels = np.concatenate([b["label"].argmax(1) for b in stream])
  assert _rows(images[:n], labels[:n]) == _split_rows(data_dir, "digits", "train")
  assert _rows(images[n:2 * n], labels[n:2 * n]) == _split_rows(data_dir, "digits", "train")
  assert not np.array_equal(images[:n], images[n:2 * n])


@pytest.mark.parametrize("cache", [False])
def test_process_parts_are_disjoint_covering_permutations(data_dir, cache):
  # Streaming (cache=False) only: each process reads its own part of the split.
  c = cfg(data_dir, cache=cache, shuffle_buffer=64)
  data.dataset_info(c)  # prepares digits if this test runs first in the module (shuffled order)
  total = collections.Counter()
  sizes = []
  for p in range(3):
    n = tfds.builder("digits", data_dir=data_dir).info.splits[tfds.even_splits("train", 3)[p]].num_examples
    sizes.append(n)
    batches = data.train_batches(c, global_batch_size=48, seed=1, process_index=p, process_count=3)
    stream = [b for _, b in zip(range(-(-2 * n // 16)), batches)]
    images = np.concatenate([b["image"] for b in stream])
    labels = np.concatenate([b["label"].argmax(1) for b in stream])
    epoch0, epoch1 = _rows(images[:n], labels[:n]), _rows(images[n:2 * n], labels[n:2 * n])
    assert epoch0 == epoch1  # each epoch visits the part exactly once ...
    assert not np.array_equal(images[:n], images[n:2 * n])  # ... in a new order
    assert not total & epoch0  # disjoint from the other processes' parts
    total += epoch0
  assert sorted(sizes) == [479, 479, 479]
  assert total == _split_rows(data_dir, "digits", "train")  # and together they cover the split


@pytest.mark.parametrize("cache", [True, False])
def test_eval_sees_every_example_exactly_once(data_dir, cache):
  for split, global_batch, expected_batches in (("test", 48, 8), ("test[:100]", 48, 3), ("test", 720, 1),
                                                ("test[:2]", 3, 1)):  # process 2 gets no example
    c = cfg(data_dir, cache=cache, eval_split=split)
    assert data.num_eval_batches(c, global_batch_size=global_batch, process_count=3) == expected_batches
    seen = collections.Counter()
    for p in range(3):
      batches = list(data.eval_batches(c, global_batch_size=global_batch, process_index=p, process_count=3))
      assert len(batches) == expected_batches
      for b in batches:
        assert b["image"].shape == (global_batch // 3, 8, 8, 1) and b["image"].dtype == np.float32
        assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
        real = b["mask"] == 1
        assert set(np.unique(b["mask"])) <= {0.0, 1.0}
        assert not b["image"][~real].any() and not b["label"][~real].any()
        seen += _rows(b["image"][real], b["label"][real])
    assert seen == _split_rows(data_dir, "digits", split)


def test_single_process_defaults_use_jax(data_dir):
  batches = list(data.eval_batches(cfg(data_dir), global_batch_size=100))
  assert len(batches) == data.num_eval_batches(cfg(data_dir), global_batch_size=100) == 4
  assert sum(b["mask"].sum() for b in batches) == 360


def test_model_compatibility_errors_name_both_sides(data_dir):
  c = cfg(data_dir, "mnist5k")
  data.check_model_compatible(c, {"image_size": 28, "num_channels": 1, "num_classes": 10})
  with pytest.raises(ConfigError, match=r"model.image_size: data.image_size=28 but model.image_size=32"):
    data.check_model_compatible(c, {"image_size": 32, "num_channels": 1, "num_classes": 10})
  with pytest.raises(ConfigError, match=r"data.channels=1 but model.num_channels=3: set data.channels"):
    data.check_model_compatible(c, {"image_size": 28, "num_classes": 10})
  with pytest.raises(ConfigError, match=r"has num_classes=10 but model.num_classes=1000"):
    data.check_model_compatible(c, {"image_size": 28, "num_channels": 1, "num_classes": 1000})


def test_bad_dataset_inputs_fail_fast_with_instructions(tmp_path, data_dir):
  t = time.time()
  with pytest.raises(ConfigError, match=r"data.name: unknown dataset 'mnist5kk'. Did you mean 'mnist5k'"):
    data.dataset_info(cfg(data_dir, "mnist5kk"))
  with pytest.raises(ConfigError, match=r"not prepared .* `tfds build cifar10 --data_dir"):
    data.dataset_info(cfg(str(tmp_path), "cifar10"))
  with pytest.raises(ConfigError, match=r"manual download: put the files into .*downloads/manual"):
    data.dataset_info(cfg(str(tmp_path), "imagenet2012"))
  assert time.time() - t < 20  # no download attempt (which stalls for minutes here)
  with pytest.raises(ConfigError, match=r"data.eval_split: bad split 'tset' .* its splits are 'train', 'test'"):
    data.dataset_info(cfg(data_dir, eval_split="tset"))
  with pytest.raises(ConfigError, match=r"global_batch_size: 10 is not divisible by the 3 processes"):
    data.train_batches(cfg(data_dir), global_batch_size=10, seed=0, process_index=0, process_count=3)
  with pytest.raises(ConfigError, match=r"model.num_classes: 5 is smaller than the 10 classes"):
    data.train_batches(cfg(data_dir), global_batch_size=8, seed=0, num_classes=5)


def test_prepare_command(data_dir, capsys):
  from vitnorm.data.__main__ import main  # pylint: disable=import-outside-toplevel
  main(["--data_dir", data_dir, "digits"])
  assert "digits: train 1437, test 360 examples" in capsys.readouterr().out
  with pytest.raises(SystemExit) as exit_info:
    main(["--data_dir", data_dir, "cifar10"])
  assert exit_info.value.code == 2
  assert "error: unknown offline dataset 'cifar10'; choose from mnist5k, digits" in capsys.readouterr().err


def test_numpy_mnist5k_holds_the_same_splits_as_the_tfds_builder(data_dir):
  """'numpy:mnist5k' (the NumPy feed) and 'mnist5k' (tfds) hold the same train and test images."""
  info = data.dataset_info(dict(name="numpy:mnist5k", image_size=28, **RAW))
  assert info == data.DatasetInfo("numpy:mnist5k", 10, (28, 28, 1), 4000, 1000)
  data.dataset_info(cfg(data_dir, "mnist5k"))  # prepares the tfds builder
  split = arrays.split_arrays("mnist5k")
  for name in ("train", "test"):
    assert _split_rows(data_dir, "mnist5k", name) == _rows(split[f"{name}_images"], split[f"{name}_labels"])


@pytest.mark.parametrize("cache", [True, False])
def test_pipelines_trace_our_functions_as_written_without_autograph(data_dir, cache, monkeypatch):
  """AutoGraph converts no vitnorm function of the train and eval pipelines (converting their
  source took ~5 s of start-up per process; every branch in them is on static values). tfds's
  own reader functions may still be converted."""
  from tensorflow.python.autograph.impl import api  # pylint: disable=import-outside-toplevel
  converted = []
  original = api.converted_call

  def spy(f, *args, **kwargs):
    converted.append(getattr(f, "__module__", None) or "")
    return original(f, *args, **kwargs)

  monkeypatch.setattr(api, "converted_call", spy)
  c = cfg(data_dir, cache=cache, **{**HEAVY_AUG, "randaugment_layers": 2})
  next(data.train_batches(c, global_batch_size=32, seed=0, process_index=0, process_count=1))
  next(data.eval_batches(c, global_batch_size=32, process_index=0, process_count=1))
  assert converted  # the spy sees what AutoGraph converts (tfds's readers)
  assert not [m for m in converted if m.startswith("vitnorm")], converted
