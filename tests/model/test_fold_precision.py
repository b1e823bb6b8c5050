"""The BN fold does not depend on JAX's default matmul precision (TF32 on recent NVIDIA GPUs,
bfloat16 passes on TPU), so evaluate's float32 agreement check holds on an accelerator.

XLA:CPU computes float32 matmuls in float32 whatever `jax_default_matmul_precision` says, so on
CPU the reduced precision is emulated: while the fold runs, jax.numpy's matmuls round their
float32 operands to bfloat16 (what a bfloat16 pass does) unless they ask for 'highest'
explicitly. A fold computed with jax.numpy at the default precision then misses the float32
tolerance; the fold in float64 NumPy (vitnorm.model.fold) does not go through JAX at all.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vitnorm.inference import comparison
from vitnorm.model import fold, norms, vit

# Folded and unfolded logits computed at 'highest' differ by float32 round-off only: a few ulps
# (2**-23 ~ 1.2e-7) per layer, relative to the logits' scale. 1e-5 is evaluate's float32 bound.
FLOAT32_TOLERANCE = 1e-5


def _is_highest(precision) -> bool:
  if precision is None:
    return False
  first = precision[0] if isinstance(precision, (tuple, list)) else precision
  return str(first).lower() in ("highest", "precision.highest", "float32")


@contextlib.contextmanager
def cpu_matmuls_at_default_precision(monkeypatch):
  """jnp.tensordot / dot / matmul / einsum round float32 operands to bfloat16 while the default
  matmul precision is 'bfloat16' and the call does not ask for 'highest' (as a GPU/TPU would)."""
  jax.config.update("jax_default_matmul_precision", "bfloat16")

  def reduced(fn):
    def wrapper(*args, precision=None, **kwargs):
      if not _is_highest(precision):
        args = tuple(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32)
                     if hasattr(a, "dtype") and jnp.dtype(a.dtype) == jnp.float32 else a for a in args)
      return fn(*args, precision=precision, **kwargs)
    return wrapper

  with monkeypatch.context() as patch:
    for name in ("tensordot", "dot", "matmul", "einsum", "inner", "vdot"):
      patch.setattr(jnp, name, reduced(getattr(jnp, name)))
    try:
      yield
    finally:
      jax.config.update("jax_default_matmul_precision", None)


def _model_and_variables():
  cfg = common.model_config(variant=None, num_classes=10, image_size=16, num_channels=3, norm="batch",
                            ffn_norm="batch")
  cfg.update(dict(hidden_size=64, num_layers=2, mlp_dim=128, num_heads=4, patch_size=4))
  cfg = cfg.to_dict()
  model = vit.build_model(cfg)
  return model, comparison.random_variables(model, cfg, seed=3)


def _relative_logit_difference(model, variables, folded_model, folded_variables) -> float:
  images = np.random.default_rng(0).standard_normal((8, 16, 16, 3), np.float32)
  with jax.default_matmul_precision("highest"):
    a = np.asarray(model.apply(variables, images, train=False), np.float64)
    b = np.asarray(folded_model.apply(folded_variables, images, train=False), np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


def test_the_emulation_degrades_a_default_precision_matmul(monkeypatch):
  """The harness itself: under it a default-precision jnp matmul is off by bfloat16 round-off."""
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((64, 64), np.float32), rng.standard_normal((64, 64), np.float32)
  exact = a.astype(np.float64) @ b
  with cpu_matmuls_at_default_precision(monkeypatch):
    default = np.asarray(jnp.dot(a, b))
    highest = np.asarray(jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
  assert np.max(np.abs(default - exact)) / np.max(np.abs(exact)) > 1e-3
  assert np.max(np.abs(highest - exact)) / np.max(np.abs(exact)) < 1e-6


def test_fold_under_bfloat16_default_precision_agrees_within_float32_tolerance(monkeypatch):
  model, variables = _model_and_variables()
  with cpu_matmuls_at_default_precision(monkeypatch):
    folded_model, folded_variables = fold.fold_batchnorm(model, variables)
  assert _relative_logit_difference(model, variables, folded_model, folded_variables) < FLOAT32_TOLERANCE


@pytest.mark.parametrize("module", ["encoderblock_0/" + norms.module_name("batch", 0),
                                    "encoderblock_1/MlpBlock_0/" + norms.module_name("batch", 0)])
def test_a_fold_with_one_scale_off_by_one_percent_is_still_caught(monkeypatch, module):
  model, variables = _model_and_variables()
  broken = jax.tree.map(np.array, variables)
  node = broken["params"]["Transformer"]
  for key in module.split("/"):
    node = node[key]
  node["scale"][0] *= 1.01  # one channel's scale off by 1%
  with cpu_matmuls_at_default_precision(monkeypatch):
    folded_model, folded_variables = fold.fold_batchnorm(model, broken)
  assert _relative_logit_difference(model, variables, folded_model, folded_variables) > 10 * FLOAT32_TOLERANCE
