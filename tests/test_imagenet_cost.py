"""experiments.imagenet_cost: runs x steps x batch x FLOPs per image -> accelerator-hours."""
import json

import pytest

from experiments import imagenet_cost
from experiments import sweeps as sweeps_lib


def test_hours_are_images_times_flops_over_the_sustained_rate(tmp_path, capsys):
  out = tmp_path / "cost"
  assert imagenet_cost.main(["--flops_per_image=4e9", "--mfu=0.5", "--peak_tflops=800",
                             f"--out={out}"]) == 0
  doc = json.loads(out.with_suffix(".json").read_text())
  rows = {r["sweep"]: r for r in doc["sweeps"]}
  norm = rows["norm_variants_imagenet"]
  assert norm["runs"] == 3 * len(sweeps_lib.VARIANTS) and norm["seeds"] == [0, 1, 2]
  assert norm["epochs_per_run"] == pytest.approx(300, abs=0.01)
  assert norm["train_images"] == norm["runs"] * norm["steps_per_run"] * 1024
  assert norm["accelerator_hours"] == pytest.approx(norm["train_images"] * 4e9 / 400e12 / 3600)
  assert rows["stability_imagenet"]["epochs_per_run"] == pytest.approx(30, abs=0.01)
  assert doc["total_accelerator_hours"] == pytest.approx(sum(r["accelerator_hours"] for r in rows.values()))
  text = capsys.readouterr().out
  assert text == out.with_suffix(".md").read_text() + "\n"
  assert "python -m experiments.run_sweep --sweep norm_variants_imagenet --root gs://BUCKET/vitnorm_study --seeds 0,1,2" in text
  # An input pipeline slower than the compute rate sets the hours.
  slow = imagenet_cost.estimate(4e9, peak_tflops=800, mfu=0.5, images_per_s=1000)
  assert slow["sweeps"][0]["accelerator_hours"] == pytest.approx(norm["train_images"] / 1000 / 3600)


@pytest.mark.parametrize("flag", ["--mfu=0", "--mfu=1.5", "--peak_tflops=-1", "--images_per_s=0"])
def test_bad_assumptions_are_one_line_errors(flag, tmp_path, capsys):
  with pytest.raises(SystemExit) as exc:
    imagenet_cost.main(["--flops_per_image=4e9", flag, f"--out={tmp_path / 'x'}"])
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {flag.split('=')[0]}:") and "\n" not in err


def _input_report(path, per_core_1, rate_4):
  doc = {"mode": "input", "image_size": 224, "cpu_count": 4, "groups": [
      {"threads": 4, "results": [{"variant": "deit", "images_per_s": rate_4, "images_per_s_per_core": rate_4 / 4}]},
      {"threads": 1, "results": [{"variant": "deit_aa", "images_per_s": 1.0, "images_per_s_per_core": 1.0},
                                 {"variant": "deit", "images_per_s": per_core_1,
                                  "images_per_s_per_core": per_core_1}]}]}
  path.write_text(json.dumps(doc))
  return path


def test_hours_are_the_max_of_compute_and_input_bound_with_the_bound_named(tmp_path, capsys):
  bench = _input_report(tmp_path / "input.json", per_core_1=150.0, rate_4=520.0)
  out = tmp_path / "cost"
  assert imagenet_cost.main(["--flops_per_image=4e9", "--mfu=0.5", "--peak_tflops=800",
                             f"--input_benchmark={bench}", "--host_cores=16", f"--out={out}"]) == 0
  doc = json.loads(out.with_suffix(".json").read_text())
  assert doc["input_images_per_s"] == pytest.approx(16 * 150.0)  # the threads=1 group, 'deit'
  assert doc["bound"] == "input"
  for r in doc["sweeps"]:
    assert r["compute_bound_hours"] == pytest.approx(r["train_images"] * 4e9 / 400e12 / 3600)
    assert r["input_bound_hours"] == pytest.approx(r["train_images"] / 2400 / 3600)
    assert r["accelerator_hours"] == pytest.approx(r["input_bound_hours"]) and r["bound"] == "input"
  text = capsys.readouterr().out
  assert "16 host cores x 150.0 images/s per core" in text and "input-bound" in text
  # --input_variant picks another feed's per-core rate (here the A/A copy's, 1 image/s per core).
  assert imagenet_cost.main(["--flops_per_image=4e9", f"--input_benchmark={bench}", "--host_cores=16",
                             "--input_variant=deit_aa", f"--out={out}"]) == 0
  assert json.loads(out.with_suffix(".json").read_text())["input_images_per_s"] == pytest.approx(16.0)
  # A host fast enough for the accelerator: compute-bound, hours unchanged by the input rate.
  fast = imagenet_cost.estimate(4e9, peak_tflops=800, mfu=0.5, images_per_s=1e9)
  assert fast["bound"] == "compute"
  assert fast["sweeps"][0]["accelerator_hours"] == pytest.approx(fast["sweeps"][0]["compute_bound_hours"])


@pytest.mark.parametrize("flags,field", [(["--host_cores=8"], "--host_cores"),
                                         (["--input_benchmark=X"], "--host_cores"),
                                         (["--input_benchmark=X", "--host_cores=8", "--images_per_s=5"], "--images_per_s"),
                                         (["--input_benchmark=/nonexistent.json", "--host_cores=8"], "--input_benchmark")])
def test_bad_input_rate_arguments_are_one_line_errors(flags, field, tmp_path, capsys):
  _check_one_line_error(flags, field, tmp_path, capsys)


def test_a_variant_missing_from_the_benchmark_is_a_one_line_error(tmp_path, capsys):
  bench = _input_report(tmp_path / "input.json", per_core_1=150.0, rate_4=520.0)
  _check_one_line_error([f"--input_benchmark={bench}", "--host_cores=8", "--input_variant=grain"],
                        "--input_variant", tmp_path, capsys)


def _check_one_line_error(flags, field, tmp_path, capsys):
  with pytest.raises(SystemExit) as exc:
    imagenet_cost.main(["--flops_per_image=4e9", *flags, f"--out={tmp_path / 'x'}"])
  assert exc.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith(f"error: {field}:") and "\n" not in err
