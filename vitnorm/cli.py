"""What the entry points share: a quiet, quick start (called before TensorFlow is imported), the exit codes.

Only entry points (vitnorm.train / evaluate / benchmark, python -m vitnorm.data, experiments.run_sweep)
call `quiet_start`; library modules never set environment variables. Exit codes of the trainer:

  0   the run completed (also: re-running a completed run, --help, --print_config)
  1   an unexpected error (a traceback: a bug, or a failure outside the input's control)
  2   bad input, or a workdir held by another run: one line 'error: <field>: <what is wrong; the
      fix>' on stderr, nothing changed
  3   training diverged (status.json says at which step; the last good checkpoint is kept)
  4   the workdir's disk is full (status.json says 'failed'; every surviving checkpoint verifies):
      free space and run the same command again
  75  preempted (SIGTERM / Ctrl-C; EX_TEMPFAIL): a checkpoint was saved, run the same command again
"""
import importlib.util
import os
import sys

EXIT_COMPLETED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_DISK_FULL = 4
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later"; schedulers may requeue on it



def exit_code(summary: dict) -> int:
  """The trainer's exit code for a train_and_evaluate summary: completed 0, preempted 75."""
  return EXIT_PREEMPTED if summary["status"] == "preempted" else EXIT_COMPLETED


# TensorFlow's C++ start-up lines ('All log messages before absl::InitializeLog()', oneDNN notices,
# CPU feature notices) are printed unless both are set. TF only runs the input pipeline here (the
# mnist5k batches came out bit-identical with oneDNN on and off); set TF_ENABLE_ONEDNN_OPTS=1 to keep it.
_QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def wants_verbose(argv=None) -> bool:
  """--verbose (or absl's --verbosity / -v) on the command line."""
  argv = sys.argv[1:] if argv is None else argv
  return any(a in ("--verbose", "--verbose=true", "-v") or a.startswith(("--verbosity", "-v="))
             for a in argv)


def quiet_start(argv=None) -> bool:
  """Silences TensorFlow's start-up output unless --verbose, and skips its import of Keras
  (skip_keras_at_tensorflow_import); returns whether verbose.

  Must run before anything imports TensorFlow; variables the user set are left as they are."""
  verbose = wants_verbose(argv)
  if not verbose:
    for key, value in _QUIET_ENV.items():
      os.environ.setdefault(key, value)
  skip_keras_at_tensorflow_import()
  return verbose


def skip_keras_at_tensorflow_import() -> bool:
  """`import tensorflow` also imports Keras 3 (and with it scikit-learn, pandas and matplotlib):
  about half of TensorFlow's import, 2-3 s of CPU in every process that reads a tfds dataset,
  though tf.data never uses Keras. TensorFlow skips that import when TF_USE_LEGACY_KERAS asks for
  tf_keras and tf_keras is not installed, so this sets TF_USE_LEGACY_KERAS=1 in exactly that case
  (unset by the user, tf_keras absent); `tf.keras` is then unavailable in this process, which
  vitnorm never uses. Returns whether it set it. Must run before anything imports TensorFlow."""
  if "TF_USE_LEGACY_KERAS" in os.environ or importlib.util.find_spec("tf_keras") is not None:
    return False
  os.environ["TF_USE_LEGACY_KERAS"] = "1"
  return True
