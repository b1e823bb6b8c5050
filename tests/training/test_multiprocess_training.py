"""Two real JAX processes on localhost (2 CPU devices each) train a 2-block quickstart-family
model on the in-memory `numpy:digits` (8x8, a few steps: the test is dominated by start-up and
compilation; the processes import no TensorFlow).

2 processes x 2 devices follow the trajectory of 1 process x 4 devices (the global batch k is a
function of (seed, k) alone), with parallelism=jit and with pmap, within the float32 budget of
tests/float32_budget.py. A SIGTERM to one process
(debug.preempt_at_step on process 1 only) stops both at the same step, two steps later, with one
checkpoint and exit code EXIT_PREEMPTED; re-running both ends bit-identical to the uninterrupted
run. Each worker process runs several trainings, so JAX starts and compiles only once per launch.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from vitnorm import cli, workdir as workdir_lib
from vitnorm import checkpoints
import float32_budget  # tests/float32_budget.py (tests/ is on sys.path: conftest.py)
import xla_test_flags  # tests/xla_test_flags.py (tests/ is on sys.path: conftest.py)

pytestmark = pytest.mark.multiprocess

# The signal comes between two log steps: a flag shared only every log_every steps (the old
# behaviour) would stop at step 4, not 3.
NUM_STEPS, LOG_EVERY, PREEMPT_AT = 8, 2, 1
STOP_STEP = PREEMPT_AT + 2  # the shared flag is read one step after the step that carried it

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    spec = json.loads(sys.argv[1])
    jax.config.update("jax_num_cpu_devices", spec["devices"])
    if spec["processes"] > 1:
      jax.distributed.initialize(f"127.0.0.1:{spec['port']}", num_processes=spec["processes"],
                                 process_id=spec["process_id"])
    from configs import quickstart
    from vitnorm import cli
    from vitnorm.training import loop
    results, code = [], 0
    for run in spec["runs"]:
      config = quickstart.get_config()  # the in-memory feed; _overrides makes it the 8x8 digits
      for key, value in run["overrides"].items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
          node = node[p]
        node[leaf] = value
      summary = loop.train_and_evaluate(config, run["workdir"])
      code = cli.exit_code(summary)
      results.append({"status": summary["status"], "step": summary["step"]})
    json.dump(results, open(spec["out"], "w"))
    sys.exit(code)
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _overrides(parallelism="jit", **extra):
  return {"num_steps": NUM_STEPS, "log_every": LOG_EVERY, "eval_every": 0, "checkpoint_every": 1000,
          "diagnostics_every": 0, "progress_bar": "off", "parallelism": parallelism,
          "data.name": "numpy:digits", "data.image_size": 8, "model.image_size": 8, "model.patch_size": 4,
          "model.num_layers": 2, "model.hidden_size": 32, "model.mlp_dim": 64, "model.num_heads": 2,
          "optim.warmup_epochs": 0.05, **extra}


def _launch(tmp_path, name, processes, devices, runs_of):
  """Starts `processes` workers; runs_of(process_id) -> the runs of that worker."""
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  # The workers inherit tests/conftest.py's environment, its disabled compilation cache included.
  env = dict(os.environ, XLA_FLAGS=xla_test_flags.xla_flags())
  env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
  port = _free_port()
  procs = []
  for i in range(processes):
    spec = dict(devices=devices, processes=processes, process_id=i, port=port, runs=runs_of(i),
                out=str(tmp_path / f"{name}-{i}.json"))
    procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(spec)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=os.getcwd()))
  return procs


def _finish(procs, tmp_path, name):
  codes, outputs = [], []
  for p in procs:
    out, _ = p.communicate(timeout=400)
    codes.append(p.returncode)
    outputs.append(out.decode()[-3000:])
  results = [json.loads((tmp_path / f"{name}-{i}.json").read_text()) if code in (0, cli.EXIT_PREEMPTED)
             else None for i, code in enumerate(codes)]
  return codes, results, outputs


def _losses(workdir):
  return [(r["step"], r["train/loss"]) for r in workdir_lib.read_metrics(workdir) if "train/loss" in r]


def _variables(workdir):
  variables, step = checkpoints.restore_variables(workdir)
  return jax.tree.map(np.asarray, variables), step


def _initial_variables(workdir):
  """The run's parameters and BN statistics at step 0 (the trainer initializes them from
  fold_in(key(seed), 0))."""
  from vitnorm.training import plan as plan_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  plan = plan_lib.prepare(checkpoints.load_run_config(workdir))
  init_rng = jax.random.fold_in(jax.random.PRNGKey(plan.config.seed), 0)
  state = state_lib.create_train_state(plan, init_rng)
  return jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multiprocess")
  wd = {k: str(tmp / k) for k in ("single", "jit", "pmap", "preempted")}
  single = _launch(tmp, "single", 1, 4, lambda i: [dict(workdir=wd["single"], overrides=_overrides())])

  def first_launch(i):
    preempt = {"debug.preempt_at_step": PREEMPT_AT} if i == 1 else {}  # SIGTERM to process 1 only
    return [dict(workdir=wd["jit"], overrides=_overrides()),
            dict(workdir=wd["pmap"], overrides=_overrides("pmap")),
            dict(workdir=wd["preempted"], overrides=_overrides(**preempt))]

  first = _finish(_launch(tmp, "first", 2, 2, first_launch), tmp, "first")
  preempted_steps = checkpoints.all_steps(wd["preempted"])
  resumed = _finish(_launch(tmp, "resume", 2, 2, lambda i: [dict(workdir=wd["preempted"],
                                                                 overrides=_overrides())]),
                    tmp, "resume")
  return dict(single=_finish(single, tmp, "single"), first=first, resumed=resumed, workdirs=wd,
              preempted_steps=preempted_steps)


def test_two_processes_follow_the_single_process_trajectory_with_jit_and_pmap(runs):
  codes, results, outputs = runs["single"]
  assert codes == [0], outputs
  codes, results, outputs = runs["first"]
  assert codes == [cli.EXIT_PREEMPTED] * 2, outputs
  for r in results:
    assert [x["status"] for x in r[:2]] == ["completed", "completed"] and r[0]["step"] == NUM_STEPS
  wd = runs["workdirs"]
  single_losses = _losses(wd["single"])
  assert [s for s, _ in single_losses] == list(range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY))
  assert single_losses[-1][1] < single_losses[0][1]  # it learns
  single, _ = _variables(wd["single"])
  initial = _initial_variables(wd["single"])
  for mode in ("jit", "pmap"):
    losses = _losses(wd[mode])
    assert [s for s, _ in losses] == [s for s, _ in single_losses]
    np.testing.assert_allclose([l for _, l in losses], [l for _, l in single_losses], rtol=1e-5, err_msg=mode)
    variables, step = _variables(wd[mode])
    assert step == NUM_STEPS
    # Parameters and BN running statistics: tests/float32_budget.py (float32 reduction order,
    # amplified for near-zero gradients by Adam).
    for part in ("params", "batch_stats"):
      float32_budget.assert_same_trajectory(variables[part], single[part], initial[part],
                                            f"{mode} {part}")


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes_bit_identical(runs):
  codes, results, outputs = runs["first"]
  assert codes == [cli.EXIT_PREEMPTED] * 2, outputs
  assert [r[2] for r in results] == [{"status": "preempted", "step": STOP_STEP}] * 2
  assert runs["preempted_steps"] == [STOP_STEP]  # one checkpoint, at the step both stopped at
  codes, results, outputs = runs["resumed"]
  assert codes == [0, 0], outputs
  assert [r[0] for r in results] == [{"status": "completed", "step": NUM_STEPS}] * 2
  wd = runs["workdirs"]
  # The interval that holds the stop (steps 3-4) is averaged over step 4 alone after the resume.
  cut = lambda losses: [x for x in losses if not STOP_STEP <= x[0] < STOP_STEP + LOG_EVERY]  # noqa: E731
  assert cut(_losses(wd["preempted"])) == cut(_losses(wd["jit"]))
  assert len(cut(_losses(wd["jit"]))) == NUM_STEPS // LOG_EVERY - 1
  resumed, step = _variables(wd["preempted"])
  uninterrupted, _ = _variables(wd["jit"])
  assert step == NUM_STEPS
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
  status = workdir_lib.read_status(wd["preempted"])
  assert status["status"] == "completed"
  assert status["metrics"]["eval/top1"] == workdir_lib.read_status(wd["jit"])["metrics"]["eval/top1"]
