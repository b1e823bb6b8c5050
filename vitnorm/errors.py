"""User-facing errors: one clear line, no traceback.

Anything caused by the user's input (a config field, a flag, a missing file or dataset) raises
`UserError` (or `ConfigError`) with a message that names the field and says how to fix it.
The command-line entry points wrap their `main` with `exit_on_user_error`, which prints the
message on one line and exits with status 2, before any heavy work and without touching the
run's checkpoints.
"""
import functools
import re
import sys
from typing import NoReturn


class UserError(Exception):
  """A mistake in the user's input; str(err) is the whole, one-line message."""


class ConfigError(UserError, ValueError):
  """A bad config field. The message starts with the field name, e.g. 'model.norm: ...'."""

  def __init__(self, field, message):
    self.field = field
    super().__init__(f"{field}: {message}")


def one_line(message) -> str:
  """A message (or exception) as one readable line: a KeyError's text without its repr quotes,
  no escaped quotes or literal '\\n', no Python tuples ('(reason, value)' -> 'reason: value')."""
  if isinstance(message, KeyError) and len(message.args) == 1:
    message = message.args[0]
  elif isinstance(message, Exception) and len(message.args) > 1:
    message = ": ".join(str(a) for a in message.args)
  text = str(message).replace("\\n", " ").replace("\\'", "'")
  text = re.sub(r"\('([^']*)', '([^']*)'\)", r"\1: \2", text)
  return " ".join(text.split())


def exit_with_error(message) -> NoReturn:
  """Prints 'error: <message>' on one line to stderr and exits with status 2."""
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  sys.exit(2)


def exit_on_user_error(fn):
  """Decorator for CLI mains: a UserError becomes 'error: <message>' on stderr and exit code 2."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except UserError as e:
      exit_with_error(e)

  return wrapper


HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "--helpfull")


def run_cli(main, *, parse_errors=(), log_level="warning", help_text=None, flags_module=None):
  """absl `app.run(main)` for an entry point whose flags are already defined.

  --help prints `help_text` and the flags of `flags_module` (the entry point's own) and exits 0.
  Bad flags (absl flag errors and `parse_errors`) and UserErrors from `main` become one-line
  errors with exit code 2; absl logging is turned down to `log_level` unless --verbosity is given
  (orbax and tfds log every file they touch at INFO).
  """
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  if help_text is not None and any(a in HELP_FLAGS for a in sys.argv[1:]):
    sys.stdout.write(help_text.rstrip() + "\n")
    if flags_module is not None:
      sys.stdout.write("\nFlags:\n" + flags.FLAGS.module_help(flags_module) + "\n")
    sys.exit(0)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, *parse_errors) as e:
      exit_with_error(e)

  @exit_on_user_error
  def checked_main(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(log_level)
    main(argv)

  app.run(checked_main, flags_parser=parse)
