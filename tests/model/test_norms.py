"""Tests for vitnorm.model.norms: BatchNorm over tokens (train/eval, CLS exclusion, ghost batches, sync)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitnorm.model import norms

EPS = 1e-5


def _bn(**kw):
  return norms.TokenBatchNorm(epsilon=EPS, **kw)


def _x(shape=(8, 5, 4), seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(3.0, 2.0, shape) * rng.uniform(0.5, 3, shape[-1]), jnp.float32)


def _init(bn, x):
  return bn.init(jax.random.key(0), x, train=False)


def test_train_mode_uses_batch_statistics_and_updates_running_averages():
  x = _x()
  bn = _bn(momentum=0.9)
  variables = _init(bn, x)
  y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
  xn = np.asarray(x)
  mean, var = xn.mean(axis=(0, 1)), xn.var(axis=(0, 1))
  np.testing.assert_allclose(y, (xn - mean) / np.sqrt(var + EPS), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y).mean(axis=(0, 1)), 0, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)


def test_eval_mode_uses_running_statistics_and_is_independent_of_the_batch():
  x = _x()
  bn = _bn()
  variables = _init(bn, x)
  stats = {"mean": jnp.arange(4.0), "var": jnp.array([0.5, 1.0, 2.0, 4.0])}
  params = {"scale": jnp.array([1.0, 2.0, 3.0, 4.0]), "bias": jnp.array([0.1, 0.2, 0.3, 0.4])}
  variables = {"params": params, "batch_stats": stats}
  y = bn.apply(variables, x, train=False)
  expected = (np.asarray(x) - stats["mean"]) / np.sqrt(stats["var"] + EPS) * params["scale"] + params["bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  # Example 0 gives the same output whatever the rest of the batch is.
  other = x.at[1:].set(_x(seed=1)[1:] * 100)
  np.testing.assert_array_equal(bn.apply(variables, other, train=False)[0], y[0])
  # Eval mode never changes the running averages.
  _, updates = bn.apply(variables, x, train=False, mutable=["batch_stats"])
  np.testing.assert_array_equal(updates["batch_stats"]["mean"], stats["mean"])


def test_cls_token_can_be_left_out_of_the_statistics():
  x = _x().at[:, 0].add(50.0)  # an outlying CLS token
  bn = _bn(num_excluded_tokens=1)
  y, updates = bn.apply(_init(bn, x), x, train=True, mutable=["batch_stats"])
  patches = np.asarray(x)[:, 1:]
  mean, var = patches.mean(axis=(0, 1)), patches.var(axis=(0, 1))
  # All tokens, CLS included, are normalized with the statistics of the patch tokens.
  np.testing.assert_allclose(y, (np.asarray(x) - mean) / np.sqrt(var + EPS), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)


def test_ghost_batches_normalize_each_group_with_its_own_statistics():
  x = _x((8, 5, 4))
  ghost = _bn(group_size=2)
  y, updates = ghost.apply(_init(ghost, x), x, train=True, mutable=["batch_stats"])
  whole = _bn()
  means, variances = [], []
  for g in range(4):
    part = x[2 * g:2 * g + 2]
    y_part, upd = whole.apply(_init(whole, part), part, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y[2 * g:2 * g + 2], y_part, rtol=1e-5, atol=1e-5)
    means.append(np.asarray(part).mean(axis=(0, 1)))
    variances.append(np.asarray(part).var(axis=(0, 1)))
  # Running mean: mean of group means; running variance: mean of group variances.
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * np.mean(means, 0), rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * np.mean(variances, 0), rtol=1e-5)
  # A group as large as the batch is the plain (non-ghost) BatchNorm.
  full = _bn(group_size=8)
  np.testing.assert_allclose(full.apply(_init(full, x), x, train=True, mutable=["batch_stats"])[0],
                             whole.apply(_init(whole, x), x, train=True, mutable=["batch_stats"])[0],
                             rtol=1e-6)


def test_group_size_that_does_not_divide_the_batch_is_an_error():
  x = _x((6, 5, 4))
  bn = _bn(group_size=4)
  with pytest.raises(ValueError, match="bn_group_size"):
    bn.apply(_init(bn, x), x, train=True, mutable=["batch_stats"])


def test_make_norm_names_and_kinds():
  assert [norms.module_name(k, 1) for k in ("layer", "batch", "rms")] == ["LayerNorm_1", "BatchNorm_1", "RMSNorm_1"]
  assert norms.is_foldable("batch") and norms.is_foldable("none")
  assert not norms.is_foldable("layer") and not norms.is_foldable("rms")
  with pytest.raises(ValueError, match="unknown norm kind"):
    norms.make_norm("group", name="x", options=norms.NormOptions())

  class Holder(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x):
      return norms.make_norm(self.kind, name="n", options=norms.NormOptions())(x, False)

  x = _x()
  for kind, expected_params in (("layer", {"scale", "bias"}), ("rms", {"scale"}), ("batch", {"scale", "bias"})):
    variables = Holder(kind).init(jax.random.key(0), x)
    assert set(variables["params"]["n"]) == expected_params
  assert "params" not in Holder("none").init(jax.random.key(0), x)
  np.testing.assert_array_equal(Holder("none").apply({}, x), x)


@pytest.mark.parametrize("group_size", [None, 2])
def test_statistics_agree_under_pmap_jit_mesh_and_one_device(group_size):
  n = jax.device_count()
  assert n == 8, "conftest.py should give 8 CPU devices"
  x = _x((2 * n, 5, 4), seed=3)
  variables = _init(_bn(group_size=group_size), x)

  def run(bn, xs):
    y, upd = bn.apply(variables, xs, train=True, mutable=["batch_stats"])
    return y, upd["batch_stats"]

  # One device, the whole batch.
  y_one, stats_one = jax.jit(lambda xs: run(_bn(group_size=group_size), xs))(x)
  # jit over an 8-device mesh with the batch sharded.
  mesh = Mesh(np.array(jax.devices()), ("data",))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  y_jit, stats_jit = jax.jit(lambda xs: run(_bn(group_size=group_size), xs))(x_sharded)
  # pmap with the axis name.
  y_pmap, stats_pmap = jax.pmap(lambda xs: run(_bn(group_size=group_size, axis_name="batch"), xs),
                                axis_name="batch")(x.reshape(n, 2, 5, 4))
  np.testing.assert_allclose(y_jit, y_one, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_pmap).reshape(x.shape), y_one, rtol=1e-5, atol=1e-5)
  for key in ("mean", "var"):
    np.testing.assert_allclose(stats_jit[key], stats_one[key], rtol=1e-5, atol=1e-6)
    for d in range(n):  # every device holds the same running statistics
      np.testing.assert_allclose(stats_pmap[key][d], stats_one[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# DyT and PRepBN
# ---------------------------------------------------------------------------------------------


def test_dyt_forward_equals_the_formula_and_has_no_batch_dependence():
  x = _x((4, 5, 6))
  dyt = norms.DyT(alpha_init=0.5)
  variables = dyt.init(jax.random.key(0), x)
  assert float(variables["params"]["alpha"]) == 0.5 and variables["params"]["alpha"].shape == ()
  np.testing.assert_array_equal(variables["params"]["scale"], np.ones(6))
  np.testing.assert_array_equal(variables["params"]["bias"], np.zeros(6))
  rng = np.random.default_rng(1)
  params = {"alpha": jnp.float32(0.3), "scale": jnp.asarray(rng.normal(size=6), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=6), jnp.float32)}
  got = dyt.apply({"params": params}, x)
  xn = np.asarray(x, np.float64)
  expected = np.asarray(params["scale"]) * np.tanh(0.3 * xn) + np.asarray(params["bias"])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  # Example 0 alone gives the same output: no statistics over the batch.
  np.testing.assert_array_equal(dyt.apply({"params": params}, x[:1]), got[:1])


@pytest.mark.parametrize("warmup,decay,expected", [
    (3, 11, {0: 1.0, 2: 1.0, 3: 1.0, 4: 0.875, 7: 0.5, 10: 0.125, 11: 0.0, 500: 0.0}),
    (0, 4, {0: 1.0, 1: 0.75, 2: 0.5, 3: 0.25, 4: 0.0}),
    (5, 5, {0: 1.0, 4: 1.0, 5: 0.0, 6: 0.0}),
])
def test_prepbn_lam_schedule_values_python_and_traced(warmup, decay, expected):
  steps = list(expected)
  assert [norms.prepbn_lam(s, warmup, decay) for s in steps] == list(expected.values())
  traced = jax.jit(jax.vmap(lambda s: norms.prepbn_lam(s, warmup, decay)))(jnp.asarray(steps, jnp.int32))
  np.testing.assert_allclose(np.asarray(traced), list(expected.values()), rtol=0, atol=1e-7)
  with pytest.raises(ValueError, match="decay_steps"):
    norms.prepbn_lam(0, 0, None)


def _prepbn_reference(params, stats, x, lam, train, eps_ln=1e-6, eps_bn=EPS):
  """lam * LN(x) + (1 - lam) * (BN(x) + eta * x), written out in numpy."""
  x = np.asarray(x, np.float64)
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  ln = (x - mu) / np.sqrt(var + eps_ln) * params["LayerNorm"]["scale"] + params["LayerNorm"]["bias"]
  if train:
    bmu, bvar = x.mean((0, 1)), x.var((0, 1))
  else:
    bmu, bvar = np.asarray(stats["mean"]), np.asarray(stats["var"])
  bn = (x - bmu) / np.sqrt(bvar + eps_bn) * params["BatchNorm"]["scale"] + params["BatchNorm"]["bias"]
  return lam * ln + (1 - lam) * (bn + float(params["eta"]) * x)


def test_prepbn_forward_is_the_lam_mix_of_layernorm_and_repbn():
  x = _x((4, 5, 6))
  prep = norms.PRepBN(options=norms.NormOptions(bn_epsilon=EPS))
  variables = prep.init(jax.random.key(0), x, False, 0.0)
  assert float(variables["params"]["eta"]) == 1.0
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda p: jnp.asarray(p + 0.3 * rng.normal(size=p.shape), jnp.float32),
                        variables["params"])
  stats = {"mean": jnp.asarray(rng.normal(size=6), jnp.float32),
           "var": jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)}
  v = {"params": params, "batch_stats": {"BatchNorm": stats}}
  for lam in (0.3, jnp.float32(0.3)):  # static and traced lam, train mode (batch statistics)
    got, _ = prep.apply(v, x, True, lam, mutable=["batch_stats"])
    np.testing.assert_allclose(got, _prepbn_reference(params, stats, x, 0.3, True), rtol=1e-4, atol=1e-4)
  for lam in (0.0, 1.0, 0.6):  # eval mode: running statistics; lam 0 skips the LN branch
    got = prep.apply(v, x, False, lam)
    np.testing.assert_allclose(got, _prepbn_reference(params, stats, x, lam, False), rtol=1e-4, atol=1e-4)


def test_make_norm_builds_dyt_and_prepbn_under_their_names():
  assert [norms.module_name(k, 0) for k in ("dyt", "prepbn")] == ["DyT_0", "PRepBN_0"]
  assert norms.canonical_kind("DyT") == "dyt" and norms.canonical_kind("repbn") == "prepbn"
  assert norms.is_foldable("prepbn") and not norms.is_foldable("dyt")
  assert norms.uses_batch_stats("prepbn") and not norms.uses_batch_stats("dyt")

  class Holder(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x):
      return norms.make_norm(self.kind, name="n", options=norms.NormOptions(dyt_alpha_init=0.7))(x, False)

  x = _x()
  dyt = Holder("dyt").init(jax.random.key(0), x)
  assert set(dyt["params"]["n"]) == {"alpha", "scale", "bias"} and float(dyt["params"]["n"]["alpha"]) == np.float32(0.7)
  prep = Holder("prepbn").init(jax.random.key(0), x)
  assert set(prep["params"]["n"]) == {"eta", "LayerNorm", "BatchNorm"}
  assert set(prep["batch_stats"]["n"]["BatchNorm"]) == {"mean", "var"}
