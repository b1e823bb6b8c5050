"""A full disk while training: telling it from other errors, and keeping its report to one line.

`out_of_space` is true for an exception (or one it was raised from) that says the disk or quota is
full: OSError ENOSPC / EDQUOT, or tensorstore's RESOURCE_EXHAUSTED text around them. When a
checkpoint write fails that way, orbax's and asyncio's worker threads log a traceback per failed
array and, at exit, "Event loop is closed"; `quiet_out_of_space_noise` filters exactly those
records (and that shutdown noise once a full disk was seen), so the trainer's own `error:` line is
the report. `record_in_status` removes the failed save's temporary files and writes status.json.
"""
import errno
import logging
import sys
import time
from typing import Optional


def out_of_space(err: BaseException) -> bool:
  """Whether an exception (or one it was raised from) says the disk or quota is full."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
      return True
    err = err.__cause__ or err.__context__
  return False


class _OutOfSpaceNoise(logging.Filter):
  """Drops the log records (and, once the disk was full, the shutdown noise) that orbax's and
  asyncio's worker threads emit for a failed write on a full disk: the run reports it in one line."""

  seen = False

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    if (exc is not None and out_of_space(exc)) or "No space left on device" in record.getMessage():
      _OutOfSpaceNoise.seen = True
      return False
    return not (_OutOfSpaceNoise.seen and "Event loop is closed" in record.getMessage())


def quiet_out_of_space_noise():
  """Installs the filter on the absl and asyncio loggers and on sys.unraisablehook (idempotent)."""
  for name in ("absl", "asyncio"):
    logger = logging.getLogger(name)
    if not any(isinstance(f, _OutOfSpaceNoise) for f in logger.filters):
      logger.addFilter(_OutOfSpaceNoise())
  if getattr(sys.unraisablehook, "_vitnorm_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if (out_of_space(exc) or "Event loop is closed" in str(exc) or  # orbax after a failed write
        (_OutOfSpaceNoise.seen and isinstance(exc, ImportError))):  # and at interpreter shutdown
      return
    previous(unraisable)

  hook._vitnorm_quiet = True
  sys.unraisablehook = hook


def note_out_of_space():
  _OutOfSpaceNoise.seen = True


def record_in_status(workdir: str) -> Optional[int]:
  """After a full disk: frees what the failed save left, gives committed steps whose manifest
  could not be written one, says why in status.json; returns the newest step with a manifest."""
  from vitnorm import parallel, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vitnorm import checkpoints, checkpoint_integrity as integrity  # pylint: disable=g-import-not-at-top
  note_out_of_space()
  checkpoints.discard_partial_saves(workdir)
  directory = checkpoints.checkpoint_dir(workdir)
  verified = []
  if parallel.is_main_process():
    for step in checkpoints.all_steps(workdir):
      step_dir = f"{directory}/{step}"
      try:
        if not integrity.has_manifest(step_dir):
          integrity.write_manifest(step_dir)  # orbax committed it: complete, only unrecorded
        verified.append(step)
      except OSError:
        pass
    try:
      workdir_lib.write_status(workdir, "failed", verified[-1] if verified else 0, {},
                               reason=f"no space left on the device of {workdir}",
                               last_checkpoint_step=verified[-1] if verified else None)
    except OSError:
      pass
  time.sleep(1.0)  # orbax's writer threads may still be failing: then discard what they left
  checkpoints.discard_partial_saves(workdir)
  return verified[-1] if verified else None
