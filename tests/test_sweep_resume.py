"""`python -m experiments.run_sweep --resume` of a partly done sweep, with the real trainer.

A two-run sweep (tiny ViT on the in-memory `numpy:digits`, 4 steps) is started and preempted the
way a cluster preempts a job: run `a`'s trainer is stopped at step 2 (debug.preempt_at_step: it
saves a checkpoint and exits 75) and the runner gets SIGTERM too (a thin wrapper around
`vitnorm.train` signals its parent), so run `b` never starts. `--resume` with the real trainer
then continues `a` from its step-2 checkpoint (it logs steps 3-4 only) and starts `b`. Both runs
have the same config and seed, so the resumed `a` ends bit-identical to the uninterrupted `b`.
Both sweep invocations are processes (the runner's SIGTERM handling is part of what runs).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from vitnorm import checkpoints
from vitnorm import workdir as workdir_lib
import xla_test_flags  # tests/xla_test_flags.py (tests/ is on sys.path: conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS, PREEMPT_AT = 4, 2
TINY = (("data.name", "numpy:digits"), ("data.image_size", "8"), ("model.image_size", "8"),
        ("model.patch_size", "4"), ("model.hidden_size", "16"), ("model.num_layers", "2"),
        ("model.mlp_dim", "32"), ("model.num_heads", "2"), ("batch_size", "32"), ("data.random_shift_pad", "1"),
        ("log_every", "1"), ("eval_every", "0"), ("diagnostics_every", "0"), ("checkpoint_every", "100"))

SWEEP_MAIN = textwrap.dedent(f'''
    # python sweep_main.py ARGS = python -m experiments.run_sweep --sweep resume_cpu ARGS, with the
    # test sweep registered.
    import sys
    from experiments import run_sweep, sweeps
    tiny = {TINY!r}
    sweeps.SWEEPS["resume_cpu"] = sweeps.Sweep("resume_cpu", "cpu", "Does --resume continue a sweep?", runs=(
        sweeps.Run("a", "configs/quickstart.py:norm=bn,ffn_norm=bn",
                   tiny + (("debug.preempt_at_step", "{PREEMPT_AT}"),)),
        sweeps.Run("b", "configs/quickstart.py:norm=bn,ffn_norm=bn", tiny)))
    sys.exit(run_sweep.main(["--sweep", "resume_cpu", *sys.argv[1:]]))
''')

JOB_PREEMPTING_TRAIN = textwrap.dedent('''
    # python -m job_preempting_train ARGS = python -m vitnorm.train ARGS; when the run is preempted
    # (exit 75), the whole job is: SIGTERM to the sweep runner (the parent) too.
    import os, signal
    from vitnorm import cli, train
    try:
      train.run()
    except SystemExit as e:
      if e.code == cli.EXIT_PREEMPTED:
        os.kill(os.getppid(), signal.SIGTERM)
      raise
''')


def _sweep(tmp_path, *args):
  env = dict(os.environ, XLA_FLAGS=xla_test_flags.xla_flags(2),  # starts faster than 8
             PYTHONPATH=os.pathsep.join([str(tmp_path / "mods"), REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(tmp_path / "mods" / "sweep_main.py"), "--root", str(tmp_path / "root"),
                         "--num_steps", str(NUM_STEPS), *args], env=env, cwd=REPO, capture_output=True, text=True,
                        timeout=500)
  doc = json.loads((tmp_path / "root" / "resume_cpu" / "results.json").read_text())
  return proc, {r["name"]: r for r in doc["runs"]}


def _train_steps(workdir):
  return [r["step"] for r in workdir_lib.read_metrics(workdir) if "train/loss" in r]


def test_resume_continues_the_preempted_run_from_its_checkpoint_and_starts_the_unstarted_one(tmp_path):
  mods = tmp_path / "mods"
  mods.mkdir()
  (mods / "sweep_main.py").write_text(SWEEP_MAIN)
  (mods / "job_preempting_train.py").write_text(JOB_PREEMPTING_TRAIN)
  sweep_dir = tmp_path / "root" / "resume_cpu"
  a, b = str(sweep_dir / "a"), str(sweep_dir / "b")

  proc, runs = _sweep(tmp_path, "--train_module", "job_preempting_train")
  assert proc.returncode == 143, (proc.stdout[-2000:], proc.stderr[-2000:])  # the runner was SIGTERMed
  assert "continue with the same command plus --resume" in proc.stderr
  assert (runs["a"]["status"], runs["a"]["step"]) == ("preempted", PREEMPT_AT), runs["a"]
  assert runs["b"]["status"] == "not_run" and not os.path.exists(b)
  assert checkpoints.all_steps(a) == [PREEMPT_AT]
  assert _train_steps(a) == [1, 2]

  proc, runs = _sweep(tmp_path, "--resume")  # the real trainer, vitnorm.train
  assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
  assert "[1/2] a: training (resuming)" in proc.stdout
  assert "[2/2] b: training --" in proc.stdout
  for name in ("a", "b"):
    assert (runs[name]["status"], runs[name]["step"]) == ("completed", NUM_STEPS), runs[name]
  # a continued from its step-2 checkpoint: the second attempt trained (and logged) steps 3 and 4 only.
  assert _train_steps(a) == [1, 2, 3, 4] and _train_steps(b) == [1, 2, 3, 4]
  assert checkpoints.all_steps(a) == [PREEMPT_AT, NUM_STEPS] and checkpoints.all_steps(b) == [NUM_STEPS]
  log = open(os.path.join(a, "train.log"), encoding="utf-8").read()
  assert f"{a} (resuming from step {PREEMPT_AT} of {NUM_STEPS})" in log  # the trainer's start header
  # Same config and seed: the preempted-and-resumed a is bit-identical to the uninterrupted b.
  final_a, step_a = checkpoints.restore_variables(a)
  final_b, step_b = checkpoints.restore_variables(b)
  assert step_a == step_b == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(final_a), jax.device_get(final_b))
  losses = {w: [r["train/loss"] for r in workdir_lib.read_metrics(w) if "train/loss" in r] for w in (a, b)}
  assert losses[a] == losses[b]
