"""The BatchNorm knobs of config.model (bn_momentum, bn_include_cls, bn_group_size) reach a real ViT.

Each field is checked on a model built by `vit.build_model` from a `configs.common` model config:
the running statistics after one train-mode apply must equal, to float32 rounding, those computed
by hand from the norm's captured input with that field's value -- and differ from what the
default value would give, so a field that is dropped or hard-coded on its way to the norm fails.
"""
import jax
import numpy as np
import pytest

from configs import common
from vitnorm.model import vit

BATCH = 8


def model_config(**overrides):
  m = common.model_config(variant=None, norm="bn", ffn_norm="bn", num_classes=10, image_size=8,
                          num_channels=1)
  m.update(dict(hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2, patch_size=4))
  m.update(overrides)
  return m


def one_train_apply(cfg):
  """Running stats and the inputs of the block's two BatchNorms after one train-mode apply."""
  model = vit.build_model(cfg)
  variables = vit.init_variables(model, jax.random.key(0), (1, 8, 8, 1))
  # Images with a per-example offset and a bright first row: group and token statistics differ.
  images = np.asarray(jax.random.normal(jax.random.key(1), (BATCH, 8, 8, 1)))
  images = images + np.arange(BATCH)[:, None, None, None] * 0.5
  images[:, :4] += 3.0
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"],
                                            capture_intermediates=True)[1])
  out = apply(variables, images)
  block = out["intermediates"]["Transformer"]
  # Dropout is 0: the first norm sees the position-embedded tokens; the FFN norm ('pre_act') sees fc1.
  norm_input = np.asarray(block["posembed_input"]["__call__"][0], np.float64)
  ffn_input = np.asarray(block["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["__call__"][0], np.float64)
  stats = out["batch_stats"]["Transformer"]["encoderblock_0"]
  return ({"norm": stats["BatchNorm_0"], "ffn": stats["MlpBlock_0"]["BatchNorm_0"]},
          {"norm": norm_input, "ffn": ffn_input})


def expected_running_stats(x, *, momentum, include_cls, group_size):
  """ra = m * init + (1 - m) * batch stat; per group mean / biased variance, averaged over groups."""
  if not include_cls:
    x = x[:, 1:]
  g = group_size or x.shape[0]
  xg = x.reshape((x.shape[0] // g, g) + x.shape[1:])
  mean = xg.mean(axis=(1, 2))  # (groups, channels)
  var = np.square(xg - mean[:, None, None]).mean(axis=(1, 2))
  return (1 - momentum) * mean.mean(0), momentum * 1.0 + (1 - momentum) * var.mean(0)


DEFAULTS = dict(momentum=0.9, include_cls=True, group_size=None)


@pytest.mark.parametrize("field, value, key", [
    ("bn_momentum", 0.5, "momentum"),
    ("bn_include_cls", False, "include_cls"),
    ("bn_group_size", 2, "group_size"),
])
def test_each_bn_field_changes_the_running_stats_exactly_as_it_must(field, value, key):
  stats, inputs = one_train_apply(model_config(**{field: value}))
  chosen = dict(DEFAULTS, **{key: value})
  for name in ("norm", "ffn"):
    mean, var = expected_running_stats(inputs[name], **chosen)
    np.testing.assert_allclose(stats[name]["mean"], mean, rtol=2e-5, atol=1e-6, err_msg=f"{field} {name}")
    np.testing.assert_allclose(stats[name]["var"], var, rtol=2e-5, atol=1e-6, err_msg=f"{field} {name}")
    # The default value would have given clearly different statistics: the field matters. (Not
    # for ghost groups at the FFN norm: the block norm before it already centred every group.)
    if (field, name) == ("bn_group_size", "ffn"):
      continue
    d_mean, d_var = expected_running_stats(inputs[name], **DEFAULTS)
    gap = max(np.max(np.abs(d_mean - mean)), np.max(np.abs(d_var - var)))
    assert gap > 1e-3, (field, name, gap)


def test_all_three_fields_together_and_the_defaults():
  stats, inputs = one_train_apply(model_config(bn_momentum=0.7, bn_include_cls=False, bn_group_size=4))
  for name in ("norm", "ffn"):
    mean, var = expected_running_stats(inputs[name], momentum=0.7, include_cls=False, group_size=4)
    np.testing.assert_allclose(stats[name]["mean"], mean, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(stats[name]["var"], var, rtol=2e-5, atol=1e-6)
  stats, inputs = one_train_apply(model_config())
  mean, var = expected_running_stats(inputs["norm"], **DEFAULTS)
  np.testing.assert_allclose(stats["norm"]["mean"], mean, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(stats["norm"]["var"], var, rtol=2e-5, atol=1e-6)
