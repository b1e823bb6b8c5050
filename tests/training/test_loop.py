"""The training loop, in-process on 8 CPU devices with a tiny ViT on the offline 8x8 `digits`:
outputs, resume == uninterrupted, preemption, divergence, refused resumes, bad input."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common
from vitnorm import checkpoints
from vitnorm import workdir as run_logging
from vitnorm.training import loop, plan as plan_lib, state as state_lib
from vitnorm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(**overrides):
  c = common.base_config()
  c.model = common.model_config(variant=None, norm="bn", ffn_norm="bn", num_classes=10, image_size=8,
                                num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4))
  c.data = common.data_config(name="numpy:digits", image_size=8)  # in memory: the feed is not under test
  c.data.update(dict(channels=1, cache=True, inception_crop=False, hflip=False,
                     normalize_mean=(0.5,), normalize_std=(0.5,), eval_crop_fraction=1.0))
  c.batch_size = 64
  c.num_steps = 24
  c.optim.update(dict(base_lr=3e-3, lr_scaling_batch=None, warmup_steps=3, grad_clip_norm=1.0))
  c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = 4, 12, 8, 6
  c.progress_bar = "off"
  c.async_checkpoints = False
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return c


def final_params(workdir):
  variables, step = checkpoints.restore_variables(workdir)
  return jax.tree.map(np.asarray, variables), step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  summary = loop.train_and_evaluate(tiny_config(), workdir)
  return workdir, summary


def test_run_writes_metrics_status_config_and_checkpoints(uninterrupted):
  workdir, summary = uninterrupted
  assert summary["status"] == "completed" and summary["step"] == 24
  rows = run_logging.read_metrics(workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [4, 8, 12, 16, 20, 24]
  assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]  # it learns
  for key in ("train/top1", "train/lr", "train/grad_norm", "train/img_per_s", "train/step_time_s"):
    assert key in train_rows[-1]
  evals = [r for r in rows if "eval/top1" in r]
  assert [r["step"] for r in evals] == [12, 24]
  diag = [r for r in rows if "diag/block_1/max_attention_logit" in r]
  assert [r["step"] for r in diag] == [6, 12, 18, 24]
  assert {"diag/block_0/residual_rms", "diag/block_0/ffn_hidden_rms", "diag/block_0/grad_norm"} <= set(diag[0])
  status = run_logging.read_status(workdir)
  assert status["status"] == "completed" and status["step"] == 24
  assert status["metrics"]["eval/top1"] == evals[-1]["eval/top1"] > 0.2  # chance is 0.1
  assert checkpoints.all_steps(workdir) == [8, 16, 24][-3:]
  saved = checkpoints.load_run_config(workdir)
  assert saved.model.norm == "batch" and saved.num_steps == 24
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  variables, step = final_params(workdir)
  assert step == 24 and "batch_stats" in variables


def test_preempted_and_resumed_run_ends_identical_to_uninterrupted(uninterrupted, tmp_path):
  workdir = str(tmp_path / "resumed")
  # SIGTERM after step 10: the loop saves a checkpoint at step 10 and returns cleanly.
  first = loop.train_and_evaluate(tiny_config(**{"debug.preempt_at_step": 10}), workdir)
  assert first["status"] == "preempted" and first["step"] == 10
  assert run_logging.read_status(workdir)["status"] == "preempted"
  assert checkpoints.latest_step(workdir) == 10
  # Re-running the same command resumes from step 10 (the data order continues exactly).
  second = loop.train_and_evaluate(tiny_config(), workdir)
  assert second["status"] == "completed" and second["step"] == 24
  resumed, _ = final_params(workdir)
  expected, _ = final_params(uninterrupted[0])
  jax.tree.map(np.testing.assert_array_equal, resumed, expected)  # bit-identical
  # metrics.jsonl has each step once.
  steps = [r["step"] for r in run_logging.read_metrics(workdir) if "train/loss" in r]
  assert steps == sorted(set(steps))
  # A finished run re-run does nothing new and stays completed.
  again = loop.train_and_evaluate(tiny_config(), workdir)
  assert again["status"] == "completed" and again["step"] == 24


def test_injected_nan_stops_with_diverged_status_and_keeps_the_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  with pytest.raises(loop.TrainingDiverged) as err:
    loop.train_and_evaluate(tiny_config(**{"debug.inject_nan_at_step": 11}), workdir)
  assert err.value.step == 11
  status = run_logging.read_status(workdir)
  assert status["status"] == "diverged" and status["step"] == 11
  assert np.isfinite(status["metrics"]["train/loss"])  # the last finite metrics
  assert checkpoints.all_steps(workdir) == [8]
  variables, step = final_params(workdir)
  assert step == 8
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def test_resuming_with_a_different_model_is_refused(uninterrupted):
  with pytest.raises(UserError, match=r"different model \(model.norm: 'batch' -> 'layer'"):
    plan_lib.prepare(tiny_config(**{"model.norm": "ln"}), uninterrupted[0])
  # Regularization may change on resume.
  plan_lib.prepare(tiny_config(**{"model.dropout_rate": 0.1}), uninterrupted[0])


@pytest.mark.parametrize("overrides, field", [
    ({"batch_size": 60}, "batch_size"),
    ({"accum_steps": 3}, "batch_size"),
    ({"model.bn_group_size": 3}, "model.bn_group_size"),
    ({"eval_batch_size": 12}, "eval_batch_size"),
    ({"parallelism": "dp"}, "parallelism"),
    ({"data.name": "no_such_dataset"}, None),
    ({"model.num_classes": 7}, None),
    ({"optim.base_lr": -1.0}, "optim.base_lr"),
    ({"num_steps": 0}, "num_steps"),
])
def test_bad_input_is_a_one_line_user_error(overrides, field):
  with pytest.raises(UserError) as err:
    plan_lib.prepare(tiny_config(**overrides))
  message = str(err.value)
  assert "\n" not in message
  if field:
    assert message.startswith(field + ":"), message


def test_norm_short_names_and_epochs_derive_steps():
  plan = plan_lib.prepare(tiny_config(**{"model.norm": "ln", "model.ffn_norm": "bn", "num_steps": None,
                                      "num_epochs": 2.0, "optim.warmup_steps": None,
                                      "optim.warmup_epochs": 1.0}))
  assert (plan.config.model.norm, plan.config.model.ffn_norm) == ("layer", "batch")
  per_epoch = plan.num_train_examples / 64
  assert plan.num_steps == int(np.ceil(2 * per_epoch))
  assert plan.warmup_steps == round(per_epoch)


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vitnorm.train", *args], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=120)


def test_cli_rejects_an_unknown_override_in_one_line(tmp_path):
  proc = _cli("--config", "configs/quickstart.py", "--workdir", str(tmp_path),
              "--config.model.no_such_field=3")
  assert proc.returncode == 2
  # The whole output is our one line: no TensorFlow / absl start-up lines before it.
  assert proc.stderr.splitlines() == ["error: config.model.no_such_field: no such config field; fix the "
                                      "name (fields and their comments: configs/common.py)"], proc.stderr[-2000:]
  assert proc.stdout == ""
  proc = _cli("--config", "configs/quickstart.py:norm=bogus", "--workdir", str(tmp_path))
  errors = proc.stderr.splitlines()
  assert proc.returncode == 2 and proc.stdout == ""
  assert len(errors) == 1 and errors[0].startswith("error: --config: config argument norm='bogus': unknown norm")
  assert not os.listdir(tmp_path)


def test_loss_spike_past_the_factor_and_chance_level_is_divergence():
  def metrics(loss):
    return dict(loss=loss, top1=0.9, grad_norm=1.0, lr=1e-3, finite=True)
  monitor = loop._Monitor(spike_factor=10.0, chance_loss=np.log(10), start_step=0)
  for step in range(1, 30):
    monitor.observe(step, metrics(0.1))
  monitor.observe(30, metrics(0.9))  # 9x the running mean: noise, not divergence
  with pytest.raises(loop.TrainingDiverged, match="loss spiked to 5"):
    monitor.observe(31, metrics(5.0))
  assert monitor.last_finite["train/loss"] == float(np.float32(0.9))  # kept on device, in float32
  # A large relative jump that stays below chance level (log 10) is not a blow-up.
  quiet = loop._Monitor(spike_factor=10.0, chance_loss=np.log(10), start_step=0)
  for step in range(1, 30):
    quiet.observe(step, metrics(0.01))
  quiet.observe(30, metrics(1.0))
  with pytest.raises(loop.TrainingDiverged, match="non-finite"):
    quiet.observe(31, dict(metrics(float("nan")), finite=False))


def test_init_from_a_reference_checkpoint_starts_from_its_weights(tmp_path):
  from vitnorm.model import pretrained, vit
  config = tiny_config(**{"model.norm": "layer", "model.ffn_norm": "none"})
  # A "reference" checkpoint of the same width trained at 16 px with 5 classes.
  ref_cfg = dict(config.model.to_dict(), image_size=16, num_classes=5)
  ref_params = vit.init_variables(vit.build_model(ref_cfg), jax.random.key(9), (1, 16, 16, 1))["params"]
  path = str(tmp_path / "ref.npz")
  pretrained.save_npz(path, ref_params)
  plan = plan_lib.prepare(config)
  state = state_lib.create_train_state(plan, jax.random.key(0))
  loaded = state_lib.load_pretrained(state, path, vit.build_model(plan.config.model))
  block = "encoderblock_1"
  np.testing.assert_array_equal(loaded.params["Transformer"][block]["MlpBlock_0"]["Dense_0"]["kernel"],
                                ref_params["Transformer"][block]["MlpBlock_0"]["Dense_0"]["kernel"])
  assert loaded.params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 5, 32)
  np.testing.assert_array_equal(loaded.params["head"]["kernel"], state.params["head"]["kernel"])
  with pytest.raises(UserError, match="init_from"):
    plan_lib.prepare(tiny_config(init_from=str(tmp_path / "missing.npz")))


def test_divergence_between_sync_points_is_found_at_its_exact_step(tmp_path, monkeypatch):
  # NaN at step 13: the host reads nothing until the sync at step 16 (a log and checkpoint step),
  # where the device monitor names step 13; the step-16 checkpoint is never written.
  syncs = []
  sync = loop._Monitor.sync
  monkeypatch.setattr(loop._Monitor, "sync", lambda self: syncs.append(self.host["step"]) or sync(self))
  workdir = str(tmp_path / "nan13")
  with pytest.raises(loop.TrainingDiverged, match="non-finite") as err:
    loop.train_and_evaluate(tiny_config(**{"debug.inject_nan_at_step": 13}), workdir)
  assert err.value.step == 13
  status = run_logging.read_status(workdir)
  assert status["status"] == "diverged" and status["step"] == 13
  assert np.isfinite(status["metrics"]["train/loss"]) and status["last_checkpoint_step"] == 8
  assert checkpoints.all_steps(workdir) == [8]
  # One host read per sync point (log 4/8/12/16, diagnostics 6/12, checkpoint 8/16, eval 12), none between.
  assert len(syncs) == 5
  assert [r["step"] for r in run_logging.read_metrics(workdir) if "train/loss" in r] == [4, 8, 12]


def test_monitor_folds_many_pending_steps_in_order_like_one_at_a_time():
  def metrics(loss, finite=True):
    return dict(loss=np.float32(loss), top1=np.float32(0.5), grad_norm=np.float32(2 * loss),
                lr=np.float32(1e-3), finite=np.bool_(finite))
  losses = [0.2 + 0.01 * (i % 3) for i in range(30)]
  # 30 steps queued (folded in chunks of 8 without a host read), then one sync.
  batched = loop._Monitor(spike_factor=10.0, chance_loss=np.log(10), start_step=100, max_pending=8)
  for loss in losses:
    batched.add({k: jax.numpy.asarray(v) for k, v in metrics(loss).items()})
  host = batched.sync()
  assert host["step"] == 130 and host["count"] == 30
  summary = batched.interval_summary()
  np.testing.assert_allclose(summary["train/loss"], np.mean(np.float32(losses)), rtol=1e-6)
  np.testing.assert_allclose(summary["train/grad_norm"], 2 * np.mean(np.float32(losses)), rtol=1e-6)
  # The sums restart after a summary; a spike, then more (finite) steps, all before the next sync.
  for loss in [0.2, 0.21, 5.0, 0.2, 7.0, float("nan")]:
    batched.add({k: jax.numpy.asarray(v) for k, v in metrics(loss, np.isfinite(loss)).items()})
  with pytest.raises(loop.TrainingDiverged, match="loss spiked to 5") as err:
    batched.sync()
  assert err.value.step == 133  # the first bad step, not the later ones
  assert batched.last_finite["train/loss"] == float(np.float32(0.21))
  assert batched.host["count"] == 2  # only the steps before the spike were averaged
  # Before SPIKE_WARMUP_STEPS steps a jump is not judged; a non-finite step always is.
  early = loop._Monitor(spike_factor=10.0, chance_loss=np.log(10), start_step=0)
  for loss in [0.1] * 5 + [9.0]:
    early.add({k: jax.numpy.asarray(v) for k, v in metrics(loss).items()})
  assert early.sync()["bad_step"] == 0
  early.add({k: jax.numpy.asarray(v) for k, v in metrics(float("nan"), False).items()})
  with pytest.raises(loop.TrainingDiverged, match="non-finite") as err:
    early.sync()
  assert err.value.step == 7
