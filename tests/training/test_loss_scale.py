"""float16 training with dynamic loss scaling (vitnorm.training.loss_scale), 8 CPU devices.

- The scale halves on an injected gradient overflow (the update skipped, counted, the parameters
  untouched) and doubles after `growth_interval` good steps: exact numbers.
- A non-finite *loss* (the constructed q.k overflow of tests/model/test_precision.py) is not a
  skipped step: the state stays unchanged and the step reports finite=False (DeiT's crash); the
  monitor names which happened.
- jit and pmap give the same float16 steps; other dtypes carry no scaler.
- Bad optim.loss_scale values are one-line ConfigErrors.
"""
import jax
import numpy as np
import pytest

from configs import common
from vitnorm import parallel
from vitnorm.errors import ConfigError
from vitnorm.training import monitor as monitor_lib, optim, placement as placement_lib, plan as plan_lib
from vitnorm.training import state as state_lib

NUM_CLASSES, BATCH = 10, 32


def fp16_plan(parallelism="jit", init=1024.0, growth_interval=3, norm="layer", dtype="float16", **model):
  c = common.base_config()
  c.model = common.model_config(variant=None, norm=norm, num_classes=NUM_CLASSES, image_size=8,
                                num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=1, mlp_dim=64, num_heads=2, patch_size=4,
                      dtype=dtype, **model))
  c.batch_size, c.parallelism = BATCH, parallelism
  c.optim.update(dict(base_lr=1e-3, lr_scaling_batch=None, warmup_steps=0))
  c.optim.loss_scale.update(dict(init=init, growth_interval=growth_interval))
  return plan_lib.Plan(config=plan_lib.canonical_config(c), num_steps=10, warmup_steps=0,
                       steps_per_epoch=10.0, eval_batch_size=BATCH, num_classes=NUM_CLASSES,
                       num_train_examples=10 * BATCH, num_eval_examples=BATCH)


def make_batch(seed=0, label_factor=1.0):
  rng = np.random.RandomState(seed)
  labels = rng.randint(0, NUM_CLASSES, BATCH)
  images = rng.randn(BATCH, 8, 8, 1).astype(np.float32) + labels[:, None, None, None] / 5.0
  return dict(image=images, label=np.eye(NUM_CLASSES, dtype=np.float32)[labels] * label_factor)


# Targets x 1e6: the loss stays finite (~2e6, well inside float32) but its gradient at the logits,
# x 1024 (the scale) / 32 examples, is ~3e7: far past float16's 65,504 on the way back.
OVERFLOW = 1e6


class Runner:
  def __init__(self, plan, state=None):
    self.mesh = parallel.data_mesh()
    self.plan = plan
    self.placement = placement_lib.make_placement(plan, self.mesh)
    if state is None:
      state = state_lib.create_train_state(plan, jax.random.PRNGKey(0))
      head = state.params["head"]  # a random head, so every layer gets a gradient
      head = dict(head, kernel=jax.random.normal(jax.random.PRNGKey(5), head["kernel"].shape) * 0.1)
      state = state.replace(params={**state.params, "head": head})
    self.state = self.placement.put_state(state)

  def step(self, batch):
    if self.plan.config.parallelism == "jit":
      placed = jax.device_put(batch, parallel.batch_sharding(self.mesh))
    else:
      placed = jax.tree.map(lambda x: x.reshape((jax.local_device_count(), -1) + x.shape[1:]), batch)
    before = jax.tree.map(np.asarray, self.host_state())
    self.state, metrics = self.placement.step(self.state, placed, jax.random.PRNGKey(1), False)
    return before, self.placement.metrics_to_host(metrics)

  def host_state(self):
    return jax.tree.map(np.asarray, self.placement.global_state(self.state))


@pytest.fixture(scope="module")
def overflow_run():
  """Steps: good, overflow, good, good, good, good (growth_interval 3, init scale 1024)."""
  runner = Runner(fp16_plan())
  records = []
  for i, factor in enumerate([1.0, OVERFLOW, 1.0, 1.0, 1.0, 1.0]):
    before, metrics = runner.step(make_batch(i, factor))
    records.append((before, metrics, runner.host_state()))
  return records


def test_loss_scale_halves_on_overflow_and_doubles_after_the_growth_interval(overflow_run):
  scales = [m["loss_scale"] for _, m, _ in overflow_run]  # the scale each step used
  after = [float(s.loss_scale.scale) for _, _, s in overflow_run]
  counters = [int(s.loss_scale.counter) for _, _, s in overflow_run]
  assert scales == [1024.0, 1024.0, 512.0, 512.0, 512.0, 1024.0]
  assert after == [1024.0, 512.0, 512.0, 512.0, 1024.0, 1024.0]
  assert counters == [1, 0, 1, 2, 0, 1]
  assert [m["skipped"] for _, m, _ in overflow_run] == [False, True, False, False, False, False]
  assert [m["skipped_steps"] for _, m, _ in overflow_run] == [0, 1, 1, 1, 1, 1]
  assert all(m["finite"] for _, m, _ in overflow_run)  # a skipped step is no crash
  assert np.isfinite(overflow_run[1][1]["loss"]) and not np.isfinite(overflow_run[1][1]["grad_norm"])


def test_a_skipped_step_keeps_parameters_and_optimizer_state_but_advances_the_step(overflow_run):
  before, _, after = overflow_run[1]
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)
  assert int(after.step) == int(before.step) + 1
  # A good step changes the parameters, and nothing non-finite ever enters the state.
  before, _, after = overflow_run[2]
  assert not np.array_equal(after.params["head"]["kernel"], before.params["head"]["kernel"])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(after))


def test_unscaled_gradients_equal_the_float16_gradient_of_the_loss():
  # The scale cancels: two scales that both avoid overflow give the same first update (within
  # float16 rounding of the scaled backward pass, relative to the gradient's size).
  norms = []
  for init in (256.0, 4096.0):
    _, metrics = Runner(fp16_plan(init=init)).step(make_batch())
    norms.append(metrics["grad_norm"])
  assert norms[0] == pytest.approx(norms[1], rel=1e-2)


def test_a_non_finite_loss_is_a_crash_not_a_skipped_step():
  from tests.model.test_precision import _overflowing_attention  # pylint: disable=g-import-not-at-top
  plan = fp16_plan(attention_logits="compute", attention_scale="product")
  state = state_lib.create_train_state(plan, jax.random.PRNGKey(0))
  from vitnorm.model import vit  # pylint: disable=g-import-not-at-top
  params = _overflowing_attention(vit.build_model(plan.config.model))["params"]
  runner = Runner(plan, state.replace(params=params))
  before, metrics = runner.step(make_batch())
  assert not np.isfinite(metrics["loss"])
  assert not metrics["finite"] and not metrics["skipped"]
  after = runner.host_state()
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  assert float(after.loss_scale.scale) == 1024.0 and int(after.loss_scale.skipped_steps) == 0
  assert int(after.step) == int(before.step)  # nothing of the step entered the state
  monitor = monitor_lib.Monitor(0.0, np.log(NUM_CLASSES), 0)
  with pytest.raises(monitor_lib.TrainingDiverged, match="non-finite loss .* in float16") as err:
    monitor.observe(1, metrics)
  assert err.value.kind == monitor_lib.NON_FINITE_LOSS


def test_the_monitor_counts_skipped_steps_and_keeps_their_gradient_norm_out_of_the_mean():
  monitor = monitor_lib.Monitor(10.0, np.log(NUM_CLASSES), 0)
  steps = [dict(loss=2.0, top1=0.1, grad_norm=1.0, lr=1e-3, finite=True, skipped=False, skipped_steps=0,
                loss_scale=1024.0),
           dict(loss=2.0, top1=0.1, grad_norm=np.inf, lr=1e-3, finite=True, skipped=True, skipped_steps=1,
                loss_scale=1024.0),
           dict(loss=2.0, top1=0.1, grad_norm=3.0, lr=1e-3, finite=True, skipped=False, skipped_steps=1,
                loss_scale=512.0)]
  for i, m in enumerate(steps):
    monitor.observe(i + 1, m)
  summary = monitor.interval_summary()
  assert summary["train/grad_norm"] == 2.0  # mean over the two applied updates
  assert summary["train/skipped_steps"] == 1 and summary["train/skipped_in_interval"] == 1
  assert summary["train/loss_scale"] == 512.0
  assert monitor.last_finite["train/skipped_steps"] == 1


@pytest.mark.parametrize("parallelism", ["pmap"])
def test_float16_steps_agree_under_jit_and_pmap(overflow_run, parallelism):
  runner = Runner(fp16_plan(parallelism=parallelism))
  for i, factor in enumerate([1.0, OVERFLOW, 1.0]):
    _, metrics = runner.step(make_batch(i, factor))
    jit_metrics = overflow_run[i][1]
    assert metrics["loss_scale"] == jit_metrics["loss_scale"] and metrics["skipped"] == jit_metrics["skipped"]
    assert metrics["loss"] == pytest.approx(jit_metrics["loss"], rel=1e-3)
    if not metrics["skipped"]:
      assert metrics["grad_norm"] == pytest.approx(jit_metrics["grad_norm"], rel=1e-2)
  # (Parameters are not compared element by element: Adam's first updates are ~lr * sign(g), and
  # float16 rounds the near-zero gradient entries differently when the batch is split per device.)
  state, expected = runner.host_state(), overflow_run[2][2]
  assert float(state.loss_scale.scale) == float(expected.loss_scale.scale) == 512.0
  assert int(state.loss_scale.counter) == int(expected.loss_scale.counter) == 1
  assert int(state.loss_scale.skipped_steps) == int(expected.loss_scale.skipped_steps) == 1


def test_other_dtypes_have_no_loss_scale():
  for dtype in ("float32", "bfloat16"):
    plan = fp16_plan(dtype=dtype)
    state = state_lib.create_train_state(plan, jax.random.PRNGKey(0))
    assert state.loss_scale is None


@pytest.mark.parametrize("field,value", [("init", 0.5), ("init", float("inf")), ("growth_interval", 0),
                                         ("factor", 1), ("growth_interval", 2.5)])
def test_bad_loss_scale_settings_are_one_line_config_errors(field, value):
  cfg = common.optim_config().to_dict()
  cfg["loss_scale"][field] = value
  with pytest.raises(ConfigError, match=rf"^optim\.loss_scale\.{field}: must be"):
    optim.validate(cfg)


# ------------------------------------------------------------------------------------------------
# The trainer: the scale is checkpointed and a resumed float16 run ends bit-identical
# ------------------------------------------------------------------------------------------------


def _fp16_loop_config(**overrides):
  from test_loop import tiny_config  # tests/training is on sys.path  pylint: disable=g-import-not-at-top
  # growth_interval 2 from 2^16: the scale keeps doubling until the float16 backward pass
  # overflows, so the run both grows and halves the scale and skips steps.
  return tiny_config(**{"model.dtype": "float16", "optim.loss_scale.growth_interval": 2, **overrides})


@pytest.fixture(scope="module")
def fp16_uninterrupted(tmp_path_factory):
  from vitnorm.training import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("fp16_uninterrupted"))
  return workdir, loop.train_and_evaluate(_fp16_loop_config(), workdir)


def test_float16_run_logs_the_loss_scale_and_skipped_steps(fp16_uninterrupted):
  from vitnorm import workdir as run_logging  # pylint: disable=g-import-not-at-top
  from vitnorm import checkpoints  # pylint: disable=g-import-not-at-top
  workdir, summary = fp16_uninterrupted
  assert summary["status"] == "completed"
  rows = [r for r in run_logging.read_metrics(workdir) if "train/loss_scale" in r]
  assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
  scales = [r["train/loss_scale"] for r in rows]
  assert len(set(scales)) > 1  # the scale moved during the run
  status = run_logging.read_status(workdir)
  assert status["metrics"]["train/skipped_steps"] == rows[-1]["train/skipped_steps"] > 0
  diag = [r for r in run_logging.read_metrics(workdir) if "diag/compute_dtype_max" in r]
  assert [r["step"] for r in diag] == [6, 12, 18, 24] and diag[0]["diag/compute_dtype_max"] == 65504.0
  names = {"residual_rms", "ffn_hidden_rms", "ffn_pre_norm_rms", "ffn_pre_norm_max_abs", "ffn_out_rms",
           "ffn_out_max_abs", "max_attention_logit", "max_abs_qk", "max_abs_matmul", "grad_norm"}
  assert {f"diag/block_1/{n}" for n in names} | {"diag/max_abs_matmul", "diag/head_log_partition_mean",
                                                   "diag/head_log_partition_max"} <= set(diag[-1])
  assert 0 < diag[-1]["diag/max_abs_matmul"] < 65504.0
  evals = [r for r in run_logging.read_metrics(workdir) if "eval/loss" in r]
  assert all(np.isfinite(r["eval/loss_batch_stats"]) for r in evals)  # a BN model: the mismatch
  assert checkpoints.Checkpointer(workdir).train_keys(24) >= {"step", "opt_state", "loss_scale"}


def test_preempted_float16_run_resumes_bit_identical_with_its_loss_scale(fp16_uninterrupted, tmp_path):
  from vitnorm import workdir as run_logging  # pylint: disable=g-import-not-at-top
  from vitnorm import checkpoints
  from vitnorm.training import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "resumed")
  first = loop.train_and_evaluate(_fp16_loop_config(**{"debug.preempt_at_step": 10}), workdir)
  assert first["status"] == "preempted" and first["step"] == 10
  second = loop.train_and_evaluate(_fp16_loop_config(), workdir)
  assert second["status"] == "completed" and second["step"] == 24
  expected_dir = fp16_uninterrupted[0]
  resumed, _ = checkpoints.restore_variables(workdir)
  expected, _ = checkpoints.restore_variables(expected_dir)
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)
  # The scale and the skipped-step count follow the uninterrupted run at every log step (the
  # interval means of step 12 differ only because the resumed interval starts at step 11).
  rows = lambda w: [(r["step"], r["train/loss_scale"], r["train/skipped_steps"],  # noqa: E731
                     r["train/loss"] if r["step"] > 12 else None)
                    for r in run_logging.read_metrics(w) if "train/loss_scale" in r]
  assert rows(workdir) == rows(expected_dir)
