"""tf.data input pipelines over any tfds image-classification dataset.

Processes. A global batch of B is P local batches of b = B / P, one per process (process p holds
rows [p * b, (p + 1) * b) of it).

Determinism. Training batch k is a function of (seed, k, data config, dataset contents):
  * cache=True (small datasets, e.g. the quickstart's mnist5k): every process decodes the WHOLE
    split once into memory and derives the same global example stream: epoch e visits the split
    in the order `index_shuffle(i, key(seed, e))`, global batch k is stream positions
    [k * B, (k + 1) * B), and process p takes its slice of it. Batch k is therefore the same
    whatever the number of processes (1 process x 4 devices and 2 processes x 2 devices train on
    the same examples), and a run can resume on a different number of hosts. Position j of the
    stream is computed directly, so resuming at step N costs nothing.
  * cache=False (streaming, e.g. imagenet2012): process p reads only its part of the split,
    `tfds.even_splits(split, P)[p]` (disjoint, covering), in its fixed on-disk order (tfds
    shuffled the records when the dataset was prepared), shuffled per epoch through a buffer of
    `shuffle_buffer` examples seeded with key(seed, p, e). Batch k then depends on P as well.
    Resuming at step N starts at epoch e = N*b // n and skips the first N*b mod n records of it,
    undecoded: at most one epoch of record reading (for imagenet2012 on one host of 8, ~160k
    records, tens of seconds), no image decoding.
  * The augmentation of the example at stream position j uses the stateless seed key(seed, j)
    (j global with cache=True, per process otherwise); mixup/CutMix of batch k uses key(seed, k)
    and mixes global row i with global row B-1-i (cache=True: each process also builds the
    mirrored slice it needs, so mixing costs it twice the augmentation work; cache=False: the
    process's own batch is mixed with itself). tf.data runs in deterministic mode, so parallel
    maps cannot reorder anything.
So `train_batches(..., start_step=N)` yields exactly what an uninterrupted iterator yields from
its N-th batch on. With one process both modes yield exactly what they yielded before the global
order existed (the keys of process 0 are the global keys).

Evaluation. Each process pads its part to `num_eval_batches * b` examples with zero images of
mask 0, so every real example appears exactly once (mask 1) and all processes yield the same
number of full-size batches.

Missing data never triggers a download: a dataset that is not prepared in data_dir fails at once
with instructions (`tfds build ...` or the manual folder); only the offline builders (mnist5k,
digits), whose data ships inside installed packages, are prepared on first use.
"""

import difflib
import functools
import math
import os
from typing import Iterator, Optional, Tuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vitnorm.data import config as config_lib
from vitnorm.data import imagenet_like  # noqa: F401  registers the imagenet_like builder with tfds
from vitnorm.data import mixup as mixup_lib
from vitnorm.data import offline
from vitnorm.data import preprocess
from vitnorm.data.config import DatasetInfo
from vitnorm.errors import ConfigError, UserError

_INT64_MAX = np.iinfo(np.int64).max
# Salts that separate the random streams derived from one run seed.
_ORDER_SALT, _AUGMENT_SALT, _MIX_SALT = 1, 2, 3
# Decoded splits held in memory (cache=True), keyed by (data_dir, builder name, split).
_MEMORY_CACHE = {}
_MEMORY_CACHE_ENTRIES = 4


@functools.lru_cache(maxsize=None)
def _hide_gpus_from_tensorflow():
  """Data must never touch TensorFlow's GPU (JAX owns the accelerator)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # already initialized, or no such device type
    pass


def _is_mocked() -> bool:
  """True inside tfds.testing.mock_data (splits are unknown there and examples are generated)."""
  fn = tfds.core.dataset_builder.DatasetBuilder.download_and_prepare
  return getattr(fn, "__module__", "").startswith("tensorflow_datasets.testing")


def _unknown_dataset_error(name: str) -> UserError:
  try:
    known = tfds.list_builders(with_community_datasets=False)
  except Exception:  # pylint: disable=broad-except
    known = []
  close = difflib.get_close_matches(name.split("/")[0].split(":")[0], known, n=3)
  hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
  return ConfigError(
      "data.name", f"unknown dataset {name!r}.{hint} Valid names are tfds builder names: see "
      "https://www.tensorflow.org/datasets/catalog/overview or run `python -c \"import "
      "tensorflow_datasets as tfds; print(tfds.list_builders())\"`; offline datasets that need "
      f"no download: {', '.join(offline.OFFLINE_DATASETS)}.")


def _not_prepared_error(builder, cfg) -> UserError:
  root = os.path.dirname(os.path.dirname(builder.data_dir))
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    how = (f"it needs a manual download: put the files into {root}/downloads/manual (see "
           f"https://www.tensorflow.org/datasets/catalog/{builder.name}) and run `tfds build "
           f"{builder.name} --data_dir {root} --manual_dir {root}/downloads/manual`")
  else:
    how = (f"run `tfds build {builder.name} --data_dir {root}` on a machine with internet access "
           f"(then copy {root}/{builder.name} here)")
  where = "data_dir" if cfg.data_dir else "the default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  return ConfigError("data.data_dir", f"dataset {cfg.name!r} is not prepared in {where} {root} "
                     f"(no {builder.data_dir}); {how}, or point data.data_dir at a directory that "
                     "holds it. Nothing is downloaded automatically.")


def _builder(cfg: config_lib.DataConfig):
  """The tfds builder of `cfg.name`, prepared (offline builders) or checked to be prepared."""
  _hide_gpus_from_tensorflow()
  if cfg.name in offline.OFFLINE_DATASETS and not _is_mocked():
    return offline.prepare(cfg.name, cfg.data_dir)  # prepares on first use, without tfds' own output
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_dataset_error(cfg.name) from None
  except (AssertionError, ValueError) as e:  # e.g. an unknown version or config of a known dataset
    raise ConfigError("data.name", f"cannot load {cfg.name!r}: {' '.join(str(e).split())}") from None
  if _is_mocked() or builder.is_prepared():
    return builder
  if builder.name in offline.OFFLINE_DATASETS:
    return offline.prepare(cfg.name, cfg.data_dir)
  raise _not_prepared_error(builder, cfg)


def _keys(builder) -> Tuple[str, str]:
  keys = builder.info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  features = builder.info.features
  if "image" in features and "label" in features:
    return "image", "label"
  raise ConfigError("data.name", f"dataset {builder.name!r} is not an image-classification dataset "
                    "(no (image, label) supervised keys)")


def _num_classes(builder, label_key) -> int:
  feature = builder.info.features[label_key]
  if not hasattr(feature, "num_classes"):
    raise ConfigError("data.name", f"dataset {builder.name!r}: label {label_key!r} is not a ClassLabel")
  return int(feature.num_classes)


def _source_channels(builder, image_key) -> int:
  shape = builder.info.features[image_key].shape
  return int(shape[-1]) if shape and shape[-1] is not None else 3


def _read_config():
  return tfds.ReadConfig(try_autocache=False, add_tfds_id=False)


def _split_size(builder, split, field) -> int:
  """Examples in a split string or sub-split; counts them when tfds is mocked (splits unknown)."""
  if _is_mocked():
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=_read_config())
    cardinality = int(ds.cardinality())
    return cardinality if cardinality >= 0 else int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, AssertionError) as e:
    names = ", ".join(repr(s) for s in builder.info.splits)
    raise ConfigError(field, f"bad split {str(split)!r} for dataset {builder.name!r} "
                      f"({' '.join(str(e).split())}); its splits are {names}; slices like "
                      "'train[:90%]' are allowed") from None


def _process_part(split: str, process_index: int, process_count: int):
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]




def _as_written(fn):
  """fn for Dataset.map, traced as written, without AutoGraph: every Python branch of the
  preprocessing, RandAugment and mixing code is on static values (config fields, dtypes, static
  shapes; tensor branches use tf.cond), so converting their source would only cost start-up
  (~5 s of CPU in every process that builds a pipeline) and give the same graph."""
  return tf.autograph.experimental.do_not_convert(fn)


def _key(*values) -> tf.Tensor:
  """A stateless-RNG seed (shape [2], int64) from integers, by repeated fold-in."""
  key = tf.constant([values[0], 0x5EED], tf.int64)
  for v in values[1:]:
    key = tf.random.experimental.stateless_fold_in(key, tf.constant(v, tf.int64))
  return key


def _fold(key, value):
  return tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))


def _load_in_memory(builder, split, image_key, label_key):
  """(images, labels) tensors of a whole (sub-)split: uint8 [n, H, W, C] when every image has the
  same shape, else encoded bytes [n] (decoded per example later)."""
  cache_key = (builder.data_dir, builder.name, str(split))
  if cache_key in _MEMORY_CACHE and not _is_mocked():
    return _MEMORY_CACHE[cache_key]
  feature = builder.info.features[image_key]
  fixed_shape = bool(feature.shape) and all(d is not None for d in feature.shape)
  decoders = None if fixed_shape else {image_key: tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders, read_config=_read_config())
  ds = ds.map(_as_written(lambda ex: (ex[image_key], ex[label_key]))).batch(1024)
  images, labels = [], []
  for image, label in ds.as_numpy_iterator():
    images.append(image)
    labels.append(label)
  if not images:
    raise ConfigError("data.train_split", f"split {str(split)!r} of {builder.name!r} is empty for this process")
  result = (tf.constant(np.concatenate(images)), tf.constant(np.concatenate(labels).astype(np.int64)))
  if not _is_mocked():
    while len(_MEMORY_CACHE) >= _MEMORY_CACHE_ENTRIES:
      _MEMORY_CACHE.pop(next(iter(_MEMORY_CACHE)))
    _MEMORY_CACHE[cache_key] = result
  return result


def _stream(builder, split, image_key, label_key):
  """(encoded image, label) records of a (sub-)split in their fixed on-disk order, undecoded."""
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=_read_config(),
                          decoders={image_key: tfds.decode.SkipDecoding()})
  return ds.map(_as_written(lambda ex: (ex[image_key], ex[label_key])))


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return options


def _resolve(data_cfg):
  cfg = config_lib.resolve_data_config(data_cfg)
  builder = _builder(cfg)
  image_key, label_key = _keys(builder)
  channels = cfg.channels or _source_channels(builder, image_key)
  mean, std = config_lib.check_normalization(cfg, channels)
  for field in ("train_split", "eval_split"):
    split = getattr(cfg, field)
    if builder.name == "imagenet2012" and split.split("[")[0].strip() == "test":
      raise ConfigError(f"data.{field}", f"imagenet2012's {split!r} split has no labels (all -1 in "
                        "tfds); evaluate on 'validation' (or hold out part of 'train', e.g. "
                        "'train[99%:]')")
  if cfg.randaugment_layers and cfg.image_size < 3:
    raise ConfigError("data.randaugment_layers", f"RandAugment needs images of at least 3x3 pixels, "
                      f"data.image_size is {cfg.image_size}; set randaugment_layers=0")
  return cfg, builder, image_key, label_key, channels, mean, std


def dataset_info(data_cfg) -> DatasetInfo:
  """Name, classes, output image shape and split sizes; fast, never downloads (UserError instead)."""
  cfg, builder, image_key, label_key, channels, _, _ = _resolve(data_cfg)
  return DatasetInfo(
      name=cfg.name,
      num_classes=_num_classes(builder, label_key),
      image_shape=(cfg.image_size, cfg.image_size, channels),
      num_train_examples=_split_size(builder, cfg.train_split, "data.train_split"),
      num_eval_examples=_split_size(builder, cfg.eval_split, "data.eval_split"),
  )


def check_model_compatible(data_cfg, model_cfg, info: Optional[DatasetInfo] = None):
  """Raises ConfigError naming both sides when image size, channels or classes do not match."""
  config_lib.check_model_compatible(model_cfg, info or dataset_info(data_cfg))


def _global_order_slices(cfg, builder, image_key, label_key, train_fn, seed, p_index, p_count,
                         local_batch, start_step, augment_key, mixing):
  """cache=True: (this process's slices of the global batches, the mirrored slices mixup needs
  or None). Every process holds the whole split and the same global order."""
  images, labels = _load_in_memory(builder, cfg.train_split, image_key, label_key)
  n = int(labels.shape[0])
  order_key = _key(seed, 0, _ORDER_SALT)
  b, global_batch = local_batch, local_batch * p_count

  def example(position):  # global stream position -> (augmented image, label)
    epoch, i = position // n, position % n
    index = tf.random.experimental.index_shuffle(i, _fold(order_key, epoch), tf.constant(n - 1, tf.int64))
    return train_fn(tf.gather(images, index), _fold(augment_key, position)), tf.gather(labels, index)

  def slices(first_row):  # rows [first_row, first_row + b) of every global batch from start_step on
    local = tf.data.Dataset.range(start_step * b, _INT64_MAX)
    positions = local.map(_as_written(lambda i: (i // b) * global_batch + first_row + i % b))
    return positions.map(_as_written(example), num_parallel_calls=tf.data.AUTOTUNE).batch(b, drop_remainder=True)

  own = slices(p_index * b)
  partner = slices((p_count - 1 - p_index) * b) if mixing and p_count > 1 else None
  return own, partner


def _process_stream(cfg, builder, image_key, label_key, train_fn, seed, p_index, p_count, local_batch,
                    start_step, augment_key):
  """cache=False: batches of this process's part of the split, streamed from disk."""
  part = _process_part(cfg.train_split, p_index, p_count)
  n = _split_size(builder, part, "data.train_split")
  if n == 0:
    raise ConfigError("data.train_split", f"{cfg.train_split!r} leaves no examples for process {p_index} "
                      f"of {p_count}; use a larger split")
  order_key = _key(seed, p_index, _ORDER_SALT)
  start = start_step * local_batch
  records = _stream(builder, part, image_key, label_key)
  buffer = min(cfg.shuffle_buffer, n)

  def epoch_records(epoch):
    epoch_seed = tf.random.stateless_uniform([], _fold(order_key, epoch), minval=None, maxval=None,
                                             dtype=tf.int64)
    return records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(start // n, _INT64_MAX).flat_map(_as_written(epoch_records)).skip(start % n)
  ds = tf.data.Dataset.zip((ds, tf.data.Dataset.range(start, _INT64_MAX)))
  ds = ds.map(_as_written(lambda record, position: (train_fn(record[0], _fold(augment_key, position)),
                                                    record[1])),
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(local_batch, drop_remainder=True)


def train_dataset(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  num_classes: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> tf.data.Dataset:
  """The infinite tf.data.Dataset behind `train_batches` (dicts of `image`, `label` tensors)."""
  cfg, builder, image_key, label_key, channels, mean, std = _resolve(data_cfg)
  p_index, p_count = config_lib.process_slot(process_index, process_count)
  local_batch = config_lib.local_batch_size(global_batch_size, p_count)
  if isinstance(start_step, bool) or int(start_step) != start_step or start_step < 0:
    raise UserError(f"start_step must be a non-negative integer, got {start_step!r}")
  dataset_classes = _num_classes(builder, label_key)
  num_classes = dataset_classes if num_classes is None else int(num_classes)
  if num_classes < dataset_classes:
    raise ConfigError("model.num_classes", f"{num_classes} is smaller than the {dataset_classes} "
                      f"classes of dataset {cfg.name!r}; set it to {dataset_classes}")
  seed = int(seed)
  train_fn = preprocess.TrainPreprocess(cfg, channels, mean, std)
  # Process 0's keys are the global keys: one process yields what it always yielded.
  augment_key = _key(seed, 0 if cfg.cache else p_index, _AUGMENT_SALT)
  mix_key = _key(seed, 0 if cfg.cache else p_index, _MIX_SALT)
  # With augment_on_device the batch is mixed on the accelerator, on the global batch.
  mixing = cfg.mixing and not cfg.augment_on_device
  if cfg.cache:
    ds, partner = _global_order_slices(cfg, builder, image_key, label_key, train_fn, seed, p_index,
                                       p_count, local_batch, int(start_step), augment_key, mixing)
  else:
    ds, partner = _process_stream(cfg, builder, image_key, label_key, train_fn, seed, p_index, p_count,
                                  local_batch, int(start_step), augment_key), None
  if partner is not None:  # global row B-1-i of process p's row i lives in process P-1-p's slice
    ds = tf.data.Dataset.zip((ds, partner))
  ds = tf.data.Dataset.zip((ds, tf.data.Dataset.range(int(start_step), _INT64_MAX)))

  def mix(batch, step):
    if cfg.augment_on_device:  # uint8 crops and int labels: vitnorm.data.device_augment does the rest
      (images, labels) = batch
      return {"image": images, "label": tf.cast(labels, tf.int32)}
    if partner is not None:
      (images, labels), (mirror_images, mirror_labels) = batch
      mirror = dict(mirror_images=tf.reverse(mirror_images, [0]), mirror_labels=tf.reverse(mirror_labels, [0]))
    else:
      (images, labels), mirror = batch, {}
    images, targets = mixup_lib.mix_batch(
        images, labels, _fold(mix_key, step), num_classes=num_classes,
        mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
        switch_prob=cfg.mixup_switch_prob, mix_prob=cfg.mixup_prob, smoothing=cfg.label_smoothing,
        **mirror)
    return {"image": images, "label": targets}

  ds = ds.map(_as_written(mix), num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def train_batches(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  num_classes: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """Infinite iterator of this process's part of each global training batch, as numpy:
  `image` float32 [b, H, W, C] normalized, `label` float32 [b, num_classes] soft targets (rows
  sum to 1), b = global_batch_size / process_count. With data.augment_on_device: `image` uint8
  crops and `label` int32 (the train step augments, vitnorm.data.device_augment). Batch k depends only on (seed, k, config):
  start_step=N yields what an uninterrupted iterator yields from its N-th batch on.
  process_index / process_count default to JAX's (override only to simulate processes)."""
  ds = train_dataset(data_cfg, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
                     num_classes=num_classes, process_index=process_index, process_count=process_count)
  return ds.as_numpy_iterator()


def _eval_plan(data_cfg, global_batch_size, process_index, process_count):
  cfg, builder, image_key, label_key, channels, mean, std = _resolve(data_cfg)
  p_index, p_count = config_lib.process_slot(process_index, process_count)
  local_batch = config_lib.local_batch_size(global_batch_size, p_count)
  sizes = [_split_size(builder, _process_part(cfg.eval_split, p, p_count), "data.eval_split")
           for p in range(p_count)]
  num_batches = math.ceil(max(sizes) / local_batch)
  return cfg, builder, image_key, label_key, channels, mean, std, p_index, p_count, local_batch, sizes, num_batches


def num_eval_batches(data_cfg, *, global_batch_size: int, process_count: Optional[int] = None) -> int:
  """Batches `eval_batches` yields (the same on every process)."""
  return _eval_plan(data_cfg, global_batch_size, 0, process_count)[-1]


def eval_dataset(data_cfg, *, global_batch_size: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> tf.data.Dataset:
  """The finite tf.data.Dataset behind `eval_batches`."""
  (cfg, builder, image_key, label_key, channels, mean, std, p_index, p_count, local_batch, sizes,
   num_batches) = _eval_plan(data_cfg, global_batch_size, process_index, process_count)
  part = _process_part(cfg.eval_split, p_index, p_count)
  pad = {"image": tf.zeros([cfg.image_size, cfg.image_size, channels], tf.float32),
         "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0)}
  padding = tf.data.Dataset.from_tensors(pad).repeat(num_batches * local_batch - sizes[p_index])
  if sizes[p_index] == 0:  # a split smaller than the process count: this process only pads
    ds = padding
  else:
    if cfg.cache:
      ds = tf.data.Dataset.from_tensor_slices(_load_in_memory(builder, part, image_key, label_key))
    else:
      ds = _stream(builder, part, image_key, label_key)
    eval_fn = preprocess.EvalPreprocess(cfg, channels, mean, std)
    ds = ds.map(_as_written(lambda image, label: {"image": eval_fn(image), "label": tf.cast(label, tf.int32),
                                                  "mask": tf.constant(1.0)}),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.concatenate(padding)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_batches(data_cfg, *, global_batch_size: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Iterator[dict]:
  """One pass over this process's part of the eval split, as numpy: `image` float32
  [b, H, W, C], `label` int32 [b], `mask` float32 [b] (1 real, 0 padding). Every batch is full
  (the last padded); over all processes every example appears exactly once; every process yields
  `num_eval_batches` batches."""
  ds = eval_dataset(data_cfg, global_batch_size=global_batch_size, process_index=process_index,
                    process_count=process_count)
  return ds.as_numpy_iterator()
