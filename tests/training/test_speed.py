"""Training speed: the train-step benchmark per norm (FLOPs, A/A line, ratios, JSON) and the
loop-vs-bare-step benchmark, on tiny models (8 CPU devices)."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from configs import common
from vitnorm.errors import ConfigError
from vitnorm.inference import comparison, throughput
from vitnorm.model import norms, vit
from vitnorm.training import loop_speed, speed

TINY = dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=4, patch_size=8)


@pytest.fixture(scope="module")
def report():
  cfg = comparison.model_config("Ti/16", 16, num_classes=10, **TINY)
  return speed.run_train_benchmark(cfg, models=["ln"], batch_sizes=(16,), parallelisms=["jit"],
                                   dtypes=["float32"], warmup=1, iterations=2, repeats=3,
                                   matmul_size=32, log=lambda _: None)


def test_train_step_is_timed_with_its_aa_copy_and_costs_about_three_forward_passes(report):
  rows = {r["model"]: r for r in report["results"]}
  assert list(rows) == ["ln", speed.AA_COPY]
  ln, aa = rows["ln"], rows[speed.AA_COPY]
  for r in (ln, aa):
    assert r["status"] == "ok" and r["parallelism"] == "jit" and r["dtype"] == "float32"
    assert r["num_devices"] == 8 and r["repeats"] == 3 and r["iterations"] == 2
    assert r["achieved_flops_per_second"] == pytest.approx(r["flops_per_image"] * r["images_per_second"]["median"])
    assert r["fraction_of_matmul_peak"] == pytest.approx(r["achieved_flops_per_second"] /
                                                         r["matmul_peak_flops_per_second"])
  assert ln["ratio_to_ln"] == 1.0 and ln["ratio_to_no_norm"] is None  # 'none' was not asked for
  assert aa["flops_per_image"] == ln["flops_per_image"]  # identical programs
  # Forward + backward of the same model is ~3x the inference FLOPs per image; AdamW and clipping
  # (~30 FLOPs per parameter per step) add a visible share on a model this small.
  cfg = dict(comparison.model_config("Ti/16", 16, num_classes=10, **TINY), norm="layer")
  model = vit.build_model(cfg)
  variables = comparison.random_variables(model, cfg, 0)
  forward = throughput.compile_forward(throughput.model_forward(model), variables, 16, (16, 16, 3),
                                       throughput.local_mesh())
  assert 2.8 < ln["flops_per_image"] / forward.flops_per_image < 6.0
  json.dumps(report)  # JSON-able (NaN became null)
  text = speed.format_train_report(report)
  assert "| jit " in text and "A/A (jit float32 batch 16): ln_aa and ln run identical programs" in text


def test_train_model_table_guards_norms_that_do_not_exist_yet():
  names = speed.available_models()
  assert names[:6] == ["ln", "bn", "bn_ghost", "bn_ffnbn", "rms", "none"]
  for name in ("dyt", "prepbn"):
    assert (name in names) == (speed.TRAIN_MODELS[name]["norm"] in norms.NORM_KINDS)
    if name not in names:
      with pytest.raises(ConfigError, match=rf"^--models: unknown train model '{name}' \(its norm is not"):
        speed.check_models([name])
  with pytest.raises(ConfigError, match=r"^--models: unknown train model 'bn_folded'"):
    speed.check_models(["ln", "bn_folded"])
  plan = speed.train_plan(dict(comparison.model_config("Ti/16", 16, num_classes=10, **TINY), norm="bn",
                               bn_group_size=4), batch_size=16, parallelism="pmap")
  assert plan.config.model.norm == "batch" and plan.config.model.bn_group_size == 4
  assert plan.config.parallelism == "pmap" and plan.num_classes == 10


def test_bad_train_benchmark_input_fails_before_any_compilation():
  cfg = comparison.model_config("Ti/16", 16, num_classes=10, **TINY)
  with pytest.raises(ConfigError, match=r"^--bn_group_size: 3 does not divide the per-device batch 2"):
    speed.run_train_benchmark(cfg, models=["bn_ghost"], batch_sizes=(16,), bn_group_size=3)
  with pytest.raises(ConfigError, match=r"^--parallelism: unknown value 'dp'"):
    speed.run_train_benchmark(cfg, models=["ln"], parallelisms=["dp"])
  with pytest.raises(ConfigError, match=r"^--dtypes: unknown dtype 'f16'"):
    speed.run_train_benchmark(cfg, models=["ln"], dtypes=["f16"])


def _digits_config():
  c = common.base_config()
  c.model = common.model_config(variant=None, norm="bn", ffn_norm="bn", num_classes=10, image_size=8,
                                num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4))
  c.data = common.data_config(name="digits", image_size=8)
  c.data.update(dict(channels=1, cache=True, inception_crop=False, hflip=False,
                     normalize_mean=(0.5,), normalize_std=(0.5,), eval_crop_fraction=1.0))
  c.batch_size, c.log_every, c.diagnostics_every = 64, 4, 0
  c.optim.update(dict(base_lr=3e-3, lr_scaling_batch=None, warmup_steps=3, grad_clip_norm=1.0))
  return c


def test_loop_benchmark_reports_trainer_and_bare_step_from_one_run(tmp_path):
  report = loop_speed.run_loop_benchmark(_digits_config(), num_steps=12, repeats=2, warmup=1,
                                         workdir=str(tmp_path), log=lambda _: None)
  assert report["trainer_status"] == "completed"
  assert len(report["loop_images_per_second"]["per_interval"]) == 2  # 3 intervals, the first dropped
  assert len(report["bare_images_per_second"]["per_round"]) == 2
  assert len(report["bare_with_data_images_per_second"]["per_round"]) == 2
  assert len(report["bare_with_data_inline_images_per_second"]["per_round"]) == 2  # the thread's A/B
  inline = np.median(report["bare_with_data_inline_images_per_second"]["per_round"])
  assert report["ratio_bare_with_data_inline_to_bare"] == pytest.approx(
      inline / np.median(report["bare_images_per_second"]["per_round"]))
  assert not [t for t in threading.enumerate() if t.name == "vitnorm-prefetch"]  # both feeds closed
  loop_ips = np.median(report["loop_images_per_second"]["per_interval"])
  bare_ips = np.median(report["bare_images_per_second"]["per_round"])
  assert report["ratio_loop_to_bare"] == pytest.approx(loop_ips / bare_ips)
  assert report["setup"]["steps_in_flight"] == 2 and report["setup"]["num_devices"] == 8
  assert "ratio loop / bare:" in loop_speed.format_loop_report(report)
  json.dumps(report)
  with pytest.raises(ConfigError, match=r"^--loop_steps: 6 gives fewer than two log intervals of 4"):
    loop_speed.run_loop_benchmark(_digits_config(), num_steps=6)


def test_cli_train_and_loop_modes_refuse_bad_input_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, "-m", "vitnorm.benchmark", *a], capture_output=True,  # noqa: E731
                                  text=True, timeout=300, env=env, check=False)
  proc = run("--mode=train", "--models=ln,bogus", "--variant=Ti/16", "--image_size=16")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --models: unknown train model 'bogus'")
  proc = run("--mode=loop")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --config: loop mode needs a training config, e.g. --config=configs/quickstart.py")


def test_dyt_and_prepbn_train_steps_compile_and_run():
  """Every norm of the table gets a real train step (PRepBN needs its decay resolved, as the trainer does)."""
  from vitnorm import parallel  # pylint: disable=g-import-not-at-top
  flops = {}
  for name in ("dyt", "prepbn"):
    cfg = dict(comparison.model_config("Ti/16", 16, num_classes=10, **TINY), **speed.TRAIN_MODELS[name])
    plan = speed.train_plan(cfg, batch_size=16, parallelism="jit")
    assert plan.model.norm == name  # the timed model is the named one
    program = speed.compile_train_step(plan, parallel.data_mesh())
    losses = [float(program.call()) for _ in range(3)]
    assert all(np.isfinite(losses)), name
    assert losses[2] != losses[0], name  # a real train step: the state it carries is updated
    flops[name] = program.flops_per_image
  # PRepBN runs LayerNorm and BatchNorm while lam > 0: a bigger program than DyT's tanh.
  assert flops["prepbn"] > flops["dyt"] > 0
