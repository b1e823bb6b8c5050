"""The paper's ablations as runnable sweeps (see experiments/README.md).

- `experiments.sweeps`: the named sweeps (which runs, with which config and overrides).
- `experiments.run_sweep`: `python -m experiments.run_sweep --sweep NAME --root DIR` runs a sweep,
  each training as its own `python -m vitnorm.train` process, and collects `results.json`
  (`sweep_dir`: the sweep folder and results.json; `execute`: one local command; `sweep_status`:
  `--status`).
- `experiments.slurm`: `run_sweep --launcher slurm` submits a sweep as one SLURM job array through
  submitit; `experiments.slurm_task` is what each array task runs (requeue on preemption).
- `experiments.run_files`: reads a run's files (status.json, metrics.jsonl, config.json, evaluation.json).
- `experiments.report`: `python -m experiments.report --root DIR` writes markdown tables and plots.

Nothing in `vitnorm` imports this package; it only drives the vitnorm commands and reads their files.
"""
