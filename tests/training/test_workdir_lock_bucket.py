"""The workdir lock on a gs:// workdir, against the local GCS emulator of tests/test_bucket_workdir.py.

Object stores have no exclusive create, so WorkdirLock writes WORKDIR/lock.json, waits and reads it
back, and refreshes it by writing a temporary object and renaming it over the lock. Child processes
(tests/bucket_lock_child.py, the emulator's environment set before gcsfs is imported) use the lock
API directly, no training: a live holder's record is in the bucket and refreshed; a second process
is refused with one 'error: workdir: ...' line naming the holder; the holder's release removes the
object (and no temporary objects stay); locks of a dead process on this host, or of another host
not refreshed for STALE_SECONDS, are taken over with one warning line, a fresh one of another host
is not.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import test_bucket_workdir
from test_bucket_workdir import BUCKET, REPO, _list_objects, emulator_env
from vitnorm.training.workdir_lock import STALE_SECONDS

gcs_emulator = test_bucket_workdir.gcs_emulator  # the fixture: fake-gcs-server with an empty bucket

CHILD = os.path.join(REPO, "tests", "bucket_lock_child.py")
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, never a proxy


def _read_object(url, name):
  with OPENER.open(f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media",
                   timeout=10) as r:
    return json.loads(r.read())


def _write_object(url, name, record):
  request = urllib.request.Request(
      f"{url}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={urllib.parse.quote(name, safe='')}",
      data=json.dumps(record).encode(), headers={"Content-Type": "application/json"}, method="POST")
  with OPENER.open(request, timeout=10) as r:
    assert r.status == 200


def _take(url, workdir):
  """(exit code, stdout lines, stderr lines) of a child that takes and releases the lock."""
  proc = subprocess.run([sys.executable, CHILD, "take", workdir], env=emulator_env(url), capture_output=True,
                        text=True, timeout=120, cwd=REPO)
  return proc.returncode, proc.stdout.strip().splitlines(), proc.stderr.strip().splitlines()


def test_a_live_holder_refuses_a_second_one_refreshes_and_releases_at_exit(gcs_emulator):
  url, workdir = gcs_emulator, f"gs://{BUCKET}/run"
  holder = subprocess.Popen([sys.executable, CHILD, "hold", workdir, "0.2"], env=emulator_env(url),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == "locked", holder.stderr.read() if holder.poll() is not None else ""
    record = _read_object(url, "run/lock.json")
    assert (record["host"], record["pid"]) == (socket.gethostname(), holder.pid)
    deadline = time.time() + 20  # the holder rewrites its record every 0.2 s (temporary object + rename)
    while _read_object(url, "run/lock.json")["refreshed_at"] == record["refreshed_at"]:
      assert time.time() < deadline, "the lock on the bucket was never refreshed"
      time.sleep(0.1)
    assert _read_object(url, "run/lock.json")["token"] == record["token"]

    code, out, err = _take(url, workdir)
    assert code == 2 and out == []
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith(f"error: workdir: {workdir} is in use by another training run (host "
                             f"{socket.gethostname()} pid {holder.pid} (started "), err
    assert err[0].endswith(f"lock {workdir}/lock.json); wait for it to finish or stop it, or pass "
                           "another --workdir"), err
    assert _read_object(url, "run/lock.json")["token"] == record["token"]  # the refusal changed nothing

    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    assert holder.wait(timeout=30) == 0
  finally:
    if holder.poll() is None:
      holder.kill()
      holder.wait()
  assert [o for o in _list_objects(url) if o.startswith("run/")] == []  # lock and temporaries gone

  code, out, err = _take(url, workdir)  # free again: the next run takes it without a warning
  assert code == 0 and err == [] and out[-1] == "released", (out, err)
  assert json.loads(out[0])["host"] == socket.gethostname()
  assert _list_objects(url) == []


def test_stale_locks_on_the_bucket_are_taken_over_and_a_fresh_one_is_not(gcs_emulator):
  url = gcs_emulator
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  dead_pid = int(gone.stdout)  # a process of this host that has exited
  now = time.time()
  records = {
      "dead": dict(host=socket.gethostname(), pid=dead_pid, started_at=now - 60, refreshed_at=now, token="a"),
      "lost": dict(host="lost-host", pid=12345, started_at=now - 7200, refreshed_at=now - STALE_SECONDS - 5,
                   token="b"),
      "alive": dict(host="other-host", pid=12345, started_at=now - 60, refreshed_at=now, token="c"),
  }
  for name, record in records.items():
    _write_object(url, f"{name}/lock.json", record)

  reasons = {"dead": "its process is no longer running",
             "lost": f"(stale after {STALE_SECONDS:.0f} s)"}
  for name, why in reasons.items():
    workdir = f"gs://{BUCKET}/{name}"
    code, out, err = _take(url, workdir)
    assert code == 0, err
    holder = records[name]
    assert len(err) == 1 and err[0].startswith(
        f"warning: taking over the lock of {workdir} from host {holder['host']} pid {holder['pid']} "), err
    assert err[0].endswith(why), err
    taken = json.loads(out[0])
    assert taken["host"] == socket.gethostname() and taken["token"] != holder["token"]
    assert out[-1] == "released"
    assert f"{name}/lock.json" not in _list_objects(url)  # released at exit

  code, out, err = _take(url, f"gs://{BUCKET}/alive")
  assert code == 2 and out == [] and len(err) == 1, (out, err)
  assert err[0].startswith(f"error: workdir: gs://{BUCKET}/alive is in use by another training run (host "
                           "other-host pid 12345"), err
  assert _read_object(url, "alive/lock.json") == records["alive"]
