"""experiments.accelerator_check in its reduced mode (tiny sizes, CPU): it runs as parts without
TensorFlow, tfds, clu, mlxtend or scikit-learn (as on a stock CUDA image), keeps every finished
part when it is killed, completes the rest on a re-run, and reports a broken check as a failure."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import accelerator_check, accelerator_parts, accelerator_runner
from vitnorm.data import export_npz
from vitnorm.inference import comparison

# Not installed on the GPU image; scikit-learn is, but the check must not need it with --data_npz.
HIDDEN = ("tensorflow", "tensorflow_datasets", "clu", "mlxtend", "sklearn", "tensorboardX")

NO_TF = """
import sys
for name in ("tensorflow", "tensorflow_datasets", "clu", "mlxtend", "tensorboardX"):
  sys.modules[name] = None  # as on a stock CUDA image: not installed
import experiments.accelerator_check, vitnorm.training.loop, vitnorm.training.placement
import vitnorm.training.step, vitnorm.inference.comparison, vitnorm.inference.run_report
import vitnorm.model.fold, vitnorm.workdir, vitnorm.data
import vitnorm.data as data
cfg = dict(name="numpy:digits", image_size=8, inception_crop=False, hflip=False, normalize_mean=(0.5,),
           normalize_std=(0.5,))
batch = next(data.train_batches(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1))
assert batch["image"].shape == (4, 8, 8, 1), batch["image"].shape
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu")
                and sys.modules[m] is not None)
assert not loaded, loaded
print("ok")
"""

# Runs the check's CLI with packages hidden: python -c RUN_HIDDEN 'pkg,pkg' ARGS...
RUN_HIDDEN = """
import runpy, sys
for name in sys.argv[1].split(","):
  sys.modules[name] = None  # not installed
sys.argv = ["experiments.accelerator_check"] + sys.argv[2:]
runpy.run_module("experiments.accelerator_check", run_name="__main__")
"""

CHECK_PARTS = ["env", "fold", "sync", "resume", "quickstart"]
TIMING_PARTS = ["peaks", "inference_s16", "inference_b16", "train"]


def _env():
  return dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))


def _check(hidden, *args, timeout=600):
  return subprocess.run([sys.executable, "-c", RUN_HIDDEN, ",".join(hidden), *args], env=_env(),
                        capture_output=True, text=True, timeout=timeout)


def test_trainer_benchmark_and_check_import_without_tensorflow():
  proc = subprocess.run([sys.executable, "-c", NO_TF], env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("data") / "digits.npz")
  export_npz.main(["--name", "digits", "--out", path])
  return path


@pytest.fixture(scope="module")
def killed_then_completed(tmp_path_factory, digits_npz):
  """The plan's first command killed when its third part starts, then the whole check re-run."""
  out = tmp_path_factory.mktemp("accelerator")
  killed = _check(HIDDEN, "--out", str(out), "--data_npz", digits_npz, "--parts", ",".join(CHECK_PARTS),
                  "--debug_kill_at_part", "sync")
  after_kill = json.loads((out / "cpu.json").read_text())
  md_after_kill = (out / "cpu.md").read_text()
  rerun = _check(HIDDEN, "--out", str(out), "--data_npz", digits_npz)
  return killed, after_kill, md_after_kill, rerun, out


def test_a_killed_check_keeps_exactly_the_parts_it_finished(killed_then_completed):
  killed, doc, md, _, _ = killed_then_completed
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert list(doc["parts"]) == ["env", "fold"]
  assert doc["ok"] is True and doc["complete"] is False
  assert doc["missing_parts"] == ["sync", "resume", "quickstart"] + TIMING_PARTS
  # Only check parts were selected: they ran with deterministic XLA:GPU reductions.
  assert all(accelerator_check.DETERMINISTIC_FLAG in p["xla_flags"] for p in doc["parts"].values())
  assert "| fold | OK |" in md and "| sync | not run |" in md


def test_a_rerun_completes_the_rest_and_reports_every_part(killed_then_completed):
  _, before, _, rerun, out = killed_then_completed
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "part env: already in the results" in rerun.stdout and "part fold: already in the results" in rerun.stdout
  assert sorted(os.listdir(out)) == ["cpu.json", "cpu.md"]
  doc = json.loads((out / "cpu.json").read_text())
  assert list(doc["parts"]) == CHECK_PARTS + TIMING_PARTS
  assert doc["ok"] is True and doc["complete"] is True and doc["missing_parts"] == [] and doc["reduced"] is True
  for name in ("env", "fold"):  # skipped, not redone
    assert doc["parts"][name] == before["parts"][name]
  for name in ["sync", "resume", "quickstart"] + TIMING_PARTS:  # a run with timing parts: no flag
    assert accelerator_check.DETERMINISTIC_FLAG not in doc["parts"][name]["xla_flags"]
  for name, part in doc["parts"].items():
    assert "error" not in part and part["wall_seconds"] > 0, name
  result = lambda name: doc["parts"][name]["result"]  # noqa: E731
  assert result("env")["jax"] == jax.__version__ and result("env")["device_kind"]
  assert set(result("peaks")) == {"bfloat16", "float32", "float32_highest"}
  assert [p["matmul_precision"] for p in result("peaks").values()] == ["default", "default", "highest"]
  assert all(p["flops_per_second"] > 0 for p in result("peaks").values())
  fold = result("fold")["models"]
  assert set(fold) == set(comparison.FOLDED_MODELS)
  assert all(f["ok"] and f["max_relative_difference"] < 1e-5 for f in fold.values())
  assert result("sync")["devices"] == 8 and result("sync")["proves_synchronisation"] is True
  assert result("sync")["max_bn_stats_difference"] < 1e-4
  assert result("resume") == dict(result("resume"), preempted_at=6, final_step=12, bit_identical=True,
                                  same_structure=True, max_abs_difference=0.0, preempted_status="preempted",
                                  required="bit-identical")
  for name in ("inference_s16", "inference_b16"):
    reports = result(name)["reports"]
    assert [r["setup"]["model"]["dtype"] for r in reports] == ["bfloat16", "float32"]
    for report in reports:
      assert report["matmul_precision"] == "default"
      assert [row["model"] for row in report["results"]] == list(accelerator_parts.REDUCED.inference_models)
      for row in report["results"]:
        assert row["status"] == "ok" and row["images_per_second"]["median"] > 0
        # Cost analysis counts the matmuls and more (norms, softmax, GELU: a lot at width 16;
        # tests/inference/test_flops.py compares the two at a realistic width).
        assert 0.95 < row["cost_analysis_to_analytic"] < 3
        assert 0 < row["fraction_of_matmul_peak_analytic"]
  assert [t["model"] for t in result("train")["rows"]] == list(accelerator_parts.REDUCED.train_models)
  for t in result("train")["rows"]:
    assert t["images_per_second"] > 0 and t["mfu"] > 0 and t["mfu_analytic"] > 0
    assert t["bf16_peak_flops_per_second"] == result("peaks")["bfloat16"]["flops_per_second"]
  q = result("quickstart")
  assert q["status"] == "completed" and q["steps"] == 12 and 0 <= q["eval_top1"] <= 1
  assert q["data"] == "digits.npz (.npz)"
  md = (out / "cpu.md").read_text()
  for text in ("REDUCED mode", "Overall: OK", "Dense matmul peak", "float32 at matmul precision 'highest'",
               "fold bn_folded", "BN sync jit == pmap (8 device(s)", "resume (bfloat16): preempted at step 6",
               "| bn_ffnbn_folded", "GFLOP/img analytic", "MFU (analytic)", "Training step",
               "Quickstart in bf16"):
    assert text in md, text
  assert "proves nothing about synchronisation" not in md  # 8 devices: it does check the sync


def test_a_broken_check_is_reported_as_a_failure(tmp_path, monkeypatch):
  """One BN scale folded 1% off: the fold part fails, the document is not ok, the exit code is 1;
  once fixed, only --force runs the part again."""
  from vitnorm.model import fold  # pylint: disable=import-outside-toplevel
  original = fold.batchnorm_affine

  def off_by_one_percent(*args):
    s, t = original(*args)
    return s * 1.01, t

  monkeypatch.setattr(fold, "batchnorm_affine", off_by_one_percent)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main adds the deterministic flag
  with pytest.raises(SystemExit) as exit_info:
    accelerator_check.main(["--out", str(tmp_path), "--parts", "fold", "--reduced"])
  assert exit_info.value.code == 1
  doc = json.loads((tmp_path / "cpu.json").read_text())
  assert doc["ok"] is False and doc["parts"]["fold"]["ok"] is False
  assert all(not f["ok"] and f["max_relative_difference"] > 1e-5 for f in doc["parts"]["fold"]["result"]["models"].values())
  assert "| fold | FAIL |" in (tmp_path / "cpu.md").read_text()
  monkeypatch.setattr(fold, "batchnorm_affine", original)  # fixed: a re-run keeps the result ...
  for args, code in (([], 1), (["--force"], 0)):  # ... until --force redoes the part
    with pytest.raises(SystemExit) as exit_info:
      accelerator_check.main(["--out", str(tmp_path), "--parts", "fold", "--reduced", *args])
    assert exit_info.value.code == code
  assert json.loads((tmp_path / "cpu.json").read_text())["ok"] is True


def test_a_part_that_raises_keeps_the_others_and_is_redone_on_the_next_run(tmp_path, monkeypatch):
  def broken(_):
    raise RuntimeError("out of memory")

  monkeypatch.setattr(accelerator_parts, "matmul_peaks", broken)
  doc = accelerator_check.run(str(tmp_path), reduced=True, parts="env,peaks")
  assert doc["ok"] is False and doc["parts"]["env"]["ok"] is None
  assert doc["parts"]["peaks"]["error"] == "RuntimeError: out of memory"
  assert "peaks" in doc["missing_parts"]
  monkeypatch.undo()
  doc = accelerator_check.run(str(tmp_path), reduced=True, parts="env,peaks")
  assert doc["ok"] is True and "error" not in doc["parts"]["peaks"]


def test_tree_difference_sees_a_missing_leaf_that_zip_would_not():
  a = {"params": {"w": np.ones(3), "b": np.zeros(2)}, "batch_stats": {"mean": np.ones(2)}}
  shorter = {"params": {"b": np.zeros(2)}, "batch_stats": {"mean": np.ones(2)}}  # "w", the last leaf, is gone
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(shorter)))  # the old bug
  assert accelerator_parts.tree_difference(a, shorter)["same_structure"] is False
  assert accelerator_parts.tree_difference(a, shorter)["bit_identical"] is False
  reshaped = jax.tree.map(lambda x: x.reshape(1, -1), a)
  assert accelerator_parts.tree_difference(a, reshaped)["same_structure"] is False
  changed = jax.tree.map(np.copy, a)
  changed["params"]["w"][1] = 1.5
  d = accelerator_parts.tree_difference(a, changed)
  assert d == dict(same_structure=True, bit_identical=False, max_abs_difference=0.5, max_relative_difference=0.5)
  assert accelerator_parts.tree_difference(a, jax.tree.map(np.copy, a))["bit_identical"] is True


@pytest.mark.parametrize("hidden,args,missing", [
    (("ml_collections",), [], "ml-collections"),
    (("sklearn",), ["--parts", "resume"], "scikit-learn (or pass --data_npz)"),
])
def test_missing_packages_are_named_in_one_line_before_any_part(tmp_path, hidden, args, missing):
  proc = _check(hidden, "--out", str(tmp_path / "o"), *args, timeout=120)
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
  assert err[0].startswith(f"error: missing: {missing}") and "no part was run" in err[0]
  assert not (tmp_path / "o").exists()


def test_the_plan_is_two_commands_within_the_budget_check_parts_first():
  commands = accelerator_runner.plan_commands(accelerator_check.parts_for(accelerator_check.FULL),
                                              accelerator_check.COMMAND_BUDGET_SECONDS)
  assert [names for names, _ in commands] == [CHECK_PARTS, TIMING_PARTS]
  assert all(seconds <= accelerator_check.COMMAND_BUDGET_SECONDS for _, seconds in commands)
  text = accelerator_check.plan_text()
  assert text.count("timeout 480 python -m experiments.accelerator_check") == 2
  assert f"--parts {','.join(CHECK_PARTS)}" in text and f"--parts {','.join(TIMING_PARTS)}" in text


def test_bad_input_is_one_error_line(tmp_path, capsys):
  for args, start in ((["--data_npz", str(tmp_path / "missing.npz")], "error: --data_npz: no such file"),
                      (["--parts", "env,nope"], "error: --parts: unknown part 'nope'")):
    with pytest.raises(SystemExit) as exit_info:
      accelerator_check.main(["--out", str(tmp_path / "o"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start), err
  assert not (tmp_path / "o").exists()


def test_an_xla_without_the_determinism_flag_runs_without_it(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(accelerator_check, "xla_accepts", lambda flags: False)
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  with pytest.raises(SystemExit) as exit_info:
    accelerator_check.main(["--out", str(tmp_path), "--parts", "env", "--reduced"])
  assert exit_info.value.code == 0
  assert accelerator_check.DETERMINISTIC_FLAG not in os.environ["XLA_FLAGS"]
  assert "does not accept --xla_gpu_deterministic_ops=true; running without it" in capsys.readouterr().out
  assert accelerator_check.xla_accepts("--xla_no_such_flag_for_the_test=true") is False


def test_a_flax_too_old_for_the_installed_jax_is_named(monkeypatch):
  import flax  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(flax, "__version__", "0.12.6")
  missing = accelerator_check.missing_requirements(["env"], None)
  assert missing == [f"flax >= 0.12.7 (found 0.12.6; with jax {jax.__version__} flax.jax_utils.replicate "
                     "needs it)"]
  monkeypatch.setattr(flax, "__version__", "0.12.7")
  assert accelerator_check.missing_requirements(["env"], None) == []


def test_results_of_another_mode_are_not_mixed(tmp_path):
  from vitnorm.errors import UserError  # pylint: disable=import-outside-toplevel
  accelerator_check.run(str(tmp_path), reduced=True, parts="env")
  with pytest.raises(UserError, match="holds a reduced check and this run is full"):
    accelerator_check.run(str(tmp_path), reduced=False, parts="env")
  (tmp_path / "cpu.json").write_text(json.dumps(dict(reduced=True, ok=True)))  # the old one-shot format
  with pytest.raises(UserError, match="written by an older version"):
    accelerator_check.run(str(tmp_path), reduced=True, parts="env")
