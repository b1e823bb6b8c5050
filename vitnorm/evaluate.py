"""`python -m vitnorm.evaluate`: top-1, loss and inference throughput of a trained run or a config.

  python -m vitnorm.evaluate --workdir=DIR [--step=N] [--use_ema] [--batch_sizes=1,8,64]
      [--eval_batch_size=256] [--dtype=bfloat16] [--no_throughput] [--no_accuracy]
  python -m vitnorm.evaluate --config=configs/F.py[:args] [--output_dir=DIR] ...

The command line only: flags, parsing and the exit code. What is measured and how is in
vitnorm.inference.run_report.
"""
import sys

from absl import flags
from ml_collections import config_flags

from vitnorm import cli, parallel
from vitnorm.errors import UserError, run_cli
from vitnorm.inference.run_report import evaluate
from vitnorm.model import vit

FLAGS = flags.FLAGS

HELP = """\
Accuracy (folded and unfolded BN) and inference throughput of a trained run, or of a config's model
with random weights.

  python -m vitnorm.evaluate --workdir DIR [--step N] [--use_ema] [--batch_sizes 1,8,64]
      [--no_throughput] [--no_accuracy] [--dtype bfloat16] [--output_dir DIR]
  python -m vitnorm.evaluate --config configs/FILE.py[:ARGS] [--output_dir DIR] ...

Writes evaluation.json and evaluation.md to --output_dir (default: the workdir) and prints the
tables. Exit codes: 0 done, 1 the folded model disagrees with the trained one (a bug), 2 bad input
(one 'error: ...' line). --verbosity=0 keeps the start-up and INFO logging.
"""


def define_flags():
  """Defines the command-line flags (once; only the CLI does, so importing this module is free)."""
  if "no_throughput" in FLAGS:
    return
  flags.DEFINE_string("workdir", None, "Training workdir to evaluate (config.json + checkpoints/).")
  config_flags.DEFINE_config_file("config", None, "Config file (random weights) instead of --workdir.",
                                  lock_config=True)
  flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
  flags.DEFINE_bool("use_ema", False, "Evaluate the EMA of the weights saved with the checkpoint.")
  flags.DEFINE_list("batch_sizes", None, "Global batch sizes for throughput, each a multiple of the "
                    "device count (default: 1, 8 and 64 per device; 1 and 8 on CPU).")
  flags.DEFINE_enum("dtype", None, list(vit.DTYPES), "Compute dtype for evaluation and throughput "
                    "(default: the config's model.dtype); the weights stay float32.")
  flags.DEFINE_integer("eval_batch_size", None, "Global batch size of the accuracy pass (default: "
                       "config.eval_batch_size, else batch_size // accum_steps).")
  flags.DEFINE_bool("no_throughput", False, "Skip the throughput measurement.")
  flags.DEFINE_bool("no_accuracy", False, "Skip the accuracy pass over the eval split.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls per model and batch size before timing.")
  flags.DEFINE_integer("iterations", 10, "Timed calls per repeat.")
  flags.DEFINE_integer("repeats", 3, "Timed repeats (interleaved rounds); the spread is over these.")
  flags.DEFINE_string("output_dir", None, "Where evaluation.json / .md go (default: --workdir).")

def _config_flag():
  """(--config ConfigDict or None, its file name); a file that fails to load is a one-line UserError."""
  if FLAGS["config"].value is None and not FLAGS["config"].present:
    return None, None
  try:
    config = FLAGS.config
    _ = config.model  # ml_collections defers load errors to the first access
  except (OSError, ImportError, AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
    raise UserError(f"--config: {' '.join(str(e).split())}") from None
  return config, config_flags.get_config_filename(FLAGS["config"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help)")
  config, config_name = _config_flag()
  report = evaluate(workdir=FLAGS.workdir, config=config, config_name=config_name,
                    step=FLAGS.step, use_ema=FLAGS.use_ema, batch_sizes=FLAGS.batch_sizes,
                    eval_batch_size_override=FLAGS.eval_batch_size, accuracy=not FLAGS.no_accuracy,
                    measure=not FLAGS.no_throughput, warmup=FLAGS.warmup, iterations=FLAGS.iterations,
                    repeats=FLAGS.repeats, output_dir=FLAGS.output_dir, dtype=FLAGS.dtype,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True))
  print(report["markdown"], end="", flush=True)
  if report["accuracy"].get("folded_agrees") is False:
    print("error: the folded model disagrees with the model as trained (see the accuracy table); "
          "this is a bug in vitnorm.model.fold, please report it", file=sys.stderr, flush=True)
    sys.exit(1)


def run():
  """Console entry point `vitnorm-evaluate`."""
  cli.quiet_start()  # before anything imports TensorFlow
  parallel.use_all_cpu_cores()
  define_flags()
  run_cli(main, parse_errors=(ValueError, KeyError, AttributeError, TypeError, UserError),
          log_level="error", help_text=HELP, flags_module=sys.modules[define_flags.__module__])


if __name__ == "__main__":
  run()
