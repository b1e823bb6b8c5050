"""One training run per workdir: WORKDIR/lock.json names the run that holds it.

The trainer's main process takes the lock after validating the config and before writing
anything else; the file holds host, pid, start time and a refresh time that a background thread
updates every REFRESH_SECONDS while the run lives. A second run on the same workdir refuses with
a UserError naming the holder and writes nothing. A lock is stale, and is taken over with one
warning line, when its process is gone (same host, pid not running) or its refresh time is older
than STALE_SECONDS (another host, e.g. one that was lost). On local disks the lock file is
created exclusively (O_EXCL); on object stores (gs://, through etils.epath) it is written and
read back after a short pause, which catches all but starts within that pause of each other.
`held_by_the_run` is the trainer's context manager (process 0 holds it; all processes refuse together).
"""
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Optional

from etils import epath

from vitnorm import paths
from vitnorm.errors import UserError

LOCK_FILE = "lock.json"
REFRESH_SECONDS = 30.0  # the holder rewrites its refresh time this often
STALE_SECONDS = 300.0  # a lock not refreshed for this long (10 refreshes missed) is stale
REMOTE_SETTLE_SECONDS = 1.0  # object stores: pause between writing the lock and reading it back


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OSError):
    return True
  return True


def describe(info: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.get("started_at", 0)))
  return f"host {info.get('host')} pid {info.get('pid')} (started {started})"


def staleness(info: Optional[dict], now: Optional[float] = None) -> Optional[str]:
  """Why a lock record is stale, or None while its holder may still be running."""
  if info is None:
    return "its lock file is unreadable"
  now = time.time() if now is None else now
  if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
    return "its process is no longer running"
  age = now - float(info.get("refreshed_at", 0))
  if age > STALE_SECONDS:
    return f"it was last refreshed {age:.0f} s ago (stale after {STALE_SECONDS:.0f} s)"
  return None


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds WORKDIR/lock.json; UserError if another live run holds it."""

  def __init__(self, workdir, *, refresh_seconds: float = REFRESH_SECONDS, warn=None):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.refresh_seconds = refresh_seconds
    self.warn = warn or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self.info = None
    self._stop = threading.Event()
    self._thread = None

  # -- reading and writing the record ----------------------------------------------------------

  def _read(self) -> Optional[dict]:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      raise
    except (OSError, ValueError):
      return None

  def _record(self) -> str:
    return json.dumps(self.info, sort_keys=True) + "\n"

  def _create_exclusive(self) -> bool:
    """Writes the record if no lock file exists; False if one does."""
    if not paths.is_url(self.path):  # a local disk: O_EXCL (etils' open() has no mode "x")
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:  # a reader in between sees an empty file: acquire() looks again
        f.write(self._record())
      return True
    # An object store has no exclusive create: write, pause, and read back who won.
    if self.path.exists():
      return False
    self.path.write_text(self._record())
    time.sleep(REMOTE_SETTLE_SECONDS)
    return (self._read() or {}).get("token") == self.info["token"]

  # -- the protocol ----------------------------------------------------------------------------

  def acquire(self):
    now = time.time()
    self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now,
                 "refreshed_at": now, "token": uuid.uuid4().hex}
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
      for _ in range(3):
        if self._create_exclusive():
          break
        try:
          holder = self._read()
          if holder is None:  # being written by its creator right now? look again
            time.sleep(REMOTE_SETTLE_SECONDS)
            holder = self._read()
        except FileNotFoundError:
          continue  # released meanwhile: try again
        why = staleness(holder)
        if why is None:
          raise UserError(
              f"workdir: {self.workdir} is in use by another training run ({describe(holder)}, lock "
              f"{self.path}); wait for it to finish or stop it, or pass another --workdir")
        self.warn(f"warning: taking over the lock of {self.workdir} from "
                  f"{describe(holder or {})}: {why}")
        self.path.unlink(missing_ok=True)
      else:
        raise UserError(f"workdir: could not take the lock {self.path} (other runs keep taking it); "
                        "make sure only one run uses this --workdir")
    except OSError as e:  # a file, a read-only directory or file system, a full disk
      raise UserError(f"workdir: {self.workdir} is not a writable directory ({type(e).__name__}: "
                      f"{e.strerror or e}); pass a --workdir you can write to") from None
    self._thread = threading.Thread(target=self._refresh_loop, name="workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _refresh_loop(self):
    while not self._stop.wait(self.refresh_seconds):
      self.refresh()

  def refresh(self):
    """Rewrites the refresh time (errors, e.g. a full disk, are ignored: the run reports them)."""
    try:
      current = self._read()
      if current is not None and current.get("token") != self.info["token"]:
        self.warn(f"warning: the lock {self.path} was taken over by {describe(current)}")
        self._stop.set()
        return
      self.info["refreshed_at"] = time.time()
      tmp = self.path.parent / f"{LOCK_FILE}.{self.info['token']}.tmp"
      tmp.write_text(self._record())
      tmp.replace(self.path)
    except (OSError, ValueError):
      pass

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    try:
      current = self._read()
      if current is None or current.get("token") == self.info["token"]:
        self.path.unlink(missing_ok=True)
    except OSError:
      pass

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def held_by_the_run(workdir):
  """WORKDIR/lock.json held by process 0 for the whole run; with several processes all refuse
  together (the others raise too when process 0 could not take the lock)."""
  import jax  # pylint: disable=g-import-not-at-top
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
  error = None
  try:
    if lock is not None:
      lock.acquire()
  except UserError as e:
    error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    failed = bool(multihost_utils.process_allgather(np.int32(error is not None)).max())
    if failed and error is None:
      if lock is not None:
        lock.release()
      error = UserError(f"workdir: process 0 could not lock {workdir}; see its error line")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
