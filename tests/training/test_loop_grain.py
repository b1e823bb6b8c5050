"""The trainer on the Grain feed (data.reader='grain'): ArrayRecord JPEGs, host decode + crop, the
per-batch augmentation inside the compiled step; a preempted and resumed run ends bit-identical."""
import jax
import numpy as np
import pytest

from configs import common
from vitnorm.data import imagenet_like
from vitnorm.errors import ConfigError
from vitnorm import checkpoints
from vitnorm.training import loop


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  imagenet_like.prepare("tiny", root, file_format="array_record")
  return root


def grain_config(data_dir, **overrides):
  c = common.base_config()
  c.model = common.model_config(variant=None, norm="bn", ffn_norm="bn", num_classes=10, image_size=16)
  c.model.update(dict(hidden_size=32, num_layers=1, mlp_dim=64, num_heads=2, patch_size=8))
  c.data = common.data_config(name="imagenet_like/tiny", image_size=16)
  c.data.update(dict(data_dir=data_dir, reader="grain", eval_split="validation", hflip=True,
                     random_erasing_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                     randaugment_layers=2))
  c.batch_size = 16
  c.num_steps = 10
  c.optim.update(dict(base_lr=3e-3, lr_scaling_batch=None, warmup_steps=2))
  c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = 2, 10, 5, 0
  c.progress_bar = "off"
  c.async_checkpoints = False
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return c


def _params(workdir):
  variables, _ = checkpoints.restore_variables(workdir)
  return jax.tree.map(np.asarray, variables)


def test_grain_run_trains_evaluates_and_resumes_bit_identical(data_dir, tmp_path):
  whole = loop.train_and_evaluate(grain_config(data_dir), str(tmp_path / "whole"))
  assert whole["status"] == "completed" and whole["step"] == 10
  metrics = whole["metrics"]
  assert np.isfinite(metrics["eval/loss"]) and 0 <= metrics["eval/top1"] <= 1  # eval on 'validation'
  assert abs(metrics["train/loss"] - np.log(10)) < 1.0  # soft targets over the 10 classes
  first = loop.train_and_evaluate(grain_config(data_dir, **{"debug.preempt_at_step": 5}),
                                  str(tmp_path / "resumed"))
  assert first["status"] == "preempted" and first["step"] == 5
  second = loop.train_and_evaluate(grain_config(data_dir), str(tmp_path / "resumed"))
  assert second["status"] == "completed" and second["step"] == 10
  jax.tree.map(np.testing.assert_array_equal, _params(str(tmp_path / "resumed")),
               _params(str(tmp_path / "whole")))


def test_grain_with_pmap_is_refused(data_dir, tmp_path):
  with pytest.raises(ConfigError, match=r"parallelism: 'pmap' cannot .* set parallelism='jit'"):
    loop.train_and_evaluate(grain_config(data_dir, parallelism="pmap"), str(tmp_path / "pmap"))


def test_tf_data_feed_with_augment_on_device_trains(tmp_path):
  tfrecord_dir = str(tmp_path / "tfds")
  imagenet_like.prepare("tiny", tfrecord_dir)
  cfg = grain_config(tfrecord_dir, num_steps=4, eval_every=4, checkpoint_every=4,
                     **{"data.reader": "tf_data", "data.augment_on_device": True})
  summary = loop.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert summary["status"] == "completed" and summary["step"] == 4
  assert np.isfinite(summary["metrics"]["train/loss"]) and np.isfinite(summary["metrics"]["eval/loss"])
