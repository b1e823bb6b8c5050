"""`run_sweep --launcher slurm` against a real SLURM: a one-node cluster on localhost (munged,
slurmctld and slurmd of Debian's slurm-wlm, tests/local_slurm.py), started once for this module.

- A sweep with a completed, a diverged and a failed run goes through the cluster; `report` on its
  root equals `report` on a local run of the same sweep, and `--status` shows queued, running,
  completed, diverged and failed along the way. The failed run is not retried.
- Runs preempted three ways (`scontrol requeue`; SIGTERM to the job's steps with `scancel
  --signal=TERM`; the scheduler's warning signal SIGUSR2 that submitit catches) save a checkpoint,
  are requeued, resume, and end bit-identical to a run of the same config nobody interrupted;
  `--status` shows them preempted while they wait in the queue.
- One run trained by a 2-task job (srun starts 2 processes; the trainer's jax.distributed finds
  its coordinator in SLURM's environment) follows the 1-process run of the same config.

The trainings are tiny (`numpy:digits`, a 2-block width-16 ViT); the time goes to process start-up.
Skipped, with the reason, where the SLURM and munge programs are missing or this is not root.
"""
import json
import os
import re
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from experiments import report, run_files, run_sweep, slurm, sweep_status
from experiments import sweeps as sweeps_lib
from vitnorm import checkpoints

sys.path.insert(0, os.path.dirname(__file__))
import local_slurm  # noqa: E402  pylint: disable=wrong-import-position
import xla_test_flags  # tests/xla_test_flags.py (tests/ is on sys.path: conftest.py)

pytestmark = pytest.mark.slurm

WAIT_S = 600  # a whole sweep on the 2-CPU node, start-up included
TERMINAL = ("completed", "diverged", "failed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  reason = local_slurm.unavailable()
  if reason:
    warnings.warn(reason, stacklevel=2)  # listed in pytest's warnings summary, not only in -rs
    pytest.skip(reason)
  c = local_slurm.LocalSlurm(str(tmp_path_factory.mktemp("slurm")), cpus=2)
  previous = os.environ.get("SLURM_CONF")
  try:
    c.start()
    os.environ["SLURM_CONF"] = c.conf  # sbatch / squeue / scontrol of this process find the cluster
    yield c
  finally:
    c.stop()
    if previous is None:
      os.environ.pop("SLURM_CONF", None)
    else:
      os.environ["SLURM_CONF"] = previous


def _tiny(**extra):
  # The in-memory digits: no dataset to prepare and no TensorFlow in the many trainer processes.
  fields = {"data.name": "numpy:digits", "data.image_size": 8, "model.image_size": 8,
            "model.patch_size": 4, "model.hidden_size": 16, "model.num_layers": 2, "model.mlp_dim": 32,
            "model.num_heads": 2, "batch_size": 32, "diagnostics_every": 0, **extra}
  return tuple((k, str(v)) for k, v in fields.items())


def _sweep(monkeypatch, name, runs):
  sweep = sweeps_lib.Sweep(name, "cpu", "Does the sweep run on SLURM as it runs here?",
                           runs=tuple(sweeps_lib.Run(n, "configs/quickstart.py:norm=ln,ffn_norm=none", o, note=n)
                                      for n, o in runs))
  monkeypatch.setitem(sweeps_lib.SWEEPS, name, sweep)
  return sweep


def _states(sweep, sweep_dir):
  return {r["name"]: r for r in sweep_status.sweep_states(sweep, sweep_dir)}


def _diagnostics(sweep_dir):
  """The end of every log of the sweep, for an assertion message."""
  text = []
  for folder, _, files in os.walk(sweep_dir):
    for f in files:
      if f.endswith((".log", "_log.out", "_log.err")):
        with open(os.path.join(folder, f), errors="replace") as fh:
          text.append(f"--- {os.path.join(folder, f)}\n{fh.read()[-1500:]}")
  return "\n".join(text)


def _wait(sweep, sweep_dir, until, seen=None, timeout=WAIT_S):
  """Polls the runs' states until until(states) holds; records every (run, state) in `seen`."""
  deadline = time.time() + timeout
  while True:
    states = _states(sweep, sweep_dir)
    for name, r in states.items():
      if seen is not None:
        seen.setdefault(name, [])
        if not seen[name] or seen[name][-1] != r["state"]:
          seen[name].append(r["state"])
    if until(states):
      return states
    if time.time() > deadline:
      raise AssertionError(f"timed out; states {states}\n{_diagnostics(sweep_dir)}")
    time.sleep(0.5)


def _all_ended(states):
  return all(r["state"] in TERMINAL and r["scheduler"] in slurm.ENDED for r in states.values())


def _variables(workdir):
  variables, step = checkpoints.restore_variables(workdir)
  return jax.tree.map(np.asarray, variables), step


def test_slurm_flags_are_checked_before_anything_is_submitted(tmp_path, capsys):
  """No cluster needed: bad --slurm.* values and misuse are one error line and exit 2."""
  base = ["--sweep", "norm_variants_cpu", "--root", str(tmp_path / "runs")]
  for extra, message in (
      (["--slurm.nodes", "2"], "--slurm.nodes: only used with --launcher slurm"),
      (["--launcher", "slurm", "--slurm.time", "soon"], "expected MINUTES, HH:MM:SS or D-HH:MM:SS"),
      (["--launcher", "slurm", "--slurm.tasks_per_node", "0"], "must be a positive integer"),
      (["--launcher", "slurm", "--slurm.additional_parameters", "account"], "expected KEY=VALUE"),
      (["--status"], "holds no sweep"),
  ):
    with pytest.raises(SystemExit) as e:
      run_sweep.main(base + extra)
    assert e.value.code == 2 and message in capsys.readouterr().err, extra
  assert not (tmp_path / "runs" / "norm_variants_cpu").exists()
  assert [slurm.time_minutes(t) for t in ("90", "1:30:00", "2-00:00:00", "1-12", "0:30")] == [90, 90, 2880, 2160, 1]


def test_sweep_through_slurm_reports_like_a_local_run_and_status_follows_it(cluster, tmp_path, monkeypatch,
                                                                            capsys):
  del cluster
  sweep = _sweep(monkeypatch, "slurm_e2e_cpu", [
      ("ln", _tiny()),
      ("nan", _tiny(**{"debug.inject_nan_at_step": 2})),  # diverges: a result
      ("bad", _tiny(**{"model.norm": "bogus"})),  # the trainer refuses it: failed
  ])
  monkeypatch.setenv("XLA_FLAGS", xla_test_flags.xla_flags(2))
  root = tmp_path / "cluster"
  args = ["--sweep", sweep.name, "--num_steps", "3"]
  # sbatch refuses an unknown partition: one error line, and nothing is left that needs --resume.
  with pytest.raises(SystemExit) as e:
    run_sweep.main(args + ["--root", str(root), "--launcher", "slurm", "--slurm.partition", "nosuch"])
  assert e.value.code == 2
  assert "error: --launcher slurm: the job array was not submitted:" in capsys.readouterr().err
  assert not (root / sweep.name / "sweep.json").exists() and not (root / sweep.name / slurm.RECORD).exists()
  assert run_sweep.main(args + ["--root", str(root), "--launcher", "slurm", "--slurm.cpus_per_task", "1",
                                "--slurm.time", "1:00:00"]) == 0
  out = capsys.readouterr().out
  record = json.loads((root / sweep.name / slurm.RECORD).read_text())
  jobs = record["submissions"][0]["runs"]
  assert sorted(jobs) == ["bad", "ln", "nan"] and len({j.split("_")[0] for j in jobs.values()}) == 1  # one array
  assert f"ln: job {jobs['ln']}" in out
  sweep_dir = str(root / sweep.name)
  # Three tasks on two CPUs: at least one waits in the queue at first.
  assert run_sweep.main(["--sweep", sweep.name, "--root", str(root), "--status"]) == 0
  first = capsys.readouterr().out
  assert " queued " in first and f"job {jobs['bad']}" in first, first

  # The same sweep run here, while the cluster works on it.
  local_root = tmp_path / "local"
  assert run_sweep.main(args + ["--root", str(local_root)]) == 1  # 'bad' failed
  final = _wait(sweep, sweep_dir, _all_ended)
  assert {n: r["state"] for n, r in final.items()} == {"ln": "completed", "nan": "diverged", "bad": "failed"}
  assert final["bad"]["scheduler"] == "FAILED" and "model.norm" in final["bad"]["detail"]
  # The failed run was tried once: one attempt in its log, not requeued.
  assert (root / sweep.name / "bad" / "train.log").read_text().count("# SLURM job") == 1
  assert run_sweep.main(["--sweep", sweep.name, "--root", str(root), "--status"]) == 0
  text = capsys.readouterr().out
  assert "ln   completed at step 3" in text and "nan  diverged at step 2" in text, text
  assert "bad  failed" in text and f"job {jobs['bad']} (failed)" in text, text

  # Equal but for where they are and how long the trainings took ("Machine time: N min ...").
  same = lambda text, where: re.sub(r"Machine time: \d+ min", "Machine time: N min", text.replace(where, "ROOT"))  # noqa: E731
  cluster_report = same(report.make_report(str(root)), str(root))
  local_report = same(report.make_report(str(local_root)), str(local_root))
  assert "Machine time: N min over 3 runs" in cluster_report
  assert "| ln |" in cluster_report and "diverged" in cluster_report
  assert cluster_report == local_report
  results = json.loads((root / sweep.name / "results.json").read_text())
  assert {r["name"]: r["status"] for r in results["runs"]} == {"ln": "completed", "nan": "diverged",
                                                               "bad": "failed"}


PREEMPT_STEPS = 600  # long enough that the signal lands mid-run (the first log is at step 12)


def test_preempted_runs_are_requeued_and_end_bit_identical(cluster, tmp_path, monkeypatch, capsys):
  runs = ("reference", "requeued", "sigterm", "warned")
  sweep = _sweep(monkeypatch, "slurm_preempt_cpu", [(n, _tiny()) for n in runs])
  monkeypatch.setenv("XLA_FLAGS", xla_test_flags.xla_flags(1))
  root = tmp_path / "runs"
  assert run_sweep.main(["--sweep", sweep.name, "--root", str(root), "--num_steps", str(PREEMPT_STEPS),
                         "--launcher", "slurm", "--slurm.cpus_per_task", "1", "--slurm.time", "60"]) == 0
  jobs = json.loads((root / sweep.name / slurm.RECORD).read_text())["submissions"][0]["runs"]
  sweep_dir = str(root / sweep.name)
  how = {"requeued": ["scontrol", "requeue", jobs["requeued"]],  # SLURM: SIGTERM, then requeue
         "sigterm": ["scancel", "--signal=TERM", jobs["sigterm"]],  # the steps get SIGTERM; the task requeues
         "warned": ["scancel", "--signal=USR2", jobs["warned"]]}  # submitit's time-limit / preemption signal
  seen, signalled = {}, set()

  def signal_the_running_ones(states):
    for name, command in how.items():
      if name not in signalled and states[name]["state"] == "running" and (states[name]["step"] or 0) >= 1:
        subprocess.run(command, check=True, env=dict(os.environ, SLURM_CONF=cluster.conf))
        signalled.add(name)
      if states[name]["state"] == "preempted" and states[name]["scheduler"] in slurm.ENDED:
        raise AssertionError(f"{name} was preempted and not requeued: {states[name]}\n{_diagnostics(sweep_dir)}")
    return _all_ended(states)

  final = _wait(sweep, sweep_dir, signal_the_running_ones, seen)
  capsys.readouterr()
  assert {n: r["state"] for n, r in final.items()} == {n: "completed" for n in runs}, seen
  for name in how:
    # queued -> running -> preempted (checkpoint saved, waiting in the queue) -> running -> completed
    assert "preempted" in seen[name] and seen[name][-1] == "completed", (name, seen[name])
    assert seen[name].index("running") < seen[name].index("preempted"), (name, seen[name])
    log = (root / sweep.name / name / "train.log").read_text()
    assert "received: saved a checkpoint at step" in log, (name, log[-3000:])
    assert log.count("# SLURM job") == 2, (name, log[-3000:])  # one requeue, then done
    stopped = int(log.split("received: saved a checkpoint at step ")[1].split(";")[0])
    assert 0 < stopped < PREEMPT_STEPS
  assert "preempted" not in seen["reference"]
  reference, step = _variables(os.path.join(sweep_dir, "reference"))
  assert step == PREEMPT_STEPS
  for name in how:
    resumed, step = _variables(os.path.join(sweep_dir, name))
    assert step == PREEMPT_STEPS
    jax.tree.map(np.testing.assert_array_equal, resumed, reference)
    status = json.loads((root / sweep.name / name / "status.json").read_text())
    assert status["metrics"]["eval/top1"] == json.loads(
        (root / sweep.name / "reference" / "status.json").read_text())["metrics"]["eval/top1"]


def test_two_task_job_trains_one_run_as_two_processes(cluster, tmp_path, monkeypatch):
  del cluster
  steps = 8
  sweep = _sweep(monkeypatch, "slurm_2proc_cpu", [("ln", _tiny(log_every=2, eval_every=4))])
  # 2 processes x 2 CPU devices on the cluster; 1 process x 4 devices here: the same global batch.
  monkeypatch.setenv("XLA_FLAGS", xla_test_flags.xla_flags(2))
  root = tmp_path / "cluster"
  assert run_sweep.main(["--sweep", sweep.name, "--root", str(root), "--num_steps", str(steps),
                         "--launcher", "slurm", "--slurm.tasks_per_node", "2", "--slurm.cpus_per_task", "1",
                         "--slurm.time", "60"]) == 0
  monkeypatch.setenv("XLA_FLAGS", xla_test_flags.xla_flags(4))
  local_root = tmp_path / "local"
  assert run_sweep.main(["--sweep", sweep.name, "--root", str(local_root), "--num_steps", str(steps)]) == 0
  sweep_dir = str(root / sweep.name)
  final = _wait(sweep, sweep_dir, _all_ended)
  assert final["ln"]["state"] == "completed", _diagnostics(sweep_dir)
  log = (root / sweep.name / "ln" / "train.log").read_text()
  assert "4 x cpu in 2 processes" in log and "--config.distributed.auto=True" in log, log
  assert "task 1" in (root / sweep.name / "ln" / "train.rank1.log").read_text()
  one, two = (os.path.join(str(r), sweep.name, "ln") for r in (local_root, root))
  losses = lambda wd: run_files.read_metrics(wd)["train/loss"]  # noqa: E731
  assert [s for s, _ in losses(two)] == [s for s, _ in losses(one)] == [2, 4, 6, 8]
  # tests/training/test_multiprocess_training.py's tolerances for 2 x 2 vs 1 x 4 devices.
  np.testing.assert_allclose([v for _, v in losses(two)], [v for _, v in losses(one)], rtol=1e-5)
  (a, step_a), (b, step_b) = _variables(one), _variables(two)
  assert step_a == step_b == steps
  movement = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(a["params"]))
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * movement)
