"""Run logging: metrics.jsonl, TensorBoard events, status.json, resume truncation, console lines."""
import json
import math
import os

import numpy as np
import pytest

from vitnorm import workdir as run_logging


def test_metrics_jsonl_tensorboard_and_console_lines(tmp_path, capsys):
  logger = run_logging.RunLogger(str(tmp_path), total_steps=100, start_step=0, progress_bar="off")
  logger.write(10, {"train/loss": np.float32(1.5), "train/img_per_s": 320.0})
  logger.write(20, {"eval/top1": 0.75})
  logger.report(10, {"train/loss": 1.5, "train/top1": 0.5, "train/lr": 1e-3, "train/img_per_s": 320.0})
  logger.close()
  rows = run_logging.read_metrics(str(tmp_path))
  assert rows == [{"step": 10, "train/loss": 1.5, "train/img_per_s": 320.0}, {"step": 20, "eval/top1": 0.75}]
  events = os.listdir(tmp_path / "tensorboard")
  assert len(events) == 1 and events[0].startswith("events.out.tfevents")
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()  # TensorBoard reads back every scalar at its step
  assert {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]} == {
      "train/loss": [(10, 1.5)], "train/img_per_s": [(10, 320.0)], "eval/top1": [(20, 0.75)]}
  line = capsys.readouterr().out.strip()
  assert line.startswith("step 10/100 | loss 1.5000 | top1 0.500 | lr 1.00e-03 | 320 img/s | eta ")


def test_non_main_process_writes_nothing(tmp_path, capsys):
  logger = run_logging.RunLogger(str(tmp_path / "w"), total_steps=10, is_main=False)
  logger.write(1, {"train/loss": 1.0})
  logger.report(1, {"train/loss": 1.0})
  logger.close()
  assert not os.path.exists(tmp_path / "w") and capsys.readouterr().out == ""


def test_status_roundtrip_with_non_finite_values(tmp_path):
  run_logging.write_status(str(tmp_path), "diverged", 7, {"train/loss": float("nan"), "x": np.float32(2.0)},
                           reason="non-finite loss")
  with open(tmp_path / "status.json") as f:
    status = json.load(f)  # strict JSON: no bare NaN
  assert status == {"status": "diverged", "step": 7, "metrics": {"train/loss": "nan", "x": 2.0},
                    "reason": "non-finite loss"}
  assert run_logging.read_status(str(tmp_path))["status"] == "diverged"
  with pytest.raises(ValueError):
    run_logging.write_status(str(tmp_path), "exploded", 1, {})
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_truncate_metrics_drops_rows_after_the_resume_step(tmp_path):
  logger = run_logging.RunLogger(str(tmp_path), total_steps=100, progress_bar="off")
  for step in (5, 10, 15, 20):
    logger.write(step, {"train/loss": 1.0 / step})
  logger.close()
  assert run_logging.truncate_metrics(str(tmp_path), 10) == 2
  assert [r["step"] for r in run_logging.read_metrics(str(tmp_path))] == [5, 10]
  assert run_logging.truncate_metrics(str(tmp_path), 10) == 0


def test_format_duration():
  assert run_logging.format_duration(5) == "5s"
  assert run_logging.format_duration(62.4) == "1m02s"
  assert run_logging.format_duration(3725) == "1h02m05s"
  assert run_logging.format_duration(math.nan) == "?"
