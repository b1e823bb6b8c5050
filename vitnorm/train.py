r"""The trainer's command line: python -m vitnorm.train --config configs/<file>.py[:args] --workdir DIR.

Flags, parsing, one call to vitnorm.training.loop.train_and_evaluate, the exit code:
0 completed or preempted (checkpoint saved, re-run to resume), 2 bad input or a workdir held by
another run (one line 'error: ...'), 3 training diverged (status.json says where), 4 the workdir's
disk is full (status.json says 'failed'; free space and re-run to resume).
"""
import re
import sys

from vitnorm import parallel
from vitnorm.errors import UserError, exit_on_user_error
from vitnorm.training.loop import TrainingDiverged, WorkdirFull, summary_text, train_and_evaluate


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file(
      "config", None, "Config file, optionally with :args, e.g. configs/deit.py:variant=S/16,norm=bn. "
      "Override fields with --config.FIELD=VALUE.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics); re-use it to resume.")
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir


_FLAGS = None


@exit_on_user_error
def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}; use --config FILE --workdir DIR "
                    "[--config.FIELD=VALUE ...]")
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it touches at INFO
    logging.set_verbosity(logging.WARNING)
  workdir = _FLAGS[1].value
  try:  # config_flags reports a config file it could not load only when the config is used
    config = _FLAGS[0].value
    config.get("num_cpu_devices")
  except SyntaxError as e:
    raise UserError(_syntax_error_line(e)) from None
  except (OSError, ValueError) as e:
    raise UserError(f"--config: {_last_error_line(str(e))}") from None
  parallel.use_all_cpu_cores(config.num_cpu_devices)
  parallel.maybe_initialize_distributed(
      config.distributed.coordinator_address, config.distributed.num_processes,
      config.distributed.process_id, auto=bool(config.distributed.auto))
  try:
    summary = train_and_evaluate(config, workdir)
  except TrainingDiverged as err:
    print(f"error: {err} (status.json in {workdir}; the last good checkpoint is kept)",
          file=sys.stderr, flush=True)
    sys.exit(3)
  except WorkdirFull as err:
    print(f"error: workdir: {err}", file=sys.stderr, flush=True)
    sys.exit(4)
  if parallel.is_main_process():
    print(summary_text(summary), flush=True)


def _syntax_error_line(e: SyntaxError) -> str:
  return (f"--config: {e.filename} line {e.lineno}: {e.msg}; fix the syntax error in the config "
          "file (python -m py_compile FILE shows it)")


def _last_error_line(message: str) -> str:
  """The useful line of a config_flags error (which may embed a whole traceback)."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  if "Traceback (most recent call last)" in message and lines:
    last = lines[-1]
    return last.split(": ", 1)[1] if re.match(r"^\w+(Error|Exception): ", last) else last
  if any("No such file" in l for l in lines):  # config file missing: say which and why
    return next(l for l in lines if "No such file" in l)
  return " ".join(message.split())


def _parse_flags(argv):
  """absl flag parsing with one-line errors (unknown --config.field, bad config file args)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except SyntaxError as e:  # the config file does not parse
    print(f"error: {_syntax_error_line(e)}", file=sys.stderr, flush=True)
    sys.exit(2)
  except (flags.Error, ValueError, KeyError, AttributeError, TypeError, OSError, UserError) as e:
    message = _last_error_line(str(e))
    if isinstance(e, (AttributeError, KeyError)):  # an override names a field the config lacks
      key = message.strip("\"'")
      override = next((a for a in argv[1:] if a.startswith("--config.") and
                       re.search(rf"[.]{re.escape(key)}$", a.split("=")[0])), None)
      field = override.split("=")[0][2:] if override else key
      message = (f"{field}: no such config field; fix the name (fields and their comments: "
                 "configs/common.py)")
    elif "Traceback" in str(e):
      message = f"--config: {message}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def run():
  """Console entry point (vitnorm-train)."""
  global _FLAGS
  from absl import app  # pylint: disable=g-import-not-at-top
  if _FLAGS is None:
    _FLAGS = _define_flags()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
