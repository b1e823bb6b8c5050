"""experiments.study: seeds aggregated with intervals, the stability criterion and maps, the
mechanism summary; seeds as a sweep dimension in the runner; the report's study sections."""
import dataclasses
import json
import math
import os

import pytest

from experiments import plots, report, run_sweep, study
from experiments import sweeps as sweeps_lib
from tests.test_experiments import _png_size, fake_modules  # noqa: F401  (fixture)
from vitnorm.errors import UserError
from vitnorm.inference import comparison


def test_mean_interval_is_students_t_over_the_seeds():
  s = study.mean_interval([0.90, 0.92, 0.94])
  assert s["n"] == 3 and s["mean"] == pytest.approx(0.92) and s["std"] == pytest.approx(0.02)
  half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t(0.975, df=2) from tables
  assert s["ci95"] == pytest.approx((0.92 - half, 0.92 + half))
  assert study.mean_interval([0.5]) == dict(n=1, mean=0.5, std=None, ci95=None)
  assert study.mean_interval([float("nan"), None])["n"] == 0


def _run(name, group, status, top1=None, seed=0, series=None):
  final = {} if top1 is None else {"eval/top1": top1}
  return dict(name=name, group=group, seed=seed, status=status, final=final, series=series or {},
              model={"norm": "bn"})


def test_outcome_follows_the_criterion_fixed_before_the_runs():
  assert study.outcome(_run("a", "a", "diverged", 0.9)) == study.CRASHED
  assert study.outcome(_run("a", "a", "completed", 0.49)) == study.FAILED
  assert study.outcome(_run("a", "a", "completed", 0.5)) == study.TRAINED
  assert study.outcome(_run("a", "a", "preempted", 0.9)) == study.UNFINISHED
  assert "50%" in study.criterion_text()


def test_aggregate_counts_crashes_apart_from_the_accuracy_statistics():
  runs = [_run("ln_seed0", "ln", "completed", 0.9, 0), _run("ln_seed1", "ln", "completed", 0.8, 1),
          _run("bn_seed0", "bn", "diverged", None, 0), _run("bn_seed1", "bn", "completed", 0.7, 1)]
  rows = {r["variant"]: r for r in study.aggregate(runs)}
  assert rows["ln"]["top1"]["mean"] == pytest.approx(0.85) and rows["ln"]["crashed"] == 0
  assert rows["bn"]["top1"]["n"] == 1 and rows["bn"]["crashed"] == 1
  table = study.aggregate_table(list(rows.values()))
  assert "| ln | 2/2 | 85.00 |" in table and "| bn | 1/2 | 70.00 |" in table


def test_aggregate_pairs_each_seed_with_the_reference_and_reports_folded_accuracy():
  runs = [_run(f"ln_seed{s}", "ln", "completed", t, s) for s, t in enumerate((0.90, 0.80, 0.70))]
  runs += [_run(f"bn_seed{s}", "bn", "completed", t, s) for s, t in enumerate((0.92, 0.825, 0.73))]
  runs += [_run("rms_seed0", "rms", "completed", 0.95, 0), _run("rms_seed1", "rms", "diverged", None, 1)]
  for r in runs[3:6]:
    r["evaluated"] = {"top1": r["final"]["eval/top1"], "folded_top1": r["final"]["eval/top1"],
                      "folded_agrees": r["seed"] != 2}
  rows = {r["variant"]: r for r in study.aggregate(runs)}
  # Unpaired, the seeds' spread (std ~10 points) hides the difference; paired it is 2.5 +- 0.5 points.
  assert rows["bn"]["top1"]["ci95"][0] < 0.80 < rows["bn"]["top1"]["ci95"][1]
  d = rows["bn"]["difference"]
  assert d["n"] == 3 and d["mean"] == pytest.approx(0.025) and d["std"] == pytest.approx(0.005)
  assert d["ci95"][0] > 0  # resolvable: the interval excludes 0
  assert rows["ln"]["difference"] is None and rows["rms"]["difference"]["n"] == 1  # seed 1 crashed
  assert rows["bn"]["folded_top1"]["mean"] == pytest.approx(0.825)
  assert (rows["bn"]["folded_agrees"], rows["bn"]["folded_checked"]) == (2, 3)
  table = study.aggregate_table(list(rows.values())).splitlines()
  assert "paired difference to ln (pp)" in table[0] and "top-1 % BN folded" in table[0]
  assert table[2].startswith("| ln | 3/3 | 80.00 | 10.00 |") and "| (reference) | - | - | - |" in table[2]
  assert table[3].startswith("| bn | 3/3 | 82.50 | 9.50 |")
  assert "| +2.50 | +1.26 to +3.74 | 82.50 | 2/3 | 0 | 0 |" in table[3]  # t(0.975, 2) = 4.303
  assert table[4].startswith("| rms | 1/2 | 95.00 | - | - | +5.00 | - | - | - | 1 | 0 |")
  assert "paired" not in study.aggregate_table(study.aggregate(runs[3:], reference="ln"))


def test_stability_map_and_mechanism_per_variant_and_learning_rate():
  diag = lambda v: {"diag/block_0/ffn_hidden_rms": [(1, v), (2, 2 * v)],  # noqa: E731
                    "diag/block_1/ffn_hidden_rms": [(1, v / 2), (2, float("nan"))]}
  runs = [_run("bn_lr1e-3_seed0", "bn_lr1e-3", "completed", 0.9, 0, diag(1.0)),
          _run("bn_lr1e-3_seed1", "bn_lr1e-3", "completed", 0.3, 1, diag(3.0)),
          _run("bn_lr1e-2_seed0", "bn_lr1e-2", "diverged", None, 0, diag(10.0)),
          _run("bn_lr1e-2_seed1", "bn_lr1e-2", "running", None, 1)]
  lrs = {"bn_lr1e-3_seed0": 1e-3, "bn_lr1e-3_seed1": 1e-3, "bn_lr1e-2_seed0": 1e-2,
         "bn_lr1e-2_seed1": 1e-2}
  smap = study.stability_map(runs, lrs)
  low, high = smap["bn"][1e-3], smap["bn"][1e-2]
  assert (low["n"], low[study.TRAINED], low[study.FAILED], low["success_rate"]) == (2, 1, 1, 0.5)
  assert low["top1"]["mean"] == pytest.approx(0.6)
  assert (high["n"], high[study.CRASHED], high[study.UNFINISHED], high["success_rate"]) == (1, 1, 1, 0.0)
  table = study.stability_table(smap)
  assert "1/2 trained, 60.00% (1 failed to learn)" in table and "0/1 trained (1 crashed, 1 not finished)" in table
  totals = study.variant_totals(smap)["bn"]
  assert (totals["runs"], totals["crashed"], totals["failed"], totals["trained"], totals["unfinished"]) == (3, 1, 1, 1, 1)
  assert (totals["lowest_crash_lr"], totals["highest_all_trained_lr"]) == (1e-2, None)
  assert "| bn | 3 | 1 | 1 | 1 | 0.01 | - |" in study.totals_table({"bn": totals})
  mech = study.mechanism(runs, lrs)
  # Peak over steps and blocks (non-finite values skipped), then the mean over seeds.
  assert mech["ffn_hidden_rms"]["bn"] == [(1e-3, pytest.approx(4.0)), (1e-2, pytest.approx(20.0))]


def test_with_seeds_repeats_every_run_with_its_seed_and_group():
  sweep = sweeps_lib.SWEEPS["bn_cls_cpu"]
  seeded = sweeps_lib.with_seeds(sweep, (3, 7))
  assert [r.name for r in seeded.runs] == ["cls_in_seed3", "cls_in_seed7", "cls_out_seed3", "cls_out_seed7"]
  assert seeded.runs[1].group == "cls_in" and seeded.runs[1].seed == 7
  assert seeded.runs[1].overrides[-1] == ("seed", "7") and seeded.runs[1].variant == "cls_in"
  assert sweeps_lib.with_seeds(sweep, ()) is sweep  # no seeds: each config's own seed
  assert len(sweeps_lib.with_seeds(sweeps_lib.SWEEPS["stability_imagenet"]).runs) == 2 * 5 * len(sweeps_lib.VARIANTS)
  with pytest.raises(UserError, match="--seeds"):
    sweeps_lib.with_seeds(sweep, (1, 1))


def test_stability_sweeps_state_lr_grid_and_harsh_recipe():
  cpu = sweeps_lib.SWEEPS["stability_imagenet"]
  lrs = sorted({sweeps_lib.stability_lr(r) for r in cpu.runs})
  assert len(lrs) >= 5 and len(cpu.seeds) >= 2
  harsh = sweeps_lib.SWEEPS["stability_harsh_imagenet"]
  for run in harsh.runs:
    fields = dict(run.overrides)
    assert fields["model.num_layers"] == "12" and fields["optim.warmup_steps"] == "0"
    assert fields["optim.grad_clip_norm"] == "None"  # no clipping transform at all
  assert max(sweeps_lib.stability_lr(r) for r in harsh.runs) > max(lrs)


def test_crash_study_sweeps_cover_the_design_with_the_declared_recipe():
  sens = [s for s in sweeps_lib.SWEEPS.values() if s.kind == "sensitivity"]
  arms = {}
  for sweep in sens:
    assert sweep.num_steps >= 1500 and sweep.name.startswith("crash_")
    depths = {sweeps_lib.parse_crash_arm(run.name)["depth"] for run in sweep.runs}
    # >= 2 seeds for the factorial and fp16 arms; the 8- and 12-block depth arm: the declared budget seeds
    assert sweep.seeds == (sweeps_lib.SENSITIVITY_SEEDS if depths == {4} else sweeps_lib.DEPTH_SEEDS)
    assert len(sweeps_lib.SENSITIVITY_SEEDS) >= 2
    for run in sweep.runs:
      fields = dict(run.overrides)
      parsed = sweeps_lib.parse_crash_arm(run.name)
      assert fields["num_cpu_devices"] == "1"  # the same computation alone or beside another run
      arms.setdefault(parsed["arm"], set()).add(float(fields["optim.base_lr"]))
      assert run.config.endswith(",feed=numpy") and fields["optim.grad_clip_norm"] == "None"
      assert fields["loss_spike_factor"] == "0"  # the criterion reads the loss, no early stop
      assert int(fields["model.hidden_size"]) // int(fields["model.num_heads"]) == 64  # DeiT's head dim
      assert fields["model.num_layers"] == str(parsed["depth"])
      assert fields["model.dtype"] == {"fp16": "float16", "fp32": "float32"}[parsed["precision"]]
      assert (fields["model.attention_logits"], fields["model.attention_scale"]) == ("compute", "product")
      norm, ffn_norm, qk = sweeps_lib.CRASH_VARIANTS[parsed["variant"]]
      assert f"norm={norm},ffn_norm={ffn_norm}" in run.config and fields["model.qk_norm"] == qk
  grid = sorted(sweeps_lib.SENSITIVITY_LRS)
  assert len(grid) >= 7 and grid[0] == 1e-4 and grid[-1] == 1e-1
  assert all(sorted(lrs) == grid for lrs in arms.values())
  arm = sweeps_lib.crash_arm
  factorial = {arm(v, "fp32", 4) for v in sweeps_lib.CRASH_VARIANTS}
  fp16 = {arm(v, "fp16", 4) for v in ("ln", "bn", "bn_ffnbn", "bn_qknorm")}
  depth = {arm(v, "fp16", d) for v in ("ln", "bn", "bn_ffnbn") for d in (8, 12)}
  assert set(arms) == factorial | fp16 | depth and len(factorial) == 8
  accuracy = sweeps_lib.SWEEPS[sweeps_lib.ACCURACY_SWEEP]
  assert accuracy.kind == "accuracy" and len(accuracy.seeds) >= 5
  assert set(sweeps_lib.ACCURACY_ARMS) == factorial
  with pytest.raises(UserError, match="bn_fp32_d4"):
    sweeps_lib.accuracy_runs({a: 1e-3 for a in sweeps_lib.ACCURACY_ARMS if a != "bn_fp32_d4"})


FAKE_STABILITY = sweeps_lib.Sweep(
    "fake_stability_cpu", "cpu", "Where does the fake trainer fail?",
    runs=tuple(sweeps_lib.Run(f"{name}_lr{lr}", f"configs/quickstart.py:norm={norm},ffn_norm=none",
                              (("optim.base_lr", lr),), note=name)
               for name, norm in (("ln", "ln"), ("bn", "bn")) for lr in ("1e-3", "1e-2")),
    seeds=(0, 1), num_steps=4, kind="stability")


def test_seeded_stability_sweep_end_to_end_with_the_report(tmp_path, fake_modules, monkeypatch, capsys):  # noqa: F811
  monkeypatch.setitem(sweeps_lib.SWEEPS, FAKE_STABILITY.name, FAKE_STABILITY)
  root = tmp_path / "runs"
  assert run_sweep.main(["--sweep", FAKE_STABILITY.name, "--root", str(root), *fake_modules]) == 0
  sweep_dir = root / FAKE_STABILITY.name
  doc = json.loads((sweep_dir / "results.json").read_text())
  assert sorted(r["name"] for r in doc["runs"]) == sorted(
      f"{n}_lr{lr}_seed{s}" for n in ("ln", "bn") for lr in ("1e-3", "1e-2") for s in (0, 1))
  assert {r["seed"] for r in doc["runs"]} == {0, 1} and doc["num_steps"] == 4
  assert json.loads((sweep_dir / "sweep.json").read_text())["seeds"] == [0, 1]
  # The same root with other seeds is refused: results of different seeds never mix silently.
  with pytest.raises(SystemExit) as exc:
    run_sweep.main(["--sweep", FAKE_STABILITY.name, "--root", str(root), "--resume", "--seeds", "0,1,2",
                    *fake_modules])
  assert exc.value.code == 2 and capsys.readouterr().err.startswith("error: --seeds:")
  text = report.make_report(str(root), out=str(tmp_path / "out"))
  # The fake trainer diverges every BN-only run and ends LN runs at 0.54 top-1 (above 50%).
  assert "| ln | 2/2 trained, 54.00% | 2/2 trained, 54.00% |" in text
  assert "| bn | 0/2 trained (2 crashed) | 0/2 trained (2 crashed) |" in text
  assert "Criterion, fixed before the runs" in text
  out = tmp_path / "out" / FAKE_STABILITY.name
  assert (out / "stability_map.png").stat().st_size > 0 and (out / "mechanism.png").stat().st_size > 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["stability_map"]["ln"]["0.001"]["success_rate"] == 1.0
  assert summary["totals"]["bn"]["crashed"] == 4 and summary["totals"]["ln"]["highest_all_trained_lr"] == 0.01
  assert summary["overall"] == {"runs": 8, "crashed": 4, "failed": 0, "trained": 4, "unfinished": 0}
  assert "| ln | 4 | 0 | 0 | 4 | - | 0.01 |" in text
  assert f"Regenerate: `python -m experiments.run_sweep --sweep {FAKE_STABILITY.name} --root runs" in text
  assert str(tmp_path) not in text  # no absolute paths of the machine it ran on


def test_seeded_table_sweep_reports_mean_std_and_interval(tmp_path, fake_modules, monkeypatch):  # noqa: F811
  root = tmp_path / "runs"
  assert run_sweep.main(["--sweep", "fake_cpu", "--root", str(root), "--seeds", "0,1,2", "--num_steps", "4",
                         "--evaluate", *fake_modules]) == 1  # the fake 'bad' run fails
  text = report.make_report(str(root), out=str(tmp_path / "out"))
  # The fake evaluation reports 60% folded, folded = unfolded, for every completed run.
  assert "| ln | 3/3 | 54.00 | 0.00 | 54.00 - 54.00 | (reference) | - | 60.00 | 3/3 | 0 | 0 |" in text
  assert "| bn | 0/3 | - | - | - | - | - | - | - | 3 | 0 |" in text
  assert "img/s" not in text  # speeds of evaluations timed one by one stay out of a seeded table
  assert "--evaluate && python -m experiments.report --root runs" in text
  assert (tmp_path / "out" / "fake_cpu" / "spread.png").exists()
  # The diagnostics: a row per variant with diagnostics (ln, bn, bn_ffnbn), not one per seed (9).
  assert _png_size(tmp_path / "out" / "fake_cpu" / "diagnostics.png")[1] == round((2.6 * 3 + 0.6) * 90)
  # A variant's note is listed once; a seed that stopped is listed by its own name, with why.
  assert text.count("- `ln`: LN\n") == 1 and "- `ln_seed0`" not in text
  assert "- `bn_seed1`: BN only -- stopped:" in text
  # A sweep that declares another reference row (the BN-knob tables: their default setting) is
  # paired against it: the fake ends bn_ffnbn like ln, so their difference is exactly 0.
  monkeypatch.setitem(sweeps_lib.SWEEPS, "fake_cpu",
                      dataclasses.replace(sweeps_lib.SWEEPS["fake_cpu"], reference="bn_ffnbn"))
  text = report.make_report(str(root), out=str(tmp_path / "out"))
  assert "paired difference to bn_ffnbn (pp)" in text and "| ln | 3/3 | 54.00 | 0.00 | 54.00 - 54.00 | +0.00 |" in text
  rows = json.loads((tmp_path / "out" / "fake_cpu" / "summary.json").read_text())["variants"]
  assert {r["variant"]: r["reference"] for r in rows}["ln"] == "bn_ffnbn"


def test_diagnostics_figure_shows_one_seed_per_variant_preferring_one_that_diverged():
  runs = [dict(name=f"{g}_seed{s}", group=g, seed=s, step=3, status="diverged" if (g, s) == ("bn", 1) else "completed")
          for g in ("ln", "bn") for s in (0, 1, 2)]
  assert [r["name"] for r in plots.diagnostics_runs(runs)] == ["ln_seed0", "bn_seed1"]
  unseeded = [dict(name=n, status="completed", step=3) for n in ("ln", "bn", "bn_ffnbn")]
  assert plots.diagnostics_runs(unseeded) == unseeded


def test_readable_command_has_no_machine_paths():
  cmd = ["/opt/venv/bin/python3", "-m", "vitnorm.benchmark", "--variant=S/16",
         f"--output={os.path.join(run_sweep.PROJECT_ROOT, 'runs', 'x', 'benchmark.json')}",
         "--output=/tmp/elsewhere/benchmark.json"]
  assert report.readable_command(cmd) == (
      "python -m vitnorm.benchmark --variant=S/16 --output=runs/x/benchmark.json "
      "--output=ROOT/benchmark.json")


def _row(model, per_repeat, ratio=None):
  med = sorted(per_repeat)[len(per_repeat) // 2]
  return dict(model=model, status="ok", ratio_to_no_norm=ratio,
              images_per_second=dict(median=med, min=min(per_repeat), max=max(per_repeat),
                                     per_repeat=per_repeat))


def test_benchmark_flags_an_aa_ratio_off_by_more_than_3_percent_or_a_wide_spread():
  ok = comparison.reliability([_row("none", [100, 101, 99]), _row("none_aa", [100, 100, 100], 1.01)])
  assert ok["reliable"] and ok["aa_ratio"] == 1.01 and ok["aa_checked"]
  off = comparison.reliability([_row("none", [100, 101, 99]), _row("none_aa", [95, 96, 95], 0.95)])
  assert not off["reliable"] and "A/A ratio 0.950" in off["problems"][0]
  wide = comparison.reliability([_row("ln", [80, 100, 120]), _row("none", [100, 100, 100])])
  assert not wide["reliable"] and not wide["aa_checked"] and "ln varied by 40.0%" in wide["problems"][0]


# ----------------------------------------------------------------------------------------------
# The crash study: outcome from the train loss, sensitivity, accuracy statistics
# ----------------------------------------------------------------------------------------------


def _loss_run(name, status, loss, seed=0, top1=None):
  final = {"train/loss": loss}
  if top1 is not None:
    final["eval/top1"] = top1
  return dict(name=f"{name}_seed{seed}", group=name, seed=seed, status=status, final=final, series={})


def test_loss_outcome_is_the_criterion_fixed_before_the_runs():
  l0 = math.log(10)
  assert study.initial_loss() == pytest.approx(2.302585092994046)
  assert study.loss_outcome(_loss_run("a", "diverged", 0.1)) == study.LOSS_CRASHED  # stopped: crash
  assert study.loss_outcome(_loss_run("a", "completed", l0 + 1e-9)) == study.LOSS_DIVERGED
  assert study.loss_outcome(_loss_run("a", "completed", float("nan"))) == study.LOSS_DIVERGED
  assert study.loss_outcome(_loss_run("a", "completed", l0)) == study.LOSS_TRAINED
  assert study.loss_outcome(_loss_run("a", "completed", 0.05, top1=0.11)) == study.LOSS_TRAINED  # not accuracy
  assert study.loss_outcome(_loss_run("a", "preempted", 0.1)) == study.UNFINISHED
  assert study.clipped_loss(_loss_run("a", "diverged", 0.1)) == l0
  assert study.clipped_loss(_loss_run("a", "completed", 7.0)) == l0
  assert study.clipped_loss(_loss_run("a", "completed", 0.25)) == 0.25
  assert "log 10 = 2.303" in study.loss_criterion_text()


def _sensitivity_runs():
  arm = "ln_fp32_d4"
  return [_loss_run(f"{arm}_lr1e-4", "completed", 0.5, 0), _loss_run(f"{arm}_lr1e-4", "completed", 0.7, 1),
          _loss_run(f"{arm}_lr1e-3", "completed", 0.2, 0), _loss_run(f"{arm}_lr1e-3", "completed", 0.4, 1),
          _loss_run(f"{arm}_lr1e-2", "diverged", 0.3, 0), _loss_run(f"{arm}_lr1e-2", "completed", 3.0, 1),
          _loss_run("bn_fp16_d8_lr1e-4", "completed", 0.1, 0), _loss_run("bn_fp16_d8_lr1e-3", "preempted", 0.1, 0),
          _loss_run("not_a_crash_run", "completed", 0.1, 0), _loss_run("bn_fp16_d8_lr1e-2", "not_run", None, 0)]


def test_sensitivity_is_wortsmans_expectation_over_the_grid_with_crashes_at_l0():
  curves = study.loss_curves(_sensitivity_runs())
  assert list(curves) == ["bn_fp16_d8", "ln_fp32_d4"]  # the run that is not the study's is left out
  ln = curves["ln_fp32_d4"]
  assert ln[1e-4]["loss"] == pytest.approx(0.6) and ln[1e-3]["loss"] == pytest.approx(0.3)
  assert (ln[1e-2]["crashed"], ln[1e-2]["diverged"], ln[1e-2]["loss"]) == (1, 1, math.log(10))
  grid = (1e-4, 1e-3, 1e-2)
  s = study.sensitivity(ln, grid)
  # E[min(L, L0)] - L* = (0.6 + 0.3 + L0) / 3 - 0.3 = L0 / 3
  assert s["value"] == pytest.approx(math.log(10) / 3) and s["best_loss"] == pytest.approx(0.3)
  assert s["best_lr"] == 1e-3 and s["complete"]
  bn = study.sensitivity(curves["bn_fp16_d8"], grid)
  assert bn["value"] is None and not bn["complete"] and bn["best_lr"] == 1e-4
  table = study.sensitivity_table(curves, grid).splitlines()
  assert table[2] == "| bn_fp16_d8 | 0.100 | not finished | not run | - | 0.100 | 0.0001 |"
  assert table[3] == "| ln_fp32_d4 | 0.600 | 0.300 | 2.303 CD | 0.768 | 0.300 | 0.001 |"


def test_holm_adjusts_step_down_and_keeps_the_order():
  adjusted = study.holm({"a": 0.01, "b": 0.04, "c": 0.03, "ref": None})
  # sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04)
  assert adjusted == {"a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06), "ref": None}
  assert study.holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_bootstrap_interval_of_one_seed_is_the_binomial_one_and_stays_in_bounds():
  draws = study.bootstrap_top1({0: 0.9}, resamples=20_000)
  half = 1.959964 * math.sqrt(0.9 * 0.1 / 1000)  # the normal approximation of Binomial(1000, 0.9)
  low, high = study.percentile_interval(draws)
  assert low == pytest.approx(0.9 - half, abs=0.1 * half) and high == pytest.approx(0.9 + half, abs=0.1 * half)
  low, high = study.percentile_interval(study.bootstrap_top1({0: 1.0, 1: 0.998}))
  assert high <= 1.0 and low < 0.999  # a t-interval of these two would pass 100%
  # Seeds are resampled too: the spread between seeds widens the interval.
  wide = study.percentile_interval(study.bootstrap_top1({0: 0.80, 1: 0.90}))
  assert wide[0] < 0.81 and wide[1] > 0.89


def test_noninferiority_pairs_seeds_counts_crashes_as_chance_and_corrects_with_holm():
  runs = [_loss_run("ln", "completed", 0.1, s, top1=0.95) for s in range(5)]
  runs += [_loss_run("bn", "completed", 0.1, s, top1=0.97) for s in range(5)]  # 3 points above the margin
  runs += [_loss_run("bad", "completed", 0.1, s, top1=0.90) for s in range(5)]  # 5 points lower
  runs += [_loss_run("crashy", "completed", 0.1, s, top1=0.96) for s in range(4)]
  runs += [_loss_run("crashy", "diverged", 0.1, 4)]
  rows = {r["variant"]: r for r in study.noninferiority(runs, "ln")}
  assert rows["ln"]["verdict"] == "-" and rows["ln"]["p"] is None
  assert rows["bn"]["difference"] == pytest.approx(0.02) and rows["bn"]["verdict"] == "non-inferior"
  # No draw reaches -1 point: p = 1 / (1 + draws); Holm multiplies the smallest of 3 by 3.
  assert rows["bn"]["p"] == pytest.approx(1 / 10_001) and rows["bn"]["p_holm"] == pytest.approx(3 / 10_001)
  assert rows["bad"]["verdict"] == "not shown" and rows["bad"]["p"] > 0.99
  # The crashed seed counts as 10% (chance): mean (4 x 0.96 + 0.1) / 5 = 0.788.
  assert rows["crashy"]["crashed"] == 1 and rows["crashy"]["top1"] == pytest.approx(0.788)
  assert rows["crashy"]["verdict"] == "not shown"
  lo, hi = rows["bn"]["difference_ci95"]
  assert lo < 0.02 < hi and hi - lo < 0.03
  table = study.noninferiority_table(list(rows.values()), "ln")
  assert "| ln | 5 | 0 | 95.00 |" in table and "(reference)" in table and "| non-inferior |" in table


def _write_run(sweep_dir, name, *, status, step, losses, diag=None, evals=None, divergence=None):
  """A run directory as the trainer leaves it: status.json and metrics.jsonl."""
  wd = sweep_dir / name
  wd.mkdir(parents=True)
  with open(wd / "metrics.jsonl", "w") as f:
    for s, loss in losses:
      f.write(json.dumps({"step": s, "train/loss": loss}) + "\n")
    for s, record in (diag or {}).items():
      f.write(json.dumps(dict(step=s, **record)) + "\n")
    for s, record in (evals or {}).items():
      f.write(json.dumps(dict(step=s, **record)) + "\n")
  final = [v for _, v in losses if math.isfinite(v)]
  doc = {"status": status, "step": step, "metrics": {"train/loss": final[-1]} if final else {}}
  if divergence:
    doc.update(divergence=divergence, reason="non-finite loss")
  (wd / "status.json").write_text(json.dumps(doc))


def _block_diag(scale):
  """Two blocks' diagnostics; block 1 is `scale` times block 0."""
  rec = {}
  for b, f in ((0, 1.0), (1, scale)):
    rec.update({f"diag/block_{b}/ffn_pre_norm_rms": 2.0 * f, f"diag/block_{b}/ffn_out_rms": 1.0 * f,
                f"diag/block_{b}/max_attention_logit": 10.0 * f, f"diag/block_{b}/max_abs_qk": 80.0 * f,
                f"diag/block_{b}/residual_rms": 3.0 * f, f"diag/block_{b}/ffn_pre_norm_max_abs": 5.0 * f,
                f"diag/block_{b}/ffn_out_max_abs": 4.0 * f, f"diag/block_{b}/max_abs_matmul": 80.0 * f})
  rec["diag/max_abs_matmul"] = 80.0 * max(1.0, scale)
  return rec


FAKE_SENSITIVITY = sweeps_lib.Sweep(
    "fake_sensitivity_cpu", "cpu", "Does the fake BN crash in fp16?",
    runs=tuple(sweeps_lib.crash_run(v, "fp16", 4, lr) for v in ("ln", "bn") for lr in (1e-3, 1e-1)),
    seeds=(0, 1), num_steps=60, kind="sensitivity")


def test_sensitivity_report_and_figures_from_a_fake_root(tmp_path, monkeypatch):
  monkeypatch.setitem(sweeps_lib.SWEEPS, FAKE_SENSITIVITY.name, FAKE_SENSITIVITY)
  sweep_dir = tmp_path / "runs" / FAKE_SENSITIVITY.name
  sweep_dir.mkdir(parents=True)
  (sweep_dir / "sweep.json").write_text(json.dumps({"sweep": FAKE_SENSITIVITY.name, "num_steps": 60,
                                                    "overrides": [], "seeds": [0, 1]}))
  evals = {60: {"eval/loss": 0.5, "eval/top1": 0.9, "eval/loss_batch_stats": 0.25, "eval/top1_batch_stats": 0.95}}
  for seed in (0, 1):
    for lr, loss in (("1e-3", 0.4), ("1e-1", 3.0)):  # LN: trains at 1e-3, diverges (loss > log 10) at 1e-1
      _write_run(sweep_dir, f"ln_fp16_d4_lr{lr}_seed{seed}", status="completed", step=60,
                 losses=[(30, 2.0), (60, loss + seed / 10)], diag={30: _block_diag(1.0), 60: _block_diag(2.0)})
    _write_run(sweep_dir, f"bn_fp16_d4_lr1e-3_seed{seed}", status="completed", step=60,
               losses=[(30, 2.0), (60, 0.3)], diag={30: _block_diag(1.0)}, evals=evals)
    # BN at 1e-1 crashes at step 45: at the last record (step 30) block 1's q.k is 80 x 1000 > 65,504
    # (seed 0), or overflowed to inf in block 0 while block 1's output was NaN (seed 1).
    last = _block_diag(1000.0)
    if seed:
      last.update({"diag/block_0/max_abs_qk": float("inf"), "diag/block_1/max_abs_qk": float("nan"),
                   "diag/block_1/max_abs_matmul": float("nan")})
    _write_run(sweep_dir, f"bn_fp16_d4_lr1e-1_seed{seed}", status="diverged", step=45,
               losses=[(30, 1.5), (45, float("nan"))], diag={15: _block_diag(3.0), 30: last},
               divergence="non_finite_loss")
  out = tmp_path / "out"
  text = report.make_report(str(tmp_path / "runs"), out=str(out))
  assert "Criterion, fixed before the runs" in text
  summary = json.loads((out / FAKE_SENSITIVITY.name / "summary.json").read_text())
  assert summary["outcomes"]["bn_fp16_d4"] == {"crashed": 2, "diverged": 0, "trained": 2, "not finished": 0}
  assert summary["outcomes"]["ln_fp16_d4"] == {"crashed": 0, "diverged": 2, "trained": 2, "not finished": 0}
  assert summary["curves"]["ln_fp16_d4"]["0.001"]["loss"] == pytest.approx(0.45)
  assert summary["curves"]["ln_fp16_d4"]["0.1"]["loss"] == pytest.approx(math.log(10))
  assert summary["best_lr"] == {"bn_fp16_d4": 0.001, "ln_fp16_d4": 0.001}
  assert summary["sensitivity"]["bn_fp16_d4"]["value"] is None  # 2 of the 7 lrs: not complete
  site = summary["crash_sites"]["bn_fp16_d4_lr1e-1_seed0"]
  assert site == {"step": 45, "divergence": "non_finite_loss", "diag_step": 30, "block": 1,
                  "tensor": "q.k product", "diagnostic": "max_abs_qk", "value": 80000.0, "over_fp16": True}
  site = summary["crash_sites"]["bn_fp16_d4_lr1e-1_seed1"]
  assert (site["diag_step"], site["block"], site["tensor"], site["over_fp16"]) == (30, 0, "q.k product", True)
  assert site["value"] == float("inf")
  assert summary["peaks"]["ffn_pre_norm_rms"]["ln_fp16_d4"]["0.001"] == 4.0  # block 1 at step 60
  assert summary["peaks"]["max_abs_matmul"]["bn_fp16_d4"]["0.1"] == 80000.0
  assert summary["bn_mismatch"]["bn_fp16_d4_lr1e-3_seed0"]["loss_running"] == 0.5
  assert "| bn_fp16_d4_lr1e-1_seed0 | 45 | non_finite_loss | 30 | 1 | q.k product | 8e+04 | yes |" in text
  for name in ("loss_vs_lr.png", "ffn_rms_vs_lr.png", "attention_vs_lr.png", "max_activation.png",
               "crash_traces.png", "bn_mismatch.png", "loss.png"):
    assert (out / FAKE_SENSITIVITY.name / name).stat().st_size > 5_000, name
  # Every sensitivity sweep together: the precision and depth figures and each arm's best lr.
  assert (out / "crash_study" / "loss_vs_lr_precision.png").stat().st_size > 10_000
  assert (out / "crash_study" / "loss_vs_lr_depth.png").stat().st_size > 10_000
  together = json.loads((out / "crash_study" / "summary.json").read_text())
  assert together["crashed"] == {"bn_fp16_d4": 2, "ln_fp16_d4": 0}
  first = together["first_crash"]["bn_fp16_d4"]
  assert (first["run"], first["lr"], first["block"], first["step"]) == ("bn_fp16_d4_lr1e-1_seed0", 0.1, 1, 45)
  assert together["verdicts"]["bn_crashes"]["fp16"] == study.NOT_RESOLVABLE  # LN diverged at 1e-1
  assert (out / "crash_study" / "section.md").read_text().startswith("Criterion, fixed before the runs")
  assert str(tmp_path) not in text


def test_accuracy_sweep_runs_each_variant_at_its_best_lr_and_reports_noninferiority(
    tmp_path, fake_modules, capsys):  # noqa: F811
  results = tmp_path / "results"
  root = tmp_path / "runs"
  args = ["--sweep", sweeps_lib.ACCURACY_SWEEP, "--root", str(root), "--best_lrs", str(results),
          "--seeds", "0,1", "--num_steps", "4", *fake_modules]
  with pytest.raises(SystemExit) as exc:  # no sensitivity results yet: one clear line
    run_sweep.main(args)
  assert exc.value.code == 2 and "crash_fp32_cpu" in capsys.readouterr().err
  lrs = {arm: 10.0 ** -(3 + i % 2) for i, arm in enumerate(sweeps_lib.ACCURACY_ARMS)}
  for source in sweeps_lib.ACCURACY_SOURCES:
    (results / source).mkdir(parents=True)
    mine = {a: lr for a, lr in lrs.items() if (("qknorm" in a) == ("qknorm" in source))}
    (results / source / "summary.json").write_text(json.dumps({"best_lr": mine}))
  assert run_sweep.main(args) == 0
  frozen = json.loads((root / sweeps_lib.ACCURACY_SWEEP / "best_lrs.json").read_text())["best_lr"]
  assert frozen == lrs
  invocation = (root / sweeps_lib.ACCURACY_SWEEP / "ln_ffnbn_fp32_d4_seed1" / "invocations").read_text()
  assert f"--config.optim.base_lr={lrs['ln_ffnbn_fp32_d4']}" in invocation and "--config.seed=1" in invocation
  text = report.make_report(str(root), out=str(tmp_path / "out"))
  rows = {r["variant"]: r for r in json.loads(
      (tmp_path / "out" / sweeps_lib.ACCURACY_SWEEP / "summary.json").read_text())["variants"]}
  # The fake trainer ends every completed run at 54% and crashes BN without an FFN BN.
  assert rows["ln_fp32_d4"]["verdict"] == "-" and rows["ln_ffnbn_fp32_d4"]["difference"] == 0.0
  assert rows["bn_fp32_d4"]["crashed"] == 2 and rows["bn_fp32_d4"]["top1"] == pytest.approx(0.1)
  assert rows["bn_fp32_d4"]["verdict"] == "not shown"
  assert "non-inferiority" in text.lower() and "Holm" in text
  assert (tmp_path / "out" / sweeps_lib.ACCURACY_SWEEP / "forest.png").stat().st_size > 10_000


def test_verdicts_follow_the_rules_fixed_before_the_runs():
  grid = (1e-3, 1e-2)
  runs = []
  for seed in (0, 1):
    for lr in ("1e-3", "1e-2"):
      runs.append(_loss_run(f"ln_fp16_d4_lr{lr}", "completed", 0.3, seed))
      runs.append(_loss_run(f"bn_qknorm_fp16_d4_lr{lr}", "completed", 0.3, seed))
      runs.append(_loss_run(f"ln_fp32_d4_lr{lr}", "completed", 0.3, seed))
      runs.append(_loss_run(f"bn_fp32_d4_lr{lr}", "completed", 0.3 if lr == "1e-3" else 9.0, seed))
    runs.append(_loss_run("bn_fp16_d4_lr1e-3", "completed", 0.3, seed))
    runs.append(_loss_run("bn_fp16_d4_lr1e-2", "diverged" if seed else "completed", 0.3, seed))
    runs.append(_loss_run("bn_ffnbn_fp16_d4_lr1e-2", "completed", 9.0 if seed else 0.3, seed))
  v = study.verdicts(study.loss_curves(runs), grid)
  assert v["bn_crashes"]["fp16"] == study.REPRODUCED and v["crash_lrs"]["fp16"] == [1e-2]
  assert v["bn_crashes"]["fp32"] == study.NOT_REPRODUCED  # it diverged (loss 9), it never crashed
  assert v["qknorm_prevents"]["fp16"] == study.REPRODUCED  # every seed trained at 1e-2
  assert v["ffnbn_prevents"]["fp16"] == study.NOT_REPRODUCED  # a seed diverged at 1e-2
  assert v["ffnbn_prevents"]["fp32"] == study.NOT_RESOLVABLE  # nothing to prevent in fp32
  assert v["bn_crashes"]["fp16_d8"] == study.NOT_RESOLVABLE and v["depth_gap_grows"] == study.NOT_RESOLVABLE
  assert v["depth_gap"]["d4"] == pytest.approx(study.sensitivity(study.loss_curves(runs)["bn_fp16_d4"], grid)["value"])
