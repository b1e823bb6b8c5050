"""The data config (`config.data`): fields, defaults and validation.

`resolve_data_config` turns a ConfigDict or dict into a frozen `DataConfig`, filling defaults and
raising `ConfigError('data.<field>', ...)` for every bad or unknown field before any data is read.
"""
import dataclasses
import math
import os
from typing import Mapping, Optional, Tuple

import ml_collections

from vitnorm.errors import ConfigError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATA_CONFIG_FIELDS = """Fields of `config.data` (default in brackets):

  name                 tfds dataset name, e.g. 'mnist5k', 'digits' (offline, bundled with pip packages),
                       'cifar10', 'cifar100', 'imagenet2012', 'imagenette', 'oxford_flowers102'. [required]
  data_dir             tfds data directory; None -> $TFDS_DATA_DIR or ~/tensorflow_datasets. [None]
  train_split          tfds split string for training, slices allowed ('train[:90%]'). ['train']
  eval_split           tfds split string for evaluation ('test', 'validation', 'train[90%:]'). ['test']
  image_size           side of the square images the pipeline outputs (train and eval). [224]
  channels             output channels: 1 or 3 converts gray<->RGB; None keeps the dataset's. [None]
  inception_crop       train: random resized crop (area in [crop_scale_min, 1], aspect 3/4..4/3),
                       bicubic; False: resize the shorter side to image_size and centre-crop. [True]
  crop_scale_min       smallest crop area fraction of the inception crop (DeiT 0.08; digits ~0.6). [0.08]
  hflip                train: random horizontal flip (turn off for digits). [True]
  random_shift_pad     train: pad by this many pixels (zeros) and randomly crop back, after the
                       resize; the CIFAR/MNIST 'random shift' augmentation; 0 = off. [0]
  randaugment_layers   train: RandAugment ops per image (timm 'rand-m9-mstd0.5-inc1'; DeiT 2); 0 = off. [0]
  randaugment_magnitude  RandAugment magnitude in [0, 10] (DeiT 9). [9.0]
  randaugment_magnitude_std  per-op Gaussian noise on the magnitude (DeiT 0.5). [0.5]
  random_erasing_prob  train: probability of erasing one random box with per-pixel normal noise,
                       after normalization (timm 'pixel' mode; DeiT 0.25). [0.0]
  normalize_mean       per-channel mean in [0, 1] pixel units, subtracted from every image;
                       one value per output channel (or a single value for all). [ImageNet mean]
  normalize_std        per-channel std in [0, 1] pixel units, divides every image. [ImageNet std]
  mixup_alpha          train: Beta(alpha, alpha) mixup of the batch with its reverse (DeiT 0.8); 0 = off. [0.0]
  cutmix_alpha         train: CutMix with Beta(alpha, alpha) box area (DeiT 1.0); 0 = off. [0.0]
  mixup_switch_prob    probability of CutMix instead of mixup when both are on (DeiT 0.5). [0.5]
  mixup_prob           probability that a batch is mixed at all (DeiT 1.0). [1.0]
  label_smoothing      train targets: 1 - s + s/K on the label, s/K elsewhere (DeiT 0.1). [0.0]
  eval_crop_fraction   eval: resize the shorter side to image_size / fraction, centre-crop
                       image_size (DeiT 0.875; 1.0 = plain resize, right for small images). [0.875]
  shuffle_buffer       train, streaming mode (cache=False): shuffle buffer in examples. [10000]
  cache                hold this process's decoded split in memory: exact per-epoch permutations and
                       O(1) resume; for datasets that fit in RAM (mnist5k, digits, cifar). [False]
  reader               'tf_data': tfds + tf.data, augmentations on the host; 'grain': tfds ArrayRecord
                       data source + Grain, one global order for every process count, the host
                       decodes, crops (and RandAugments), the accelerator does the rest. ['tf_data']
  grain_workers        reader='grain': Grain worker processes per host (0 = threads in the trainer's
                       process only). [0]
  augment_on_device    flip, normalization, random erasing, Mixup / CutMix and label smoothing run
                       on the accelerator inside the train step (vitnorm.data.device_augment) and
                       the host ships uint8 crops; None: True for reader='grain' (which requires
                       it), False for 'tf_data'. [None]
"""

DEFAULTS = dict(
    name=None,
    data_dir=None,
    train_split="train",
    eval_split="test",
    image_size=224,
    channels=None,
    inception_crop=True,
    crop_scale_min=0.08,
    hflip=True,
    random_shift_pad=0,
    randaugment_layers=0,
    randaugment_magnitude=9.0,
    randaugment_magnitude_std=0.5,
    random_erasing_prob=0.0,
    normalize_mean=IMAGENET_MEAN,
    normalize_std=IMAGENET_STD,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    mixup_switch_prob=0.5,
    mixup_prob=1.0,
    label_smoothing=0.0,
    eval_crop_fraction=0.875,
    shuffle_buffer=10_000,
    cache=False,
    reader="tf_data",
    grain_workers=0,
    augment_on_device=None,
)
READERS = ("tf_data", "grain")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """A validated `config.data`; see DATA_CONFIG_FIELDS for the meaning of each field."""
  name: str
  data_dir: Optional[str]
  train_split: str
  eval_split: str
  image_size: int
  channels: Optional[int]
  inception_crop: bool
  crop_scale_min: float
  hflip: bool
  random_shift_pad: int
  randaugment_layers: int
  randaugment_magnitude: float
  randaugment_magnitude_std: float
  random_erasing_prob: float
  normalize_mean: Tuple[float, ...]
  normalize_std: Tuple[float, ...]
  mixup_alpha: float
  cutmix_alpha: float
  mixup_switch_prob: float
  mixup_prob: float
  label_smoothing: float
  eval_crop_fraction: float
  shuffle_buffer: int
  cache: bool
  reader: str
  grain_workers: int
  augment_on_device: bool

  @property
  def mixing(self) -> bool:
    """Whether batches are mixed (mixup or CutMix) at all."""
    return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def default_data_config(**overrides) -> ml_collections.ConfigDict:
  """A ConfigDict with every field at its default, then `overrides` (unknown names raise)."""
  cfg = dict(DEFAULTS)
  for key, value in overrides.items():
    if key not in cfg:
      raise ConfigError(f"data.{key}", f"unknown field; known fields: {', '.join(DEFAULTS)}")
    cfg[key] = value
  return ml_collections.ConfigDict(cfg)


def _as_dict(cfg) -> dict:
  if isinstance(cfg, DataConfig):
    return dataclasses.asdict(cfg)
  if hasattr(cfg, "to_dict"):
    return cfg.to_dict()
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise ConfigError("data", f"must be a ConfigDict or dict, got {type(cfg).__name__}")


def _int(raw, key, *, minimum):
  value = raw[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
    raise ConfigError(f"data.{key}", f"must be an integer, got {value!r}")
  if value < minimum:
    raise ConfigError(f"data.{key}", f"must be >= {minimum}, got {value}")
  return int(value)


def _float(raw, key, *, low, high, low_open=False, high_open=False):
  value = raw[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(f"data.{key}", f"must be a number, got {value!r}")
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ConfigError(f"data.{key}", f"must be in {interval}, got {value}")
  return float(value)


def _bool(raw, key):
  value = raw[key]
  if not isinstance(value, bool):
    raise ConfigError(f"data.{key}", f"must be True or False, got {value!r}")
  return value


def _str(raw, key):
  value = raw[key]
  if not isinstance(value, str) or not value.strip():
    raise ConfigError(f"data.{key}", f"must be a non-empty string, got {value!r}")
  return value.strip()


def _floats(raw, key, *, positive):
  value = raw[key]
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    value = (value,)
  try:
    values = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f"data.{key}", f"must be a tuple of numbers, one per channel, got {value!r}") from None
  if not values or any(not math.isfinite(v) for v in values) or (positive and min(values) <= 0):
    raise ConfigError(f"data.{key}", f"must be a non-empty tuple of {'positive ' if positive else ''}"
                      f"numbers (in [0, 1] pixel units), got {value!r}")
  return values


def resolve_data_config(cfg) -> DataConfig:
  """Validates `config.data` (ConfigDict, dict or DataConfig) and returns a DataConfig."""
  given = _as_dict(cfg)
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"data.{unknown[0]}", f"unknown field; known fields: {', '.join(DEFAULTS)}")
  raw = {**DEFAULTS, **{k: v for k, v in given.items()
                        if v is not None or k in ("data_dir", "channels", "augment_on_device")}}
  if raw["name"] is None:
    raise ConfigError("data.name", "is not set; give a tfds dataset name such as 'mnist5k', 'digits', "
                      "'cifar10' or 'imagenet2012'")
  data_dir = raw["data_dir"]
  if data_dir is not None:
    if not isinstance(data_dir, (str, os.PathLike)) or not str(data_dir).strip():
      raise ConfigError("data.data_dir", f"must be a directory path or None, got {data_dir!r}")
    data_dir = os.path.expanduser(str(data_dir))
  channels = raw["channels"]
  if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
    raise ConfigError("data.channels", f"must be 1, 3 or None (keep the dataset's), got {channels!r}")
  out = DataConfig(
      name=_str(raw, "name"),
      data_dir=data_dir,
      train_split=_str(raw, "train_split"),
      eval_split=_str(raw, "eval_split"),
      image_size=_int(raw, "image_size", minimum=1),
      channels=None if channels is None else int(channels),
      inception_crop=_bool(raw, "inception_crop"),
      crop_scale_min=_float(raw, "crop_scale_min", low=0.0, high=1.0, low_open=True),
      hflip=_bool(raw, "hflip"),
      random_shift_pad=_int(raw, "random_shift_pad", minimum=0),
      randaugment_layers=_int(raw, "randaugment_layers", minimum=0),
      randaugment_magnitude=_float(raw, "randaugment_magnitude", low=0.0, high=10.0),
      randaugment_magnitude_std=_float(raw, "randaugment_magnitude_std", low=0.0, high=10.0),
      random_erasing_prob=_float(raw, "random_erasing_prob", low=0.0, high=1.0),
      normalize_mean=_floats(raw, "normalize_mean", positive=False),
      normalize_std=_floats(raw, "normalize_std", positive=True),
      mixup_alpha=_float(raw, "mixup_alpha", low=0.0, high=100.0),
      cutmix_alpha=_float(raw, "cutmix_alpha", low=0.0, high=100.0),
      mixup_switch_prob=_float(raw, "mixup_switch_prob", low=0.0, high=1.0),
      mixup_prob=_float(raw, "mixup_prob", low=0.0, high=1.0),
      label_smoothing=_float(raw, "label_smoothing", low=0.0, high=1.0, high_open=True),
      eval_crop_fraction=_float(raw, "eval_crop_fraction", low=0.0, high=1.0, low_open=True),
      shuffle_buffer=_int(raw, "shuffle_buffer", minimum=1),
      cache=_bool(raw, "cache"),
      reader=_str(raw, "reader"),
      grain_workers=_int(raw, "grain_workers", minimum=0),
      augment_on_device=(raw["reader"] == "grain" if raw["augment_on_device"] is None
                         else _bool(raw, "augment_on_device")),
  )
  if out.reader not in READERS:
    raise ConfigError("data.reader", f"must be one of {', '.join(READERS)}, got {out.reader!r}")
  if out.reader == "grain" and not out.augment_on_device:
    raise ConfigError("data.augment_on_device", "reader='grain' always augments on the device; "
                      "leave it unset (None) or True")
  return out


def check_normalization(cfg: DataConfig, channels: int):
  """Per-channel mean/std: returns (mean, std) tuples of length `channels` or raises ConfigError."""
  result = []
  for key in ("normalize_mean", "normalize_std"):
    values = getattr(cfg, key)
    if len(values) == 1:
      values = values * channels
    if len(values) != channels:
      hint = " (e.g. (0.5,) for MNIST-like digits)" if channels == 1 else ""
      raise ConfigError(f"data.{key}", f"has {len(values)} values but the images have {channels} "
                        f"channel(s); give one value per channel{hint}, or set data.channels")
    result.append(values)
  return tuple(result)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipeline produces for a data config."""
  name: str
  num_classes: int
  image_shape: Tuple[int, int, int]  # (H, W, C) of the images the pipeline outputs
  num_train_examples: int  # whole train split, all processes together
  num_eval_examples: int  # whole eval split, all processes together


def _model_field(model_cfg, key, default=None):
  try:
    value = model_cfg[key]
  except (KeyError, AttributeError):
    return default
  return default if value is None else value


def check_model_compatible(model_cfg, info: DatasetInfo):
  """Raises ConfigError naming both sides when image size, channels or classes do not match."""
  height, _, channels = info.image_shape
  checks = (
      ("image_size", height, _model_field(model_cfg, "image_size"),
       "set both to the same value (the pipeline resizes images to data.image_size)"),
      ("channels", channels, _model_field(model_cfg, "num_channels", 3),
       "set data.channels (gray<->RGB conversion) or model.num_channels to match"),
      ("num_classes", info.num_classes, _model_field(model_cfg, "num_classes"),
       f"dataset {info.name!r} has {info.num_classes} classes; set model.num_classes={info.num_classes}"),
  )
  for key, data_value, model_value, fix in checks:
    model_key = {"channels": "num_channels"}.get(key, key)
    if model_value is None:
      raise ConfigError(f"model.{model_key}", f"is not set; the data gives {key}={data_value}")
    if int(model_value) != data_value:
      data_side = f"data.{key}={data_value}" if key != "num_classes" else f"data ({info.name}) has num_classes={data_value}"
      raise ConfigError(f"model.{model_key}", f"{data_side} but model.{model_key}={model_value}: {fix}")


def process_slot(process_index=None, process_count=None):
  """(this process's index, the process count): the arguments, else JAX's (imported only then)."""
  import jax  # pylint: disable=import-outside-toplevel
  count = jax.process_count() if process_count is None else int(process_count)
  index = jax.process_index() if process_index is None else int(process_index)
  if not 0 <= index < count:
    raise UserError(f"process_index {index} is outside [0, {count})")
  return index, count


def local_batch_size(global_batch_size, process_count) -> int:
  """Each process's part of a global batch; a ConfigError when it does not split evenly."""
  if isinstance(global_batch_size, bool) or int(global_batch_size) != global_batch_size or global_batch_size <= 0:
    raise ConfigError("global_batch_size", f"must be a positive integer, got {global_batch_size!r}")
  if global_batch_size % process_count:
    raise ConfigError("global_batch_size", f"{global_batch_size} is not divisible by the "
                      f"{process_count} processes; use a multiple of {process_count}")
  return int(global_batch_size) // process_count
