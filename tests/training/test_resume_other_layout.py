"""Resuming on another layout: a run preempted as 2 processes x 2 CPU devices (parallelism=jit)
resumes as 1 process x 4 devices with parallelism=pmap, and ends where an uninterrupted 1 x 4 jit
run ends.

The global batch k is a function of (seed, k) alone (`numpy:digits`, in memory), so the layouts
see the same examples; what differs is float32 reduction order (jit vs pmap, 2 x 2 vs 1 x 4). So:
exactly equal where the math is identical (the steps logged, the losses logged before the stop,
checkpoint steps, the resume point), and within float32 budgets elsewhere (parameters and BN
statistics: tests/float32_budget.py; losses relative 1e-4). Tiny BN + FFN-BN ViT with an EMA; each
launch is one JAX start per process. SIGTERM to process 1 only (debug.preempt_at_step) stops both processes at one step with
one checkpoint.
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

from vitnorm import checkpoints, cli
from vitnorm import workdir as workdir_lib
import float32_budget  # tests/float32_budget.py (tests/ is on sys.path: conftest.py)
import xla_test_flags  # tests/xla_test_flags.py (tests/ is on sys.path: conftest.py)

pytestmark = pytest.mark.multiprocess

NUM_STEPS, LOG_EVERY, PREEMPT_AT = 8, 2, 1

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    spec = json.loads(sys.argv[1])
    jax.config.update("jax_num_cpu_devices", spec["devices"])
    if spec["processes"] > 1:
      jax.distributed.initialize(f"127.0.0.1:{spec['port']}", num_processes=spec["processes"],
                                 process_id=spec["process_id"])
    from configs import common
    from vitnorm import cli
    from vitnorm.training import loop

    def config(parallelism, preempt_at_step=None):
      c = common.base_config()
      c.parallelism = parallelism
      c.model = common.model_config(variant=None, norm="bn", ffn_norm="bn", num_classes=10, image_size=8,
                                    num_channels=1)
      c.model.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4))
      c.data = common.data_config(name="numpy:digits", image_size=8)
      c.data.update(dict(channels=1, inception_crop=False, hflip=True, random_shift_pad=1,
                         normalize_mean=(0.5,), normalize_std=(0.5,), eval_crop_fraction=1.0))
      c.batch_size, c.num_steps = 64, spec["num_steps"]
      c.optim.update(dict(base_lr=3e-3, lr_scaling_batch=None, warmup_steps=2, grad_clip_norm=1.0,
                          ema_decay=0.8))
      c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = spec["log_every"], 0, 1000, 0
      c.progress_bar = "off"
      c.debug.preempt_at_step = preempt_at_step
      return c

    results, code = [], 0
    for run in spec["runs"]:
      summary = loop.train_and_evaluate(config(run["parallelism"], run.get("preempt_at_step")), run["workdir"])
      code = cli.exit_code(summary)
      results.append({"status": summary["status"], "step": summary["step"]})
    json.dump(results, open(spec["out"], "w"))
    sys.exit(code)
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tmp_path, name, processes, devices, runs_of):
  """Runs `processes` workers to the end; runs_of(process_id) -> that worker's runs.
  Returns (exit codes, results per process, outputs)."""
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = dict(os.environ, XLA_FLAGS=xla_test_flags.xla_flags())  # no device count: the workers set theirs
  env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
  port = _free_port()
  procs = []
  for i in range(processes):
    spec = dict(devices=devices, processes=processes, process_id=i, port=port, runs=runs_of(i),
                num_steps=NUM_STEPS, log_every=LOG_EVERY, out=str(tmp_path / f"{name}-{i}.json"))
    procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(spec)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=os.getcwd()))
  codes, outputs = [], []
  for p in procs:
    out, _ = p.communicate(timeout=400)
    codes.append(p.returncode)
    outputs.append(out.decode())
  results = [json.loads((tmp_path / f"{name}-{i}.json").read_text()) if code in (0, cli.EXIT_PREEMPTED)
             else None for i, code in enumerate(codes)]
  return codes, results, outputs


def _state(workdir):
  """The last checkpoint's full train state (params, BN statistics, EMA, optimizer) as numpy."""
  variables, step = checkpoints.restore_variables(workdir)
  ema, _ = checkpoints.restore_variables(workdir, step, use_ema=True)
  return jax.tree.map(np.asarray, {"live": variables, "ema": ema}), step


def _initial_variables(workdir):
  """The run's parameters and BN statistics at step 0 (the trainer initializes them from
  fold_in(key(seed), 0))."""
  from vitnorm.training import plan as plan_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  plan = plan_lib.prepare(checkpoints.load_run_config(workdir))
  init_rng = jax.random.fold_in(jax.random.PRNGKey(plan.config.seed), 0)
  state = state_lib.create_train_state(plan, init_rng)
  return jax.tree.map(np.asarray, {"params": state.params, "batch_stats": state.batch_stats})


def _rows(workdir, key):
  return [(r["step"], r[key]) for r in workdir_lib.read_metrics(workdir) if key in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("layout")
  wd = {k: str(tmp / k) for k in ("resumed", "whole")}
  preempt = lambda i: {"preempt_at_step": PREEMPT_AT} if i == 1 else {}  # noqa: E731  (SIGTERM to process 1)
  first = _launch(tmp, "first", 2, 2, lambda i: [dict(workdir=wd["resumed"], parallelism="jit", **preempt(i))])
  first_steps = checkpoints.all_steps(wd["resumed"])
  first_rows = _rows(wd["resumed"], "train/loss")
  second = _launch(tmp, "second", 1, 4, lambda i: [dict(workdir=wd["resumed"], parallelism="pmap"),
                                                     dict(workdir=wd["whole"], parallelism="jit")])
  return dict(first=first, second=second, first_steps=first_steps, first_rows=first_rows, workdirs=wd)


def test_preempted_as_2x2_jit_resumes_as_1x4_pmap_and_ends_as_the_uninterrupted_run(runs):
  codes, results, outputs = runs["first"]
  assert codes == [cli.EXIT_PREEMPTED] * 2, [o[-3000:] for o in outputs]
  stop = results[0][0]["step"]
  assert results == [[{"status": "preempted", "step": stop}]] * 2 and 0 < stop < NUM_STEPS
  assert runs["first_steps"] == [stop]  # one checkpoint, where both processes stopped

  codes, results, outputs = runs["second"]
  assert codes == [0], [o[-3000:] for o in outputs]
  assert results == [[{"status": "completed", "step": NUM_STEPS}] * 2]
  # The second layout restored the first layout's checkpoint: it resumed, it did not start over.
  assert f"{runs['workdirs']['resumed']} (resuming from step {stop} of {NUM_STEPS})" in outputs[0]

  wd = runs["workdirs"]
  resumed, step = _state(wd["resumed"])
  whole, _ = _state(wd["whole"])
  assert step == NUM_STEPS and checkpoints.all_steps(wd["resumed"]) == [stop, NUM_STEPS]
  assert jax.tree.structure(resumed) == jax.tree.structure(whole)

  # The logged steps are the same; the rows before the stop are the first layout's, kept as logged.
  losses, reference = _rows(wd["resumed"], "train/loss"), _rows(wd["whole"], "train/loss")
  cut = lambda rows: [r for r in rows if not stop <= r[0] < stop + LOG_EVERY]  # noqa: E731  (the split interval)
  logged = [s for s, _ in cut([(s, None) for s in range(LOG_EVERY, NUM_STEPS + 1, LOG_EVERY)])]
  assert [s for s, _ in cut(losses)] == [s for s, _ in cut(reference)] == logged and len(logged) >= 2
  assert [r for r in losses if r[0] < stop] == [r for r in runs["first_rows"] if r[0] < stop]
  np.testing.assert_allclose([l for _, l in cut(losses)], [l for _, l in cut(reference)], rtol=1e-4)

  # Parameters and BN running statistics, live and EMA: tests/float32_budget.py (the L2 norm of the
  # difference relative to how far the uninterrupted run moved them from their initial values).
  initial = _initial_variables(wd["whole"])
  for kind in ("live", "ema"):
    for part in ("params", "batch_stats"):
      float32_budget.assert_same_trajectory(resumed[kind][part], whole[kind][part],
                                            initial[part], f"{kind} {part}")
