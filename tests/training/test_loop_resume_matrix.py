"""The whole training loop with everything on: dropout, attention dropout, drop path, flips, random
shifts, mixup, gradient accumulation, async checkpoints and the EMA, under jit and under pmap.

For each parallelism: a preempted-then-resumed run ends bit-identical (params, BN statistics, EMA,
eval metrics) to an uninterrupted one; the EMA is updated every step by its formula, checkpointed
and evaluated as eval_ema/*. In-process on 8 CPU devices with a tiny ViT on the offline `digits`.
"""
import jax
import numpy as np
import pytest

from configs import common
from vitnorm import data, parallel, workdir as workdir_lib
from vitnorm.model import vit
from vitnorm import checkpoints, evaluation
from vitnorm.training import loop

NUM_STEPS, PREEMPT_AT, EMA_DECAY = 8, 5, 0.8


def full_config(parallelism, **debug):
  c = common.base_config()
  c.parallelism = parallelism
  c.model = common.model_config(variant=None, norm="bn", ffn_norm="bn", num_classes=10, image_size=8,
                                num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4,
                      dropout_rate=0.1, attention_dropout_rate=0.1, drop_path_rate=0.2))
  c.data = common.data_config(name="digits", image_size=8)
  c.data.update(dict(channels=1, cache=True, inception_crop=False, hflip=True, random_shift_pad=1,
                     mixup_alpha=0.5, normalize_mean=(0.5,), normalize_std=(0.5,), eval_crop_fraction=1.0))
  c.batch_size, c.accum_steps, c.num_steps = 64, 2, NUM_STEPS  # 4 examples per device and micro-batch
  c.optim.update(dict(base_lr=3e-3, lr_scaling_batch=None, warmup_steps=2, grad_clip_norm=1.0,
                      ema_decay=EMA_DECAY))
  # Checkpoints at 7 and 8 (two consecutive EMA states) and at the preemption (5).
  c.log_every, c.eval_every, c.checkpoint_every, c.keep_checkpoints = 2, 4, 7, 3
  c.diagnostics_every = 0  # one compiled step per parallelism
  c.async_checkpoints = True
  c.progress_bar = "off"
  c.debug.update(debug)
  return c


def _variables(workdir, step, use_ema=False):
  variables, restored_step = checkpoints.restore_variables(workdir, step, use_ema=use_ema)
  assert restored_step == step
  return jax.tree.map(np.asarray, variables)


def _eval_rows(workdir):
  return {r["step"]: r for r in workdir_lib.read_metrics(workdir) if "eval/top1" in r}


@pytest.fixture(scope="module", params=["jit", "pmap"])
def runs(request, tmp_path_factory):
  """(parallelism, uninterrupted workdir, resumed workdir, first summary, second summary)."""
  mode = request.param
  whole = str(tmp_path_factory.mktemp(f"{mode}_whole"))
  assert loop.train_and_evaluate(full_config(mode), whole)["status"] == "completed"
  resumed = str(tmp_path_factory.mktemp(f"{mode}_resumed"))
  first = loop.train_and_evaluate(full_config(mode, preempt_at_step=PREEMPT_AT), resumed)
  second = loop.train_and_evaluate(full_config(mode), resumed)
  return mode, whole, resumed, first, second


def test_preempted_and_resumed_run_is_bit_identical_to_an_uninterrupted_one(runs):
  mode, whole, resumed, first, second = runs
  assert first["status"] == "preempted" and first["step"] == PREEMPT_AT
  assert second["status"] == "completed" and second["step"] == NUM_STEPS
  assert checkpoints.all_steps(whole) == [7, 8] and checkpoints.all_steps(resumed) == [5, 7, 8]
  for use_ema in (False, True):
    expected, got = _variables(whole, NUM_STEPS, use_ema), _variables(resumed, NUM_STEPS, use_ema)
    assert set(expected) == {"params", "batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, got, expected)
  # The evaluation after the resume (step 8) logs exactly the uninterrupted run's numbers.
  rows_whole, rows_resumed = _eval_rows(whole), _eval_rows(resumed)
  for key in ("eval/top1", "eval/loss", "eval_ema/top1", "eval_ema/loss"):
    assert rows_resumed[NUM_STEPS][key] == rows_whole[NUM_STEPS][key], (mode, key)
  assert rows_resumed[4]["eval/loss"] == rows_whole[4]["eval/loss"]  # logged before the preemption


def test_the_ema_is_updated_every_step_checkpointed_and_evaluated(runs):
  mode, whole, _, _, _ = runs
  params = {s: _variables(whole, s)["params"] for s in (7, 8)}
  ema = {s: _variables(whole, s, use_ema=True) for s in (7, 8)}
  # ema_8 = d * ema_7 + (1 - d) * params_8, leaf by leaf.
  jax.tree.map(lambda e8, e7, p8: np.testing.assert_allclose(
      e8, EMA_DECAY * e7 + (1 - EMA_DECAY) * p8, rtol=1e-5, atol=1e-7),
      ema[8]["params"], ema[7]["params"], params[8])
  moved = jax.tree.leaves(jax.tree.map(lambda e, p: float(np.max(np.abs(e - p))), ema[8]["params"], params[8]))
  assert max(moved) > 1e-4  # the EMA lags the weights (it is not a copy of them)
  # eval_ema/* is logged at every evaluation and is the evaluation of the checkpointed EMA.
  rows = _eval_rows(whole)
  assert sorted(rows) == [4, 8]
  assert all({"eval_ema/top1", "eval_ema/loss"} <= set(r) for r in rows.values())
  cfg = checkpoints.load_run_config(whole)
  model = vit.build_model(cfg.model)
  batches = data.eval_batches(cfg.data, global_batch_size=32)
  result = evaluation.evaluate_classifier(model, ema[8], batches, mesh=parallel.data_mesh())
  assert result["loss"] == pytest.approx(rows[8]["eval_ema/loss"], rel=1e-5)
  assert result["top1"] == pytest.approx(rows[8]["eval_ema/top1"])
  assert rows[8]["eval_ema/loss"] != rows[8]["eval/loss"]
  status = workdir_lib.read_status(whole)
  assert status["metrics"]["eval_ema/loss"] == rows[8]["eval_ema/loss"]
