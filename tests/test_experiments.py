"""Tests of experiments/: the sweep definitions, the runner (with a fake trainer) and the report."""
import io
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from experiments import report
from experiments import run_files
from experiments import run_sweep
from experiments import sweeps as sweeps_lib
from vitnorm.model import vit
from vitnorm.errors import UserError
import xla_test_flags  # tests/xla_test_flags.py (tests/ is on sys.path: conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for `python -m vitnorm.train` that follows the trainer's file contract:
# - norm=bn with ffn_norm=none diverges at step 3 (NaN loss), writes status diverged, exits 1;
# - --config.model.bn_momentum=0.5 fails like a bad override: 'error: ...' and exit 2;
# - FAKE_PREEMPT_AT=k: stops after step k like a SIGTERM'd trainer (status preempted, exit 75);
# - FAKE_PROGRESS=1: prints the trainer's plain progress lines;
# - FAKE_KILL_AT=k: the first attempt dies at step k (checkpoint at k - 1, no status), the next
#   attempt resumes from the checkpoint and logs steps k.. again;
# - otherwise trains to --config.num_steps (default 6) and writes status completed.
FAKE_TRAINER = textwrap.dedent('''
    import json, math, os, sys, time
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    wd = flags["workdir"]
    cfg_args = dict(kv.split("=") for kv in flags["config"].split(":", 1)[1].split(","))
    num_steps = int(flags.get("config.num_steps", 6))
    with open(os.path.join(wd, "invocations"), "a") as f:
      f.write(" ".join(sys.argv[1:]) + "\\n")
    t0 = time.time()
    time.sleep(float(os.environ.get("FAKE_SLEEP", 0)))
    with open(os.path.join(wd, "affinity"), "a") as f:  # the cores it may use, when it ran
      f.write(json.dumps({"cores": sorted(os.sched_getaffinity(0)), "start": t0, "end": time.time()}) + "\\n")
    if flags.get("config.model.bn_momentum") == "0.5":
      print("error: model.bn_momentum: fake trainer refuses 0.5", file=sys.stderr)
      sys.exit(2)
    long = {"ln": "layer", "bn": "batch", "rms": "rms", "none": "none"}
    model = {"norm": long[cfg_args["norm"]], "ffn_norm": long[cfg_args["ffn_norm"]]}
    model.update({k[13:]: json.loads(v.lower()) if v[0].isdigit() or v in ("True", "False") else v
                  for k, v in flags.items() if k.startswith("config.model.")})
    json.dump({"model": model, "num_steps": num_steps}, open(os.path.join(wd, "config.json"), "w"))
    ckpt = os.path.join(wd, "checkpoints")
    start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
    kill_at = int(os.environ.get("FAKE_KILL_AT", 0))
    diverge_at = 3 if model["norm"] == "batch" and model["ffn_norm"] == "none" else None
    log = open(os.path.join(wd, "metrics.jsonl"), "a")
    last = {}
    for step in range(start + 1, num_steps + 1):
      if step == kill_at and not os.path.exists(os.path.join(wd, "killed")):
        open(os.path.join(wd, "killed"), "w").close()
        open(ckpt, "w").write(str(step - 1))
        log.write('{"step": %d, "train/lo' % step)  # a line cut off by the kill
        sys.exit(137)
      loss = float("nan") if step == diverge_at else 2.0 / step
      if os.environ.get("FAKE_PROGRESS"):
        print("step %d/%d | loss %.4f | eta 0s" % (step, num_steps, loss), flush=True)
      if step == int(os.environ.get("FAKE_PREEMPT_AT", 0)):
        json.dump({"status": "preempted", "step": step, "metrics": {}}, open(os.path.join(wd, "status.json"), "w"))
        sys.exit(75)
      rec = {"step": step, "train/loss": loss}
      for b in range(2):
        rec[f"diag/block_{b}/residual_rms"] = (b + 1) * step * (100 if diverge_at else 1)
        rec[f"diag/block_{b}/ffn_hidden_rms"] = 0.5 * (b + 1)
        rec[f"diag/block_{b}/max_attention_logit"] = 3.0 + b
        rec[f"diag/block_{b}/grad_norm"] = 1.0 / step
      log.write(json.dumps(rec) + "\\n")
      if step == diverge_at:
        json.dump({"status": "diverged", "step": step, "metrics": last, "reason": "non-finite loss"},
                  open(os.path.join(wd, "status.json"), "w"))
        print("error: training diverged at step %d (loss nan)" % step, file=sys.stderr)
        sys.exit(1)
      last = {"train/loss": loss}
      if step % 2 == 0:
        last.update({"eval/top1": 0.5 + step / 100, "eval/loss": 1.0 / step})
        log.write(json.dumps({"step": step, "eval/top1": last["eval/top1"],
                              "eval/loss": last["eval/loss"]}) + "\\n")
    json.dump({"status": "completed", "step": num_steps, "metrics": last},
              open(os.path.join(wd, "status.json"), "w"))
''')

# What the fake evaluate writes to evaluation.json.
FAKE_EVALUATION = {
    "accuracy": {"as_trained": {"top1": 0.6, "loss": 1.0, "num_examples": 10},
                 "folded": {"top1": 0.6, "loss": 1.0, "num_examples": 10}, "folded_agrees": True},
    "throughput": [{"model": "unfolded", "batch_size": 64, "images_per_second": {"median": 100.0}},
                   {"model": "folded", "batch_size": 64, "images_per_second": {"median": 125.0}},
                   {"model": "folded", "batch_size": 8, "images_per_second": {"median": 90.0}}],
}
FAKE_EVALUATE = textwrap.dedent(f'''
    import json, os, sys
    wd = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workdir=")][0]
    json.dump({FAKE_EVALUATION!r}, open(os.path.join(wd, "evaluation.json"), "w"))
''')

TEST_SWEEP = sweeps_lib.Sweep(
    "fake_cpu", "cpu", "Does the fake trainer behave?",
    runs=(
        sweeps_lib.Run("ln", "configs/quickstart.py:norm=ln,ffn_norm=none", note="LN"),
        sweeps_lib.Run("bn", "configs/quickstart.py:norm=bn,ffn_norm=none", note="BN only"),
        sweeps_lib.Run("bn_ffnbn", "configs/quickstart.py:norm=bn,ffn_norm=bn",
                       (("model.bn_momentum", "0.99"),), note="the fix"),
        sweeps_lib.Run("bad", "configs/quickstart.py:norm=bn,ffn_norm=bn",
                       (("model.bn_momentum", "0.5"),), note="a bad override"),
    ),
    evaluate_args=("--batch_sizes=64",))


@pytest.fixture
def fake_modules(tmp_path, monkeypatch):
  """Fake trainer/evaluate modules importable by the runner's subprocesses; TEST_SWEEP registered."""
  mod_dir = tmp_path / "fake_mods"
  mod_dir.mkdir()
  (mod_dir / "fake_train.py").write_text(FAKE_TRAINER)
  (mod_dir / "fake_evaluate.py").write_text(FAKE_EVALUATE)
  monkeypatch.setenv("PYTHONPATH", f"{mod_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  monkeypatch.setitem(sweeps_lib.SWEEPS, TEST_SWEEP.name, TEST_SWEEP)
  return ["--train_module=fake_train", "--evaluate_module=fake_evaluate"]


def _invocations(workdir):
  path = os.path.join(workdir, "invocations")
  return open(path).read().splitlines() if os.path.exists(path) else []


# ----------------------------------------------------------------------------------------------
# Sweep definitions
# ----------------------------------------------------------------------------------------------

ABLATIONS = ("norm_variants", "ffn_position", "bn_sync", "bn_momentum", "bn_epsilon", "bn_cls",
             "lr_stress", "inference_speed")
IMAGENET_ONLY = ("stability", "stability_harsh")  # at CPU scale the crash study replaces them


def test_every_ablation_exists_at_both_scales_with_the_scale_config():
  crash = {n for n in sweeps_lib.SWEEPS if n.startswith("crash_")}
  assert set(sweeps_lib.SWEEPS) - crash == ({f"{a}_{s}" for a in ABLATIONS for s in ("cpu", "imagenet")}
                                            | {f"{a}_imagenet" for a in IMAGENET_ONLY})
  assert crash and all(sweeps_lib.SWEEPS[n].scale == "cpu" for n in crash)
  for sweep in sweeps_lib.SWEEPS.values():
    names = [r.name for r in sweep.runs]
    assert len(names) == len(set(names)), sweep.name
    assert all(n.replace("_", "").replace(".", "").replace("-", "").isalnum() for n in names)
    want = "configs/quickstart.py:" if sweep.scale == "cpu" else "configs/deit.py:variant="
    assert all(r.config.startswith(want) for r in sweep.runs), sweep.name
    assert sweep.is_benchmark == (not sweep.runs) or sweep.kind == "accuracy"  # runs from its best lrs
    # A seeded table's paired differences need their reference row among its runs.
    if sweep.kind == "table" and sweep.runs and sweep.name.startswith(("norm_variants", "bn_", "ffn_")):
      assert sweep.reference in names, (sweep.name, sweep.reference)
    if sweep.scale == "cpu" and sweep.name.startswith(("norm_variants", "bn_", "ffn_")):
      assert sweep.seeds == (0, 1, 2) and sweep.num_steps == 2000, sweep.name


def test_norm_variants_cover_the_papers_models():
  for scale in ("cpu", "imagenet"):
    pairs = {r.name: run_files.model_fields(None, r)
             for r in sweeps_lib.SWEEPS[f"norm_variants_{scale}"].runs}
    got = {name: (m["norm"], m["ffn_norm"], m["qk_norm"]) for name, m in pairs.items()}
    assert got == {"ln": ("ln", "none", "none"), "bn": ("bn", "none", "none"),
                   "bn_ffnbn": ("bn", "bn", "none"), "ln_ffnbn": ("ln", "bn", "none"),
                   "rms": ("rms", "none", "none"), "none": ("none", "none", "none"),
                   "dyt": ("dyt", "none", "none"), "prepbn": ("prepbn", "none", "none"),
                   "bn_qknorm": ("bn", "none", "layer")}


@pytest.mark.parametrize("ablation,field", [("bn_sync", "bn_group_size"), ("bn_momentum", "bn_momentum"),
                                            ("bn_epsilon", "bn_epsilon"), ("bn_cls", "bn_include_cls"),
                                            ("ffn_position", "ffn_norm_position")])
def test_knob_sweeps_vary_their_knob_and_resolve_in_the_model(ablation, field):
  short = {"ln": "layer", "bn": "batch", "rms": "rms", "none": "none"}
  for scale in ("cpu", "imagenet"):
    sweep = sweeps_lib.SWEEPS[f"{ablation}_{scale}"]
    seen = []
    for run in sweep.runs:
      fields = run_files.model_fields(None, run)
      # The overrides name real model fields with valid values: the ViT config accepts them.
      cfg = dict(hidden_size=32, num_layers=1, mlp_dim=64, num_heads=2, patch_size=4,
                 num_classes=10, image_size=8, num_channels=1,
                 norm=short[fields["norm"]], ffn_norm=short[fields["ffn_norm"]])
      for key, value in run.overrides:
        assert key.startswith("model."), key
        cfg[key[len("model."):]] = run_files._parse_value(value)
      resolved = vit.resolve_model_config(cfg)
      options = resolved["norm_options"]
      value = {"bn_group_size": options.bn_group_size, "bn_momentum": options.bn_momentum,
               "bn_epsilon": options.bn_epsilon, "bn_include_cls": options.bn_include_cls,
               "ffn_norm_position": resolved["ffn_norm_position"]}[field]
      assert value == fields[field]
      seen.append((fields["norm"], value))
      if ablation.startswith("bn_"):  # knobs of the paper's model: BN + FFN-BN
        assert (fields["norm"], fields["ffn_norm"]) == ("bn", "bn")
    assert len(set(seen)) == len(seen) >= 2, (sweep.name, seen)


def _parse_like_the_trainer(cmd):
  """The ConfigDict `python -m vitnorm.train` builds from a command's --config flags."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from vitnorm import config_overrides  # pylint: disable=g-import-not-at-top
  args = [a for a in cmd[3:] if a.startswith("--config")]
  args[0] = "--config=" + os.path.join(run_sweep.PROJECT_ROOT, args[0].split("=", 1)[1])
  args, none_fields = config_overrides.none_overrides(args)  # --config.FIELD=None, as the trainer does
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, sys_argv=["prog"] + args)
  values(["prog"] + args)
  for field in none_fields:
    config_overrides.apply_none(values.config, field)
  return values.config


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading a config file
def test_every_sweep_command_parses_with_the_trainers_config_flags():
  """Each run's config file, :args and overrides give the model the sweep says it trains."""
  for sweep in sweeps_lib.SWEEPS.values():
    for run in sweep.runs:
      cmd = run_sweep.train_command(run, "/tmp/unused", num_steps=20, scale=sweep.scale,
                                    overrides=["seed=3"])
      config = _parse_like_the_trainer(cmd)
      assert (config.num_steps, config.seed) == (20, 3)
      cpu_data = "numpy:mnist5k" if run.config.endswith("feed=numpy") else "mnist5k"
      assert config.data.name == (cpu_data if sweep.scale == "cpu" else "imagenet2012")
      own = dict(run.overrides)
      assert config.eval_every == (int(own.get("eval_every", 2)) if sweep.scale == "cpu" else config.eval_every)
      assert cmd.count(f"--config.eval_every={config.eval_every}") <= 1  # one interval per command
      declared = run_files.model_fields(None, run)
      assert run_files.model_fields(config.to_dict()) == declared, (sweep.name, run.name)
      vit.resolve_model_config(config.model)  # a valid model


def test_unknown_sweep_is_a_one_line_error_listing_the_names(capsys):
  with pytest.raises(SystemExit) as exc:
    run_sweep.main(["--sweep", "norm_variant", "--root", "/tmp/unused"])
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and err.startswith("error: --sweep: unknown sweep 'norm_variant'")
  assert "norm_variants_cpu" in err and "inference_speed_imagenet" in err


def test_unwritable_root_is_a_one_line_error(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  for root in (blocker, blocker / "sub"):
    with pytest.raises(SystemExit) as exc:
      run_sweep.main(["--sweep", "norm_variants_cpu", "--root", str(root)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --root: ") and str(root) in err


def test_dry_run_prints_the_exact_commands_and_creates_nothing(tmp_path, capsys):
  root = tmp_path / "root"
  assert run_sweep.main(["--sweep", "bn_momentum_cpu", "--root", str(root), "--dry_run",
                         "--num_steps", "50", "--evaluate"]) == 0
  lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
  py = sys.executable
  wd = root / "bn_momentum_cpu"
  # The BN-knob tables declare seeds 0, 1, 2: each run once per seed, named and seeded by it.
  assert lines[0] == (f"{py} -m vitnorm.train --config=configs/quickstart.py:norm=bn,ffn_norm=bn,feed=tfds "
                      f"--workdir={wd / 'momentum_0.5_seed0'} --config.num_steps=50 "
                      "--config.log_every=1 --config.eval_every=5 --config.diagnostics_every=1 "
                      "--config.model.bn_momentum=0.5 --config.seed=0")
  assert lines[1] == f"{py} -m vitnorm.evaluate --workdir={wd / 'momentum_0.5_seed0'} --batch_sizes=64"
  assert len(lines) == 18 and lines[16].endswith("--config.model.bn_momentum=0.99 --config.seed=2")
  assert not root.exists()
  # A sweep without a declared length: the config's own, and the CPU runs log densely enough to plot.
  run_sweep.main(["--sweep", "lr_stress_cpu", "--root", str(root), "--dry_run"])
  lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
  assert lines[0].endswith("--workdir=%s --config.log_every=25 --config.eval_every=625 "
                           "--config.diagnostics_every=125 --config.optim.base_lr=0.008 "
                           "--config.optim.grad_clip_norm=None" % (root / "lr_stress_cpu" / "ln"))
  # A sweep's own length and seeds: norm_variants_cpu declares 2,000 steps and seeds 0, 1, 2.
  run_sweep.main(["--sweep", "norm_variants_cpu", "--root", str(root), "--dry_run"])
  lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
  assert len(lines) == 3 * len(sweeps_lib.VARIANTS)
  assert lines[1].endswith("--workdir=%s --config.num_steps=2000 --config.log_every=25 "
                           "--config.eval_every=200 --config.diagnostics_every=40 --config.seed=1"
                           % (root / "norm_variants_cpu" / "ln_seed1"))
  run_sweep.main(["--sweep", "norm_variants_imagenet", "--root", str(root), "--dry_run"])
  lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
  assert lines[2] == (f"{py} -m vitnorm.train --config=configs/deit.py:variant=Ti/16,norm=bn,ffn_norm=bn "
                      f"--workdir={root / 'norm_variants_imagenet' / 'bn_ffnbn'}")
  # --seeds repeats every run per seed, whatever the sweep declares.
  run_sweep.main(["--sweep", "norm_variants_imagenet", "--root", str(root), "--dry_run", "--seeds", "4,5"])
  lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
  assert lines[0].endswith(f"--workdir={root / 'norm_variants_imagenet' / 'ln_seed4'} --config.seed=4")
  assert lines[1].endswith(f"--workdir={root / 'norm_variants_imagenet' / 'ln_seed5'} --config.seed=5")
  # --set overrides go to every run, after the run's own overrides.
  run_sweep.main(["--sweep", "bn_cls_imagenet", "--root", str(root), "--dry_run",
                  "--set", "data.data_dir=/data/tfds", "--set", "batch_size=512"])
  lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
  assert [l.split(" --config.model.classifier=token ")[1] for l in lines] == [
      f"--config.model.bn_include_cls={b} --config.data.data_dir=/data/tfds --config.batch_size=512"
      for b in (True, False)]
  with pytest.raises(SystemExit):
    run_sweep.main(["--sweep", "bn_cls_imagenet", "--root", str(root), "--dry_run", "--set", "batch_size"])
  assert capsys.readouterr().err.startswith("error: --set: expected FIELD=VALUE")
  run_sweep.main(["--sweep", "inference_speed_cpu", "--root", str(root), "--dry_run"])
  (bench,) = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
  assert bench.startswith(f"{py} -m vitnorm.benchmark --variant=S/16 --image_size=224")
  assert bench.endswith(f"--output={root / 'inference_speed_cpu' / 'benchmark.json'}")


# ----------------------------------------------------------------------------------------------
# Reading run files
# ----------------------------------------------------------------------------------------------


def test_read_metrics_keeps_what_the_finished_attempt_logged(tmp_path):
  lines = [
      {"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0},
      {"step": 2, "eval/top1": 0.2}, {"step": 3, "train/loss": 9.0},  # attempt 1, killed after 3
      {"step": 3, "train/loss": 1.5}, {"step": 4, "train/loss": None, "train/lr": "nan"},  # resumed at 3
  ]
  text = "\n".join(json.dumps(l) for l in lines) + '\n{"step": 5, "train/lo'  # cut-off line
  text = text.replace('{"step": 3, "train/loss": 1.5}', '{"step": 4, "tr{"step": 3, "train/loss": 1.5}')
  (tmp_path / "metrics.jsonl").write_text(text.replace("null", "NaN"))
  series = run_files.read_metrics(str(tmp_path))
  assert series["train/loss"][:3] == [(1, 3.0), (2, 2.0), (3, 1.5)]
  assert series["train/loss"][3][0] == 4 and math.isnan(series["train/loss"][3][1])
  assert math.isnan(series["train/lr"][0][1])
  assert series["eval/top1"] == [(2, 0.2)]
  assert run_files.last_finite(series["train/loss"]) == (3, 1.5)


def test_throughput_takes_the_best_median_of_folded_and_unfolded():
  assert run_files.throughput(FAKE_EVALUATION) == {"unfolded": 100.0, "folded": 125.0}
  assert run_files.throughput({"results": {"bn_unfolded": {"images_per_second": 7.0}}}) == {"unfolded": 7.0}
  assert run_files.throughput(None) == {}


# ----------------------------------------------------------------------------------------------
# The runner with a fake trainer
# ----------------------------------------------------------------------------------------------


def test_sweep_records_completed_diverged_and_failed_runs_and_resumes(tmp_path, fake_modules, capsys):
  root = tmp_path / "runs"
  args = ["--sweep", "fake_cpu", "--root", str(root), "--num_steps", "6", "--evaluate", *fake_modules]
  assert run_sweep.main(args) == 1  # a run failed
  out = capsys.readouterr().out
  assert "[2/4] bn: diverged at step 3" in out
  assert "[4/4] bad: failed: error: model.bn_momentum: fake trainer refuses 0.5" in out
  sweep_dir = root / "fake_cpu"
  doc = json.loads((sweep_dir / "results.json").read_text())
  runs = {r["name"]: r for r in doc["runs"]}
  assert [r["name"] for r in doc["runs"]] == ["ln", "bn", "bn_ffnbn", "bad"]
  assert (runs["ln"]["status"], runs["ln"]["step"]) == ("completed", 6)
  assert runs["ln"]["final"] == {"train/loss": 2.0 / 6, "eval/top1": 0.56, "eval/loss": 1.0 / 6}
  assert runs["ln"]["model"]["norm"] == "ln" and runs["ln"]["throughput"] == {"unfolded": 100.0, "folded": 125.0}
  assert (runs["bn"]["status"], runs["bn"]["step"]) == ("diverged", 3)
  assert runs["ln"]["evaluated"] == {"top1": 0.6, "folded_top1": 0.6, "folded_agrees": True}
  assert runs["bn"]["throughput"] == {} and runs["bn"]["evaluated"] == {}  # a diverged run is not evaluated
  assert runs["bn_ffnbn"]["model"]["bn_momentum"] == 0.99
  assert runs["bad"]["status"] == "failed"
  assert runs["bad"]["error"] == "error: model.bn_momentum: fake trainer refuses 0.5"
  assert _invocations(sweep_dir / "ln")[0] == (
      f"--config=configs/quickstart.py:norm=ln,ffn_norm=none --workdir={sweep_dir / 'ln'} "
      "--config.num_steps=6 --config.log_every=1 --config.eval_every=1 --config.diagnostics_every=1")
  assert "error: training diverged" in (sweep_dir / "bn" / "train.log").read_text()

  # Running again needs --resume; with another --num_steps it is refused too.
  with pytest.raises(SystemExit) as exc:
    run_sweep.main(args)
  assert exc.value.code == 2 and "pass --resume" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run_sweep.main(args[:4] + ["--num_steps", "7", "--resume", *fake_modules])
  assert "--num_steps: " in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run_sweep.main(args + ["--resume", "--set", "seed=1"])
  err = capsys.readouterr().err
  assert err.startswith("error: --set: ") and "was started with --set (none), not seed=1" in err
  # --resume: finished runs (completed, diverged) are skipped, the failed one runs again.
  assert run_sweep.main(args + ["--resume"]) == 1
  out = capsys.readouterr().out
  assert "[1/4] ln: already completed at step 6" in out and "[2/4] bn: already diverged at step 3" in out
  assert [len(_invocations(sweep_dir / n)) for n in ("ln", "bn", "bn_ffnbn", "bad")] == [1, 1, 1, 2]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPU cores")
def test_jobs_trains_runs_side_by_side_each_on_its_own_cores(tmp_path, fake_modules, monkeypatch, capsys):
  """--jobs 2: the same results as one at a time, runs overlapping in time, each pinned to one
  core of its own, and the runner notes say so (the report weights machine time by them)."""
  monkeypatch.setenv("FAKE_SLEEP", "1.5")
  cores = sorted(os.sched_getaffinity(0))[:2]
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores))  # the runner's own cores
  args = ["--sweep", "fake_cpu", "--num_steps", "6", *fake_modules]
  assert run_sweep.main(args + ["--root", str(tmp_path / "one")]) == 1
  assert run_sweep.main(args + ["--root", str(tmp_path / "two"), "--jobs", "2"]) == 1
  one, two = ({r["name"]: r for r in json.loads((tmp_path / d / "fake_cpu" / "results.json").read_text())["runs"]}
              for d in ("one", "two"))
  assert {n: (r["status"], r["step"], r["final"]) for n, r in one.items()} == {
      n: (r["status"], r["step"], r["final"]) for n, r in two.items()}
  assert all(r["cores"] == 1 and r["machine_cores"] == os.cpu_count() for r in two.values())
  assert all(r["cores"] == 2 for r in one.values())
  seen = {n: json.loads((tmp_path / "two" / "fake_cpu" / n / "affinity").read_text().splitlines()[0])
          for n in ("ln", "bn")}
  assert seen["ln"]["cores"] != seen["bn"]["cores"] and all(len(v["cores"]) == 1 for v in seen.values())
  assert seen["bn"]["start"] < seen["ln"]["end"] and seen["ln"]["start"] < seen["bn"]["end"]  # overlapped
  assert "on cores" in capsys.readouterr().out
  # The report weights each run's wall-clock by its share of the machine: half here.
  text = report.make_report(str(tmp_path / "two"))
  assert "weighted by the share of the machine's cores each run had" in text
  summary = json.loads(next((tmp_path / "two").rglob("summary.json")).read_text())
  assert summary["machine_minutes"] == pytest.approx(summary["wall_minutes"] * 1 / os.cpu_count())
  with pytest.raises(SystemExit) as exc:
    run_sweep.main(args + ["--root", str(tmp_path / "three"), "--jobs", "3"])
  assert exc.value.code == 2 and "--jobs: 3 runs at once need at least 3 CPU cores" in capsys.readouterr().err
  assert not (tmp_path / "three").exists()


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading a config file
def test_a_typo_in_set_is_refused_before_anything_starts_and_not_recorded(tmp_path, fake_modules, capsys):
  root = tmp_path / "runs"
  args = ["--sweep", "fake_cpu", "--root", str(root), "--num_steps", "4", *fake_modules]
  for bad, line in (("model.nrom=ln", "error: --set: model.nrom: no such config field; did you mean "
                     "model.norm? (fields and their comments: configs/common.py)"),
                    ("data.cache=maybe", "error: --set: data.cache: 'maybe' is not a boolean; use true or false")):
    with pytest.raises(SystemExit) as exc:
      run_sweep.main(args + ["--set", bad])
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert not root.exists() or not os.listdir(root)  # nothing started, nothing recorded
  # The corrected command runs without --resume; None unsets an optional field.
  assert run_sweep.main(args + ["--set", "model.norm=ln", "--set", "optim.grad_clip_norm=None"]) == 1
  assert "[1/4] ln: completed at step 4" in capsys.readouterr().out


def test_changed_settings_are_allowed_while_no_run_has_trained(tmp_path, fake_modules):
  sweep = sweeps_lib.Sweep("fake_cpu", "cpu", "q", runs=TEST_SWEEP.runs[3:])  # 'bad': fails at once
  run_sweep.run_sweep(sweep, str(tmp_path), overrides=["seed=1"], train_module="fake_train")
  doc = run_sweep.run_sweep(sweep, str(tmp_path), resume=True, overrides=["seed=2"], train_module="fake_train")
  assert doc["runs"][0]["status"] == "failed"
  manifest = json.loads((tmp_path / "fake_cpu" / "sweep.json").read_text())
  assert manifest["overrides"] == ["seed=2"]


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_a_preempted_trainer_is_recorded_as_preempted_and_progress_updates_one_line(
    tmp_path, fake_modules, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_PROGRESS", "1")
  monkeypatch.setenv("FAKE_PREEMPT_AT", "3")
  sweep = sweeps_lib.Sweep("fake_cpu", "cpu", "q", runs=TEST_SWEEP.runs[:1])
  out = _Terminal()
  doc = run_sweep.run_sweep(sweep, str(tmp_path), num_steps=6, train_module="fake_train", out=out)
  (run,) = doc["runs"]
  assert (run["status"], run["step"]) == ("preempted", 3) and not run.get("error")
  text = out.getvalue()
  assert "\r[1/1] ln: step 1/6 | loss 2.0000 | eta 0s\x1b[K\r[1/1] ln: step 2/6 |" in text
  assert "\r\x1b[K[1/1] ln: preempted at step 3 (checkpoint saved; --resume continues it)" in text
  monkeypatch.delenv("FAKE_PREEMPT_AT")
  monkeypatch.setitem(sweeps_lib.SWEEPS, "fake_cpu", sweep)
  assert run_sweep.main(["--sweep", "fake_cpu", "--root", str(tmp_path), "--num_steps", "6", "--resume",
                         "--train_module", "fake_train"]) == 0
  assert "\r" not in capsys.readouterr().out  # not a terminal: no progress line


def test_a_sweep_that_ends_with_a_preempted_run_exits_75(tmp_path, fake_modules, monkeypatch):
  monkeypatch.setenv("FAKE_PREEMPT_AT", "2")
  monkeypatch.setitem(sweeps_lib.SWEEPS, "fake_cpu", sweeps_lib.Sweep("fake_cpu", "cpu", "q",
                                                                      runs=TEST_SWEEP.runs[:1]))
  assert run_sweep.main(["--sweep", "fake_cpu", "--root", str(tmp_path), "--num_steps", "6",
                         "--train_module", "fake_train"]) == 75


def test_source_fingerprint_tells_config_changes_from_code_changes(tmp_path):
  for folder, name in (("configs", "quickstart.py"), ("vitnorm", "train.py"), ("vitnorm/data", "x.py")):
    (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / folder / name).write_text("a = 1\n")
  before = run_sweep.source_fingerprint(str(tmp_path))
  assert before["git"] is None  # not a git checkout
  (tmp_path / "configs" / "quickstart.py").write_text("a = 2\n")
  after_config = run_sweep.source_fingerprint(str(tmp_path))
  assert after_config["configs"] != before["configs"] and after_config["code"] == before["code"]
  (tmp_path / "vitnorm" / "data" / "x.py").write_text("b = 1\n")
  assert run_sweep.source_fingerprint(str(tmp_path))["code"] != before["code"]


def test_runs_trained_with_changed_configs_are_flagged(tmp_path, fake_modules, monkeypatch, capsys):
  """Another engineer editing configs/ mid-sweep makes the runs incomparable: say so, loudly."""
  sources = iter([{"configs": "aaa", "code": "ccc", "git": "1"}, {"configs": "aaa", "code": "ccc", "git": "1"},
                  {"configs": "bbb", "code": "ccc", "git": "1+uncommitted"}])
  monkeypatch.setattr(run_sweep, "source_fingerprint", lambda: next(sources))
  sweep = sweeps_lib.Sweep("fake_cpu", "cpu", "q", runs=TEST_SWEEP.runs[:3])
  doc = run_sweep.run_sweep(sweep, str(tmp_path), num_steps=4, train_module="fake_train",
                            overrides=["seed=3", "optim.base_lr=0.002"])
  out = capsys.readouterr().out
  assert "[1/3] ln: warning" not in out and "[2/3] bn: warning" not in out
  assert ("[3/3] bn_ffnbn: warning: runs were trained with different config files (configs/): "
          "ln, bn (configs aaa); bn_ffnbn (configs bbb)") in out
  assert [r["source"]["configs"] for r in doc["runs"]] == ["aaa", "aaa", "bbb"]
  text = report.make_report(str(tmp_path))
  assert ("**Warning: runs were trained with different config files (configs/): ln, bn (configs aaa); "
          "bn_ffnbn (configs bbb).**") in text
  assert "vitnorm code" not in text
  assert "Every run with `--set seed=3` `--set optim.base_lr=0.002`." in text


def test_interrupted_run_is_resumed_by_running_it_again(tmp_path, fake_modules, monkeypatch, capsys):
  monkeypatch.setenv("FAKE_KILL_AT", "4")
  sweep = sweeps_lib.Sweep("fake_cpu", "cpu", "q", runs=TEST_SWEEP.runs[:1])
  modules = dict(train_module="fake_train")
  doc = run_sweep.run_sweep(sweep, str(tmp_path), num_steps=6, **modules)
  (run,) = doc["runs"]
  assert run["status"] == "failed" and "exit code 137" in run["error"]
  doc = run_sweep.run_sweep(sweep, str(tmp_path), num_steps=6, resume=True, **modules)
  (run,) = doc["runs"]
  assert (run["status"], run["step"]) == ("completed", 6) and "error" not in run
  series = run_files.read_metrics(str(tmp_path / "fake_cpu" / "ln"))
  assert [s for s, _ in series["train/loss"]] == [1, 2, 3, 4, 5, 6]
  assert "(resuming)" in capsys.readouterr().out


def test_an_error_exit_is_a_failure_even_over_an_earlier_preempted_status(tmp_path, fake_modules):
  sweep = sweeps_lib.Sweep("fake_cpu", "cpu", "q", runs=TEST_SWEEP.runs[3:])  # 'bad': exits 2
  workdir = tmp_path / "fake_cpu" / "bad"
  workdir.mkdir(parents=True)
  (workdir / "status.json").write_text(json.dumps({"status": "preempted", "step": 2, "metrics": {}}))
  with pytest.raises(UserError, match="pass --resume"):
    run_sweep.run_sweep(sweep, str(tmp_path), train_module="fake_train")
  doc = run_sweep.run_sweep(sweep, str(tmp_path), resume=True, train_module="fake_train")
  (run,) = doc["runs"]
  assert run["status"] == "failed" and run["error"].startswith("error: model.bn_momentum")
  assert report.status_text(run).startswith("failed: error: model.bn_momentum")


_TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPU cores")


@pytest.mark.parametrize("jobs,b_starting", [(1, False), pytest.param(2, False, marks=_TWO_CORES),
                                             pytest.param(2, True, marks=_TWO_CORES)])
def test_sigterm_stops_the_sweep_and_lets_the_run_resume(tmp_path, jobs, b_starting):
  """SIGTERM to the runner is forwarded to the training (every one with --jobs 2), results.json is
  written, exit 143. A run the signal kills while it starts (before the trainer's own handler is
  installed: exit -15) is stopped, not failed (b_starting: run b never installs one)."""
  mod_dir = tmp_path / "mods"
  mod_dir.mkdir()
  (mod_dir / "slow_train.py").write_text(textwrap.dedent('''
      import json, os, signal, sys, time
      wd = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
      def stop(signum, frame):
        json.dump({"status": "preempted", "step": 2, "metrics": {}}, open(os.path.join(wd, "status.json"), "w"))
        sys.exit(0)
      if not wd.endswith("b") or not os.environ.get("B_STARTING"):
        signal.signal(signal.SIGTERM, stop)
      print("started", flush=True)
      time.sleep(60)
  '''))
  (mod_dir / "sweep_main.py").write_text(textwrap.dedent(f'''
      import sys
      from experiments import run_sweep, sweeps
      sweeps.SWEEPS["slow_cpu"] = sweeps.Sweep("slow_cpu", "cpu", "q", runs=(
          sweeps.Run("a", "configs/quickstart.py:norm=ln,ffn_norm=none"),
          sweeps.Run("b", "configs/quickstart.py:norm=ln,ffn_norm=none")))
      sys.exit(run_sweep.main(["--sweep", "slow_cpu", "--root", {str(tmp_path / "root")!r},
                               "--train_module", "slow_train", "--jobs", "{jobs}"]))
  '''))
  env = dict(os.environ, PYTHONPATH=f"{mod_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
             B_STARTING="1" if b_starting else "")
  proc = subprocess.Popen([sys.executable, str(mod_dir / "sweep_main.py")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  logs = [tmp_path / "root" / "slow_cpu" / name / "train.log" for name in "ab"[:jobs]]
  for _ in range(400):
    if all(log.exists() and "started" in log.read_text() for log in logs):
      break
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.terminate()
  out, err = proc.communicate(timeout=30)
  assert proc.returncode == 143, (out, err)
  assert "continue with the same command plus --resume" in err
  doc = json.loads((tmp_path / "root" / "slow_cpu" / "results.json").read_text())
  assert [(r["name"], r["status"]) for r in doc["runs"]] == [
      ("a", "preempted"), ("b", "not_run" if jobs == 1 or b_starting else "preempted")]
  assert "failed" not in err + out


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n"
  return struct.unpack(">II", head[16:24])


def test_report_tables_and_plots(tmp_path, fake_modules, capsys):
  root = tmp_path / "runs"
  run_sweep.main(["--sweep", "fake_cpu", "--root", str(root), "--num_steps", "6", "--evaluate", *fake_modules])
  capsys.readouterr()
  out_dir = tmp_path / "report"
  assert report.main(["--root", str(root), "--out", str(out_dir)]) == 0
  text = capsys.readouterr().out
  assert text == (out_dir / "report.md").read_text() + "\n"
  table = [l for l in text.splitlines() if l.startswith("|")]
  assert table[0] == ("| run | norm | ffn_norm | position | BN momentum | eval top-1 | eval loss | "
                      "train loss | status | img/s |")
  assert table[2] == "| ln | ln | none | - | 0.9 | 56.00% | 0.1667 | 0.3333 | completed (6 steps) | 100.0 / 125.0 folded |"
  # a diverged run shows its last finite metrics (from before the crash)
  assert table[3] == "| bn | bn | none | - | 0.9 | 52.00% | 0.5000 | 1.0000 | diverged at step 3 | - |"
  assert table[4].startswith("| bn_ffnbn | bn | bn | pre_act | 0.99 | 56.00% |")
  assert table[5].startswith("| bad | bn | bn | pre_act | 0.5 | - | - | - | failed: error: model.bn_momentum")
  assert "- `bn`: BN only -- stopped: non-finite loss" in text
  for name in ("loss.png", "eval_top1.png", "diagnostics.png"):
    path = out_dir / "fake_cpu" / name
    assert f"![{name}](fake_cpu/{name})" in text
    width, height = _png_size(path)
    assert width >= 600 and height >= 300
  # 3 runs with diagnostics (the failed one has none): 3 rows of panels.
  assert _png_size(out_dir / "fake_cpu" / "diagnostics.png")[1] > _png_size(out_dir / "fake_cpu" / "loss.png")[1]


# The sweep's real benchmark command, made tiny: absl keeps the last value of a repeated flag, so
# these sizes and counts win over the sweep's S/16 at 224 px; the JSON is what the real CLI writes.
TINY_BENCHMARK = textwrap.dedent('''
    import sys
    from vitnorm import benchmark
    sys.argv = ["vitnorm.benchmark"] + sys.argv[1:] + [
        "--variant=Ti/8", "--image_size=16", "--hidden_size=32", "--num_layers=1", "--mlp_dim=64",
        "--num_heads=2", "--num_classes=10", "--batch_sizes=8,16", "--warmup=0", "--iterations=1",
        "--repeats=1", "--matmul_size=64"]
    benchmark.run()
''')


def test_benchmark_sweep_runs_once_and_reports_its_table(tmp_path, monkeypatch, capsys):
  mod_dir = tmp_path / "mods"
  mod_dir.mkdir()
  (mod_dir / "tiny_benchmark.py").write_text(TINY_BENCHMARK)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mod_dir), REPO, os.environ.get("PYTHONPATH", "")]))
  root = tmp_path / "runs"
  args = ["--sweep", "inference_speed_cpu", "--root", str(root), "--benchmark_module=tiny_benchmark"]
  assert run_sweep.main(args) == 0
  out = root / "inference_speed_cpu"
  doc = json.loads((out / "results.json").read_text())
  assert doc["benchmark"]["status"] == "completed" and doc["benchmark"]["output"] == "benchmark.json"
  assert doc["benchmark"]["command"][-1] == f"--output={out / 'benchmark.json'}"
  with pytest.raises(SystemExit):  # a benchmark sweep has no training length
    run_sweep.main(args + ["--resume", "--num_steps", "5"])
  assert "--num_steps: inference_speed_cpu trains nothing" in capsys.readouterr().err
  assert run_sweep.main(args + ["--resume"]) == 0
  assert "benchmark already completed (skipped)" in capsys.readouterr().out
  measured = json.loads((out / "benchmark.json").read_text())  # written by the real benchmark CLI
  rows = {(r["model"], r["batch_size"]): r for r in measured["results"]}
  models = ["ln", "bn_folded", "bn_unfolded", "bn_ffnbn_folded", "none", "dyt", "prepbn_folded", "none_aa"]
  assert set(rows) == {(m, b) for m in models for b in (8, 16)}
  assert all(r["status"] == "ok" for r in rows.values())
  text = report.make_report(str(root))
  for (model, batch), r in rows.items():  # every measured row, as the report prints it
    ips = r["images_per_second"]
    assert (f"| {model} | {batch} | {ips['median']:.1f} | {ips['min']:.1f}-{ips['max']:.1f} | "
            f"{r['ratio_to_ln']:.3f} |") in text, (model, batch)
  # The ratio pivot from the same numbers, its curve, the numbers for a write-up, the section.
  pivot = "| model | batch 8 | batch 16 |\n|---|---|---|\n| ln | 1.000 | 1.000 |"
  assert pivot in text
  summary = json.loads((out / "summary.json").read_text())
  for model in models:
    for batch in (8, 16):
      assert summary["ratio_to_ln"][model][str(batch)] == pytest.approx(rows[model, batch]["ratio_to_ln"], rel=1e-3)
      assert summary["images_per_second"][model][str(batch)] == pytest.approx(
          rows[model, batch]["images_per_second"]["median"], rel=1e-3)
  assert _png_size(out / "speed_vs_batch.png")[0] >= 600
  section = (out / "section.md").read_text()
  assert section.startswith("_Is a BN ViT") and "![speed vs batch](inference_speed_cpu/speed_vs_batch.png)" in section
  assert "Regenerate: `python -m experiments.run_sweep --sweep inference_speed_cpu --root runs && " in section


def test_report_without_sweeps_is_a_one_line_error(tmp_path, capsys):
  with pytest.raises(SystemExit) as exc:
    report.main(["--root", str(tmp_path)])
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --root: no sweep results under") and "\n" not in err
  with pytest.raises(SystemExit):
    report.main(["--root", str(tmp_path / "missing")])
  assert "is not a directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# End to end: the real trainer
# ----------------------------------------------------------------------------------------------


def test_real_two_run_sweep_end_to_end(tmp_path, monkeypatch, capsys):
  """LN vs BN + FFN-BN (momentum 0.99) on the in-memory `numpy:digits` with a tiny ViT, 3 steps
  each, then the report (the input pipeline is not under test: no dataset to prepare, no TensorFlow)."""
  tiny = (("data.name", "numpy:digits"), ("data.image_size", 8),
          ("model.image_size", 8), ("model.patch_size", 4), ("model.hidden_size", 16),
          ("model.num_layers", 2), ("model.mlp_dim", 32), ("model.num_heads", 2), ("batch_size", 32))
  tiny = tuple((k, str(v)) for k, v in tiny)
  sweep = sweeps_lib.Sweep("e2e_cpu", "cpu", "Does the real trainer run under the sweep runner?", runs=(
      sweeps_lib.Run("ln", "configs/quickstart.py:norm=ln,ffn_norm=none", tiny, note="LN"),
      sweeps_lib.Run("bn_ffnbn", "configs/quickstart.py:norm=bn,ffn_norm=bn",
                     tiny + (("model.bn_momentum", "0.99"),), note="BN + FFN-BN")))
  monkeypatch.setitem(sweeps_lib.SWEEPS, sweep.name, sweep)
  # The trainings are separate processes: 2 CPU devices start and compile faster than 8.
  monkeypatch.setenv("XLA_FLAGS", xla_test_flags.xla_flags(2))
  root = tmp_path / "runs"
  assert run_sweep.main(["--sweep", "e2e_cpu", "--root", str(root), "--num_steps", "3"]) == 0
  doc = json.loads((root / "e2e_cpu" / "results.json").read_text())
  runs = {r["name"]: r for r in doc["runs"]}
  for name, norm, ffn_norm, momentum in (("ln", "ln", "none", 0.9), ("bn_ffnbn", "bn", "bn", 0.99)):
    r = runs[name]
    assert (r["status"], r["step"]) == ("completed", 3), r
    assert (r["model"]["norm"], r["model"]["ffn_norm"], r["model"]["bn_momentum"]) == (norm, ffn_norm, momentum)
    assert 0.0 <= r["final"]["eval/top1"] <= 1.0 and math.isfinite(r["final"]["eval/loss"])
    series = run_files.read_metrics(str(root / "e2e_cpu" / name))
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3]  # log_every=1 for a 3-step CPU run
    assert set(run_files.block_diagnostics(series)) >= {"residual_rms", "ffn_hidden_rms", "max_attention_logit"}
    assert sorted(run_files.block_diagnostics(series)["residual_rms"]) == [0, 1]
  capsys.readouterr()
  # Re-running with --resume finds both finished and trains nothing.
  assert run_sweep.main(["--sweep", "e2e_cpu", "--root", str(root), "--num_steps", "3", "--resume"]) == 0
  out = capsys.readouterr().out
  assert "[1/2] ln: already completed at step 3" in out and "[2/2] bn_ffnbn: already completed" in out
  text = report.make_report(str(root))
  assert "| ln | ln | none | - | 0.9 |" in text and "| bn_ffnbn | bn | bn | pre_act | 0.99 |" in text
  assert (root / "e2e_cpu" / "diagnostics.png").stat().st_size > 10_000
