"""The trainer's command line (python -m vitnorm.train, or vitnorm-train): flags, parsing, exit code.

The user-facing help is HELP below (--help prints it and exits 0); what training does is in
vitnorm.training.loop; the exit codes are in vitnorm.cli. Nothing heavy (JAX, TensorFlow) is
imported before the quiet start and the flag checks.
"""
import sys

from vitnorm import cli
from vitnorm.config_overrides import (HELP_FLAGS, apply_none, bad_value, config_file_argument, last_error_line,
                                      none_overrides, syntax_error_line, unknown_field)
from vitnorm.errors import UserError, exit_with_error, one_line

HELP = """\
Train a ViT (or resume one) into a workdir.

  python -m vitnorm.train --config configs/FILE.py[:ARGS] --workdir DIR [--config.FIELD=VALUE ...]
  python -m vitnorm.train --config ... --workdir DIR --print_config   # resolved config + header, exit 0

Config files and their :ARGS (key=value,...; each file's docstring says more):
  configs/quickstart.py  variant, norm, ffn_norm, epochs, batch, feed    (mnist5k, CPU, minutes)
  configs/cifar.py       dataset, size, variant, norm, ffn_norm, batch, epochs
  configs/deit.py        size, variant, norm, ffn_norm, ffn_norm_position, bn_group, dataset, batch, epochs
  variant= the paper's models: ln, bn, bn_ffnbn, ln_ffnbn, rms, none (dyt, prepbn, bn_qknorm where
  those norms exist); norm=X alone is X everywhere with no FFN norm; norm=X,ffn_norm=Y a custom mix.
  e.g. configs/quickstart.py:variant=ln   configs/deit.py:size=B/16,variant=bn_ffnbn

Fields: --config.FIELD=VALUE overrides any field (e.g. --config.num_steps=500,
  --config.model.bn_group_size=64); every field and its meaning: configs/common.py.
  --config.FIELD=None (or none) unsets a field whose default may be None (e.g.
  --config.optim.grad_clip_norm=None switches clipping off).

Flags:
  --config FILE[:ARGS]  the config file (required)
  --workdir DIR         checkpoints, metrics.jsonl, status.json, TensorBoard (required);
                        the same command again resumes it; a completed run is left as it is
  --config.init_from P  start from weights: a reference ViT .npz, a vitnorm workdir or one of its
                        checkpoints/STEP folders (position embeddings resized, new head if the
                        class count differs, BN statistics kept)
  --print_config        print the resolved config and the start header; touch nothing
  --verbose             keep TensorFlow / absl / tfds start-up and INFO logging
  --help                this text

Exit codes: 0 completed (or already completed), 2 bad input or a workdir in use by another run
(one 'error: ...' line, nothing changed), 3 training diverged (status.json says where), 4 the
workdir's disk is full (free space, run the same command again), 75 preempted by SIGTERM / Ctrl-C
(a checkpoint is saved: run the same command again), 1 anything unexpected (a traceback).
"""

def parse(argv):
  """(config, workdir, print_config, verbose) from the command line; UserError (one line) if bad."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv, none_fields = none_overrides(list(argv))
  # ml_collections loads FILE into sys.modules['config_config'] with load_module(), which re-runs a
  # file in the module object of the config loaded before it: a get_config() the new file lacks
  # would come from the old one. Each parse starts from a fresh module.
  sys.modules.pop("config_config", None)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "Config file FILE.py[:ARGS].", flag_values=values, lock_config=True,
      sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Run directory.", flag_values=values)
  flags.DEFINE_bool("print_config", False, "Print the resolved config and header.", flag_values=values)
  flags.DEFINE_bool("dry_run", False, "Same as --print_config.", flag_values=values)
  flags.DEFINE_bool("verbose", False, "Keep start-up and INFO logging.", flag_values=values)
  try:
    rest = values(argv)
    if len(rest) > 1:
      raise UserError(f"unexpected arguments {' '.join(rest[1:])}; use --config FILE --workdir DIR "
                      "[--config.FIELD=VALUE ...] (see --help)")
    for name in ("config", "workdir"):
      if not values[name].present and values[name].value is None:
        raise UserError(f"--{name}: missing; use --config FILE[:ARGS] --workdir DIR (see --help)")
    config = values.config
    config.get("num_cpu_devices")  # config_flags reports a file it could not load only when used
    for field in none_fields:
      apply_none(config, field)
  except UserError:
    raise
  except (AttributeError, KeyError) as e:  # an override names a field the config lacks
    if "get_config" in str(e):  # the file loaded but defines no get_config()
      raise UserError(f"--config: {config_file_argument(argv)} defines no get_config(); add `def get_config(arg=None)` "
                      "returning an ml_collections.ConfigDict (see configs/quickstart.py)") from None
    raise UserError(unknown_field(e, argv)) from None
  except SyntaxError as e:  # the config file does not parse: name the file and line
    raise UserError(syntax_error_line(e)) from None
  except (flags.Error, ValueError, TypeError, OSError, ImportError) as e:
    message = last_error_line(str(e))
    if "Traceback" in str(e) or isinstance(e, (OSError, SyntaxError, ImportError)):
      message = f"--config: {one_line(message)}"
    raise UserError(bad_value(message)) from None
  return config, values.workdir, values.print_config or values.dry_run, values.verbose


def main(argv=None) -> int:
  """Runs the trainer's command line; returns the exit code (bad input exits 2 via SystemExit)."""
  argv = list(sys.argv if argv is None else argv)
  verbose = cli.quiet_start(argv[1:])
  if any(a in HELP_FLAGS for a in argv[1:]):
    sys.stdout.write(HELP)
    return cli.EXIT_COMPLETED
  try:
    config, workdir, print_config, verbose = parse(argv)
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.set_verbosity(logging.INFO if verbose else logging.WARNING)  # orbax logs every file at INFO
    return _run(config, workdir, print_config)
  except UserError as e:
    exit_with_error(e)


def _run(config, workdir, print_config) -> int:
  from vitnorm import parallel  # pylint: disable=g-import-not-at-top  (imports JAX)
  from vitnorm.training import loop  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  parallel.use_all_cpu_cores(config.num_cpu_devices)
  parallel.maybe_initialize_distributed(
      config.distributed.coordinator_address, config.distributed.num_processes,
      config.distributed.process_id, auto=bool(config.distributed.auto))
  parallel.avoid_compilation_cache_on_cpu_devices(lambda line: print(line, file=sys.stderr, flush=True))
  if print_config:
    print(loop.describe_run(config, workdir), flush=True)
    return cli.EXIT_COMPLETED
  try:
    summary = loop.train_and_evaluate(config, workdir)
  except loop.TrainingDiverged as err:
    print(f"error: {err} (status.json in {workdir}; the last good checkpoint is kept)",
          file=sys.stderr, flush=True)
    return cli.EXIT_DIVERGED
  except loop.WorkdirFull as err:
    print(f"error: workdir: {err}", file=sys.stderr, flush=True)
    return cli.EXIT_DISK_FULL
  if parallel.is_main_process():
    print(loop.summary_text(summary), flush=True)
  return cli.exit_code(summary)


def run():
  """Console entry point (vitnorm-train)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
