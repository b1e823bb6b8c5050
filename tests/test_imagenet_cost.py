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
