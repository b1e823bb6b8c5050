"""How close the training loop comes to its bare train step, measured in one process.

`run_loop_benchmark(config)` trains `config` for `num_steps` steps in a temporary workdir with the
real trainer (vitnorm.training.loop: input pipeline, prefetch, divergence monitor, logging,
checkpoints) and reads its steady-state `train/img_per_s` (the log intervals after the first,
which holds compilation; evaluation and checkpoint time are outside the intervals already). Around
it, the same compiled step (the placement's cached jit / pmap function of the same plan) is timed
in a plain loop, three times: fed one device-resident batch ("bare"), fed the real input pipeline
through the trainer's prefetch, a background thread ("bare + data"), and fed it through the same
prefetch done inline on the dispatching thread ("bare + data inline", flax's prefetch_to_device
way: the A/B of the thread), in rounds of log_every steps before and after the trainer run, so
drift hits every side. The plain loops keep at most STEPS_IN_FLIGHT steps queued, as the trainer does.

  loop / bare                  the number to watch (goal >= 0.95)
  (bare + data) / bare         how much of the gap the input pipeline alone explains (on a CPU
                               host it runs on the cores the step uses)
  (bare + data inline) / bare  the same without the prefetch thread
"""
import collections
import copy
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable

import jax
import ml_collections

from vitnorm import data, workdir as workdir_lib
from vitnorm.data import device as data_device
from vitnorm.errors import ConfigError
from vitnorm.inference import throughput
from vitnorm.training import loop
from vitnorm.training.placement import make_placement
from vitnorm.training.plan import prepare
from vitnorm.training.state import create_train_state


def _plain_loop(placement, state, next_batch: Callable, rng):
  """call() runs one step on next_batch(), carrying the state, at most STEPS_IN_FLIGHT queued."""
  holder, in_flight = [state], collections.deque()

  def call():
    holder[0], metrics = placement.step(holder[0], next_batch(), rng, False)
    in_flight.append(metrics["finite"])
    if len(in_flight) > loop.STEPS_IN_FLIGHT:
      in_flight.popleft().block_until_ready()
    return metrics["finite"]

  return call


def run_loop_benchmark(config: ml_collections.ConfigDict, *, num_steps: int = 600, repeats: int = 4,
                       warmup: int = 5, workdir: str = None, log=print) -> dict:
  """Trainer img/s vs the bare step in one process; returns a JSON-able dict."""
  if num_steps < 2 or repeats < 1 or warmup < 0:
    raise ConfigError("--loop_steps/--repeats/--warmup", "need loop_steps >= 2, repeats >= 1, warmup >= 0")
  config = copy.deepcopy(config)  # every field set here exists, so a locked config takes them
  config.num_steps = int(num_steps)
  config.progress_bar = "off"
  config.eval_every = 0  # evaluation only at the end (outside the intervals anyway)
  config.checkpoint_every = int(num_steps)  # one checkpoint, at the end
  plan = prepare(config)
  cfg = plan.config
  if num_steps < 2 * cfg.log_every:
    raise ConfigError("--loop_steps", f"{num_steps} gives fewer than two log intervals of "
                      f"{cfg.log_every} steps (the first holds compilation); use at least {2 * cfg.log_every}")
  placement = make_placement(plan)  # the trainer's (cached) compiled steps
  rng = jax.random.PRNGKey(cfg.seed + 1)
  states = [placement.put_state(create_train_state(plan, jax.random.PRNGKey(cfg.seed))) for _ in range(3)]
  host_batches = data.train_batches(cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed + 1,
                                    num_classes=plan.num_classes)
  one_batch = placement.put_batch(next(host_batches))
  fed = data_device.prefetch(host_batches, placement.put_batch, size=2)
  fed_inline = data_device.prefetch(
      data.train_batches(cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed + 2,
                         num_classes=plan.num_classes), placement.put_batch, size=2, background=False)
  bare = _plain_loop(placement, states[0], lambda: one_batch, rng)
  with_data = _plain_loop(placement, states[1], lambda: next(fed), rng)
  with_data_inline = _plain_loop(placement, states[2], lambda: next(fed_inline), rng)
  del states
  for call in (bare, with_data, with_data_inline):
    throughput.warm_up(call, warmup)
  if cfg.diagnostics_every:  # compile the diagnostics step now, not inside a timed interval
    spare = placement.put_state(create_train_state(plan, jax.random.PRNGKey(cfg.seed)))
    jax.block_until_ready(placement.step(spare, one_batch, rng, True))
    del spare
  seconds = {"bare": [], "bare_data": [], "bare_data_inline": []}

  def plain_rounds(count):
    for _ in range(count):
      seconds["bare"] += throughput.timed_loop(bare, iterations=cfg.log_every)
      seconds["bare_data"] += throughput.timed_loop(with_data, iterations=cfg.log_every)
      seconds["bare_data_inline"] += throughput.timed_loop(with_data_inline, iterations=cfg.log_every)

  first = max(1, repeats // 2)
  plain_rounds(first)
  log(f"plain loops: {first} rounds of {cfg.log_every} steps done; training {num_steps} steps")
  own_dir = workdir is None
  workdir = workdir or tempfile.mkdtemp(prefix="vitnorm_loop_speed_")
  start = time.perf_counter()
  summary = loop.train_and_evaluate(config, os.path.join(workdir, "run"))
  wall = time.perf_counter() - start
  plain_rounds(repeats - first)
  rows = workdir_lib.read_metrics(os.path.join(workdir, "run"))
  if own_dir:
    shutil.rmtree(workdir, ignore_errors=True)
  intervals = [r["train/img_per_s"] for r in rows if "train/img_per_s" in r][1:]
  images = lambda s: cfg.batch_size * cfg.log_every / s  # noqa: E731
  bare_ips = statistics.median(images(s) for s in seconds["bare"])
  data_ips = statistics.median(images(s) for s in seconds["bare_data"])
  inline_ips = statistics.median(images(s) for s in seconds["bare_data_inline"])
  fed.close()  # stops the prefetch thread
  fed_inline.close()
  loop_ips = statistics.median(intervals) if intervals else float("nan")
  report = dict(
      setup=dict(mode="loop", model=cfg.model.to_dict(), data=cfg.data.name, batch_size=cfg.batch_size,
                 num_steps=num_steps, log_every=cfg.log_every, diagnostics_every=cfg.diagnostics_every,
                 parallelism=cfg.parallelism, repeats=repeats, steps_in_flight=loop.STEPS_IN_FLIGHT,
                 backend=jax.default_backend(), device_kind=jax.local_devices()[0].device_kind,
                 num_devices=jax.device_count()),
      loop_images_per_second=dict(median=loop_ips, per_interval=intervals),
      bare_images_per_second=dict(median=bare_ips, per_round=[images(s) for s in seconds["bare"]]),
      bare_with_data_images_per_second=dict(median=data_ips,
                                            per_round=[images(s) for s in seconds["bare_data"]]),
      bare_with_data_inline_images_per_second=dict(
          median=inline_ips, per_round=[images(s) for s in seconds["bare_data_inline"]]),
      ratio_loop_to_bare=loop_ips / bare_ips, ratio_bare_with_data_to_bare=data_ips / bare_ips,
      ratio_bare_with_data_inline_to_bare=inline_ips / bare_ips,
      trainer_status=summary["status"], trainer_wall_seconds=wall,
      workdir=None if own_dir else workdir)
  return throughput.nan_to_none(report)


def format_loop_report(report: dict) -> str:
  s = report["setup"]
  f = throughput.fmt
  return "\n".join([
      f"Training loop vs bare step: {s['data']} batch {s['batch_size']}, {s['num_steps']} steps "
      f"({s['parallelism']}, {s['num_devices']} {s['backend']} device(s), log_every {s['log_every']})",
      f"  loop (trainer, steady-state train/img_per_s, median of {len(report['loop_images_per_second']['per_interval'])} "
      f"intervals): {f(report['loop_images_per_second']['median'])} img/s",
      f"  bare step (one device-resident batch, median of {s['repeats']} rounds): "
      f"{f(report['bare_images_per_second']['median'])} img/s",
      f"  bare step + input pipeline (prefetch thread): "
      f"{f(report['bare_with_data_images_per_second']['median'])} img/s",
      f"  bare step + input pipeline (prefetch inline): "
      f"{f(report['bare_with_data_inline_images_per_second']['median'])} img/s",
      f"  ratio loop / bare: {f(report['ratio_loop_to_bare'], '.3f')} (goal >= 0.95); "
      f"(bare + data) / bare: {f(report['ratio_bare_with_data_to_bare'], '.3f')}; "
      f"(bare + data inline) / bare: {f(report['ratio_bare_with_data_inline_to_bare'], '.3f')}"])
