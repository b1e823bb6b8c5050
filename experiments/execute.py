"""Running one command of a local sweep: output appended to a log, the trainer's progress on one
terminal line, and SIGTERM passed on to the trainer (which saves a checkpoint) before the runner stops.
"""
import os
import re
import shlex
import signal
import subprocess
import sys
from typing import List, Optional

from experiments.commands import PROJECT_ROOT


class Interrupted(Exception):
  """The sweep was stopped by SIGINT / SIGTERM; `signum` says which."""

  def __init__(self, signum):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


_child: Optional[subprocess.Popen] = None


def on_sigterm(signum, frame):
  del frame
  if _child is not None and _child.poll() is None:
    _child.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits
  raise Interrupted(signum)


def execute(cmd: List[str], log_path: str, *, verbose: bool = False, out=None, progress: str = ""):
  """Runs `cmd` from the project root, appending its output to `log_path`.

  With `progress` (a label) and `out` a terminal, the trainer's step lines update one line there.

  Returns (exit code, the last 'error: ...' line it printed or else its last line). On an
  interruption, waits for the child to finish saving before re-raising.
  """
  out = out or sys.stdout
  global _child
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  last_line, error_line, shown = "", "", False
  progress = progress if progress and getattr(out, "isatty", lambda: False)() else ""
  with open(log_path, "a", encoding="utf-8") as log:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    _child = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace")
    try:
      for line in _child.stdout:
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
      rc = _child.wait()
    except BaseException:
      # Ctrl-C reached the child too (same process group); SIGTERM was forwarded. Let it save.
      try:
        _child.wait(timeout=300)
      except subprocess.TimeoutExpired:
        _child.kill()
      raise
    finally:
      _child = None
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
