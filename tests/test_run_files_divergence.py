"""experiments.run_files: a run summary says how a diverged run stopped and how many float16 steps
the loss scaler skipped (from the status.json the trainer writes)."""
import json
import types

from experiments import run_files


def _run():
  return types.SimpleNamespace(name="bn_fp16", note="", config="configs/quickstart.py",
                               overrides={}, override_flags=lambda: [])


def test_summary_names_the_divergence_and_the_skipped_steps(tmp_path):
  status = {"status": "diverged", "step": 40, "reason": "non-finite loss (nan) in float16 (...)",
            "divergence": "non_finite_loss",
            "metrics": {"train/loss": 2.1, "train/loss_scale": 512.0, "train/skipped_steps": 3}}
  (tmp_path / "status.json").write_text(json.dumps(status))
  summary = run_files.summarize_run(_run(), str(tmp_path))
  assert summary["status"] == "diverged"
  assert summary["divergence"] == "non_finite_loss" and summary["skipped_steps"] == 3


def test_runs_without_either_field_summarize_as_before(tmp_path):
  (tmp_path / "status.json").write_text(json.dumps({"status": "completed", "step": 10, "metrics": {}}))
  summary = run_files.summarize_run(_run(), str(tmp_path))
  assert "divergence" not in summary and "skipped_steps" not in summary
