"""`python -m vitnorm.benchmark`: the paper's inference-speed comparison, in one process.

  python -m vitnorm.benchmark --variant=S/16 --image_size=224 --batch_sizes=8,64 \
      --dtype=float32 --iterations=10 --repeats=5 --output=/tmp/benchmark.json

The command line only: flags, parsing and the exit code. The models compared and how they are
timed are in vitnorm.inference.comparison (and vitnorm.inference.throughput).
"""
import json
import os
import sys

from absl import flags

from vitnorm import cli, parallel, paths
from vitnorm.errors import ConfigError, UserError, run_cli
from vitnorm.inference.comparison import (DEFAULT_MODELS, MODELS, format_report, model_config,
                                          parse_int_list, run_benchmark)
from vitnorm.model import vit

FLAGS = flags.FLAGS

HELP = """\
The paper's inference-speed comparison in one process: LN, BN folded / unfolded, BN + FFN-BN,
RMSNorm and no-norm ViTs of one size, timed interleaved, with the dense matmul peak.

  python -m vitnorm.benchmark --variant S/16 --image_size 224 --batch_sizes 8,64 [--dtype bfloat16]
      [--models ln,bn_folded,...] [--iterations 10] [--repeats 5] [--output results.json]

Prints images/s, the ratios to LN and to no-norm, and each model's fraction of the matmul peak;
progress lines go to stderr. Exit codes: 0 done, 2 bad input (one 'error: ...' line).
"""


def define_flags():
  """Defines the command-line flags (once; only the CLI does, so importing this module is free)."""
  if "iterations" in FLAGS:
    return
  flags.DEFINE_string("variant", "S/16", "ViT size preset NAME/PATCH (Ti/16, S/16, B/16, L/16, ...).")
  flags.DEFINE_integer("image_size", 224, "Square input image side in pixels.")
  flags.DEFINE_integer("num_channels", 3, "Input image channels.")
  flags.DEFINE_integer("num_classes", 1000, "Classifier outputs.")
  flags.DEFINE_enum("classifier", "token", vit.CLASSIFIERS, "Pooling: CLS token or global average.")
  flags.DEFINE_enum("ffn_norm_position", "pre_act", vit.FFN_NORM_POSITIONS,
                    "Where the FFN BN of the bn_ffnbn models sits: before or after the GELU.")
  flags.DEFINE_integer("hidden_size", None, "Override the preset's width.")
  flags.DEFINE_integer("num_layers", None, "Override the preset's depth.")
  flags.DEFINE_integer("mlp_dim", None, "Override the preset's FFN width.")
  flags.DEFINE_integer("num_heads", None, "Override the preset's attention heads.")
  flags.DEFINE_integer("patch_size", None, "Override the preset's patch size.")
  flags.DEFINE_list("models", list(DEFAULT_MODELS), f"Models to compare, from: {', '.join(MODELS)}.")
  flags.DEFINE_list("batch_sizes", ["8"], "Global batch sizes (each a multiple of the device count).")
  flags.DEFINE_enum("dtype", "float32", list(vit.DTYPES), "Compute dtype of the models and of the matmul peak.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls per model before timing.")
  flags.DEFINE_integer("iterations", 10, "Timed calls per model per repeat.")
  flags.DEFINE_integer("repeats", 5, "Interleaved rounds (A B C ...); the spread is over these.")
  flags.DEFINE_integer("matmul_size", 0, "Side of the square matmul of the peak measurement; 0: "
                       "1024 on CPU, 8192 on accelerators.")
  flags.DEFINE_string("output", None, "Also write the results as JSON to this path.")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and statistics.")

def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help)")
  batch_sizes = parse_int_list(FLAGS.batch_sizes, "--batch_sizes")
  cfg = model_config(FLAGS.variant, FLAGS.image_size, num_classes=FLAGS.num_classes,
                     num_channels=FLAGS.num_channels, classifier=FLAGS.classifier,
                     ffn_norm_position=FLAGS.ffn_norm_position, dtype=FLAGS.dtype,
                     hidden_size=FLAGS.hidden_size, num_layers=FLAGS.num_layers, mlp_dim=FLAGS.mlp_dim,
                     num_heads=FLAGS.num_heads, patch_size=FLAGS.patch_size)
  if (FLAGS.output and not paths.is_url(FLAGS.output) and
      not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.output)))):
    raise ConfigError("--output", f"directory of {FLAGS.output} does not exist; create it first")
  report = run_benchmark(cfg, models=[m.strip() for m in FLAGS.models if m.strip()],
                         batch_sizes=batch_sizes, warmup=FLAGS.warmup, iterations=FLAGS.iterations,
                         repeats=FLAGS.repeats, matmul_size=FLAGS.matmul_size, seed=FLAGS.seed,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
  if FLAGS.output:
    paths.write_text_atomic(FLAGS.output, json.dumps(report, indent=2))  # a local path or a URL
  print(format_report(report), flush=True)


def run():
  """Console entry point `vitnorm-benchmark`."""
  cli.quiet_start()  # before anything imports TensorFlow
  parallel.use_all_cpu_cores()
  define_flags()
  run_cli(main, parse_errors=(ValueError,), log_level="warning", help_text=HELP,
          flags_module=sys.modules[define_flags.__module__])


if __name__ == "__main__":
  run()
