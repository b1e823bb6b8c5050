"""experiments.accelerator_check in its reduced mode (tiny sizes, CPU): every part runs, the JSON
and markdown hold what the GPU run must report, and its modules import without TensorFlow."""
import json
import os
import subprocess
import sys

import pytest

from experiments import accelerator_check
from vitnorm.inference import comparison

NO_TF = """
import sys
for name in ("tensorflow", "tensorflow_datasets", "clu", "mlxtend"):
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


def test_trainer_benchmark_and_check_import_without_tensorflow():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, "-c", NO_TF], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("accelerator")
  return accelerator_check.run(str(out), reduced=True), out


def test_reduced_check_writes_every_part(result):
  res, out = result
  assert sorted(os.listdir(out)) == ["cpu.json", "cpu.md"]
  doc = json.loads((out / "cpu.json").read_text())
  assert doc["reduced"] is True and doc["ok"] is True
  assert doc["environment"]["jax"] and doc["environment"]["device_kind"]
  assert set(doc["matmul_peak"]) == {"bfloat16", "float32"}
  assert all(p["flops_per_second"] > 0 for p in doc["matmul_peak"].values())
  c = doc["correctness"]
  assert set(c["fold"]) == {m for m, (_, folded) in comparison.MODELS.items() if folded}
  assert all(f["max_relative_difference"] < 1e-4 for f in c["fold"].values())
  assert c["bn_sync"]["ok"] and c["bn_sync"]["devices"] == 8
  assert c["resume"] == dict(c["resume"], preempted_at=6, final_step=12, bit_identical=True,
                             preempted_status="preempted", ok=True)
  # Every model the comparison offers (new norms join automatically), both dtypes.
  assert [(r["setup"]["model"]["dtype"]) for r in doc["inference"]] == ["bfloat16", "float32"]
  for report in doc["inference"]:
    models = [row["model"] for row in report["results"]]
    assert set(comparison.DEFAULT_MODELS) <= set(models)
    assert {m for m in comparison.MODELS if not m.endswith("_unfolded")} <= set(models)
    for row in report["results"]:
      assert row["status"] == "ok" and row["images_per_second"]["median"] > 0
      assert row["fraction_of_matmul_peak"] > 0
    ln = next(r for r in report["results"] if r["model"] == "ln")
    assert ln["ratio_to_ln"] == 1.0
  assert [t["model"] for t in doc["training"]] == ["ln", "bn_ffnbn"]
  assert all(t["images_per_second"] > 0 and 0 < t["mfu"] for t in doc["training"])
  q = doc["quickstart"]
  assert q["status"] == "completed" and q["steps"] == 10 and 0 <= q["eval_top1"] <= 1
  md = (out / "cpu.md").read_text()
  for text in ("REDUCED mode", "Dense matmul peak", "fold bn_folded", "BN sync jit == pmap",
               "resume: preempted at step 6", "| bn_ffnbn_folded", "Training step", "Quickstart in bf16"):
    assert text in md, text


def test_bad_input_is_one_error_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    accelerator_check.main(["--out", str(tmp_path / "o"), "--mnist_npz", str(tmp_path / "missing.npz")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --mnist_npz: no such file")
  assert not (tmp_path / "o").exists()
