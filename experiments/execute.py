"""Running one command of a local sweep: output appended to a log, the trainer's progress on one
terminal line, and SIGTERM passed on to the trainer (which saves a checkpoint) before the runner stops.
"""
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import List, Optional, Sequence, Set

from experiments.commands import PROJECT_ROOT


class Interrupted(Exception):
  """The sweep was stopped by SIGINT / SIGTERM; `signum` says which."""

  def __init__(self, signum):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


_children: Set[subprocess.Popen] = set()  # the commands running now (several with --jobs)


def on_sigterm(signum, frame):
  del frame
  for child in list(_children):
    if child.poll() is None:
      child.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits
  raise Interrupted(signum)


def execute(cmd: List[str], log_path: str, *, verbose: bool = False, out=None, progress: str = "",
            cpus: Optional[Sequence[int]] = None):
  """Runs `cmd` from the project root, appending its output to `log_path`.

  With `progress` (a label) and `out` a terminal, the trainer's step lines update one line there.
  With `cpus`, the command runs on those CPU cores only (its affinity; several commands side by side).

  Returns (exit code, the last 'error: ...' line it printed or else its last line). On an
  interruption, waits for the child to finish saving before re-raising.
  """
  out = out or sys.stdout
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  last_line, error_line, shown = "", "", False
  progress = progress if progress and getattr(out, "isatty", lambda: False)() else ""
  pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    child = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, errors="replace", preexec_fn=pin)
    _children.add(child)
    try:
      for line in child.stdout:
        log.write(line)
        log.flush()  # so `tail -f train.log` follows the run
        if verbose:
          out.write("    " + line)
          out.flush()
        elif progress and _PROGRESS.match(line):
          out.write(f"\r{progress}: {line.strip()}"[:_width()] + "\x1b[K")
          out.flush()
          shown = True
        if line.strip():
          last_line = line.strip()
          if last_line.startswith("error:"):
            error_line = last_line
      rc = child.wait()
    except BaseException:
      # Ctrl-C reached the child too (same process group); SIGTERM was forwarded. Let it save.
      try:
        child.wait(timeout=300)
      except subprocess.TimeoutExpired:
        child.kill()
      raise
    finally:
      _children.discard(child)
      if shown:
        out.write("\r\x1b[K")  # the next line replaces the progress line
        out.flush()
  return rc, error_line or last_line


# The trainer's plain progress lines ('step 50/6250 | loss 0.4 | ... | eta 3m10s').
_PROGRESS = re.compile(r"^step \d+/\d+ \|")


def _width() -> int:
  import shutil  # pylint: disable=import-outside-toplevel
  return max(40, shutil.get_terminal_size((100, 20)).columns - 1)


def elapsed(seconds: float) -> str:
  return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
