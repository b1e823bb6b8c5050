"""config.optim.grad_clip_norm and config.model.dtype reach the real train step (jit, 8 CPU devices).

Adam's first update is about -lr * sign(g) whatever the gradient's scale, so clipping is read off
the optimizer's moments instead: after one step mu = (1 - b1) * g_clipped exactly. bfloat16 is
checked with a non-zero head (a zero head gives log(num_classes) in any dtype).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from vitnorm import parallel
from vitnorm.model import vit
from vitnorm.training import placement as placement_lib, plan as plan_lib, state as state_lib

NUM_CLASSES, BATCH, CLIP = 10, 32, 1e-3


def tiny_plan(clip=CLIP, dtype="float32"):
  c = common.base_config()
  c.model = common.model_config(variant=None, norm="layer", num_classes=NUM_CLASSES, image_size=8,
                                num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=1, mlp_dim=64, num_heads=2, patch_size=4, dtype=dtype))
  c.batch_size = BATCH
  c.optim.update(dict(base_lr=1e-3, lr_scaling_batch=None, warmup_steps=0, grad_clip_norm=clip))
  return plan_lib.Plan(config=plan_lib.canonical_config(c), num_steps=10, warmup_steps=0,
                       steps_per_epoch=10.0, eval_batch_size=BATCH, num_classes=NUM_CLASSES,
                       num_train_examples=10 * BATCH, num_eval_examples=BATCH)


def batch(seed=0):
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, NUM_CLASSES, BATCH)
  images = rng.randn(BATCH, 8, 8, 1).astype(np.float32) + labels[:, None, None, None] / 5.0
  return dict(image=images, label=np.eye(NUM_CLASSES, dtype=np.float32)[labels])


def one_step(plan, perturb_head=False):
  """(initial state, state after one train step, host metrics) through make_placement's jit step."""
  mesh = parallel.data_mesh()
  placement = placement_lib.make_placement(plan, mesh)
  state = state_lib.create_train_state(plan, jax.random.PRNGKey(0))
  if perturb_head:  # random head: logits (and the loss) depend on every activation
    head = jax.random.normal(jax.random.PRNGKey(5), state.params["head"]["kernel"].shape)
    state = state.replace(params={**state.params, "head": {**state.params["head"], "kernel": head}})
  new, metrics = placement.step(placement.put_state(state), jax.device_put(batch(), parallel.batch_sharding(mesh)),
                                jax.random.PRNGKey(1), False)
  return state, jax.tree.map(np.asarray, new), placement.metrics_to_host(metrics)


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


@pytest.fixture(scope="module")
def clipped_step():
  return one_step(tiny_plan(), perturb_head=True)


def test_clipping_scales_the_gradient_that_reaches_adam(clipped_step):
  _, clipped, m_clipped = clipped_step
  _, unclipped, m_unclipped = one_step(tiny_plan(clip=None), perturb_head=True)
  b1, b2 = 0.9, 0.999
  grad_norm = m_clipped["grad_norm"]  # reported before clipping
  assert grad_norm == pytest.approx(m_unclipped["grad_norm"], rel=1e-6)
  assert grad_norm > 100 * CLIP  # so clipping is active
  mu = optax.tree_utils.tree_get(clipped.opt_state, "mu")
  nu = optax.tree_utils.tree_get(clipped.opt_state, "nu")
  assert _norm(mu) == pytest.approx((1 - b1) * CLIP, rel=1e-4)
  assert float(sum(np.sum(x) for x in jax.tree.leaves(nu))) == pytest.approx((1 - b2) * CLIP ** 2, rel=1e-4)
  mu_free = optax.tree_utils.tree_get(unclipped.opt_state, "mu")
  assert _norm(mu_free) == pytest.approx((1 - b1) * grad_norm, rel=1e-4)
  # Same direction: mu_clipped = mu_unclipped * CLIP / |g|.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b * CLIP / grad_norm, rtol=1e-3, atol=1e-12),
               mu, mu_free)


def test_bfloat16_compute_changes_the_numbers_but_not_the_parameter_dtype(clipped_step):
  _, f32, m32 = clipped_step
  initial, bf16, m16 = one_step(tiny_plan(dtype="bfloat16"), perturb_head=True)
  # The same program in float32 repeats its loss exactly; bfloat16 rounds it differently, within
  # bfloat16 precision (8 bits of mantissa).
  assert m16["loss"] != m32["loss"]
  assert m16["loss"] == pytest.approx(m32["loss"], rel=3e-2)
  assert m16["grad_norm"] != m32["grad_norm"] and m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=0.1)
  assert np.log(NUM_CLASSES) * 1.05 < m32["loss"]  # the random head moved the loss away from log(10)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16.params))
  # Inside the model the activations are bfloat16; the logits come out as float32.
  model = vit.build_model(tiny_plan(dtype="bfloat16").config.model)
  logits, inter = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False, capture_intermediates=True,
                                                   mutable=["intermediates"]))(initial.params, batch()["image"])
  block = inter["intermediates"]["Transformer"]["encoderblock_0"]
  assert block["MlpBlock_0"]["Dense_0"]["__call__"][0].dtype == jnp.bfloat16
  assert inter["intermediates"]["head"]["__call__"][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32
