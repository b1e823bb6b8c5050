"""vitnorm: normalization ablations for Vision Transformers in JAX/Flax.

Packages and modules (dependencies point downwards only):
  model/       norms (the normalization choice, asked by name), vit, fold (BN folding), pretrained
  data/        tfds input pipelines and offline datasets (mnist5k, digits)
  training/    plan (config validation), state, step, placement, loop, optim, checkpoints, evaluation
  inference/   throughput (timing harness), run_report (evaluate a run), comparison (benchmark)
  workdir      a run's status.json, metrics.jsonl and TensorBoard files
  parallel, errors, cli (quiet start, exit codes), variants (the paper's variant names)
  train, evaluate, benchmark   the thin command lines (python -m vitnorm.train | evaluate | benchmark)
"""

__version__ = "0.1.0"
