"""Input pipelines: tfds datasets -> normalized, augmented, per-process batches; offline datasets.

  config      config.data fields (DATA_CONFIG_FIELDS), defaults, validation
  pipeline    dataset_info, check_model_compatible, train_batches, eval_batches, num_eval_batches
  preprocess  inception crop, flip, random shift, normalization, random erasing, eval resize + crop
  randaugment timm-style RandAugment (rand-m9-mstd0.5-inc1) with stateless randomness
  mixup       Mixup / CutMix with label smoothing, per batch
  offline     'mnist5k' and 'digits' tfds builders (real images shipped by pip packages)
  device      shard_for_pmap, to_global_arrays, prefetch

Importing this package registers the offline builders with tfds.
"""
from vitnorm.data import offline  # registers 'mnist5k' and 'digits' with tfds
from vitnorm.data.config import (DATA_CONFIG_FIELDS, DataConfig, default_data_config,
                                 resolve_data_config)

# The pipeline imports TensorFlow: it is loaded on first use of one of its names, so that entry
# points (python -m vitnorm.data) can quiet TensorFlow's start-up output before it is imported.
_PIPELINE_NAMES = ("DatasetInfo", "check_model_compatible", "dataset_info", "eval_batches",
                   "eval_dataset", "num_eval_batches", "train_batches", "train_dataset")


def __getattr__(name):
  if name in _PIPELINE_NAMES:
    from vitnorm.data import pipeline  # pylint: disable=import-outside-toplevel
    return getattr(pipeline, name)
  raise AttributeError(f"module 'vitnorm.data' has no attribute {name!r}")

__all__ = [
    "DATA_CONFIG_FIELDS", "DataConfig", "DatasetInfo", "check_model_compatible", "dataset_info",
    "default_data_config", "eval_batches", "eval_dataset", "num_eval_batches", "offline",
    "resolve_data_config", "train_batches", "train_dataset",
]
