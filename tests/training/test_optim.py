"""Optimizer pieces: schedule values, lr scaling, weight-decay mask, clipping, EMA, validation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from vitnorm.model import vit
from vitnorm.training import optim
from vitnorm.errors import ConfigError


def optim_cfg(**overrides):
  c = common.optim_config()
  c.update(overrides)
  return c


def test_peak_lr_scales_with_batch_like_deit():
  assert optim.peak_learning_rate(optim_cfg(base_lr=5e-4, lr_scaling_batch=512), 1024) == pytest.approx(1e-3)
  assert optim.peak_learning_rate(optim_cfg(base_lr=5e-4, lr_scaling_batch=None), 1024) == pytest.approx(5e-4)


def test_warmup_then_cosine_values():
  s = optim.learning_rate_schedule(optim_cfg(base_lr=1e-3, lr_scaling_batch=None, min_lr=1e-5),
                                   global_batch_size=64, num_steps=110, warmup_steps=10)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(5e-4)
  assert float(s(10)) == pytest.approx(1e-3)
  midway = 1e-5 + 0.5 * (1e-3 - 1e-5)  # cosine half-way through the decay
  assert float(s(60)) == pytest.approx(midway, rel=1e-5)
  assert float(s(110)) == pytest.approx(1e-5)


def test_weight_decay_only_on_kernels():
  cfg = dict(variant=None, hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2, patch_size=4,
             num_classes=3, image_size=8, num_channels=1, norm="batch", ffn_norm="batch")
  model = vit.build_model(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False))["params"]
  mask = optim.weight_decay_mask(params)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v
          for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["embedding/kernel"] and flat["head/kernel"]
  assert flat["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"]
  assert flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  for name in ("cls", "Transformer/posembed_input/pos_embedding", "head/bias", "embedding/bias",
               "Transformer/encoderblock_0/BatchNorm_0/scale", "Transformer/encoderblock_0/BatchNorm_0/bias",
               "Transformer/encoderblock_0/MlpBlock_0/BatchNorm_0/scale", "Transformer/encoder_norm/bias"):
    assert not flat[name], name


def test_decay_applied_to_kernel_not_to_bias():
  # Zero gradients: AdamW's only change is the decoupled decay lr * wd * param on kernels.
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  tx = optim.make_optimizer(optim_cfg(weight_decay=0.5, grad_clip_norm=None), lambda step: 0.1)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.05 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["dense"]["bias"], np.zeros(2), atol=1e-12)


def test_clipping_bounds_the_global_norm():
  params = {"w": jnp.zeros((4,))}
  grads = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50
  clip_only = optax.clip_by_global_norm(1.0)
  clipped, _ = clip_only.update(grads, clip_only.init(params))
  assert float(optim.global_norm(clipped)) == pytest.approx(1.0)
  # The configured chain clips first: Adam's first step is then -lr * sign-ish of the clipped grad.
  tx = optim.make_optimizer(optim_cfg(weight_decay=0.0, grad_clip_norm=1.0), lambda step: 1.0)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["w"][:2], [-1.0, -1.0], rtol=1e-4)


def test_ema_update():
  ema = optim.ema_update({"a": jnp.array([1.0])}, {"a": jnp.array([3.0])}, 0.75)
  np.testing.assert_allclose(ema["a"], [1.5])


def test_global_norm():
  assert float(optim.global_norm({"a": jnp.array([3.0]), "b": jnp.array([[4.0]])})) == pytest.approx(5.0)


@pytest.mark.parametrize("field, value", [("base_lr", 0.0), ("b2", 1.0), ("weight_decay", -0.1),
                                          ("grad_clip_norm", 0.0), ("ema_decay", 1.0),
                                          ("lr_scaling_batch", 0), ("eps", -1.0)])
def test_validation_names_the_field(field, value):
  cfg = optim_cfg()
  cfg[field] = value
  with pytest.raises(ConfigError, match=f"^optim.{field}:"):
    optim.validate(cfg)


def test_defaults_are_valid():
  optim.validate(common.optim_config())
  optim.validate(ml_collections.ConfigDict(common.optim_config().to_dict()))
