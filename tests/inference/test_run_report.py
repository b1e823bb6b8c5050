"""`vitnorm.evaluate`: accuracy over a padded eval split, folded == unfolded, throughput, outputs, errors.

The workdir is written directly with the trainer's checkpoint API (a tiny BN + FFN-BN ViT with
random weights and BN statistics, so predictions vary), on the offline `digits` dataset (360 test
images: with an eval batch of 64 the last batch holds 40 real images and 24 padding).
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs import common
from vitnorm.inference import comparison
from vitnorm import checkpoints
from vitnorm import data
from vitnorm.inference import run_report
from vitnorm.model import vit
from vitnorm.errors import ConfigError, UserError

NUM_TEST = 360  # digits test split


def tiny_config(data_dir, norm="batch", ffn_norm="batch"):
  c = common.base_config()
  c.model.variant = None
  c.model.hidden_size, c.model.num_layers, c.model.mlp_dim = 32, 2, 64
  c.model.num_heads, c.model.patch_size = 4, 4
  c.model.num_classes, c.model.image_size, c.model.num_channels = 10, 8, 1
  c.model.norm, c.model.ffn_norm = norm, ffn_norm
  c.data.name, c.data.image_size, c.data.data_dir = "digits", 8, str(data_dir)
  c.data.normalize_mean, c.data.normalize_std = (0.5,), (0.5,)
  c.data.eval_crop_fraction = 1.0
  c.batch_size = 64
  return c


def write_workdir(workdir, config, steps=(5,), ema=False):
  checkpoints.write_run_config(str(workdir), config)
  model = vit.build_model(config.model)
  ck = checkpoints.Checkpointer(str(workdir), async_save=False)
  for i, step in enumerate(steps):
    variables = comparison.random_variables(model, config.model, seed=i)
    if ema:  # EMA weights and an EMA of the BN statistics, both unlike the live ones
      variables["ema_params"] = jax.tree_util.tree_map(lambda p: 2.0 * p, variables["params"])
      variables[checkpoints.EMA_BATCH_STATS] = jax.tree_util.tree_map(
          lambda s: 3.0 * s + 0.5, variables["batch_stats"])
    ck.save(step, variables, {"step": np.int32(step)})
  ck.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
  wd = tmp_path_factory.mktemp("run")
  write_workdir(wd, tiny_config(data_dir), steps=(5, 10))
  return str(wd)


@pytest.fixture(scope="module")
def report(workdir):
  return run_report.evaluate(workdir=workdir, batch_sizes=["8", "16"], eval_batch_size_override=64,
                           warmup=1, iterations=2, repeats=2)


def _reference_accuracy(config, variables):
  """Top-1 and mean loss over the unpadded split, in one batch, computed here in float64."""
  (batch,) = list(data.eval_batches(config.data, global_batch_size=NUM_TEST))
  assert batch["mask"].all() and len(batch["label"]) == NUM_TEST  # no padding at all
  logits = np.asarray(vit.build_model(config.model).apply(variables, batch["image"], train=False),
                      np.float64)
  top1 = float(np.mean(np.argmax(logits, -1) == batch["label"]))
  loss = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])))
  return top1, loss


def test_accuracy_over_padded_remainder_equals_accuracy_on_the_unpadded_set(report, workdir):
  assert NUM_TEST % 64  # the eval batch of 64 really leaves a padded remainder
  acc = report["accuracy"]
  config = checkpoints.load_run_config(workdir)
  variables, step = checkpoints.restore_variables(workdir)
  assert step == 10 and report["source"]["step"] == 10
  top1, loss = _reference_accuracy(config, variables)
  assert 0.02 < top1 < 0.98  # random weights with random BN statistics: predictions vary
  for name in ("as_trained", "folded"):
    assert acc[name]["num_examples"] == NUM_TEST
    assert acc[name]["top1"] == pytest.approx(top1, abs=1e-12)
    assert acc[name]["loss"] == pytest.approx(loss, rel=1e-5)
  assert acc["folded_agrees"] and acc["folded_top1_difference"] == 0.0
  assert acc["dataset"] == "digits" and acc["split"] == "test" and acc["eval_batch_size"] == 64


def test_throughput_of_model_as_trained_and_folded(report):
  rows = [(r["model"], r["batch_size"], r["status"]) for r in report["throughput"]]
  assert rows == [("as_trained", 8, "ok"), ("folded", 8, "ok"), ("as_trained", 16, "ok"), ("folded", 16, "ok")]
  for r in report["throughput"]:
    assert r["num_devices"] == 8 and r["dtype"] == "float32" and r["iterations"] == 2 and r["repeats"] == 2
    assert r["images_per_second"]["median"] > 0 and r["compile_seconds"] > 0 and r["latency_ms"] > 0
  flops = {r["model"]: r["flops_per_image"] for r in report["throughput"] if r["batch_size"] == 8}
  assert flops["folded"] < flops["as_trained"]  # the norms are gone
  assert report["folding"] == dict(foldable=True, applied=True,
                                   reason="BatchNorm in model.norm and model.ffn_norm folds into Dense layers")


def test_results_are_written_as_json_and_markdown(report, workdir):
  with open(os.path.join(workdir, "evaluation.json"), encoding="utf-8") as f:
    doc = json.load(f)
  assert doc["accuracy"]["folded"]["top1"] == report["accuracy"]["folded"]["top1"]
  assert [r["model"] for r in doc["throughput"]] == ["as_trained", "folded"] * 2
  with open(os.path.join(workdir, "evaluation.md"), encoding="utf-8") as f:
    md = f.read()
  assert md == report["markdown"]
  assert md.startswith(f"# Evaluation of {os.path.abspath(workdir)} (step 10)")
  assert "| folded     | 8     |" in md and "(agree)" in md
  # The experiments report reads the folded and unfolded throughput out of this file.
  from experiments import run_files  # pylint: disable=g-import-not-at-top
  tp = run_files.throughput(doc)
  assert set(tp) == {"folded", "unfolded"}
  assert tp["folded"] == max(r["images_per_second"]["median"] for r in doc["throughput"]
                             if r["model"] == "folded")


def test_chosen_step_and_ema_weights(tmp_path, data_dir):
  write_workdir(tmp_path, tiny_config(data_dir), steps=(3, 7), ema=True)
  first = run_report.evaluate(workdir=str(tmp_path), step=3, measure=False, eval_batch_size_override=120)
  ema = run_report.evaluate(workdir=str(tmp_path), step=3, use_ema=True, measure=False,
                          eval_batch_size_override=120)
  assert first["source"]["step"] == 3 and ema["source"]["use_ema"]
  # The EMA weights are evaluated with the EMA of the BN statistics (a hand-built reference), not
  # with the live statistics.
  config = checkpoints.load_run_config(str(tmp_path))
  live, _ = checkpoints.restore_variables(str(tmp_path), 3)
  params = jax.tree_util.tree_map(lambda p: 2.0 * p, live["params"])
  ema_stats = jax.tree_util.tree_map(lambda s: 3.0 * s + 0.5, live["batch_stats"])
  _, with_ema_stats = _reference_accuracy(config, {"params": params, "batch_stats": ema_stats})
  _, with_live_stats = _reference_accuracy(config, {"params": params, "batch_stats": live["batch_stats"]})
  assert abs(with_ema_stats - with_live_stats) > 1e-3 * with_live_stats
  assert ema["accuracy"]["as_trained"]["loss"] == pytest.approx(with_ema_stats, rel=1e-5)
  assert first["accuracy"]["as_trained"]["loss"] == pytest.approx(_reference_accuracy(config, live)[1], rel=1e-5)
  assert "EMA weights" in ema["markdown"].splitlines()[0]
  assert first["throughput"] == {"skipped": "--no_throughput"}


def test_bfloat16_evaluation_of_a_float32_run(report, workdir, tmp_path):
  rep = run_report.evaluate(workdir=workdir, dtype="bfloat16", batch_sizes=["8"], warmup=0, iterations=1,
                          repeats=1, eval_batch_size_override=120, output_dir=str(tmp_path))
  assert {r["dtype"] for r in rep["throughput"]} == {"bfloat16"} and "dtype=bfloat16" in rep["markdown"]
  acc = rep["accuracy"]
  assert acc["folded_agrees"]
  assert acc["as_trained"]["loss"] == pytest.approx(report["accuracy"]["as_trained"]["loss"], rel=2e-2)
  assert acc["as_trained"]["loss"] != report["accuracy"]["as_trained"]["loss"]  # really computed in bf16
  with pytest.raises(ConfigError, match="^--dtype: unknown dtype 'float8'"):
    run_report.evaluate(workdir=workdir, dtype="float8", measure=False)


def test_float16_evaluation_of_a_float32_run(report, workdir, tmp_path):
  rep = run_report.evaluate(workdir=workdir, dtype="float16", measure=False, eval_batch_size_override=120,
                            output_dir=str(tmp_path))
  acc = rep["accuracy"]
  assert acc["folded_agrees"]
  assert acc["as_trained"]["loss"] == pytest.approx(report["accuracy"]["as_trained"]["loss"], rel=1e-2)
  assert acc["as_trained"]["loss"] != report["accuracy"]["as_trained"]["loss"]  # really computed in fp16
  assert rep["model"]["dtype"] == "float16"


def test_layernorm_model_from_config_is_not_folded_and_missing_data_is_skipped(tmp_path):
  config = tiny_config(tmp_path / "empty", norm="layer", ffn_norm="batch")
  config.data.name = "cifar10"  # not prepared there: accuracy is skipped (never downloaded)
  config.model.num_channels, config.model.num_classes = 3, 10
  rep = run_report.evaluate(config=config, config_name="tiny.py", batch_sizes=["8"], warmup=0,
                          iterations=1, repeats=1, output_dir=str(tmp_path))
  assert not rep["folding"]["foldable"] and not rep["folding"]["applied"]
  assert "model.norm='layer'" in rep["folding"]["reason"]
  assert [r["model"] for r in rep["throughput"]] == ["as_trained"]
  assert rep["accuracy"]["skipped"].startswith("dataset not available: data.data_dir: dataset 'cifar10' is not prepared")
  assert rep["source"] == {"weights": "random", "seed": 0}
  assert os.path.exists(tmp_path / "evaluation.md")


def test_bad_inputs_are_one_line_user_errors(tmp_path, workdir, data_dir):
  with pytest.raises(ConfigError, match=r"^--batch_sizes: 12 is not divisible by the 8 devices; use a multiple of 8$"):
    run_report.evaluate(workdir=workdir, batch_sizes=["8", "12"])
  with pytest.raises(ConfigError, match=r"^--eval_batch_size: 100 is not divisible by the 8 devices"):
    run_report.evaluate(workdir=workdir, eval_batch_size_override=100, measure=False)
  with pytest.raises(UserError, match="no checkpoint for step 4 .* available steps: 5, 10"):
    run_report.evaluate(workdir=workdir, step=4, measure=False)
  with pytest.raises(UserError, match="kept no EMA"):
    run_report.evaluate(workdir=workdir, use_ema=True, measure=False, eval_batch_size_override=64)
  with pytest.raises(UserError, match="either --workdir"):
    run_report.evaluate(measure=False)
  # A run that saved no checkpoint yet.
  empty = tmp_path / "empty_run"
  checkpoints.write_run_config(str(empty), tiny_config(data_dir))
  with pytest.raises(UserError, match="^no checkpoint in .*checkpoints: the run saved none yet"):
    run_report.evaluate(workdir=str(empty), measure=False)
  # A checkpoint that does not match the config (config.json edited to another width).
  mismatch = tmp_path / "mismatch"
  shutil.copytree(workdir, mismatch)
  cfg = tiny_config(data_dir)
  cfg.model.hidden_size = 48
  checkpoints.write_run_config(str(mismatch), cfg)
  with pytest.raises(UserError, match="does not match the model of its config.json"):
    run_report.evaluate(workdir=str(mismatch), measure=False)


def test_cli_errors_are_one_line_and_exit_code_2(tmp_path, run_cli):
  def last_error_line(*args):  # in-process (conftest's run_cli)
    code, _, stderr = run_cli("evaluate", *args)
    assert code == 2 and "Traceback" not in stderr
    return stderr.strip().splitlines()[-1]
  assert last_error_line(f"--workdir={tmp_path}").startswith(f"error: {tmp_path}/config.json does not exist")
  assert last_error_line(f"--config={tmp_path}/missing.py").startswith("error: --config: ")


def test_cli_prints_the_tables(workdir, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "vitnorm.evaluate", f"--workdir={workdir}", "--step=5",
                         "--batch_sizes=8", "--iterations=1", "--repeats=1", "--no_accuracy",
                         f"--output_dir={tmp_path}"],
                        capture_output=True, text=True, timeout=300, env=dict(os.environ), check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "(step 5)" in proc.stdout and "Skipped: --no_accuracy." in proc.stdout
  assert "## Inference throughput" in proc.stdout
  assert "| folded     | 8     |" in proc.stdout
  with open(tmp_path / "evaluation.md", encoding="utf-8") as f:
    assert f.read() == proc.stdout


def test_fold_check_runs_at_highest_precision_and_catches_a_one_percent_error(workdir, monkeypatch):
  """Under a reduced global matmul precision the check still runs at 'highest': a correct fold
  agrees and a fold with one BN scale off by 1% is caught. (XLA:CPU computes float32 matmuls in
  float32 whatever the flag says -- measured: no difference at all -- so on CPU this checks the
  precision in force during the accuracy pass and the check's sensitivity; on GPU / TPU the flag
  would also change the numbers.)"""
  from vitnorm import parallel  # pylint: disable=g-import-not-at-top
  from vitnorm.model import fold, norms  # pylint: disable=g-import-not-at-top
  config = checkpoints.load_run_config(workdir)
  model = vit.build_model(config.model)
  variables, _ = checkpoints.restore_variables(workdir)
  seen = []
  original = run_report.evaluation.evaluate_classifier

  def spy(*args, **kwargs):
    seen.append(str(jax.config.jax_default_matmul_precision))
    return original(*args, **kwargs)

  monkeypatch.setattr(run_report.evaluation, "evaluate_classifier", spy)
  broken = jax.tree_util.tree_map(np.asarray, variables)
  bn = broken["params"]["Transformer"]["encoderblock_0"][norms.module_name("batch", 0)]
  bn["scale"] = bn["scale"] * 1.01  # the first block's pre-attention BN: one scale off by 1%
  jax.config.update("jax_default_matmul_precision", "bfloat16")
  try:
    assert run_report.default_precision() == "bfloat16"
    def check(folded_variables):
      return run_report.evaluate_accuracy(
          config, {"as_trained": (model, variables), "folded": fold.fold_batchnorm(model, folded_variables)},
          global_batch_size=64, mesh=parallel.data_mesh(), required=True)
    good, bad = check(variables), check(broken)
  finally:
    jax.config.update("jax_default_matmul_precision", None)
  assert seen == ["highest"] * 4 and good["matmul_precision"] == "highest"
  assert good["folded_agrees"] is True and good["folded_loss_difference"] < 1e-6
  # ~1e-4: caught by the float32 tolerance (1e-5 relative), missed by the old one (1e-4).
  assert bad["folded_agrees"] is False and bad["folded_loss_difference"] > 1e-5 * bad["as_trained"]["loss"]
