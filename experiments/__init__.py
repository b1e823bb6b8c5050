"""The paper's ablations as runnable sweeps (see experiments/README.md).

- `experiments.sweeps`: the named sweeps (which runs, with which config and overrides).
- `experiments.run_sweep`: `python -m experiments.run_sweep --sweep NAME --root DIR` runs a sweep,
  each training as its own `python -m vitnorm.train` process, and collects `results.json`.
- `experiments.run_files`: reads a run's files (status.json, metrics.jsonl, config.json, evaluation.json).
- `experiments.report`: `python -m experiments.report --root DIR` writes markdown tables and plots.

Nothing in `vitnorm` imports this package; it only drives the vitnorm commands and reads their files.
"""
