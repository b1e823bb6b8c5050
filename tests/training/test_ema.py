"""The EMA covers the BN statistics: kept beside the EMA of the weights (same decay), checkpointed,
restored, and used by eval_ema and restore_variables(use_ema=True); old checkpoints warn."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from vitnorm import data, parallel
from vitnorm.model import vit
from vitnorm import checkpoints, evaluation
from vitnorm.training import loop, plan as plan_lib, state as state_lib, step as step_lib


def tiny_config(ema_decay=0.9):
  c = common.base_config()
  c.model = common.model_config(variant=None, norm="bn", ffn_norm="bn", num_classes=10, image_size=8,
                                num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4))
  c.data = common.data_config(name="numpy:digits", image_size=8)  # in memory: the feed is not under test
  c.data.update(dict(channels=1, cache=True, inception_crop=False, hflip=False,
                     normalize_mean=(0.5,), normalize_std=(0.5,), eval_crop_fraction=1.0))
  c.batch_size, c.num_steps = 64, 16
  c.optim.update(dict(base_lr=3e-3, lr_scaling_batch=None, warmup_steps=3, grad_clip_norm=1.0,
                      ema_decay=ema_decay))
  c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = 8, 0, 8, 0
  c.progress_bar, c.async_checkpoints = "off", False
  return c


def _equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ema_run"))
  return workdir, loop.train_and_evaluate(tiny_config(), workdir)


def test_ema_statistics_are_checkpointed_and_differ_from_the_live_ones(ema_run):
  workdir, summary = ema_run
  assert summary["status"] == "completed"
  live, _ = checkpoints.restore_variables(workdir)
  ema, _ = checkpoints.restore_variables(workdir, use_ema=True)
  assert set(ema) == {"params", "batch_stats"}
  assert jax.tree.structure(ema["batch_stats"]) == jax.tree.structure(live["batch_stats"])
  # Every statistic differs: the EMA lags the live running averages.
  assert not any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                              ema["batch_stats"], live["batch_stats"])))


def test_eval_ema_equals_evaluating_ema_params_with_ema_statistics_by_hand(ema_run):
  workdir, summary = ema_run
  cfg = tiny_config()
  ema, _ = checkpoints.restore_variables(workdir, use_ema=True)
  live, _ = checkpoints.restore_variables(workdir)
  model = vit.build_model(plan_lib.canonical_config(cfg).model)

  def evaluate(variables):
    return evaluation.evaluate_classifier(model, variables, data.eval_batches(cfg.data, global_batch_size=64),
                                          mesh=parallel.data_mesh())

  by_hand = evaluate(ema)
  assert summary["metrics"]["eval_ema/loss"] == pytest.approx(by_hand["loss"], rel=1e-6)
  assert summary["metrics"]["eval_ema/top1"] == by_hand["top1"]
  # The old way (EMA weights with the live statistics) gives another number.
  mixed = evaluate({"params": ema["params"], "batch_stats": live["batch_stats"]})
  assert abs(mixed["loss"] - by_hand["loss"]) > 1e-4


def test_decay_zero_gives_exactly_the_live_variables():
  cfg = tiny_config(ema_decay=0.5)
  plan = plan_lib.Plan(config=plan_lib.canonical_config(cfg), num_steps=16, warmup_steps=3,
                       steps_per_epoch=10.0, eval_batch_size=64, num_classes=10, num_train_examples=640,
                       num_eval_examples=64)
  state = state_lib.create_train_state(plan, jax.random.PRNGKey(0))
  model = vit.build_model(plan.config.model)
  step = jax.jit(functools.partial(step_lib.train_step, model=model, schedule=state_lib.make_schedule(plan),
                                   accum_steps=1, ema_decay=0.0))
  rng = np.random.RandomState(0)
  for _ in range(2):
    batch = dict(image=jnp.asarray(rng.randn(64, 8, 8, 1), jnp.float32),
                 label=jnp.asarray(np.eye(10, dtype=np.float32)[rng.randint(0, 10, 64)]))
    state, metrics = step(state, batch, jax.random.PRNGKey(1))
    assert bool(metrics["finite"])
    assert _equal(state.ema_params, state.params)
    assert _equal(state.ema_batch_stats, state.batch_stats)
  assert not _equal(state.batch_stats, state_lib.create_train_state(plan, jax.random.PRNGKey(0)).batch_stats)


def test_checkpoint_without_ema_statistics_restores_with_a_warning(ema_run, tmp_path, capfd):
  """A checkpoint written before the EMA of the statistics existed: resume and use_ema both warn."""
  cfg = tiny_config()
  workdir = str(tmp_path)
  source, _ = checkpoints.restore_variables(ema_run[0], use_ema=False)
  ema_params = checkpoints.restore_variables(ema_run[0], use_ema=True)[0]["params"]
  checkpoints.write_run_config(workdir, plan_lib.canonical_config(cfg))
  ckpt = checkpoints.Checkpointer(workdir, keep=2, async_save=False)
  state = state_lib.create_train_state(plan_lib.prepare(cfg), jax.random.PRNGKey(0))
  ckpt.save(8, {"params": source["params"], "batch_stats": source["batch_stats"], "ema_params": ema_params},
            {"step": jnp.asarray(8, jnp.int32), "opt_state": state.opt_state})
  assert checkpoints.EMA_BATCH_STATS not in ckpt.model_keys(8)
  capfd.readouterr()
  restored = loop._restore(ckpt, 8, state, parallel.data_mesh())  # pylint: disable=protected-access
  ckpt.close()
  err = capfd.readouterr().err
  assert "warning: checkpoint 8" in err and "no EMA of the BatchNorm statistics" in err
  assert _equal(jax.device_get(restored.ema_batch_stats), source["batch_stats"])
  variables, _ = checkpoints.restore_variables(workdir, use_ema=True)
  err = capfd.readouterr().err
  assert "warning: checkpoint 8" in err and "evaluated with the live statistics" in err
  assert _equal(variables["batch_stats"], source["batch_stats"])
