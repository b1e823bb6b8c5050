"""vitnorm.data.input_speed (`python -m vitnorm.benchmark --mode input`), in its tiny mode; the
command line runs in this process (conftest's run_cli)."""
import json

import numpy as np
import pytest

from vitnorm.data import input_speed, pipeline
from vitnorm.errors import ConfigError


def test_each_variant_switches_off_exactly_its_stage(tmp_path):
  full = input_speed.deit_data_config("imagenet_like/tiny", str(tmp_path), 224)
  assert (full.randaugment_layers, full.random_erasing_prob, full.mixup_alpha, full.cutmix_alpha,
          full.label_smoothing, full.hflip, full.inception_crop) == (2, 0.25, 0.8, 1.0, 0.1, True, True)
  for name, overrides in input_speed.VARIANTS.items():
    cfg = input_speed.deit_data_config("imagenet_like/tiny", str(tmp_path), 224, **overrides)
    changed = {k for k in full if cfg[k] != full[k]}
    assert changed == {k for k, v in overrides.items() if full[k] != v}, name


def test_no_mix_variant_yields_one_hot_targets_and_the_full_recipe_mixed_ones(tmp_path):
  from vitnorm.data import imagenet_like  # pylint: disable=import-outside-toplevel
  imagenet_like.prepare("tiny", str(tmp_path))
  targets = {}
  for name in ("deit", "no_mix"):
    cfg = input_speed.deit_data_config("imagenet_like/tiny", str(tmp_path), 32,
                                       **input_speed.VARIANTS[name])
    batch = next(pipeline.train_batches(cfg, global_batch_size=4, seed=0, num_classes=1000,
                                        process_index=0, process_count=1))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["label"].shape == (4, 1000)
    targets[name] = batch["label"]
  assert set(np.unique(targets["no_mix"])) == {0.0, 1.0}
  assert targets["deit"].max() < 1.0  # smoothed (and mixed)


def test_tiny_benchmark_reports_every_group_and_variant_with_the_aa_line(tmp_path, run_cli):
  out = tmp_path / "input.json"
  code, stdout, stderr = run_cli(
      "benchmark", "--mode=input", "--input_dataset=tiny", f"--input_data_dir={tmp_path / 'data'}",
      "--image_size=32", "--batch_sizes=4", "--input_threads=1,2",
      "--models=deit,deit_aa,no_mix,grain,grain_no_randaugment", "--iterations=2", "--repeats=1",
      "--warmup=1", f"--output={out}")
  assert code == 0, stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["mode"] == "input" and report["dataset_info"]["examples"] == 48
  assert [g["threads"] for g in report["groups"]] == [1, 2]
  for group in report["groups"]:
    results = {r["variant"]: r for r in group["results"]}
    assert list(results) == ["deit", "deit_aa", "no_mix", "grain", "grain_no_randaugment"]
    for r in results.values():
      assert r["images_per_s"] > 0
      assert r["images_per_s_per_core"] == pytest.approx(r["images_per_s"] / group["threads"])
      assert r["core_ms_per_image"] == pytest.approx(1000 * group["threads"] / r["images_per_s"])
  assert input_speed.per_core_rate(report) == report["groups"][0]["results"][0]["images_per_s"]
  assert "A/A (threads 1): deit_aa and deit are the same pipeline" in stdout
  assert "| no_mix |" in stdout and "Grain feed (threads 2): " in stdout
  assert (tmp_path / "data" / "array_record" / "imagenet_like" / "tiny").is_dir()


@pytest.mark.parametrize("flag,field", [("--input_threads=0", "--input_threads"),
                                        ("--models=deit,nope", "--models"),
                                        ("--input_dataset=huge", "--input_dataset"),
                                        ("--batch_sizes=4,8", "--batch_sizes")])
def test_bad_input_flags_are_one_line_errors(flag, field, tmp_path, run_cli):
  code, _, stderr = run_cli("benchmark", "--mode=input", f"--input_data_dir={tmp_path}", flag)
  assert code == 2
  assert stderr.strip().startswith(f"error: {field}:") and "\n" not in stderr.strip()
  assert not any(tmp_path.iterdir())  # refused before any dataset was prepared


def test_parse_threads():
  assert input_speed.parse_threads(["1", "all", "1"])[0] == 1
  with pytest.raises(ConfigError):
    input_speed.parse_threads(["-1"])
