"""The NumPy feed (vitnorm.data.arrays, no TensorFlow): same data as the tfds 'digits' builder,
batch k a function of (seed, k) whatever the process count, exact resume, eval covers every
example once, export_npz round trip and one-line errors."""
import collections

import numpy as np
import pytest

import vitnorm.data as data
from vitnorm.data import arrays, export_npz
from vitnorm.errors import ConfigError

RAW = dict(normalize_mean=(0.0,), normalize_std=(1.0 / 255.0,), inception_crop=False, hflip=False)


def cfg(name=arrays.DIGITS, **kw):
  return dict(name=name, image_size=8, **{**RAW, **kw})


def test_digits_are_scikit_learns_read_without_importing_it():
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  images, labels = arrays.load_digits_arrays()
  reference = load_digits()
  np.testing.assert_array_equal(images[..., 0], np.round(reference.images * (255.0 / 16.0)).astype(np.uint8))
  np.testing.assert_array_equal(labels, reference.target)
  assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1) and labels.dtype == np.int64
  # Reading them imports no scikit-learn (~2 s of start-up in every process that trains on them).
  probe = ("import sys; from vitnorm.data import arrays; arrays.load_digits_arrays(); "
           "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_digits_match_the_offline_split():
  info = data.dataset_info(cfg())
  assert info == data.DatasetInfo(arrays.DIGITS, 10, (8, 8, 1), 1437, 360)
  split = arrays.split_arrays("digits")
  (whole,) = list(data.eval_batches(cfg(), global_batch_size=360, process_index=0, process_count=1))
  np.testing.assert_array_equal(np.round(whole["image"]).astype(np.uint8), split["test_images"])
  np.testing.assert_array_equal(whole["label"], split["test_labels"])


def test_batches_do_not_depend_on_the_process_count_and_resume_exactly():
  c = cfg(hflip=True, random_shift_pad=1, label_smoothing=0.1)
  kw = dict(global_batch_size=48, seed=5, start_step=29)  # steps 29-31 cross epoch 0's end
  whole = [b for _, b in zip(range(3), data.train_batches(c, process_index=0, process_count=1, **kw))]
  for count in (2, 3):
    parts = [[b for _, b in zip(range(3), data.train_batches(c, process_index=p, process_count=count, **kw))]
             for p in range(count)]
    for k in range(3):
      for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([part[k][key] for part in parts]), whole[k][key])
  from_start = [b for _, b in zip(range(32), data.train_batches(c, global_batch_size=48, seed=5,
                                                                 process_index=0, process_count=1))]
  for a, b in zip(from_start[29:], whole):
    np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_allclose(whole[0]["label"].sum(1), 1.0, rtol=1e-6)
  # One epoch of the plain stream is a permutation of the train split.
  stream = [b for _, b in zip(range(30), data.train_batches(cfg(), global_batch_size=48, seed=1,
                                                             process_index=0, process_count=1))]
  images = np.round(np.concatenate([b["image"] for b in stream])[:1437]).astype(np.uint8)
  split = arrays.split_arrays("digits")
  assert collections.Counter(map(bytes, images)) == collections.Counter(map(bytes, split["train_images"]))


def test_eval_parts_cover_every_example_once():
  rows = []
  for p in range(3):
    batches = list(data.eval_batches(cfg(), global_batch_size=48, process_index=p, process_count=3))
    assert len(batches) == data.num_eval_batches(cfg(), global_batch_size=48, process_count=3) == 8
    rows += [bytes(np.round(b["image"][i]).astype(np.uint8)) for b in batches for i in np.flatnonzero(b["mask"])]
  assert len(rows) == 360
  assert collections.Counter(rows) == collections.Counter(map(bytes, arrays.split_arrays("digits")["test_images"]))


def test_export_npz_round_trip_and_errors(tmp_path, capsys):
  out = str(tmp_path / "digits.npz")
  export_npz.main(["--name", "digits", "--out", out])
  assert "train 1437, test 360" in capsys.readouterr().out
  a = next(data.train_batches(cfg(out), global_batch_size=16, seed=0, process_index=0, process_count=1))
  b = next(data.train_batches(cfg(), global_batch_size=16, seed=0, process_index=0, process_count=1))
  np.testing.assert_array_equal(a["image"], b["image"])
  for argv, message in ((["--name", "cifar", "--out", out], "error: --name: unknown dataset"),
                        (["--name", "digits", "--out", str(tmp_path / "x.zip")], "error: --out:")):
    with pytest.raises(SystemExit) as e:
      export_npz.main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.startswith(message)
  with pytest.raises(ConfigError, match="data.name: no such .npz file"):
    data.dataset_info(cfg(str(tmp_path / "missing.npz")))
  with pytest.raises(ConfigError, match="data.image_size: is 28"):
    data.dataset_info(dict(cfg(), image_size=28))
  with pytest.raises(ConfigError, match="data.inception_crop: is not supported"):
    data.dataset_info(dict(cfg(), inception_crop=True))
