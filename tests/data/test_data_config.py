"""config.data: defaults, documentation of every field, and one clear error per bad field."""
import ml_collections
import pytest

from vitnorm.data import config as config_lib
from vitnorm.errors import ConfigError


def test_defaults_and_plain_dict_are_accepted():
  cfg = config_lib.resolve_data_config({"name": "mnist5k"})
  assert cfg.image_size == 224 and cfg.train_split == "train" and cfg.eval_split == "test"
  assert cfg.normalize_mean == config_lib.IMAGENET_MEAN and not cfg.mixing
  cd = config_lib.default_data_config(name="cifar10", mixup_alpha=0.8)
  assert isinstance(cd, ml_collections.ConfigDict)
  resolved = config_lib.resolve_data_config(cd)
  assert resolved.mixup_alpha == 0.8 and resolved.mixing
  assert config_lib.resolve_data_config(resolved) == resolved


def test_every_field_is_documented():
  for field in config_lib.DEFAULTS:
    assert f"\n  {field} " in config_lib.DATA_CONFIG_FIELDS, field


def test_data_dir_expands_user(monkeypatch):
  monkeypatch.setenv("HOME", "/home/someone")
  assert config_lib.resolve_data_config({"name": "x", "data_dir": "~/tfds"}).data_dir == "/home/someone/tfds"


@pytest.mark.parametrize("field, value, words", [
    ("name", None, "is not set"),
    ("mixup_aplha", 0.8, "unknown field"),
    ("image_size", 0, ">= 1"),
    ("image_size", 3.5, "integer"),
    ("channels", 2, "1, 3 or None"),
    ("hflip", "yes", "True or False"),
    ("crop_scale_min", 0.0, "(0.0, 1.0]"),
    ("randaugment_magnitude", 11, "[0.0, 10.0]"),
    ("label_smoothing", 1.0, "[0.0, 1.0)"),
    ("normalize_std", (0.2, 0.0, 0.2), "positive"),
    ("normalize_mean", "abc", "numbers"),
    ("eval_crop_fraction", 1.5, "(0.0, 1.0]"),
    ("shuffle_buffer", 0, ">= 1"),
])
def test_bad_fields_raise_config_error_naming_the_field(field, value, words):
  raw = {"name": "mnist5k", field: value}
  with pytest.raises(ConfigError) as err:
    config_lib.resolve_data_config(raw)
  assert err.value.field == f"data.{field}"
  assert words in str(err.value)
  assert "\n" not in str(err.value)


def test_normalization_matches_channels():
  cfg = config_lib.resolve_data_config({"name": "x", "normalize_mean": (0.5,), "normalize_std": 0.25})
  assert config_lib.check_normalization(cfg, 3) == ((0.5,) * 3, (0.25,) * 3)
  imagenet = config_lib.resolve_data_config({"name": "x"})
  with pytest.raises(ConfigError, match=r"data.normalize_mean: has 3 values but the images have 1 channel"):
    config_lib.check_normalization(imagenet, 1)
