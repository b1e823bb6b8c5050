"""A full disk while training: telling it from other errors, and keeping its report to one line.

`out_of_space` is true for an exception (or one it was raised from) that says the disk or quota is
full: OSError ENOSPC / EDQUOT, or tensorstore's RESOURCE_EXHAUSTED text around them. When a
checkpoint write fails that way, orbax's and asyncio's worker threads log a traceback per failed
array and, at exit, "Event loop is closed"; `quiet_out_of_space_noise` filters exactly those
records (and that shutdown noise once a full disk was seen), so the trainer's own `error:` line is
the report.
"""
import errno
import logging
import sys


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
