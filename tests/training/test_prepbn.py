"""PRepBN in training: lam follows the optimizer step in the train step and in evaluation, decay_steps
resolves to SLAB's fraction of num_steps, resume across the warm-up / decay boundaries is bit-exact, and a checkpoint
is folded only once lam is 0 (tiny ViT on the offline 8x8 `digits`, 8 CPU devices)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from vitnorm import data, workdir as run_logging
from vitnorm.errors import ConfigError
from vitnorm.inference import run_report
from vitnorm.model import norms, vit
from vitnorm import checkpoints, evaluation
from vitnorm.training import loop, plan as plan_lib, state as state_lib
from vitnorm.training import step as step_lib

WARMUP, DECAY, STEPS = 3, 9, 12  # lam: 1 for steps 0-2, linear to 0 at step 9, 0 for 9-11


def tiny_config(**overrides):
  c = common.base_config()
  c.model = common.model_config(variant=None, norm="prepbn", ffn_norm="none", num_classes=10,
                                image_size=8, num_channels=1)
  c.model.update(dict(hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2, patch_size=4))
  c.model.prepbn.warmup_steps, c.model.prepbn.decay_steps = WARMUP, DECAY
  c.data = common.data_config(name="numpy:digits", image_size=8)  # in memory: the feed is not under test
  c.data.update(dict(channels=1, cache=True, inception_crop=False, hflip=False,
                     normalize_mean=(0.5,), normalize_std=(0.5,), eval_crop_fraction=1.0))
  c.batch_size = 32
  c.num_steps = STEPS
  c.optim.update(dict(base_lr=3e-3, lr_scaling_batch=None, warmup_steps=2, grad_clip_norm=1.0))
  c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = 3, 6, 3, 0
  c.keep_checkpoints = 5
  c.progress_bar = "off"
  c.async_checkpoints = False
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return c


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("prepbn"))
  return workdir, loop.train_and_evaluate(tiny_config(), workdir)


def test_slab_decay_steps_is_slabs_fraction_of_the_run():
  # SLAB: lam 1 -> 0 over 60,000 of DeiT's 300 x 1,251 = 375,300 steps, then RepBN alone.
  assert norms.SLAB_TOTAL_STEPS == 375_300
  assert norms.slab_decay_steps(375_300) == 60_000
  assert norms.slab_decay_steps(1500) == 240  # ceil(1500 * 60000 / 375300) = ceil(239.8)
  assert norms.slab_decay_steps(1500, warmup_steps=100) == 100 + 224  # ceil(1400 * 0.15987)
  assert norms.slab_decay_steps(3) == 1  # at least one step of decay


def test_decay_steps_default_to_slabs_fraction_and_bad_values_name_the_field():
  plan = plan_lib.prepare(tiny_config(**{"model.prepbn.decay_steps": None}))
  # warm-up 3, then ceil(9 * 0.15987) = 2 steps of decay: lam reaches 0 at step 5 of 12.
  assert plan.config.model.prepbn.decay_steps == 5
  assert vit.build_model(plan.config.model).norm_options.prepbn_decay_steps == 5
  for decay, message in ((STEPS + 1, "after the last step"), (WARMUP - 1, "before warmup_steps")):
    with pytest.raises(ConfigError) as err:
      plan_lib.prepare(tiny_config(**{"model.prepbn.decay_steps": decay}))
    assert err.value.field == "model.prepbn.decay_steps" and message in str(err.value)
  # Models without PRepBN keep the field unset (their configs do not change).
  assert plan_lib.prepare(tiny_config(**{"model.norm": "dyt", "model.prepbn.decay_steps": None})
                          ).config.model.prepbn.decay_steps is None


def test_train_step_uses_lam_of_the_state_step():
  plan = plan_lib.prepare(tiny_config())
  model = vit.build_model(plan.config.model)
  state = state_lib.create_train_state(plan, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  batch = dict(image=jnp.asarray(rng.normal(size=(8, 8, 8, 1)), jnp.float32),
               label=jax.nn.one_hot(jnp.arange(8) % 10, 10))
  params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), jnp.float32),
                        state.params)  # a non-zero head, so the loss depends on the norm
  state = state.replace(params=params)
  run = jax.jit(functools.partial(step_lib.train_step, model=model, schedule=state_lib.make_schedule(plan),
                                  accum_steps=1, ema_decay=0.0))
  forward = jax.jit(lambda s: model.apply({"params": params, "batch_stats": state.batch_stats},
                                          batch["image"], train=True, step=s, mutable=["batch_stats"]))
  losses = {}
  for s in (0, 6, DECAY):
    _, metrics = run(state.replace(step=jnp.int32(s)), batch, jax.random.PRNGKey(1))
    logits, _ = forward(jnp.int32(s))
    expected = float(jnp.mean(optax.softmax_cross_entropy(logits, batch["label"])))
    losses[s] = float(metrics["loss"])
    np.testing.assert_allclose(losses[s], expected, rtol=1e-5)
  assert len({round(v, 5) for v in losses.values()}) == 3  # lam 1, 0.5 and 0 differ


def test_resume_across_the_warmup_and_decay_boundaries_is_bit_exact(uninterrupted, tmp_path):
  workdir = str(tmp_path / "resumed")
  first = loop.train_and_evaluate(tiny_config(**{"debug.preempt_at_step": 2}), workdir)  # in warm-up
  assert first["status"] == "preempted" and first["step"] == 2
  second = loop.train_and_evaluate(tiny_config(), workdir)  # crosses step 3 (decay) and 9 (lam 0)
  assert second["status"] == "completed" and second["step"] == STEPS
  resumed, _ = checkpoints.restore_variables(workdir)
  expected, _ = checkpoints.restore_variables(uninterrupted[0])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(expected))


def test_evaluation_during_training_uses_lam_of_that_step(uninterrupted):
  workdir, summary = uninterrupted
  assert summary["status"] == "completed"
  logged = {r["step"]: r["eval/loss"] for r in run_logging.read_metrics(workdir) if "eval/loss" in r}
  assert sorted(logged) == [6, 12]
  cfg = checkpoints.load_run_config(workdir)
  model = vit.build_model(cfg.model)
  variables, _ = checkpoints.restore_variables(workdir, 6)

  def loss(m):
    return evaluation.evaluate_classifier(m, variables, data.eval_batches(cfg.data, global_batch_size=32))["loss"]

  at_6 = loss(vit.at_step(model, 6))  # lam(6) = 0.5
  np.testing.assert_allclose(logged[6], at_6, rtol=1e-6)
  assert abs(loss(model) - at_6) > 1e-6  # lam 0 would have given another loss


def test_evaluate_folds_only_checkpoints_with_lam_zero(uninterrupted):
  workdir, _ = uninterrupted
  early = run_report.evaluate(workdir=workdir, step=6, measure=False)
  assert not early["folding"]["applied"]
  assert "folding becomes valid from step 9" in early["folding"]["reason"]
  assert set(early["accuracy"]) >= {run_report.AS_TRAINED} and run_report.FOLDED not in early["accuracy"]
  final = run_report.evaluate(workdir=workdir, measure=False)
  assert final["folding"]["applied"] and final["accuracy"]["folded_agrees"]
  assert final["accuracy"]["folded_loss_difference"] < 1e-5
