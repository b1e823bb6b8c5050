"""The train step on synthetic batches, 8 CPU devices: jit == pmap, accumulation == big batch,
BN statistics identical on every device, non-finite steps leave the state untouched."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
import float32_budget  # tests/float32_budget.py (tests/ is on sys.path: conftest.py)
from vitnorm import parallel
from vitnorm.training import placement as placement_lib, plan as plan_lib, state as state_lib

NUM_CLASSES = 10


def tiny_plan(norm="batch", ffn_norm="batch", batch=32, accum=1, parallelism="jit", warmup=1, layers=2,
              dtype="float32"):
  c = common.base_config()
  c.model = common.model_config(variant=None, norm=norm, ffn_norm=ffn_norm, num_classes=NUM_CLASSES,
                                image_size=8, num_channels=1)
  c.model.dtype = dtype
  c.model.update(dict(hidden_size=32, num_layers=layers, mlp_dim=64, num_heads=2, patch_size=4))
  c.batch_size, c.accum_steps, c.parallelism = batch, accum, parallelism
  c.optim.base_lr, c.optim.lr_scaling_batch, c.optim.grad_clip_norm = 3e-3, None, 1.0
  c.optim.warmup_steps = warmup
  return plan_lib.Plan(config=plan_lib.canonical_config(c), num_steps=20, warmup_steps=warmup,
                    steps_per_epoch=10.0, eval_batch_size=batch, num_classes=NUM_CLASSES,
                    num_train_examples=10 * batch, num_eval_examples=batch)


def synthetic_batches(n, batch, seed=0):
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, NUM_CLASSES, (n, batch))
  # Images that depend on the label, so the loss can fall.
  images = rng.randn(n, batch, 8, 8, 1).astype(np.float32) * 0.5 + labels[..., None, None, None] / 5.0
  onehot = np.eye(NUM_CLASSES, dtype=np.float32)[labels]
  return [dict(image=images[i], label=onehot[i]) for i in range(n)]


def run_steps(plan, batches, diagnostics=False):
  mesh = parallel.data_mesh()
  placement = placement_lib.make_placement(plan, mesh)
  state = placement.put_state(state_lib.create_train_state(plan, jax.random.PRNGKey(0)))
  metrics = []
  for b in batches:
    if plan.config.parallelism == "jit":
      placed = jax.device_put(b, parallel.batch_sharding(mesh))
    else:
      placed = jax.tree.map(lambda x: x.reshape((jax.local_device_count(), -1) + x.shape[1:]), b)
    state, m = placement.step(state, placed, jax.random.PRNGKey(1), diagnostics)
    metrics.append(placement.metrics_to_host(m))
  return placement, state, metrics


@pytest.fixture(scope="module")
def jit_and_pmap_runs():
  batches = synthetic_batches(4, 32)
  runs = {}
  for mode in ("jit", "pmap"):
    plan = tiny_plan(parallelism=mode)
    runs[mode] = run_steps(plan, batches, diagnostics=True)  # one compilation per mode
  return runs


def _max_abs_diff(a, b):
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def test_jit_and_pmap_give_the_same_losses_params_and_bn_stats(jit_and_pmap_runs):
  (pj, sj, mj), (pp, sp, mp) = jit_and_pmap_runs["jit"], jit_and_pmap_runs["pmap"]
  np.testing.assert_allclose([m["loss"] for m in mj], [m["loss"] for m in mp], rtol=1e-5)
  np.testing.assert_allclose([m["grad_norm"] for m in mj], [m["grad_norm"] for m in mp], rtol=1e-4)
  assert mj[-1]["loss"] < mj[0]["loss"]  # it learns
  gj, gp = pj.global_state(sj), pp.global_state(sp)
  # Parameters and BN running statistics: tests/float32_budget.py (reduction order, amplified by
  # Adam for near-zero gradients; a bound on the largest element was a bound for one CPU). Unsynced
  # per-device statistics differ from synced ones by a sizeable fraction of their movement.
  initial = state_lib.create_train_state(tiny_plan(), jax.random.PRNGKey(0))
  for part in ("params", "batch_stats"):
    float32_budget.assert_same_trajectory(getattr(gp, part), getattr(gj, part),
                                          getattr(initial, part), part)
  # The running statistics moved away from their initial values (0 mean, 1 var).
  assert any(float(np.max(np.abs(np.asarray(x)))) > 1e-3 for x in jax.tree.leaves(gj.batch_stats))
  for key in mj[-1]:
    if key.startswith("diag/"):
      np.testing.assert_allclose(mj[-1][key], mp[-1][key], rtol=1e-4, err_msg=key)


def test_pmap_bn_running_stats_identical_on_every_device(jit_and_pmap_runs):
  _, state, _ = jit_and_pmap_runs["pmap"]
  for leaf in jax.tree.leaves(state.batch_stats):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 8
    for s in shards[1:]:
      np.testing.assert_array_equal(s, shards[0])


def test_diagnostics_per_block(jit_and_pmap_runs):
  _, _, metrics = jit_and_pmap_runs["jit"]
  diag = metrics[3]
  for i in range(2):
    for name in ("residual_rms", "ffn_hidden_rms", "max_attention_logit", "grad_norm"):
      assert np.isfinite(diag[f"diag/block_{i}/{name}"]), name
    assert diag[f"diag/block_{i}/residual_rms"] > 0
  # Block gradient norms are parts of the (pre-clipping) global gradient norm.
  blocks = np.sqrt(sum(diag[f"diag/block_{i}/grad_norm"] ** 2 for i in range(2)))
  assert 0 < blocks <= diag["grad_norm"] * (1 + 1e-5)


def test_gradient_accumulation_equals_one_big_batch():
  # LayerNorm: each example's loss is independent of the others, so the mean gradient of 4
  # micro-batches of 8 is the gradient of the batch of 32.
  batches = synthetic_batches(2, 32, seed=1)
  _, whole, m1 = run_steps(tiny_plan(norm="layer", ffn_norm="none", accum=1, layers=1), batches)
  _, accum, m4 = run_steps(tiny_plan(norm="layer", ffn_norm="none", accum=4, layers=1), batches)
  np.testing.assert_allclose([m["loss"] for m in m1], [m["loss"] for m in m4], rtol=1e-5)
  np.testing.assert_allclose([m["grad_norm"] for m in m1], [m["grad_norm"] for m in m4], rtol=1e-4)
  assert _max_abs_diff(whole.params, accum.params) < 1e-5
  assert int(accum.step) == 2


def test_non_finite_step_leaves_the_state_unchanged(jit_and_pmap_runs):
  placement, state, _ = jit_and_pmap_runs["jit"]  # reuses its compiled step
  batches = synthetic_batches(2, 32, seed=2)
  batches[1] = dict(batches[1], image=np.full_like(batches[1]["image"], np.nan))
  sharding = parallel.batch_sharding(placement.mesh)
  state = placement.put_state(state)
  state, m0 = placement.step(state, jax.device_put(batches[0], sharding), jax.random.PRNGKey(1), True)
  before = jax.tree.map(np.asarray, state)
  state, m1 = placement.step(state, jax.device_put(batches[1], sharding), jax.random.PRNGKey(1), True)
  assert placement.metrics_to_host(m0)["finite"] and not placement.metrics_to_host(m1)["finite"]
  after = jax.tree.map(np.asarray, state)
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after))


def test_bfloat16_compute_keeps_float32_parameters():
  batches = synthetic_batches(3, 32, seed=3)
  runs = {d: run_steps(tiny_plan(norm="layer", ffn_norm="none", layers=1, dtype=d), batches)
          for d in ("float32", "bfloat16")}
  _, state, metrics = runs["bfloat16"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if hasattr(x, "dtype")
             and jnp.issubdtype(x.dtype, jnp.floating))
  # The first loss is log(10) in any dtype (zero-initialized head); after two updates the bfloat16
  # compute shows: the losses differ from float32 by more than float32 rounding, within bf16's.
  f32 = [m["loss"] for m in runs["float32"][2]]
  bf16 = [m["loss"] for m in metrics]
  assert bf16[0] == pytest.approx(np.log(NUM_CLASSES), rel=1e-2)
  assert bf16[2] != pytest.approx(f32[2], rel=1e-5) and bf16[2] == pytest.approx(f32[2], rel=5e-2)
  assert np.isfinite(bf16[1]) and metrics[1]["grad_norm"] > 0
