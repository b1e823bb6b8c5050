"""The benchmark: every variant timed interleaved, ratios, FLOPs, matmul-peak fractions, CLI errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vitnorm.inference import comparison
from vitnorm.errors import ConfigError

TINY = dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=4, patch_size=8)
TINY_FLAGS = ["--variant=Ti/16", "--hidden_size=32", "--num_layers=2", "--mlp_dim=64", "--num_heads=4",
              "--patch_size=8", "--image_size=16", "--num_classes=10"]


@pytest.fixture(scope="module")
def report():
  cfg = comparison.model_config("Ti/16", 16, num_classes=10, **TINY)
  return comparison.run_benchmark(cfg, batch_sizes=(8, 16), warmup=1, iterations=2, repeats=3,
                                 matmul_size=64, log=lambda _: None)


def _rows(report, batch):
  return {r["model"]: r for r in report["results"] if r["batch_size"] == batch}


def test_every_default_model_is_measured_at_every_batch_size(report):
  assert [(r["model"], r["batch_size"]) for r in report["results"]] == [
      (m, b) for b in (8, 16) for m in comparison.DEFAULT_MODELS]
  for r in report["results"]:
    assert r["status"] == "ok" and r["num_devices"] == 8 and r["repeats"] == 3 and r["iterations"] == 2
    assert r["images_per_second"]["min"] <= r["images_per_second"]["median"] <= r["images_per_second"]["max"]
  assert report["setup"]["interleaved"] and report["matmul_peak"]["size"] == 64


def test_ratios_to_ln_and_to_no_norm(report):
  for batch in (8, 16):
    rows = _rows(report, batch)
    assert rows["ln"]["ratio_to_ln"] == 1.0 and rows["none"]["ratio_to_no_norm"] == 1.0
    per_round = {m: np.array(r["images_per_second"]["per_repeat"]) for m, r in rows.items()}
    for m, r in rows.items():  # paired: the median over rounds of the ratio within each round
      assert r["ratio_to_ln"] == pytest.approx(np.median(per_round[m] / per_round["ln"]))
      assert r["ratio_to_no_norm"] == pytest.approx(np.median(per_round[m] / per_round["none"]))


def test_folded_models_cost_exactly_the_no_norm_flops(report):
  rows = _rows(report, 8)
  flops = {m: r["flops_per_image"] for m, r in rows.items()}
  assert flops["bn_folded"] == flops["none"] == flops["bn_ffnbn_folded"] == flops["prepbn_folded"]
  assert flops["bn_unfolded"] > flops["none"] and flops["ln"] > flops["none"] and flops["rms"] > flops["none"]
  assert flops["dyt"] > flops["none"]
  # The patch embedding alone: 4 patches x (8*8*3 inputs x 32 outputs) multiply-adds.
  assert flops["none"] > 2 * 4 * 8 * 8 * 3 * 32


def test_achieved_flops_as_fraction_of_the_matmul_peak_of_the_same_rounds(report):
  peaks = report["matmul_peak"]["per_batch_size"]
  assert set(peaks) == {"8", "16"} and all(p > 0 for p in peaks.values())
  for r in report["results"]:
    peak = peaks[str(r["batch_size"])]
    assert r["matmul_peak_flops_per_second"] == peak
    achieved = r["flops_per_image"] * r["images_per_second"]["median"]
    assert r["achieved_flops_per_second"] == pytest.approx(achieved)
    assert r["fraction_of_matmul_peak"] == pytest.approx(achieved / peak)


def test_report_table_lists_every_row(report):
  text = comparison.format_report(report)
  lines = text.splitlines()
  assert "dense matmul peak" in lines[0] and "8 cpu device(s)" in lines[0]
  table = [line for line in lines if line.startswith("|")]
  assert lines[2].startswith("| model") and len(table) == 2 + 2 * len(comparison.DEFAULT_MODELS)
  assert sum(line.startswith("| bn_folded ") for line in lines) == 2
  assert sum("run the same program" in line for line in lines) == 6  # 3 folded models x 2 batches


def test_folded_candidate_computes_what_the_unfolded_one_does():
  cfg = comparison.model_config("Ti/16", 16, num_classes=10, **TINY)
  cands = {c.name: c for c in comparison.build_candidates(cfg, ["bn_ffnbn_unfolded", "bn_ffnbn_folded"])}
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
  a = cands["bn_ffnbn_unfolded"].forward(cands["bn_ffnbn_unfolded"].variables, x)
  b = cands["bn_ffnbn_folded"].forward(cands["bn_ffnbn_folded"].variables, x)
  assert float(np.max(np.abs(a))) > 0.1
  np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(a))))
  assert "batch_stats" not in cands["bn_ffnbn_folded"].variables


def test_bad_inputs_are_config_errors():
  with pytest.raises(ConfigError, match=r"^--models: unknown model 'bn'"):
    comparison.build_candidates(comparison.model_config("Ti/16", 16, **TINY), ["ln", "bn"])
  with pytest.raises(ConfigError, match=r"^--variant: 'X/16' is not a preset"):
    comparison.model_config("X/16", 224)
  with pytest.raises(ConfigError, match=r"^--patch_size: patch size 16 does not divide image size 20"):
    comparison.model_config("S/16", 20)
  with pytest.raises(ConfigError, match=r"^--batch_sizes: 'x' is not an integer"):
    comparison.parse_int_list(["8", "x"], "--batch_sizes")


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "vitnorm.benchmark", *args], capture_output=True,
                        text=True, timeout=300, env=dict(os.environ), check=False)


def test_cli_writes_json_and_prints_the_table(tmp_path):
  out = tmp_path / "bench.json"
  proc = _cli(*TINY_FLAGS, "--batch_sizes=8", "--models=ln,bn_folded,none", "--iterations=1",
              "--repeats=1", "--warmup=0", "--matmul_size=32", "--dtype=bfloat16", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  report = json.loads(out.read_text())
  assert [r["model"] for r in report["results"]] == ["ln", "bn_folded", "none"]
  assert {r["dtype"] for r in report["results"]} == {"bfloat16"} and report["matmul_peak"]["dtype"] == "bfloat16"
  assert "| bn_folded " in proc.stdout and "vs no-norm" in proc.stdout


def test_cli_bad_batch_size_is_one_line_error_before_any_work(run_cli):
  code, _, stderr = run_cli("benchmark", *TINY_FLAGS, "--batch_sizes=8,12")  # in-process (conftest)
  assert code == 2
  assert stderr.strip().splitlines()[-1] == (
      "error: --batch_sizes: 12 is not divisible by the 8 devices; use a multiple of 8")
  assert "Traceback" not in stderr and "matmul peak" not in stderr


def test_paired_ratio_cancels_drift_between_rounds():
  from vitnorm.inference import throughput  # pylint: disable=g-import-not-at-top
  # The machine slows down 2x between rounds; B is always 10% faster than A within a round.
  a = throughput.Result("a", 8, 1, "float32", iterations=1, seconds_per_repeat=[1.0, 2.0, 4.0])
  b = throughput.Result("b", 8, 1, "float32", iterations=1, seconds_per_repeat=[1 / 1.1, 2 / 1.1, 4 / 1.1])
  assert comparison.paired_ratio(b, a) == pytest.approx(1.1)
  assert np.isnan(comparison.paired_ratio(b, None))


def test_prepbn_and_dyt_candidates_compute_their_models():
  cfg = comparison.model_config("Ti/16", 16, num_classes=10, **TINY)
  names = ["prepbn_unfolded", "prepbn_folded", "dyt", "ln_qknorm"]
  cands = {c.name: c for c in comparison.build_candidates(cfg, names)}
  x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype(np.float32)
  a = cands["prepbn_unfolded"].forward(cands["prepbn_unfolded"].variables, x)
  b = cands["prepbn_folded"].forward(cands["prepbn_folded"].variables, x)
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4 * float(np.max(np.abs(a))))
  assert "batch_stats" not in cands["prepbn_folded"].variables
  assert "DyT_0" in cands["dyt"].variables["params"]["Transformer"]["encoderblock_0"]
  attn = cands["ln_qknorm"].variables["params"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert {"query_norm", "key_norm"} <= set(attn)
