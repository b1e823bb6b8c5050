"""Test setup: 8 CPU devices, so pmap, sharding and BatchNorm sync really run on several devices.

This must run before JAX starts its backend, hence the environment variables at import time.
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
import xla_test_flags  # noqa: E402  pylint: disable=wrong-import-position

# 8 host devices (unless the environment names a count) and XLA:CPU's fast compilation
# (tests/xla_test_flags.py: the suite compiles far more than it runs).
_flags = os.environ.get("XLA_FLAGS", "")
_count = re.search(r"--xla_force_host_platform_device_count=(\d+)", _flags)
_DEVICES = int(_count.group(1)) if _count else 8
os.environ["XLA_FLAGS"] = xla_test_flags.xla_flags(_DEVICES, base=_flags)
# Forced, not defaulted: an accelerator image that presets JAX_PLATFORMS (e.g. "cuda") would
# otherwise run the suite on its one GPU instead of the 8 CPU devices the tests are written for.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's import without Keras (2-3 s less in this process and every child that reads a tfds
# dataset), as the entry points start it: vitnorm.cli.skip_keras_at_tensorflow_import.
from vitnorm import cli as _cli  # noqa: E402  (only os, sys and importlib: nothing starts)
_cli.skip_keras_at_tensorflow_import()
# No test may touch the network: tfds must never try GCS or a download.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")

# No persistent compilation cache, whatever the environment says. Executables that XLA:CPU loads
# back from that cache can deadlock in their collectives on several host devices: two all-reduces
# of one step wait for each other until XLA aborts the process ("Termination timeout for `all
# reduce RendezvousKey...` of 40 seconds exceeded", exit 134). Seen in about one run in five of
# tests/training/test_loop_resume_matrix.py with the cache, never in 14 runs without it (jax 0.10.2).
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
if "jax" in sys.modules:  # a plugin imported JAX before this file: the variables came too late
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)


import pytest  # noqa: E402  (after the environment above, which must come first)


@pytest.fixture(autouse=True, scope="session")
def _jax_backend_started():
  """Starts JAX's CPU backend before the first test, with the device count set above. JAX reads
  XLA_FLAGS when its backend starts: a test that sets XLA_FLAGS for the processes it launches
  (tests/test_slurm.py: 1, 2 or 4 devices) and then touches JAX would otherwise start it with its
  count when it runs first in a worker, and every later test in that worker would see that count."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == _DEVICES, (jax.devices(), os.environ["XLA_FLAGS"])


@pytest.fixture(autouse=True, scope="session")
def _keep_compiled_setups():
  """The in-process cache of built optimizers and compiled steps keeps every setup of the run
  (vitnorm.training.state.MAX_CACHED; tiny models, a few MB each), not the trainer's 16 entries:
  a test that trains a setup an earlier test trained does not compile it again."""
  from vitnorm.training import state  # pylint: disable=g-import-not-at-top
  saved, state.MAX_CACHED = state.MAX_CACHED, 256
  yield
  state.MAX_CACHED = saved


@pytest.fixture
def run_cli(monkeypatch, capsys):
  """run_cli('train' | 'evaluate' | 'benchmark', *ARGS, cwd=None) -> (exit code, stdout, stderr)
  of `python -m vitnorm.<name> ARGS`, run in this process.

  The same path as the console script (vitnorm.<name>.run: absl flags, app.run, exit codes), without
  a new interpreter or recompiling what this process compiled already. The flags the command
  defines (those of vitnorm modules) are removed again afterwards, so the next in-process command
  can define its own; flags a library defined when the command first imported it stay, as they
  would in a process.
  """
  import importlib  # pylint: disable=g-import-not-at-top
  from absl import app, flags  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  # absl.app defines its own flags (run_with_pdb, ...) when first imported: imported here, they
  # are not among the command's flags removed below (else a later command finds them gone).

  def run(name, *args, cwd=None):
    module = importlib.import_module(f"vitnorm.{name}")
    for key in (*_cli._QUIET_ENV, "TF_USE_LEGACY_KERAS"):  # the command's quiet_start sets them:
      if key in os.environ:                                # restored after the test
        monkeypatch.setenv(key, os.environ[key])
      else:
        monkeypatch.delenv(key, raising=False)
    if cwd is not None:
      monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [f"vitnorm.{name}", *args])
    if hasattr(module, "_FLAGS"):  # vitnorm.train keeps its flag holders between calls
      monkeypatch.setattr(module, "_FLAGS", None)
    defined = set(flags.FLAGS)
    capsys.readouterr()
    try:
      with pytest.raises(SystemExit) as exit_info:
        module.run()
    finally:  # the command's own flags go; a library imported meanwhile (grain, orbax) keeps its
      ours = {f.name for module, defined_there in flags.FLAGS.flags_by_module_dict().items()
              if module.split(".")[0] == "vitnorm" for f in defined_there}
      for flag in (set(flags.FLAGS) - defined) & ours:
        delattr(flags.FLAGS, flag)
    out = capsys.readouterr()
    code = exit_info.value.code
    return 0 if code is None else code, out.out, out.err  # sys.exit(None): the shell sees 0

  return run

def pytest_configure(config):
  config.addinivalue_line(
      "markers", "multiprocess: starts several JAX processes on localhost (kept small; runs in CI; "
      "select with -m multiprocess, skip with -m 'not multiprocess')")
  config.addinivalue_line(
      "markers", "slurm: submits to a one-node SLURM cluster started on localhost (tests/local_slurm.py; "
      "needs root and Debian's slurm-wlm + munge, skipped otherwise; skip with -m 'not slurm')")


# The files that take longest, longest first (totals of setup + call from the CI log's --durations).
# They start first, so that no long file is left to run alone while the other workers idle at the
# end. pytest-randomly shuffles files and tests before this hook; the stable sort below moves these
# files to the front and keeps the shuffled order within them and among the rest. xdist keeps the
# order with --no-loadscope-reorder (its default orders files by their number of tests instead).
LONGEST_FILES = (
    "tests/test_slurm.py",
    "tests/training/test_loop_resume_matrix.py",
    "tests/training/test_multiprocess_training.py",
    "tests/model/test_vit.py",
    "tests/training/test_loop_grain.py",
    "tests/test_accelerator_check.py",
    "tests/training/test_loss_scale.py",
    "tests/test_experiments.py",
    "tests/training/test_loop.py",
    "tests/test_sweep_resume.py",
    "tests/data/test_input_speed.py",
    "tests/test_train_cli.py",
    "tests/test_checkpoint_integrity.py",
    "tests/training/test_resume_other_layout.py",
    "tests/model/test_pretrained.py",
    "tests/test_bucket_workdir.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
