"""Tests for vitnorm.model.vit: sizes, parameter layout, every norm variant, config validation, BN sync."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitnorm.model import vit
from vitnorm.errors import ConfigError
import float32_budget  # tests/float32_budget.py (tests/ is on sys.path: conftest.py)
from jit_apply import jit_apply  # tests/jit_apply.py

TINY = dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=4, patch_size=4, num_classes=10,
            image_size=16, num_channels=3)


def _images(batch=4, seed=0, size=16):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def _param_count(variant):
  model = vit.build_model(dict(variant=variant, num_classes=1000, image_size=224))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("variant,expected", [("Ti/16", 5_717_416), ("S/16", 22_050_664),
                                              ("B/16", 86_567_656), ("deit_s/16", 22_050_664)])
def test_parameter_counts_match_the_known_figures(variant, expected):
  assert _param_count(variant) == expected


def test_layernorm_variant_uses_the_reference_parameter_layout():
  model = vit.build_model(dict(TINY, num_layers=1))
  params = vit.init_variables(model, jax.random.key(0), (1, 16, 16, 3))["params"]
  paths = set(flax.traverse_util.flatten_dict(params, sep="/"))
  block = "Transformer/encoderblock_0/"
  expected = {
      "embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
      *(block + f"LayerNorm_{i}/{p}" for i in (0, 1) for p in ("scale", "bias")),
      *(block + f"MultiHeadDotProductAttention_0/{m}/{p}" for m in ("query", "key", "value", "out")
        for p in ("kernel", "bias")),
      *(block + f"MlpBlock_0/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")),
      "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias", "head/kernel", "head/bias"}
  assert paths == expected
  attn = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert attn["query"]["kernel"].shape == (32, 4, 8) and attn["out"]["kernel"].shape == (4, 8, 32)
  np.testing.assert_array_equal(params["head"]["kernel"], 0)  # zero-initialised head


VARIANTS = [  # (norm, ffn_norm, ffn_norm_position, classifier)
    ("layer", "none", "pre_act", "token"),    # LN (the standard ViT)
    ("batch", "none", "pre_act", "token"),    # BN everywhere
    ("batch", "batch", "pre_act", "token"),   # BN + FFN-BN (the paper's fix)
    ("batch", "batch", "post_act", "gap"),
    ("layer", "batch", "pre_act", "token"),   # LN + FFN-BN
    ("rms", "none", "pre_act", "gap"),
    ("none", "none", "pre_act", "token"),
    ("none", "layer", "post_act", "token"),
]


@pytest.mark.parametrize("norm,ffn_norm,position,classifier", VARIANTS)
def test_every_norm_variant_runs_forward_and_backward_with_finite_outputs(norm, ffn_norm, position, classifier):
  # One block shows every per-block choice (the tree below is encoderblock_0's) at half the compile.
  cfg = dict(TINY, num_layers=1, norm=norm, ffn_norm=ffn_norm, ffn_norm_position=position,
             classifier=classifier, dropout_rate=0.1)
  model = vit.build_model(cfg)
  variables = vit.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  params = jax.tree.map(lambda p: p + 0.01, variables["params"])  # non-zero head: real gradients
  x, labels = _images(), jnp.arange(4)

  def loss_fn(params):
    logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                  rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels]), (logits, updates)

  (loss, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert any(np.any(g != 0) for g in jax.tree.leaves(grads["Transformer"]))
  has_bn = "batch" in (norm, ffn_norm)
  assert set(variables) == ({"params", "batch_stats"} if has_bn else {"params"})
  if has_bn:  # running statistics moved away from their initial values
    assert any(np.any(s != 0) for s in jax.tree.leaves(updates["batch_stats"]))
  eval_logits = jit_apply(model, {**variables, "params": params}, x, train=False)
  assert np.all(np.isfinite(eval_logits))
  # The module tree is the one the variant asks for (names of the reference layout).
  names = {"layer": "LayerNorm", "batch": "BatchNorm", "rms": "RMSNorm"}
  block = variables["params"]["Transformer"]["encoderblock_0"]
  norms_in_block = {k for k in block if not k.startswith(("MultiHead", "MlpBlock"))}
  assert norms_in_block == ({f"{names[norm]}_0", f"{names[norm]}_1"} if norm != "none" else set())
  assert set(block["MlpBlock_0"]) == {"Dense_0", "Dense_1"} | (
      {f"{names[ffn_norm]}_0"} if ffn_norm != "none" else set())
  assert ("encoder_norm" in variables["params"]["Transformer"]) == (norm != "none")
  assert ("cls" in variables["params"]) == (classifier == "token")


def test_ffn_norm_position_and_classifier_change_the_output():
  cfg = dict(TINY, norm="layer", ffn_norm="layer", ffn_norm_position="pre_act")
  variables = vit.init_variables(vit.build_model(cfg), jax.random.key(0), (1, 16, 16, 3))
  leaves, tree = jax.tree.flatten(variables)  # random non-zero head, cls and norm biases
  keys = jax.random.split(jax.random.key(7), len(leaves))
  variables = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  x = _images()
  out = lambda **kw: jit_apply(vit.build_model(dict(cfg, **kw)), variables, x, train=False)  # noqa: E731
  pre, post = out(), out(ffn_norm_position="post_act")
  assert float(jnp.max(jnp.abs(pre - post))) > 1e-3
  gap_variables = jax.tree_util.tree_map_with_path(  # the same weights without the CLS token
      lambda path, p: p[:, 1:] if "pos_embedding" in jax.tree_util.keystr(path) else p,
      {"params": {k: v for k, v in variables["params"].items() if k != "cls"}})
  gap = jit_apply(vit.build_model(dict(cfg, classifier="gap")), gap_variables, x, train=False)
  assert float(jnp.max(jnp.abs(pre - gap))) > 1e-3


def test_bn_model_in_eval_mode_treats_each_example_independently():
  model = vit.build_model(dict(TINY, norm="batch", ffn_norm="batch"))
  variables = vit.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  variables["params"]["head"]["kernel"] += 0.1
  x = _images(4)
  evaluate = jax.jit(lambda xs: model.apply(variables, xs, train=False))
  train = jax.jit(lambda xs: model.apply(variables, xs, train=True, mutable=["batch_stats"])[0])
  np.testing.assert_allclose(evaluate(x[:1])[0], evaluate(x)[0], rtol=1e-5, atol=1e-6)
  train_alone, train_together = train(x[:2]), train(x)
  assert not np.allclose(train_alone[0], train_together[0])  # train mode: batch statistics


def test_dropout_and_drop_path_only_act_in_training():
  model = vit.build_model(dict(TINY, drop_path_rate=0.5, dropout_rate=0.2))
  variables = vit.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  variables["params"]["head"]["kernel"] += 0.1
  x = _images()
  run = jax.jit(lambda key: model.apply(variables, x, train=True, rngs={"dropout": key}))
  assert not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)))
  np.testing.assert_array_equal(run(jax.random.key(3)), run(jax.random.key(3)))
  evaluate = jax.jit(lambda xs: model.apply(variables, xs, train=False))
  assert not np.allclose(run(jax.random.key(1)), evaluate(x))
  np.testing.assert_array_equal(evaluate(x), evaluate(x))


def test_diagnostics_are_sown_per_block_when_asked_for():
  model = vit.build_model(dict(TINY, norm="batch"))
  variables = vit.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  _, state = jit_apply(model, variables, _images(), train=True, mutable=["batch_stats", "diagnostics"])
  diag = state["diagnostics"]["Transformer"]
  for i in range(2):
    block = diag[f"encoderblock_{i}"]
    assert block["residual_rms"][0] > 0
    assert block["MlpBlock_0"]["ffn_hidden_rms"][0] > 0
    assert np.isfinite(block["MultiHeadDotProductAttention_0"]["max_attention_logit"][0])
  # Not mutable: nothing is collected.
  _, state = jit_apply(model, variables, _images(), train=True, mutable=["batch_stats"])
  assert set(state) == {"batch_stats"}


def test_bfloat16_compute_keeps_float32_parameters():
  model = vit.build_model(dict(TINY, dtype="bfloat16", norm="batch", ffn_norm="batch"))
  variables = vit.init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  logits, updates = jit_apply(model, variables, _images(), train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updates["batch_stats"]))
  # The matmuls run in bfloat16: an FFN Dense outputs bf16, and the logits differ (slightly) from
  # the float32 model's with the same weights.
  _, captured = jit_apply(model, variables, _images(), train=False, capture_intermediates=True)
  dense = captured["intermediates"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]
  assert dense["__call__"][0].dtype == jnp.bfloat16
  f32 = vit.build_model(dict(TINY, norm="batch", ffn_norm="batch"))
  params = jax.tree.map(lambda p: p + 0.05, variables["params"])  # a non-zero head
  a = jit_apply(model, {**variables, "params": params}, _images(), train=False)
  b = jit_apply(f32, {**variables, "params": params}, _images(), train=False)
  assert 0 < float(jnp.max(jnp.abs(a - b))) < 0.05 * float(jnp.max(jnp.abs(b)))


def test_vit_batch_statistics_agree_under_pmap_jit_mesh_and_one_device():
  n = jax.device_count()
  cfg = dict(TINY, norm="batch", ffn_norm="batch", bn_include_cls=False)
  variables = vit.init_variables(vit.build_model(cfg), jax.random.key(0), (1, 16, 16, 3))
  x = _images(2 * n, seed=5)

  def stats(model, xs):
    return model.apply(variables, xs, train=True, mutable=["batch_stats"])[1]["batch_stats"]

  one = jax.jit(lambda xs: stats(vit.build_model(cfg), xs))(x)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  on_mesh = jax.jit(lambda xs: stats(vit.build_model(cfg), xs))(
      jax.device_put(x, NamedSharding(mesh, P("data"))))
  pmapped = jax.pmap(lambda xs: stats(vit.build_model(cfg, bn_axis_name="batch"), xs),
                     axis_name="batch")(x.reshape((n, 2) + x.shape[1:]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), on_mesh, one)
  for d in range(n):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[d], b, rtol=1e-4, atol=1e-5), pmapped, one)


@pytest.mark.parametrize("override,field", [
    (dict(norm="group"), "model.norm"),
    (dict(ffn_norm="group"), "model.ffn_norm"),
    (dict(ffn_norm_position="middle"), "model.ffn_norm_position"),
    (dict(classifier="cls"), "model.classifier"),
    (dict(patch_size=5), "model.patch_size"),
    (dict(num_heads=5), "model.num_heads"),
    (dict(hidden_size=0), "model.hidden_size"),
    (dict(num_layers=-1), "model.num_layers"),
    (dict(num_classes=0), "model.num_classes"),
    (dict(drop_path_rate=1.5), "model.drop_path_rate"),
    (dict(bn_group_size=0), "model.bn_group_size"),
    (dict(bn_momentum=1.0), "model.bn_momentum"),
    (dict(dtype="float8"), "model.dtype"),
    (dict(qk_norm="batch"), "model.qk_norm"),
    (dict(dyt_alpha_init=0.0), "model.dyt_alpha_init"),
    (dict(prepbn=dict(warmup_steps=-1)), "model.prepbn.warmup_steps"),
    (dict(prepbn=dict(decay_steps=2.5)), "model.prepbn.decay_steps"),
    (dict(prepbn=dict(warmup_steps=10, decay_steps=5)), "model.prepbn.decay_steps"),
])
def test_bad_model_configs_raise_an_error_naming_the_field(override, field):
  with pytest.raises(ConfigError) as err:
    vit.build_model(dict(TINY, **override))
  assert str(err.value).startswith(field + ":")
  assert "\n" not in str(err.value)


def test_variants_resolve_and_explicit_sizes_override_them():
  kwargs = vit.resolve_model_config(dict(variant="S/8", num_classes=10, image_size=32))
  assert (kwargs["hidden_size"], kwargs["num_layers"], kwargs["patch_size"]) == (384, 12, 8)
  kwargs = vit.resolve_model_config(dict(variant="S/8", num_layers=4, num_classes=10, image_size=32))
  assert kwargs["num_layers"] == 4
  kwargs = vit.resolve_model_config(dict(variant="Ti/16", num_classes=10, image_size=32, norm="BN", ffn_norm="ln"))
  assert (kwargs["norm"], kwargs["ffn_norm"]) == ("batch", "layer")  # short names are accepted
  with pytest.raises(ConfigError, match="model.variant"):
    vit.resolve_model_config(dict(variant="XL/16", num_classes=10, image_size=32))
  with pytest.raises(ConfigError, match="model.hidden_size"):
    vit.resolve_model_config(dict(num_classes=10, image_size=32))


# ---------------------------------------------------------------------------------------------
# DyT, PRepBN and QK-norm
# ---------------------------------------------------------------------------------------------


def _param_count_with(variant, **overrides):
  model = vit.build_model(dict(variant=variant, num_classes=1000, image_size=224, **overrides))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def test_parameter_counts_of_dyt_prepbn_and_qk_norm_variants():
  ln, d, layers, head_dim = 5_717_416, 192, 12, 64  # ViT-Ti/16: 2 * 12 + 1 = 25 norms
  assert _param_count_with("Ti/16", norm="dyt") == ln + 25  # + one alpha per norm
  # PRepBN: LN (2d) + BN (2d) + eta per norm, i.e. LN's count + 25 * (2d + 1).
  assert _param_count_with("Ti/16", norm="prepbn") == ln + 25 * (2 * d + 1) == 5_727_041
  assert _param_count_with("Ti/16", qk_norm="layer") == ln + layers * 2 * 2 * head_dim
  assert _param_count_with("Ti/16", qk_norm="rms") == ln + layers * 2 * head_dim
  assert _param_count_with("Ti/16", norm="batch", ffn_norm="dyt") == ln + layers * (2 * 768 + 1)


def test_dyt_prepbn_and_qk_norm_agree_under_pmap_jit_and_one_device():
  n = jax.device_count()
  cfg = dict(TINY, hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2, image_size=8, norm="prepbn",
             ffn_norm="dyt", qk_norm="layer", prepbn=dict(warmup_steps=1, decay_steps=5))
  variables = vit.init_variables(vit.build_model(cfg), jax.random.key(0), (1, 8, 8, 3))
  leaves, tree = jax.tree.flatten(variables["params"])  # a non-zero head, norms off 1 / 0
  keys = jax.random.split(jax.random.key(9), len(leaves))
  variables["params"] = jax.tree.unflatten(
      tree, [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
  x = _images(2 * n, seed=5, size=8)
  step = jnp.int32(3)  # lam = 0.5: both PRepBN branches matter

  def run(model, xs, s):
    return model.apply(variables, xs, train=True, step=s, mutable=["batch_stats"])

  jitted = jax.jit(lambda xs, s: run(vit.build_model(cfg), xs, s))
  one = jitted(x, step)
  pmapped = jax.pmap(lambda xs, s: run(vit.build_model(cfg, bn_axis_name="batch"), xs, s),
                     axis_name="batch")(x.reshape((n, 2) + x.shape[1:]), jnp.full((n,), step))
  assert float(jnp.max(jnp.abs(one[0]))) > 0.1  # non-trivial logits
  np.testing.assert_allclose(np.asarray(pmapped[0]).reshape(one[0].shape), one[0], rtol=1e-4, atol=1e-5)
  for d in range(n):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[d], b, rtol=1e-4, atol=1e-5), pmapped[1], one[1])
  # The step matters: lam 1 (warm-up) and lam 0 (decayed) give other logits than lam 0.5.
  for s in (0, 5):
    assert float(jnp.max(jnp.abs(jitted(x, jnp.int32(s))[0] - one[0]))) > 1e-4
  # Eval: the static field (at_step) and the call argument give the same logits.
  model = vit.build_model(cfg)
  by_field = jax.jit(lambda xs: vit.at_step(model, 3).apply(variables, xs, train=False))(x)
  by_arg = jax.jit(lambda xs, s: model.apply(variables, xs, train=False, step=s))(x, step)
  # Two programs for one function: equal up to float32 rounding of the logits' scale (~10).
  float32_budget.assert_equal_up_to_rounding(by_field, by_arg)


def test_at_step_collapses_steps_with_equal_lam():
  model = vit.build_model(dict(TINY, norm="prepbn", prepbn=dict(warmup_steps=4, decay_steps=10)))
  assert vit.at_step(model, 2).step == vit.at_step(model, 0).step == 0
  assert vit.at_step(model, 7).step == 7 and vit.at_step(model, 7).lam() == 0.5
  assert vit.at_step(model, 10).step is None and vit.at_step(model, 99).lam() == 0.0
  ln = vit.build_model(TINY)
  assert vit.at_step(ln, 5) is ln
  with pytest.raises(ConfigError, match="model.prepbn.decay_steps"):
    vit.at_step(vit.build_model(dict(TINY, norm="prepbn")), 3)


def test_variable_shapes_are_traced_once_per_model_and_input_shape(monkeypatch):
  traced = []
  real_init = vit.init_variables
  monkeypatch.setattr(vit, "init_variables", lambda *args: traced.append(args[2]) or real_init(*args))
  cfg = dict(TINY, num_layers=1, num_classes=7)  # a model no other test asks about (the cache is per process)
  first = vit.variable_shapes(vit.build_model(cfg), (1, 16, 16, 3))
  again = vit.variable_shapes(vit.build_model(dict(cfg)), [1, 16, 16, 3])  # an equal model, a list shape
  assert traced == [(1, 16, 16, 3)]
  assert first["params"]["head"]["kernel"].shape == (32, 7)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), first) == jax.tree.map(lambda x: (x.shape, x.dtype), again)
  first["params"].clear()  # each call returns its own tree
  assert again["params"] and vit.variable_shapes(vit.build_model(cfg), (1, 16, 16, 3))["params"]
  bn = vit.variable_shapes(vit.build_model(dict(cfg, norm="batch")), (1, 16, 16, 3))
  assert len(traced) == 2 and "batch_stats" in bn
