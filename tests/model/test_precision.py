"""float16 compute as autocast runs it (vitnorm.model.precision) and the two attention knobs.

- A float16 forward pass agrees with float32 for small activations, within float16 precision
  relative to the logits' scale, and is not float32 in disguise (dtypes checked where they live).
- A constructed input whose unscaled q.k exceeds 65,504: float16 logits with the scale on the
  product give a non-finite loss; float32 logits (or the scale on q) keep it finite.
- Bad knob values are one-line ConfigErrors naming the field; the defaults are today's model.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vitnorm.errors import ConfigError
from vitnorm.model import precision, vit

TINY = dict(variant=None, hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4,
            num_classes=10, image_size=8, num_channels=1)
FP16_MAX = 65504.0


def _images(n=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, 8, 8, 1), jnp.float32)


def _variables(model, seed=0):
  variables = vit.init_variables(model, jax.random.key(seed), (1, 8, 8, 1))
  # A random head (the reference head starts at zero: every dtype would give logits 0).
  head = variables["params"]["head"]
  head["kernel"] = jax.random.normal(jax.random.key(7), head["kernel"].shape) * 0.5
  return variables


@pytest.mark.parametrize("norms", [("layer", "none"), ("batch", "batch")])
def test_float16_forward_matches_float32_for_small_activations(norms):
  cfg = dict(TINY, norm=norms[0], ffn_norm=norms[1])
  f32, f16 = vit.build_model(dict(cfg, dtype="float32")), vit.build_model(dict(cfg, dtype="float16"))
  variables = _variables(f32)
  x = _images()
  run = lambda m: jax.jit(lambda v, xs: m.apply(v, xs, train=True, mutable=["batch_stats"])[0])(  # noqa: E731
      variables, x)
  logits32, logits16 = np.asarray(run(f32)), np.asarray(run(f16))
  scale = np.max(np.abs(logits32))
  assert scale > 1.0  # the logits are not trivially small
  error = np.max(np.abs(logits16 - logits32))
  assert error <= 1e-2 * scale  # float16 has 11 significant bits: ~5e-4 per rounding
  assert error > 1e-7 * scale  # and it did compute in float16


def test_float16_dtypes_live_where_autocast_puts_them():
  model = vit.build_model(dict(TINY, norm="batch", ffn_norm="batch", dtype="float16"))
  variables = _variables(model)
  _, state = model.apply(variables, _images(), train=True, capture_intermediates=True,
                         mutable=["batch_stats", "intermediates"])
  inter = state["intermediates"]
  block = inter["Transformer"]["encoderblock_0"]
  assert inter["embedding"]["__call__"][0].dtype == jnp.float16  # the patch Conv
  assert block["MlpBlock_0"]["Dense_0"]["__call__"][0].dtype == jnp.float16
  assert block["MlpBlock_0"]["BatchNorm_0"]["__call__"][0].dtype == jnp.float16  # FFN BN: its input's
  assert block["BatchNorm_0"]["__call__"][0].dtype == jnp.float32  # pre-norm BN on the f32 stream
  assert block["__call__"][0].dtype == jnp.float32  # the residual stream
  assert inter["head"]["__call__"][0].dtype == jnp.float16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  ln = vit.build_model(dict(TINY, norm="layer", dtype="float16"))
  _, state = ln.apply(_variables(ln), _images(), train=False, capture_intermediates=True,
                      mutable=["intermediates"])
  assert state["intermediates"]["Transformer"]["encoderblock_0"]["LayerNorm_0"]["__call__"][0].dtype == jnp.float32


def _overflowing_attention(model):
  """Variables with which block 0's unscaled q.k is 16 * 80^2 = 102,400 > 65,504 for every pair
  of tokens, while the scaled logit 102,400 / sqrt(16) = 25,600 fits float16."""
  variables = _variables(model)
  p = variables["params"]["Transformer"]["encoderblock_0"]
  p["LayerNorm_0"]["scale"] = jnp.zeros_like(p["LayerNorm_0"]["scale"])  # LN output: all ones
  p["LayerNorm_0"]["bias"] = jnp.ones_like(p["LayerNorm_0"]["bias"])
  attention = p["MultiHeadDotProductAttention_0"]
  for name in ("query", "key"):  # q = k = 32 * 2.5 = 80 in every head dimension
    attention[name]["kernel"] = jnp.full_like(attention[name]["kernel"], 2.5)
  return variables


@pytest.mark.parametrize("logits,scale,finite", [
    ("compute", "product", False),  # timm 2021 under autocast: q.k overflows float16
    ("float32", "product", True),
    ("compute", "query", True),  # scaling q first keeps the logit at 25,600
    ("float32", "query", True),  # today's default
])
def test_unscaled_qk_above_float16_max_overflows_only_with_float16_logits_on_the_product(logits, scale, finite):
  model = vit.build_model(dict(TINY, norm="layer", dtype="float16", attention_logits=logits,
                               attention_scale=scale))
  variables = _overflowing_attention(model)
  labels = jax.nn.one_hot(jnp.arange(16) % 10, 10)

  @jax.jit
  def loss_and_diagnostics(v):
    out, state = model.apply(v, _images(), train=False, mutable=["diagnostics"])
    return jnp.mean(optax.softmax_cross_entropy(out, labels)), state["diagnostics"]

  loss, diags = loss_and_diagnostics(variables)
  attention = diags["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert bool(jnp.isfinite(loss)) == finite
  max_qk = float(attention["max_abs_qk"][0])
  if logits == "compute" and scale == "product":
    assert max_qk == np.inf  # as computed, in float16
  else:
    assert max_qk == pytest.approx(102400.0, rel=2e-3) and max_qk > FP16_MAX
  if finite:
    assert float(attention["max_attention_logit"][0]) == pytest.approx(25600.0, rel=2e-3)


def test_default_knobs_are_todays_model():
  assert vit.resolve_model_config(TINY)["attention_logits"] == "float32"
  assert vit.resolve_model_config(TINY)["attention_scale"] == "query"
  default = vit.build_model(dict(TINY, dtype="bfloat16"))
  explicit = vit.build_model(dict(TINY, dtype="bfloat16", attention_logits="float32", attention_scale="query"))
  assert default == explicit


def test_knobs_matter_in_float32_only_by_rounding():
  # In float32 'compute' logits are float32 too; scaling the product instead of q reorders one
  # multiplication: the same logits up to float32 rounding.
  a = vit.build_model(dict(TINY, norm="layer"))
  b = vit.build_model(dict(TINY, norm="layer", attention_logits="compute", attention_scale="product"))
  variables = _variables(a)
  la, lb = (np.asarray(jax.jit(lambda v, m=m: m.apply(v, _images(), train=False))(variables)) for m in (a, b))
  np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5 * np.max(np.abs(la)))


@pytest.mark.parametrize("field,value", [("attention_logits", "float16"), ("attention_scale", "key"),
                                         ("dtype", "float8")])
def test_bad_knob_values_are_one_line_config_errors(field, value):
  with pytest.raises(ConfigError, match=rf"^model\.{field}: unknown value '{value}'; choose one of"):
    vit.resolve_model_config(dict(TINY, **{field: value}))


def test_policy_per_dtype():
  assert precision.policy(jnp.float16) == precision.Precision(jnp.float16, jnp.float32, None)
  assert precision.policy(jnp.bfloat16) == precision.Precision(jnp.bfloat16, jnp.bfloat16, jnp.bfloat16)
  assert precision.policy(jnp.float32).max_finite == float(np.finfo(np.float32).max)
  assert precision.policy(jnp.float16).max_finite == FP16_MAX
