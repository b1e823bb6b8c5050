"""Input pipelines: datasets -> normalized, augmented, per-process batches; offline datasets.

  config      config.data fields (DATA_CONFIG_FIELDS), defaults, validation, DatasetInfo
  pipeline    tf.data over tfds datasets (imports TensorFlow): train_dataset, eval_dataset
  grain_feed  data.reader='grain': tfds ArrayRecord sources + Grain, one global order, no TensorFlow
  global_order  the global permutation per epoch and each process's rows of global batch k
  pil_preprocess  the Grain feed's host work: decode + crop (PIL)
  pil_randaugment timm's RandAugment on PIL images, for the Grain feed's host work
  device_augment  the Grain feed's per-batch work on the accelerator: flip, erasing, mix, normalize
  imagenet_like   a tfds dataset of JPEGs at ImageNet sizes (scikit-learn's photos), offline
  input_speed     python -m vitnorm.benchmark --mode input: host images/s of the train pipeline
  arrays      in-memory NumPy datasets ('*.npz', 'numpy:digits', 'numpy:mnist5k'), no TensorFlow
  preprocess  inception crop, flip, random shift, normalization, random erasing, eval resize + crop
  randaugment timm-style RandAugment (rand-m9-mstd0.5-inc1) with stateless randomness
  mixup       Mixup / CutMix with label smoothing, per batch
  offline     'mnist5k' and 'digits' tfds builders (real images shipped by pip packages)
  device      shard_for_pmap, to_global_arrays, prefetch
  export_npz  python -m vitnorm.data.export_npz: a dataset -> .npz for hosts without TensorFlow

dataset_info, check_model_compatible, train_batches, eval_batches and num_eval_batches dispatch on
data.name and data.reader: NumPy datasets go to `arrays`, reader='grain' to `grain_feed`, everything
else to `pipeline`. TensorFlow is imported
only when a tfds dataset is used, so hosts without it (a stock CUDA image) can import the trainer.
The tfds builders of `offline` are registered when the tfds pipeline is first used.
"""
import importlib

from vitnorm.data import arrays
from vitnorm.data.config import (DATA_CONFIG_FIELDS, DataConfig, DatasetInfo, default_data_config,
                                 resolve_data_config)
from vitnorm.errors import ConfigError

# The pipeline (and `offline`, the tfds builders it registers) import TensorFlow: they are loaded on
# first use, so that entry points can quiet TensorFlow's start-up output before it is imported and
# hosts without TensorFlow can use the NumPy datasets.
def _pipeline():
  return importlib.import_module("vitnorm.data.pipeline")


def _source(data_cfg):
  cfg = resolve_data_config(data_cfg)
  if arrays.is_array_source(cfg.name):
    if cfg.reader != "tf_data":
      raise ConfigError("data.reader", f"{cfg.reader!r} reads tfds ArrayRecord datasets; NumPy "
                        f"dataset {cfg.name!r} needs data.reader='tf_data' (the default)")
    if cfg.augment_on_device:
      raise ConfigError("data.augment_on_device", f"the NumPy feed ({cfg.name!r}) augments on the "
                        "host; leave it unset or False")
    return arrays
  if cfg.reader == "grain":  # TensorFlow-free: tfds ArrayRecord data sources + Grain
    return importlib.import_module("vitnorm.data.grain_feed")
  return _pipeline()


def dataset_info(data_cfg) -> DatasetInfo:
  """Name, classes, output image shape and split sizes; fast, never downloads (UserError instead)."""
  return _source(data_cfg).dataset_info(data_cfg)


def check_model_compatible(data_cfg, model_cfg, info=None):
  """Raises ConfigError naming both sides when image size, channels or classes do not match."""
  from vitnorm.data import config  # pylint: disable=import-outside-toplevel
  config.check_model_compatible(model_cfg, info or dataset_info(data_cfg))


def train_batches(data_cfg, **kwargs):
  """Infinite iterator of this process's part of each global training batch (see pipeline / arrays)."""
  return _source(data_cfg).train_batches(data_cfg, **kwargs)


def eval_batches(data_cfg, **kwargs):
  """One pass over this process's part of the eval split, padded (see pipeline / arrays)."""
  return _source(data_cfg).eval_batches(data_cfg, **kwargs)


def num_eval_batches(data_cfg, **kwargs) -> int:
  """Batches `eval_batches` yields (the same on every process)."""
  return _source(data_cfg).num_eval_batches(data_cfg, **kwargs)


def __getattr__(name):
  if name in ("train_dataset", "eval_dataset", "pipeline"):
    pipeline = _pipeline()
    return pipeline if name == "pipeline" else getattr(pipeline, name)
  if name == "offline":  # registers 'mnist5k' and 'digits' with tfds
    return importlib.import_module("vitnorm.data.offline")
  raise AttributeError(f"module 'vitnorm.data' has no attribute {name!r}")


__all__ = [
    "DATA_CONFIG_FIELDS", "DataConfig", "DatasetInfo", "arrays", "check_model_compatible",
    "dataset_info", "default_data_config", "eval_batches", "eval_dataset", "num_eval_batches",
    "offline", "resolve_data_config", "train_batches", "train_dataset",
]
