"""`python -m vitnorm.benchmark`: speed comparisons of the norm variants, in one process.

  --mode=inference (default)  forward passes (vitnorm.inference.comparison)
      python -m vitnorm.benchmark --variant=S/16 --image_size=224 --batch_sizes=8,64 \
          --dtype=float32 --iterations=10 --repeats=5 --output=/tmp/benchmark.json
  --mode=train                the compiled train step per norm, jit and pmap, f32 and bf16
                              (vitnorm.training.speed)
      python -m vitnorm.benchmark --mode=train --variant=S/16 --image_size=224 --batch_sizes=64 \
          --iterations=5 --repeats=5 --output=/tmp/train_speed.json
  --mode=loop                 the trainer's img/s against its bare step (vitnorm.training.loop_speed)
      python -m vitnorm.benchmark --mode=loop --config=configs/quickstart.py --loop_steps=600
  --mode=input                host images/s of the train input pipeline, DeiT recipe, per stage
                              (vitnorm.data.input_speed)
      python -m vitnorm.benchmark --mode=input --image_size=224 --batch_sizes=64 \
          --input_threads=1,all --iterations=5 --repeats=5 --output=/tmp/input_speed.json

The command line only: flags, parsing and the exit code.
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
MODES = ("inference", "train", "loop", "input")

HELP = """\
The paper's inference-speed comparison in one process: LN, BN folded / unfolded, BN + FFN-BN,
RMSNorm and no-norm ViTs of one size, timed interleaved, with the dense matmul peak.

  python -m vitnorm.benchmark --variant S/16 --image_size 224 --batch_sizes 8,64 [--dtype bfloat16]
      [--models ln,bn_folded,...] [--iterations 10] [--repeats 5] [--output results.json]

Prints images/s, the ratios to LN and to no-norm, and each model's fraction of the matmul peak;
progress lines go to stderr. Exit codes: 0 done, 2 bad input (one 'error: ...' line).

Other modes (--mode):
  --mode train  the compiled train step (forward, backward, AdamW, BN statistics) of LN, BN (synced),
                BN with ghost batches, BN + FFN-BN, RMSNorm, no norm, DyT, PRepBN, interleaved, with an
                A/A copy of the LN step; --parallelism jit,pmap --dtypes float32,bfloat16
  --mode loop   the trainer's loop against the same compiled step fed one resident batch:
                --config configs/quickstart.py [--config.FIELD=VALUE] --loop_steps 600
  --mode input  host images/s of the train input pipeline (DeiT recipe on ImageNet-sized JPEGs),
                with each stage switched off in turn and an A/A copy: --image_size 224
                --batch_sizes 64 --input_threads 1,all [--input_dataset bench] [--input_data_dir DIR]
"""


def define_flags():
  """Defines the command-line flags (once; only the CLI does, so importing this module is free)."""
  if "loop_steps" in FLAGS:  # a flag only this CLI defines (evaluate defines --iterations too)
    return
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum("mode", "inference", MODES, "inference: forward passes; train: the train step "
                    "per norm; loop: the trainer against its bare step.")
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
  flags.DEFINE_list("models", None, f"Models to compare. Inference (default {','.join(DEFAULT_MODELS)}) "
                    f"from: {', '.join(MODELS)}. Train (default: all whose norm exists): "
                    "ln, bn, bn_ghost, bn_ffnbn, rms, none, dyt, prepbn. Input: pipeline variants "
                    "(default all): deit, deit_aa, no_crop, no_flip, no_randaugment, no_erasing, "
                    "no_mix, decode_crop, deit_device, grain, grain_no_randaugment.")
  flags.DEFINE_list("batch_sizes", None, "Global batch sizes (each a multiple of the device count); "
                    "default 8 (inference), 64 (train).")
  flags.DEFINE_enum("dtype", "float32", list(vit.DTYPES), "Inference: compute dtype of the models and "
                    "of the matmul peak.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Train: compute dtypes, each its own group.")
  flags.DEFINE_list("parallelism", ["jit", "pmap"], "Train: placements of the step, each its own group.")
  flags.DEFINE_integer("bn_group_size", 8, "Train: ghost-batch size of the bn_ghost model (divides "
                       "the per-device batch).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls per model before timing.")
  flags.DEFINE_integer("iterations", None, "Timed calls per model per repeat; default 10 (inference), "
                       "5 (train).")
  flags.DEFINE_integer("repeats", 5, "Interleaved rounds (A B C ...); the spread is over these. Loop: "
                       "rounds of log_every bare steps, half before and half after the trainer run.")
  flags.DEFINE_integer("matmul_size", 0, "Side of the square matmul of the peak measurement; 0: "
                       "1024 on CPU, 8192 on accelerators.")
  flags.DEFINE_string("output", None, "Also write the results as JSON to this path.")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and statistics.")
  config_flags.DEFINE_config_file("config", None, "Loop: the training config file (with :args), e.g. "
                                  "configs/quickstart.py; override fields with --config.FIELD=VALUE.")
  flags.DEFINE_integer("loop_steps", 600, "Loop: trainer steps (at least two log intervals).")
  flags.DEFINE_list("input_threads", ["1", "all"], "Input: tf.data thread-pool sizes, each its own "
                    "group (1 = the per-core rate, all = every CPU).")
  flags.DEFINE_string("input_dataset", "bench", "Input: imagenet_like config (bench: 1,024 JPEGs at "
                      "ImageNet sizes; tiny: 48, for tests).")
  flags.DEFINE_string("input_data_dir", None, "Input: tfds data_dir to write imagenet_like into (once) "
                      "and read it from; default a temporary directory, removed afterwards.")


def _model_cfg():
  return model_config(FLAGS.variant, FLAGS.image_size, num_classes=FLAGS.num_classes,
                      num_channels=FLAGS.num_channels, classifier=FLAGS.classifier,
                      ffn_norm_position=FLAGS.ffn_norm_position, dtype=FLAGS.dtype,
                      hidden_size=FLAGS.hidden_size, num_layers=FLAGS.num_layers, mlp_dim=FLAGS.mlp_dim,
                      num_heads=FLAGS.num_heads, patch_size=FLAGS.patch_size)


def _names(values):
  return None if values is None else [v.strip() for v in values if v.strip()]


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])}; every option is a --flag (see --help)")
  if (FLAGS.output and not paths.is_url(FLAGS.output) and
      not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.output)))):
    raise ConfigError("--output", f"directory of {FLAGS.output} does not exist; create it first")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  if FLAGS.mode not in ("loop", "input"):
    parallel.use_all_cpu_cores()
  if FLAGS.mode == "input":
    from vitnorm.data import input_speed  # pylint: disable=g-import-not-at-top
    batch_sizes = parse_int_list(FLAGS.batch_sizes or ["64"], "--batch_sizes")
    if len(batch_sizes) != 1:
      raise ConfigError("--batch_sizes", f"input mode takes one batch size, got {FLAGS.batch_sizes}")
    report = input_speed.run_input_benchmark(
        image_size=FLAGS.image_size, batch_size=batch_sizes[0],
        threads=input_speed.parse_threads(FLAGS.input_threads), variants=_names(FLAGS.models),
        dataset=FLAGS.input_dataset, data_dir=FLAGS.input_data_dir, warmup=FLAGS.warmup,
        iterations=FLAGS.iterations or 5, repeats=FLAGS.repeats, seed=FLAGS.seed, log=log)
    text = input_speed.format_input_report(report)
  elif FLAGS.mode == "inference":
    batch_sizes = parse_int_list(FLAGS.batch_sizes or ["8"], "--batch_sizes")
    report = run_benchmark(_model_cfg(), models=_names(FLAGS.models) or list(DEFAULT_MODELS),
                           batch_sizes=batch_sizes, warmup=FLAGS.warmup,
                           iterations=FLAGS.iterations or 10, repeats=FLAGS.repeats,
                           matmul_size=FLAGS.matmul_size, seed=FLAGS.seed, log=log)
    text = format_report(report)
  elif FLAGS.mode == "train":
    from vitnorm.training import speed  # pylint: disable=g-import-not-at-top
    batch_sizes = parse_int_list(FLAGS.batch_sizes or ["64"], "--batch_sizes")
    report = speed.run_train_benchmark(
        _model_cfg(), models=_names(FLAGS.models) or speed.available_models(), batch_sizes=batch_sizes,
        parallelisms=_names(FLAGS.parallelism), dtypes=_names(FLAGS.dtypes),
        bn_group_size=FLAGS.bn_group_size, warmup=FLAGS.warmup, iterations=FLAGS.iterations or 5,
        repeats=FLAGS.repeats, matmul_size=FLAGS.matmul_size, seed=FLAGS.seed, log=log)
    text = speed.format_train_report(report)
  else:
    from vitnorm.training import loop_speed  # pylint: disable=g-import-not-at-top
    try:
      config = FLAGS.config
    except (OSError, ValueError) as e:
      raise ConfigError("--config", " ".join(str(e).split())[-300:]) from None
    if config is None:
      raise ConfigError("--config", "loop mode needs a training config, e.g. --config=configs/quickstart.py")
    parallel.use_all_cpu_cores(config.num_cpu_devices)  # as the trainer does
    report = loop_speed.run_loop_benchmark(config, num_steps=FLAGS.loop_steps, repeats=FLAGS.repeats,
                                           warmup=FLAGS.warmup, log=log)
    text = loop_speed.format_loop_report(report)
  if FLAGS.output:
    paths.write_text_atomic(FLAGS.output, json.dumps(report, indent=2))  # a local path or a URL
  print(text, flush=True)


def run():
  """Console entry point `vitnorm-benchmark`."""
  cli.quiet_start()  # before anything imports TensorFlow
  define_flags()
  run_cli(main, parse_errors=(ValueError,), log_level="warning", help_text=HELP,
          flags_module=sys.modules[define_flags.__module__])


if __name__ == "__main__":
  run()
