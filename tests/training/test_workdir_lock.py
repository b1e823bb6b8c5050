"""The workdir lock: a live holder (another process) refuses a training run that would share the
workdir, with one error line and the workdir unchanged; a run's own lock refuses a second
WorkdirLock; a dead holder or one not refreshed for STALE_SECONDS is taken over with a warning;
the holder refreshes its record while it runs. (A second run while the first trains, through
the trainer: test_checkpoint_integrity.py.)"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from test_checkpoint_integrity import snapshot
from test_loop import REPO, tiny_config
from vitnorm import errors
from vitnorm.errors import UserError
from vitnorm.training import loop, workdir_lock
from vitnorm.training.workdir_lock import LOCK_FILE, STALE_SECONDS, WorkdirLock

_HOLDER = """
import sys, time
from vitnorm.training.workdir_lock import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def other_process_holds(tmp_path):
  """A workdir with some files, locked by a live subprocess; yields (workdir, subprocess)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "status.json").write_text('{"status": "completed", "step": 24}\n')
  (workdir / "metrics.jsonl").write_text('{"step": 4, "train/loss": 2.0}\n')
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE,
                          text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
  try:
    assert proc.stdout.readline().strip() == "locked"
    yield str(workdir), proc
  finally:
    proc.kill()
    proc.wait()


def test_a_run_on_a_workdir_locked_by_another_process_refuses(other_process_holds, capsys):
  workdir, proc = other_process_holds
  before = snapshot(workdir, skip=(LOCK_FILE,))  # the holder refreshes its record every 30 s
  lock_record = json.load(open(os.path.join(workdir, LOCK_FILE)))
  started = time.time()
  with pytest.raises(SystemExit) as exit_info:
    errors.exit_on_user_error(loop.train_and_evaluate)(tiny_config(), workdir)
  assert time.time() - started < 10
  assert exit_info.value.code == 2
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith(f"error: workdir: {workdir} is in use by another training run (host "
                         f"{socket.gethostname()} pid {proc.pid} (started ")
  assert snapshot(workdir, skip=(LOCK_FILE,)) == before
  assert json.load(open(os.path.join(workdir, LOCK_FILE)))["token"] == lock_record["token"]


def test_a_dead_holder_is_taken_over_with_a_warning(other_process_holds):
  workdir, proc = other_process_holds
  proc.kill()
  proc.wait()  # kill -9: the lock file stays behind
  assert os.path.exists(os.path.join(workdir, LOCK_FILE))
  warnings = []
  with WorkdirLock(workdir, warn=warnings.append):
    record = json.load(open(os.path.join(workdir, LOCK_FILE)))
    assert record["pid"] == os.getpid()
  assert warnings == [warnings[0]] and warnings[0].startswith(f"warning: taking over the lock of {workdir}")
  assert f"pid {proc.pid}" in warnings[0] and "no longer running" in warnings[0]
  assert not os.path.exists(os.path.join(workdir, LOCK_FILE))  # released


def _write_record(workdir, host, refreshed_ago):
  now = time.time()
  record = dict(host=host, pid=12345, started_at=now - 7200, refreshed_at=now - refreshed_ago,
                token="theirs")
  with open(os.path.join(workdir, LOCK_FILE), "w") as f:
    json.dump(record, f)


def test_another_hosts_lock_is_stale_only_after_the_timeout(tmp_path):
  workdir = str(tmp_path)
  _write_record(workdir, "lost-host", refreshed_ago=STALE_SECONDS / 2)
  with pytest.raises(UserError, match=r"^workdir: .* in use by another training run \(host lost-host pid 12345"):
    WorkdirLock(workdir).acquire()
  _write_record(workdir, "lost-host", refreshed_ago=STALE_SECONDS + 1)
  warnings = []
  lock = WorkdirLock(workdir, warn=warnings.append).acquire()
  try:
    assert len(warnings) == 1 and "host lost-host pid 12345" in warnings[0]
    assert f"stale after {STALE_SECONDS:.0f} s" in warnings[0]
  finally:
    lock.release()


def test_a_held_lock_refuses_a_second_holder_and_is_refreshed(tmp_path):
  workdir = str(tmp_path / "new" / "run")  # created by the lock
  first = WorkdirLock(workdir, refresh_seconds=0.05).acquire()
  try:
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):
      WorkdirLock(workdir).acquire()
    record = json.load(open(os.path.join(workdir, LOCK_FILE)))
    assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
    time.sleep(0.5)
    refreshed = json.load(open(os.path.join(workdir, LOCK_FILE)))
    assert refreshed["refreshed_at"] > record["refreshed_at"]
    assert refreshed["started_at"] == record["started_at"]
  finally:
    first.release()
  WorkdirLock(workdir).acquire().release()  # free again


def test_a_local_lock_is_created_exclusively_without_the_object_store_pause(tmp_path, monkeypatch):
  """On a local disk the lock is an O_EXCL create: no write-pause-read-back (etils' open() has no
  mode 'x', which once sent every local run through the object-store path and its 1 s pause)."""
  def no_pause(seconds):
    raise AssertionError(f"slept {seconds} s taking a free local lock")
  monkeypatch.setattr(workdir_lock.time, "sleep", no_pause)
  workdir = str(tmp_path / "run")
  first = WorkdirLock(workdir).acquire()
  try:
    assert not WorkdirLock(workdir)._create_exclusive()  # pylint: disable=protected-access
    assert json.load(open(os.path.join(workdir, LOCK_FILE)))["token"] == first.info["token"]
  finally:
    first.release()


def test_an_unreadable_lock_is_looked_at_twice_then_taken_over(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, LOCK_FILE), "w") as f:
    f.write("{garbage")
  warnings = []
  started = time.time()
  WorkdirLock(workdir, warn=warnings.append).acquire().release()
  assert time.time() - started >= 1.0  # it waited for a writer that might be mid-write
  assert len(warnings) == 1 and "its lock file is unreadable" in warnings[0]
