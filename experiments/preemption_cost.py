r"""Cost of sharing the preemption flag every step: the train step with and without the flag.

  python -m experiments.preemption_cost [--processes 2 --devices 2] [--steps 200] [--rounds 5]

Starts `--processes` JAX processes on localhost (`--devices` CPU devices each; on a GPU/TPU host
use --processes 1 and the accelerators) and times the quickstart's jit train step as the trainer
runs it (vitnorm.training.placement: the flag rides on the step, one scalar max over all devices)
against the same step without the flag, interleaved in `--rounds` rounds of `--steps` steps, with
the metrics read back every step as the loop does. Prints the median ms/step of each and the
difference (process 0). `--steps 3 --rounds 1` is the quick correctness run.
"""
import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def _worker(args):
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", args.devices)  # CPU backend only; harmless elsewhere
  if args.processes > 1:
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes,
                               process_id=args.process_id)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  from vitnorm import parallel  # pylint: disable=import-outside-toplevel
  from vitnorm.data import device as data_device  # pylint: disable=import-outside-toplevel
  from vitnorm.model import vit  # pylint: disable=import-outside-toplevel
  from vitnorm.training import placement as placement_lib, plan as plan_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  from vitnorm.training.step import train_step  # pylint: disable=import-outside-toplevel

  c = quickstart.get_config()
  plan = plan_lib.Plan(config=plan_lib.canonical_config(c), num_steps=10_000, warmup_steps=10,
                       steps_per_epoch=62.5, eval_batch_size=c.batch_size, num_classes=10,
                       num_train_examples=4000, num_eval_examples=1000)
  mesh = parallel.data_mesh()
  with_flag = placement_lib.make_placement(plan, mesh)
  rep, shard = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  plain = jax.jit(functools.partial(
      train_step, model=vit.build_model(plan.model), schedule=state_lib.make_schedule(plan),
      accum_steps=1, ema_decay=0.0, micro_sharding=shard, diagnostics=False), donate_argnums=0,
      in_shardings=(rep, shard, rep), out_shardings=(rep, rep))
  local = c.batch_size // jax.process_count()
  rng = np.random.default_rng(jax.process_index())
  batch = data_device.to_global_arrays(dict(
      image=rng.standard_normal((local, 28, 28, 1), np.float32),
      label=np.eye(10, dtype=np.float32)[rng.integers(0, 10, local)]), shard)
  key = jax.random.PRNGKey(1)
  states = {name: with_flag.put_state(state_lib.create_train_state(plan, jax.random.PRNGKey(0)))
            for name in ("flag", "plain")}
  calls = {"flag": lambda s: with_flag.step(s, batch, key, False, stop=False),
           "plain": lambda s: plain(s, batch, key)}
  times = {name: [] for name in calls}
  for r in range(args.rounds + 1):  # round 0 compiles and warms up
    for name, call in calls.items():
      start = time.perf_counter()
      for _ in range(args.steps):
        states[name], metrics = call(states[name])
        float(parallel.host_copy(metrics["loss"]))  # the loop reads the metrics every step
      if r:
        times[name].append((time.perf_counter() - start) / args.steps)
  if jax.process_index() == 0:
    flag, base = statistics.median(times["flag"]), statistics.median(times["plain"])
    print(json.dumps(dict(processes=jax.process_count(), devices=jax.device_count(),
                          backend=jax.default_backend(), ms_per_step_with_flag=1000 * flag,
                          ms_per_step_without=1000 * base, difference_ms=1000 * (flag - base),
                          relative=(flag - base) / base)), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m experiments.preemption_cost", description=__doc__.split("\n")[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices", type=int, default=2, help="CPU devices per process (CPU only)")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--process_id", type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.process_id is not None or args.processes == 1:
    args.process_id = args.process_id or 0
    return _worker(args)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  base = [sys.executable, "-m", "experiments.preemption_cost", "--processes", str(args.processes),
          "--devices", str(args.devices), "--steps", str(args.steps), "--rounds", str(args.rounds),
          "--port", str(port)]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(base + ["--process_id", str(i)], env=env) for i in range(args.processes)]
  sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
  main()
