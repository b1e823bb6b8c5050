"""Tests for vitnorm.model.pretrained: reference / AugReg .npz checkpoints load into the LN ViT."""
import flax
import jax
import numpy as np
import pytest

from vitnorm.model import pretrained, vit
from vitnorm.errors import UserError

CFG = dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=4, patch_size=4, num_classes=10, image_size=16)


def _model_and_params(seed=0, **overrides):
  cfg = dict(CFG, **overrides)
  model = vit.build_model(cfg)
  params = vit.init_variables(model, jax.random.key(seed), vit.input_shape(cfg))["params"]
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(seed + 1), p.shape), params)
  return model, params


def _to_pre_linen(params):
  renames = {v: k for k, v in pretrained._PRE_LINEN_RENAMES.items()}
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  out = {}
  for key, value in flat.items():
    parts = key.split("/")
    if len(parts) > 2 and parts[1].startswith("encoderblock_"):
      parts[2] = renames.get(parts[2], parts[2])
    out["/".join(parts)] = value
  return out


@pytest.mark.parametrize("numbering", ["linen", "pre_linen"])
def test_reference_checkpoint_round_trips_exactly(tmp_path, numbering):
  model, params = _model_and_params()
  path = str(tmp_path / "ckpt.npz")
  if numbering == "linen":
    pretrained.save_npz(path, params)
  else:
    flat = _to_pre_linen(jax.device_get(params))
    assert any("MlpBlock_3" in k for k in flat) and any("LayerNorm_2" in k for k in flat)
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})
  loaded = pretrained.load_npz(path)
  init = vit.init_variables(model, jax.random.key(7), vit.input_shape(CFG))["params"]
  restored = pretrained.adapt_to_model(loaded, init, num_cls_tokens=1)
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(params))
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  np.testing.assert_array_equal(model.apply({"params": restored}, x, train=False),
                                model.apply({"params": params}, x, train=False))


def test_new_class_count_gets_a_fresh_head_and_new_image_size_resizes_position_embeddings(tmp_path):
  _, params = _model_and_params()
  path = str(tmp_path / "ckpt.npz")
  pretrained.save_npz(path, params)
  model = vit.build_model(dict(CFG, num_classes=3, image_size=24))
  init = vit.init_variables(model, jax.random.key(7), (1, 24, 24, 3))["params"]
  restored = pretrained.adapt_to_model(pretrained.load_npz(path), init, num_cls_tokens=1)
  np.testing.assert_array_equal(restored["head"]["kernel"], init["head"]["kernel"])
  np.testing.assert_array_equal(restored["embedding"]["kernel"], params["embedding"]["kernel"])
  pe_old = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  pe_new = restored["Transformer"]["posembed_input"]["pos_embedding"]
  assert pe_new.shape == (1, 1 + 36, 32)
  np.testing.assert_array_equal(pe_new[:, 0], pe_old[:, 0])  # the CLS embedding is kept
  # Bilinear resizing keeps the corners of the patch grid.
  np.testing.assert_allclose(pe_new[0, 1], pe_old[0, 1], rtol=1e-5)
  np.testing.assert_allclose(pe_new[0, -1], pe_old[0, -1], rtol=1e-5)
  assert np.all(np.isfinite(model.apply({"params": restored}, np.zeros((1, 24, 24, 3)), train=False)))


def test_mismatching_checkpoints_are_clear_user_errors(tmp_path):
  _, params = _model_and_params()
  path = str(tmp_path / "ckpt.npz")
  pretrained.save_npz(path, params)
  loaded = pretrained.load_npz(path)
  bn_model = vit.build_model(dict(CFG, norm="batch"))
  bn_init = vit.init_variables(bn_model, jax.random.key(0), vit.input_shape(CFG))["params"]
  with pytest.raises(UserError, match="model.norm='layer'"):
    pretrained.adapt_to_model(loaded, bn_init, num_cls_tokens=1)
  wide = vit.build_model(dict(CFG, hidden_size=48, num_heads=4))
  wide_init = vit.init_variables(wide, jax.random.key(0), vit.input_shape(CFG))["params"]
  with pytest.raises(UserError, match="shape"):
    pretrained.adapt_to_model(loaded, wide_init, num_cls_tokens=1)
  with pytest.raises(UserError, match="does not exist"):
    pretrained.load_npz(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_qk_norm_model_loads_a_reference_checkpoint_keeping_its_fresh_qk_norms(tmp_path, kind):
  _, params = _model_and_params()
  path = str(tmp_path / "ckpt.npz")
  pretrained.save_npz(path, params)
  cfg = dict(CFG, qk_norm=kind)
  model = vit.build_model(cfg)
  init = vit.init_variables(model, jax.random.key(7), vit.input_shape(cfg))["params"]
  restored = pretrained.adapt_to_model(pretrained.load_npz(path), init, num_cls_tokens=1)
  flat = flax.traverse_util.flatten_dict(jax.device_get(restored), sep="/")
  ref = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  init_flat = flax.traverse_util.flatten_dict(jax.device_get(init), sep="/")
  new = sorted(k for k in flat if k not in ref)
  assert len(new) == 2 * 2 * (2 if kind == "layer" else 1)  # 2 layers x {query,key}_norm x params
  assert all("_norm/" in k and "MultiHeadDotProductAttention_0" in k for k in new)
  for key, value in flat.items():
    np.testing.assert_array_equal(value, ref[key] if key in ref else init_flat[key])
