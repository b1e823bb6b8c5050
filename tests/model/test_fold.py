"""BN folding: the folded (norm-free) model equals the BN model in eval mode, for every foldable variant."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitnorm.model import fold
from vitnorm.model import vit
from vitnorm.errors import UserError

TINY = dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=4, patch_size=4, num_classes=5,
            image_size=8, num_channels=3)


def _cfg(**overrides):
  cfg = dict(TINY)
  cfg.update(overrides)
  return cfg


def random_variables(model, cfg, seed):
  """Random params (scale/bias far from 1/0, head non-zero) and non-trivial running statistics.

  Built from the shapes only (numpy, no compiled init), so each variant costs milliseconds.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(vit.input_shape(cfg, 1)),
                                             train=False))
  shapes = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.startswith("['batch_stats']") and name.endswith("['var']"):
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
    if name.startswith("['batch_stats']"):
      return jnp.asarray(rng.normal(size=leaf.shape), jnp.float32)
    if name.endswith("['scale']"):
      return jnp.asarray(1.0 + 0.5 * rng.normal(size=leaf.shape), jnp.float32)
    std = 1.0 / np.sqrt(leaf.shape[0]) if len(leaf.shape) >= 2 else 0.3
    return jnp.asarray(std * rng.normal(size=leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _check_fold(cfg, seed=0):
  model = vit.build_model(cfg)
  variables = random_variables(model, cfg, seed)
  images = jnp.asarray(np.random.default_rng(seed + 1).normal(size=vit.input_shape(cfg, 3)), jnp.float32)
  expected = model.apply(variables, images, train=False)
  folded_model, folded_vars = fold.fold_batchnorm(cfg, variables)
  assert folded_model.norm == "none" and folded_model.ffn_norm == "none"
  assert "batch_stats" not in folded_vars
  assert not any("BatchNorm" in jax.tree_util.keystr(p) or "encoder_norm" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(folded_vars)[0])
  got = folded_model.apply(folded_vars, images, train=False)
  scale = float(jnp.max(jnp.abs(expected)))
  assert scale > 0.1  # the logits are non-trivial, so agreement means something
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=2e-5 * scale)
  return model, variables, folded_model, folded_vars


FOLDABLE = [
    dict(norm=n, ffn_norm=f, ffn_norm_position=p, classifier=c)
    for n, f, p, c in itertools.product(("batch", "none"), ("none", "batch"), ("pre_act", "post_act"),
                                        ("token", "gap"))
    if not (f == "none" and p == "post_act")  # position only matters with an FFN norm
]


@pytest.mark.parametrize("variant", FOLDABLE, ids=lambda v: "-".join(v.values()))
def test_fold_is_exact_for_every_foldable_variant(variant):
  _check_fold(_cfg(**variant))


def test_fold_with_representation_size_and_cls_excluded_from_statistics():
  _check_fold(_cfg(norm="batch", ffn_norm="batch", representation_size=16, bn_include_cls=False,
                   bn_epsilon=1e-3))


def test_folded_model_is_the_no_norm_model():
  cfg = _cfg(norm="batch", ffn_norm="batch")
  _, _, folded_model, folded_vars = _check_fold(cfg)
  plain = vit.build_model(_cfg(norm="none", ffn_norm="none"))
  assert folded_model == plain
  plain_vars = random_variables(plain, cfg, 0)
  same_tree = jax.tree_util.tree_structure(plain_vars) == jax.tree_util.tree_structure(folded_vars)
  assert same_tree
  assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(plain_vars),
                                               jax.tree_util.tree_leaves(folded_vars)))


def test_fold_does_not_modify_the_input_variables():
  cfg = _cfg(norm="batch", ffn_norm="batch")
  model = vit.build_model(cfg)
  variables = random_variables(model, cfg, 1)
  before = jax.tree_util.tree_map(np.array, variables)
  fold.fold_batchnorm(model, variables)
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.array, variables))


@pytest.mark.parametrize("norm,ffn_norm,field", [("layer", "none", "model.norm='layer'"),
                                                ("rms", "batch", "model.norm='rms'"),
                                                ("layer", "batch", "model.norm='layer'"),
                                                ("batch", "layer", "model.ffn_norm='layer'")])
def test_ln_and_rms_variants_are_not_foldable_with_reason(norm, ffn_norm, field):
  cfg = _cfg(norm=norm, ffn_norm=ffn_norm)
  ok, reason = fold.foldability(cfg)
  assert not ok and field in reason and "token" in reason
  model = vit.build_model(cfg)
  variables = random_variables(model, cfg, 0)
  with pytest.raises(UserError, match="cannot fold BatchNorm"):
    fold.fold_batchnorm(model, variables)


def test_foldability_of_foldable_variants():
  assert fold.foldability(_cfg(norm="batch", ffn_norm="batch")) == (
      True, "BatchNorm in model.norm and model.ffn_norm folds into Dense layers")
  ok, reason = fold.foldability(_cfg(norm="none"))
  assert ok and "norm-free" in reason


def test_fold_with_mismatching_variables_is_a_user_error():
  cfg = _cfg(norm="batch")
  variables = random_variables(vit.build_model(_cfg(norm="none")), cfg, 0)
  variables = {"params": variables["params"], "batch_stats": {}}
  with pytest.raises(UserError, match="does not match"):
    fold.fold_batchnorm(cfg, variables)
  bn_vars = random_variables(vit.build_model(cfg), cfg, 0)
  with pytest.raises(UserError, match="batch_stats"):
    fold.fold_batchnorm(cfg, {"params": bn_vars["params"]})


def test_batchnorm_affine_matches_formula():
  s, t = fold.batchnorm_affine({"scale": jnp.array([2.0]), "bias": jnp.array([1.0])},
                               {"mean": jnp.array([3.0]), "var": jnp.array([3.0])}, 1.0)
  np.testing.assert_allclose(s, [1.0])
  np.testing.assert_allclose(t, [-2.0])


# ---------------------------------------------------------------------------------------------
# PRepBN folds once lam is 0; DyT and QK-norm do not fold
# ---------------------------------------------------------------------------------------------


def _trained_statistics(model, variables, cfg, steps=3):
  """Running statistics from a few train-mode passes (lam 0) over shifted, scaled images."""
  rng = np.random.default_rng(11)
  stats = variables["batch_stats"]
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  for _ in range(steps):
    images = jnp.asarray(rng.normal(0.5, 2.0, vit.input_shape(cfg, 8)), jnp.float32)
    _, updates = train({"params": variables["params"], "batch_stats": stats}, images)
    stats = updates["batch_stats"]
  return {"params": variables["params"], "batch_stats": stats}


@pytest.mark.parametrize("variant", [
    dict(norm="prepbn"),
    dict(norm="prepbn", ffn_norm="prepbn", classifier="gap"),
    dict(norm="batch", ffn_norm="prepbn", ffn_norm_position="post_act", bn_include_cls=False),
], ids=lambda v: "-".join(str(x) for x in v.values()))
def test_prepbn_at_lam_zero_folds_exactly_with_trained_statistics(variant):
  cfg = _cfg(prepbn=dict(warmup_steps=2, decay_steps=6), **variant)
  model = vit.at_step(vit.build_model(cfg), 6)  # lam(6) = 0
  start = random_variables(model, cfg, 3)
  variables = _trained_statistics(model, start, cfg)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       variables["batch_stats"], start["batch_stats"])
  assert min(jax.tree.leaves(moved)) > 0.01  # every running statistic comes from training
  images = jnp.asarray(np.random.default_rng(5).normal(size=vit.input_shape(cfg, 3)), jnp.float32)
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  ok, reason = fold.foldability(model)
  assert ok and "PRepBN" in reason
  folded_model, folded_vars = fold.fold_batchnorm(model, variables)
  assert folded_model.norm == folded_model.ffn_norm == "none" and "batch_stats" not in folded_vars
  assert not any("PRepBN" in jax.tree_util.keystr(p) or "eta" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(folded_vars)[0])
  got = jax.jit(lambda v, x: folded_model.apply(v, x, train=False))(folded_vars, images)
  scale = float(jnp.max(jnp.abs(expected)))
  assert scale > 0.1
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5 * scale)


def test_prepbn_fold_is_refused_while_lam_is_positive_naming_the_valid_step():
  cfg = _cfg(norm="prepbn", prepbn=dict(warmup_steps=2, decay_steps=6))
  model = vit.build_model(cfg)
  variables = random_variables(model, cfg, 0)
  for step in (0, 3, 5):
    ok, reason = fold.foldability(vit.at_step(model, step))
    assert not ok and "lam" in reason and "folding becomes valid from step 6" in reason
    with pytest.raises(UserError) as err:
      fold.fold_batchnorm(vit.at_step(model, step), variables)
    assert "\n" not in str(err.value) and "from step 6" in str(err.value)
  assert fold.foldability(vit.at_step(model, 6))[0] and fold.foldability(model)[0]  # None: finished


@pytest.mark.parametrize("overrides,field", [(dict(norm="dyt"), "model.norm='dyt'"),
                                             (dict(norm="batch", ffn_norm="dyt"), "model.ffn_norm='dyt'"),
                                             (dict(norm="batch", qk_norm="layer"), "model.qk_norm='layer'"),
                                             (dict(norm="none", qk_norm="rms"), "model.qk_norm='rms'")])
def test_dyt_and_qk_norm_are_not_foldable_with_reason(overrides, field):
  ok, reason = fold.foldability(_cfg(**overrides))
  assert not ok and field in reason
