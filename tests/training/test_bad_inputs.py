"""The last bad inputs: non-finite numbers in any config field, num_epochs=inf, a config file
with a syntax error, a workdir that is a file or read-only. Each is exit code 2 with one
'error: <field>: ...' line within 10 s, and an existing workdir stays byte-for-byte unchanged."""
import math
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from configs import common
from test_checkpoint_integrity import snapshot
from test_loop import REPO, tiny_config
from vitnorm import errors
from vitnorm.errors import ConfigError
from vitnorm.training import loop, plan as plan_lib


@pytest.fixture
def finished_run(tmp_path):
  """A workdir that looks like a completed run (what a bad command must not touch)."""
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "status.json").write_text('{"status": "completed", "step": 24}\n')
  (workdir / "metrics.jsonl").write_text('{"step": 24, "train/loss": 0.5}\n')
  (workdir / "config.json").write_text("{}\n")
  return str(workdir)


def _run_in_process(config, workdir, capsys):
  """(exit code, last stderr line, seconds) of the trainer on bad input."""
  started = time.time()
  with pytest.raises(SystemExit) as exit_info:
    errors.exit_on_user_error(loop.train_and_evaluate)(config, workdir)
  lines = capsys.readouterr().err.strip().splitlines()
  return exit_info.value.code, lines[-1], time.time() - started


@pytest.mark.parametrize("overrides, field, got", [
    ({"optim.base_lr": math.inf}, "optim.base_lr", "inf"),
    ({"optim.weight_decay": math.nan}, "optim.weight_decay", "nan"),
    ({"num_steps": None, "num_epochs": math.inf}, "num_epochs", "inf"),
    ({"loss_spike_factor": -math.inf}, "loss_spike_factor", "-inf"),
    ({"model.dropout_rate": math.nan}, "model.dropout_rate", "nan"),
])
def test_non_finite_numbers_are_refused(finished_run, capsys, overrides, field, got):
  before = snapshot(finished_run)
  code, last, seconds = _run_in_process(tiny_config(**overrides), finished_run, capsys)
  assert code == 2 and seconds < 10
  assert last == f"error: {field}: must be a finite number, got {got}; give a finite value"
  assert snapshot(finished_run) == before


def test_every_float_field_of_the_defaults_is_checked():
  config = common.base_config()
  fields = []

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{prefix}{key}.")
      elif isinstance(value, float):
        fields.append(f"{prefix}{key}")

  walk(config, "")
  assert len(fields) >= 10, fields
  for field in fields:
    broken = tiny_config(**{field: math.inf})
    with pytest.raises(ConfigError) as err:
      plan_lib.check_finite(broken)
    assert err.value.field == field


def test_epochs_too_large_for_a_step_count(capsys, tmp_path):
  code, last, _ = _run_in_process(tiny_config(num_steps=None, num_epochs=1e300), str(tmp_path / "w"), capsys)
  assert code == 2 and last.startswith("error: num_epochs: 1e+300 epochs is more than 2^62 steps")
  assert not os.path.exists(tmp_path / "w")


def test_a_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("not a directory\n")
  code, last, seconds = _run_in_process(tiny_config(), str(path), capsys)
  assert code == 2 and seconds < 10
  assert last == f"error: workdir: {path} is a file, not a directory; pass a directory (new or a run's) as --workdir"
  assert path.read_text() == "not a directory\n"


@pytest.fixture
def read_only_run(finished_run):
  """finished_run made read-only: a read-only bind mount as root (chmod does not stop root)."""
  if os.geteuid() != 0:
    os.chmod(finished_run, 0o555)
    yield finished_run
    os.chmod(finished_run, 0o755)
    return
  proc = subprocess.run(["mount", "--bind", "-o", "ro", finished_run, finished_run],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot make a read-only bind mount here (mount said: {proc.stderr.strip()})")
  subprocess.run(["mount", "-o", "remount,bind,ro", finished_run], check=False)
  try:
    yield finished_run
  finally:
    subprocess.run(["umount", finished_run], check=False)


def test_a_read_only_workdir(read_only_run, capsys):
  before = snapshot(read_only_run)
  code, last, seconds = _run_in_process(tiny_config(), read_only_run, capsys)
  assert code == 2 and seconds < 10
  assert last.startswith(f"error: workdir: {read_only_run} is not") and "writable" in last
  assert snapshot(read_only_run) == before


def test_cli_config_file_with_a_syntax_error_names_file_and_line(tmp_path):
  config = tmp_path / "broken.py"
  config.write_text("def get_config():\n  return dict(a=1,\n\nx = = 2\n")
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "vitnorm.train", "--config", str(config), "--workdir",
                         str(workdir)], capture_output=True, text=True, cwd=REPO, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: --config: {config} line 2: ")
  assert last.endswith("; fix the syntax error in the config file (python -m py_compile FILE shows it)")
  assert not workdir.exists()
