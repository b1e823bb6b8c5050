"""Child process of tests/training/test_workdir_lock_bucket.py: the workdir lock on a gs:// workdir.

Run with the emulator's environment already set (see tests/test_bucket_workdir.py's emulator_env),
so gcsfs (through etils.epath) talks to the local fake-gcs-server; non-local network access is
refused as in tests/bucket_child.py. Two modes:

  hold WORKDIR REFRESH_SECONDS   take the lock (refreshing it every REFRESH_SECONDS), print
                                 'locked', wait for a line on stdin, release, print 'released'
  take WORKDIR                   take the lock as the trainer's CLI would (a refusal is one
                                 'error: ...' line, exit 2), print the record read back from the
                                 bucket as JSON, release, print 'released'
"""
import json
import sys

from bucket_child import _guard_network


def main(mode, workdir, *rest):
  _guard_network()
  from vitnorm import errors  # pylint: disable=g-import-not-at-top
  from vitnorm.training.workdir_lock import WorkdirLock  # pylint: disable=g-import-not-at-top

  if mode == "hold":
    lock = WorkdirLock(workdir, refresh_seconds=float(rest[0])).acquire()
    print("locked", flush=True)
    sys.stdin.readline()
  else:
    lock = errors.exit_on_user_error(WorkdirLock(workdir).acquire)()
    print(json.dumps(json.loads(lock.path.read_text())), flush=True)
  lock.release()
  print("released", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
