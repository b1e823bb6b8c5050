"""The Grain feed (`data.reader='grain'`): tfds ArrayRecord data sources, random access, one global
order, no TensorFlow at run time.

Datasets are prepared once as ArrayRecord (`tfds build NAME --file_format=array_record`, or
`builder.download_and_prepare(file_format='array_record')`); `tfds.data_source` then reads any
record by index. Every process derives the same global order (vitnorm.data.global_order) and
reads its own rows of each global batch: batch k is a function of (seed, k) for every process
count, and `start_step=k` starts at batch k directly.

Grain's own IndexSampler shards the records before shuffling (the order then depends on the
process count) and checkpoints its iterator per process; neither is used. Instead a Grain
`MapDataset` over this process's local stream positions maps each position to (global position
-> record index -> decoded, cropped example), batches b consecutive positions (= this process's
slice of one global batch) and runs through Grain's threaded prefetch (and worker processes with
`data.grain_workers`). Since every element is a pure function of its index, threads and workers
cannot change the result.

Train batches: {'image': uint8 [b, S, S, C], 'label': int32 [b]}: decode + crop (+ RandAugment)
on the host (vitnorm.data.pil_preprocess); flip, random erasing, normalization, Mixup / CutMix and label
smoothing run on the accelerator (vitnorm.data.device_augment). Eval batches are what every feed's
eval batches are (normalized float32 images, int labels, mask): evaluation is rare, so the host
normalizes them.
"""
import math
from typing import Iterator, Optional

import numpy as np

from vitnorm.data import config as config_lib
from vitnorm.data import global_order
from vitnorm.data import pil_preprocess
from vitnorm.errors import ConfigError, UserError

_END = 1 << 50  # local stream positions are unbounded in practice
READ_THREADS = 16  # Grain's default reader threads per process (or per worker)


def _builder(cfg):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from vitnorm.data import imagenet_like, offline  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError("data.name", f"unknown tfds dataset {cfg.name!r}") from None
  except (AssertionError, ValueError) as e:
    raise ConfigError("data.name", f"cannot load {cfg.name!r}: {' '.join(str(e).split())}") from None
  root = cfg.data_dir or "~/tensorflow_datasets"
  how = (f"`tfds build {builder.name} --data_dir {root} --file_format=array_record` (ImageNet: add "
         "--manual_dir DIR with the downloaded tars)")
  if not builder.is_prepared():
    raise ConfigError("data.data_dir", f"dataset {cfg.name!r} is not prepared in {root}; data.reader="
                      f"'grain' reads ArrayRecord files: run {how}. Nothing is downloaded automatically.")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format != "array_record":
    raise ConfigError("data.reader", f"'grain' needs random access, but {cfg.name!r} in {root} is "
                      f"prepared as {file_format}; prepare it again as ArrayRecord with {how} into "
                      "another data_dir, or use data.reader='tf_data'")
  return builder


def _resolve(data_cfg):
  cfg = config_lib.resolve_data_config(data_cfg)
  builder = _builder(cfg)
  keys = builder.info.supervised_keys
  image_key, label_key = keys if isinstance(keys, tuple) and len(keys) == 2 else ("image", "label")
  shape = builder.info.features[image_key].shape
  channels = cfg.channels or (int(shape[-1]) if shape and shape[-1] else 3)
  config_lib.check_normalization(cfg, channels)
  return cfg, builder, image_key, label_key, channels


def _source(cfg, split, image_key, field):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    return tfds.data_source(cfg.name, split=split, data_dir=cfg.data_dir, download=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
  except (KeyError, ValueError, AssertionError) as e:
    raise ConfigError(field, f"bad split {split!r} for {cfg.name!r}: {' '.join(str(e).split())}") from None


def dataset_info(data_cfg) -> config_lib.DatasetInfo:
  """Name, classes, output image shape and split sizes (reads only metadata)."""
  cfg, builder, image_key, label_key, channels = _resolve(data_cfg)
  return config_lib.DatasetInfo(
      name=cfg.name, num_classes=int(builder.info.features[label_key].num_classes),
      image_shape=(cfg.image_size, cfg.image_size, channels),
      num_train_examples=len(_source(cfg, cfg.train_split, image_key, "data.train_split")),
      num_eval_examples=len(_source(cfg, cfg.eval_split, image_key, "data.eval_split")))


class _TrainExample:
  """Local stream position -> (uint8 crop, label) of this process; picklable for Grain workers."""

  def __init__(self, source, cfg, channels, seed, image_key, label_key, p_index, p_count, local_batch):
    self.source, self.cfg, self.channels, self.seed = source, cfg, channels, seed
    self.image_key, self.label_key = image_key, label_key
    self.p_index, self.p_count, self.local_batch = p_index, p_count, local_batch
    self.n = len(source)
    mean, _ = config_lib.check_normalization(cfg, channels)
    self.fill = tuple(min(max(round(255.0 * m), 0), 255) for m in mean)  # RandAugment's, as timm

  def __call__(self, local_position):
    position = global_order.global_position(local_position, self.p_index, self.p_count, self.local_batch)
    record = self.source[global_order.record_index(self.seed, position, self.n)]
    rng = global_order.example_rng(self.seed, position)
    image = pil_preprocess.train_crop(record[self.image_key], rng, self.cfg, self.channels, self.fill)
    return {"image": image, "label": np.int32(record[self.label_key])}


def train_batches(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  num_classes: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, read_threads: int = READ_THREADS) -> Iterator[dict]:
  """Infinite iterator of this process's rows of global batches start_step, start_step + 1, ...:
  `image` uint8 [b, S, S, C] (decoded, cropped), `label` int32 [b]; b = global / process count."""
  import grain  # pylint: disable=import-outside-toplevel
  del num_classes  # targets are built on the accelerator (vitnorm.data.device_augment)
  cfg, _, image_key, label_key, channels = _resolve(data_cfg)
  p_index, p_count = config_lib.process_slot(process_index, process_count)
  local_batch = config_lib.local_batch_size(global_batch_size, p_count)
  if isinstance(start_step, bool) or int(start_step) != start_step or start_step < 0:
    raise UserError(f"start_step must be a non-negative integer, got {start_step!r}")
  source = _source(cfg, cfg.train_split, image_key, "data.train_split")
  if len(source) == 0:
    raise ConfigError("data.train_split", f"split {cfg.train_split!r} of {cfg.name!r} is empty")
  example = _TrainExample(source, cfg, channels, int(seed), image_key, label_key, p_index, p_count,
                          local_batch)
  ds = grain.MapDataset.range(int(start_step) * local_batch, _END).map(example)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(2 * local_batch, 64)))
  if cfg.grain_workers:
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (the CLIs have parsed them)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.grain_workers))
  return iter(ds)


def _eval_parts(n, p_count):
  return [(p * n // p_count, (p + 1) * n // p_count) for p in range(p_count)]


def num_eval_batches(data_cfg, *, global_batch_size: int, process_count: Optional[int] = None) -> int:
  """Batches `eval_batches` yields (the same on every process)."""
  cfg, _, image_key, _, _ = _resolve(data_cfg)
  _, p_count = config_lib.process_slot(0, process_count)
  local_batch = config_lib.local_batch_size(global_batch_size, p_count)
  n = len(_source(cfg, cfg.eval_split, image_key, "data.eval_split"))
  return math.ceil(max(e - s for s, e in _eval_parts(n, p_count)) / local_batch)


def eval_batches(data_cfg, *, global_batch_size: int, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Iterator[dict]:
  """One pass over this process's contiguous part of the eval split: `image` float32 [b, S, S, C]
  normalized, `label` int32 [b], `mask` float32 [b] (0 for padding, with zero images); every
  example once over all processes."""
  cfg, _, image_key, label_key, channels = _resolve(data_cfg)
  mean, std = (np.asarray(v, np.float32) for v in config_lib.check_normalization(cfg, channels))
  p_index, p_count = config_lib.process_slot(process_index, process_count)
  local_batch = config_lib.local_batch_size(global_batch_size, p_count)
  source = _source(cfg, cfg.eval_split, image_key, "data.eval_split")
  start, stop = _eval_parts(len(source), p_count)[p_index]
  batches = num_eval_batches(data_cfg, global_batch_size=global_batch_size, process_count=p_count)
  shape = (cfg.image_size, cfg.image_size, channels)
  for k in range(batches):
    indices = range(start + k * local_batch, min(start + (k + 1) * local_batch, stop))
    images = np.zeros((local_batch,) + shape, np.float32)
    labels = np.zeros((local_batch,), np.int32)
    mask = np.zeros((local_batch,), np.float32)
    for row, index in enumerate(indices):
      record = source[index]
      crop = pil_preprocess.eval_crop(record[image_key], cfg, channels)
      images[row] = (crop.astype(np.float32) / 255.0 - mean) / std
      labels[row], mask[row] = record[label_key], 1.0
    yield {"image": images, "label": labels, "mask": mask}
