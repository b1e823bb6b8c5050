"""User-facing errors: one clear line, no traceback.

Anything caused by the user's input (a config field, a flag, a missing file or dataset) raises
`UserError` (or `ConfigError`) with a message that names the field and says how to fix it.
The command-line entry points wrap their `main` with `exit_on_user_error`, which prints the
message on one line and exits with status 2, before any heavy work and without touching the
run's checkpoints.
"""
import functools
import sys


class UserError(Exception):
  """A mistake in the user's input; str(err) is the whole, one-line message."""


class ConfigError(UserError, ValueError):
  """A bad config field. The message starts with the field name, e.g. 'model.norm: ...'."""

  def __init__(self, field, message):
    self.field = field
    super().__init__(f"{field}: {message}")


def exit_on_user_error(fn):
  """Decorator for CLI mains: a UserError becomes 'error: <message>' on stderr and exit code 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
      sys.exit(2)

  return wrapper
