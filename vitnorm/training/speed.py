"""Training speed per norm: the real compiled train step, timed like inference speed.

`run_train_benchmark` builds, for one model size, the train step of every variant in TRAIN_MODELS
(forward, backward, gradient clipping, AdamW, BN statistics updates: vitnorm.training.step via
the jit or pmap placement the trainer uses) and times them with the harness of
vitnorm.inference.throughput: each step is compiled once (`lower().compile()` of the placement's
own jit / pmap function; its XLA cost analysis gives the train-step FLOPs per image), warmed up,
then timed in interleaved rounds A B C ... together with a dense matmul of the same dtype, so the
ratios to LN and to the no-norm model and the fraction of the matmul peak are free of drift. A
second, separately compiled copy of the LN step (`ln_aa`) joins the rounds: the ratio of two
identical programs is the A/A noise line. Each (parallelism, dtype) pair is one interleaved group.

The state is carried from call to call (the step donates it) and at most STEPS_IN_FLIGHT steps are
queued, as in the trainer's loop. Weights and batches are random: speed does not depend on them.
"""
import collections
import dataclasses
import statistics
import time
from typing import Callable, Dict, List, Sequence

import jax
import numpy as np

from vitnorm.errors import ConfigError
from vitnorm.inference import throughput
from vitnorm.inference.comparison import paired_ratio
from vitnorm.model import norms, vit
from vitnorm.training.loop import STEPS_IN_FLIGHT
from vitnorm.training.placement import make_placement
from vitnorm.training.plan import PARALLELISM, Plan, canonical_config
from vitnorm.training.state import create_train_state

GHOST = "ghost"  # placeholder in TRAIN_MODELS: replaced by the --bn_group_size value
# name -> model config overrides. A new norm is one line; rows whose norm the model does not know
# (yet) are left out of the defaults and refused by name (see available_models).
TRAIN_MODELS = {
    "ln": dict(norm="layer"),
    "bn": dict(norm="batch"),  # statistics over the whole global batch (synced across devices)
    "bn_ghost": dict(norm="batch", bn_group_size=GHOST),  # ghost batches: no cross-device reduction
    "bn_ffnbn": dict(norm="batch", ffn_norm="batch"),  # the paper's model: BN + a BN in each FFN
    "rms": dict(norm="rms"),
    "none": dict(norm="none"),
    "dyt": dict(norm="dyt"),  # Dynamic Tanh, when vitnorm.model.norms has it
    "prepbn": dict(norm="prepbn"),  # progressive re-parameterized BN, when vitnorm.model.norms has it
}
AA_COPY = "ln_aa"  # a second, separately compiled LN step: the A/A line
BASELINE, FLOOR = "ln", "none"


def available_models() -> List[str]:
  """TRAIN_MODELS rows whose norms vitnorm.model.norms knows."""
  return [name for name, o in TRAIN_MODELS.items()
          if all(o.get(k, "none") in norms.NORM_KINDS for k in ("norm", "ffn_norm"))]


def check_models(names: Sequence[str]) -> List[str]:
  names = [n for n in names if n]
  if not names:
    raise ConfigError("--models", "is empty; name at least one model")
  known = available_models()
  for n in names:
    if n not in known:
      why = " (its norm is not in vitnorm.model.norms yet)" if n in TRAIN_MODELS else ""
      raise ConfigError("--models", f"unknown train model {n!r}{why}; choose from {', '.join(known)}")
  return names


def train_plan(model_cfg: dict, *, batch_size: int, parallelism: str, seed: int = 0) -> Plan:
  """A Plan for timing the train step: the common defaults (AdamW, clipping) with this model."""
  from configs import common  # pylint: disable=g-import-not-at-top  # the one home of the defaults
  c = common.base_config()
  c.model.update({k: v for k, v in model_cfg.items() if k in c.model})
  c.batch_size, c.parallelism, c.seed, c.num_steps = int(batch_size), parallelism, seed, 10_000
  c.optim.warmup_steps, c.optim.grad_clip_norm = 100, 1.0
  if c.model.get("prepbn") is not None and c.model.prepbn.get("decay_steps") is None:
    c.model.prepbn.decay_steps = c.num_steps  # both branches run while lam > 0: time the training phase
  c = canonical_config(c)
  return Plan(config=c, num_steps=10_000, warmup_steps=100, steps_per_epoch=1000.0,
              eval_batch_size=int(batch_size), num_classes=int(c.model.num_classes),
              num_train_examples=1000 * int(batch_size), num_eval_examples=int(batch_size))


@dataclasses.dataclass
class TrainProgram:
  """One compiled train step with its state and a device-resident batch, ready to call."""

  call: Callable[[], jax.Array]
  compile_seconds: float
  flops_per_image: float


def compile_train_step(plan: Plan, mesh, *, seed: int = 0) -> TrainProgram:
  """The placement's train step, compiled for `plan`, fed one random device-resident batch."""
  cfg = plan.config
  placement = make_placement(plan, mesh)
  state = placement.put_state(create_train_state(plan, jax.random.PRNGKey(seed)))
  rng = np.random.default_rng(seed)
  batch = placement.put_batch(dict(
      image=rng.standard_normal(plan.model.input_shape(cfg.batch_size), np.float32),
      label=np.eye(plan.num_classes, dtype=np.float32)[rng.integers(0, plan.num_classes, cfg.batch_size)]))
  dropout_rng = jax.random.PRNGKey(seed + 1)
  start = time.perf_counter()
  compiled = placement.lower_step(state, batch, dropout_rng, False).compile()
  compile_seconds = time.perf_counter() - start
  flops = float("nan")
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops", -1) > 0:  # per-device program (jit SPMD and pmap alike)
      flops = float(cost["flops"]) * len(mesh.devices.flat) / cfg.batch_size
  except Exception:  # pylint: disable=broad-except  # cost analysis is optional on some backends
    pass
  holder, in_flight = [state], collections.deque()

  def call():
    holder[0], metrics = compiled(holder[0], batch, dropout_rng, placement.no_stop)
    in_flight.append(metrics["loss"])
    if len(in_flight) > STEPS_IN_FLIGHT:
      in_flight.popleft().block_until_ready()
    return metrics["loss"]

  return TrainProgram(call=call, compile_seconds=compile_seconds, flops_per_image=flops)


def measure_group(programs: Dict[str, Callable[[], TrainProgram]], batch_size: int, dtype: str, *,
                  warmup: int, iterations: int, repeats: int, mesh, matmul,
                  log: Callable[[str], None]) -> Dict[str, throughput.Result]:
  """Compiles each program (builder) and times them interleaved with `matmul`; OOM is a status."""
  n = len(mesh.devices.flat)
  results, ready = {}, {}
  for name, build in programs.items():
    result = throughput.Result(name=name, batch_size=batch_size, num_devices=n, dtype=dtype,
                               iterations=iterations, warmup=warmup)
    results[name] = result
    try:
      program = build()
      result.compile_seconds, result.flops_per_image = program.compile_seconds, program.flops_per_image
      throughput.warm_up(program.call, warmup)
      ready[name] = program
      log(f"{name} train step @ batch {batch_size} {dtype}: compiled in {program.compile_seconds:.1f}s")
    except Exception as e:  # pylint: disable=broad-except
      if not throughput.is_out_of_memory(e):
        raise
      result.status, result.message = "out_of_memory", str(e).strip().splitlines()[0][:300]
      log(f"{name} @ batch {batch_size}: out of memory; skipped")
  throughput.warm_up(matmul.call, warmup)
  matmul_seconds = []
  for _ in range(repeats):
    for name in list(ready):
      try:
        results[name].seconds_per_repeat += throughput.timed_loop(ready[name].call, iterations=iterations)
      except Exception as e:  # pylint: disable=broad-except
        if not throughput.is_out_of_memory(e):
          raise
        results[name].status, results[name].seconds_per_repeat = "out_of_memory", []
        del ready[name]
    matmul_seconds += throughput.timed_loop(matmul.call, iterations=iterations)
  peak = statistics.median(matmul.flops_per_call * iterations / s for s in matmul_seconds)
  for result in results.values():
    result.matmul_peak_flops_per_second = peak
  return results


def run_train_benchmark(base_cfg: dict, *, models: Sequence[str], batch_sizes=(64,),
                        parallelisms: Sequence[str] = PARALLELISM, dtypes=("float32", "bfloat16"),
                        bn_group_size: int = 8, warmup: int = 2, iterations: int = 5,
                        repeats: int = 5, matmul_size: int = 0, seed: int = 0, log=print) -> dict:
  """Times the train step of each model for every (parallelism, dtype); returns a JSON-able dict."""
  models = check_models(models)
  if iterations < 1 or repeats < 1 or warmup < 0:
    raise ConfigError("--iterations/--repeats/--warmup", "need iterations >= 1, repeats >= 1, warmup >= 0")
  for p in parallelisms:
    if p not in PARALLELISM:
      raise ConfigError("--parallelism", f"unknown value {p!r}; choose from {', '.join(PARALLELISM)}")
  for d in dtypes:
    if d not in vit.DTYPES:
      raise ConfigError("--dtypes", f"unknown dtype {d!r}; choose from {', '.join(vit.DTYPES)}")
  mesh = throughput.local_mesh()
  n = len(mesh.devices.flat)
  for b in batch_sizes:
    throughput.check_batch_size(b, mesh)
    if "bn_ghost" in models and (b // n) % bn_group_size:
      raise ConfigError("--bn_group_size", f"{bn_group_size} does not divide the per-device batch "
                        f"{b // n} (batch {b} / {n} devices); choose a divisor of {b // n}")
  names = list(models) + ([AA_COPY] if BASELINE in models else [])
  rows, peaks = [], {}
  for dtype in dtypes:
    matmul = throughput.prepare_matmul(dtype, size=matmul_size or None, mesh=mesh)
    for parallelism in parallelisms:
      for b in batch_sizes:
        builders = {}
        for name in names:
          overrides = {k: (bn_group_size if v == GHOST else v)
                       for k, v in TRAIN_MODELS[BASELINE if name == AA_COPY else name].items()}
          plan = train_plan(dict(base_cfg, dtype=dtype, **overrides), batch_size=b,
                            parallelism=parallelism, seed=seed)
          builders[name] = (lambda plan=plan: compile_train_step(plan, mesh, seed=seed))
        results = measure_group(builders, b, dtype, warmup=warmup, iterations=iterations,
                                repeats=repeats, mesh=mesh, matmul=matmul, log=log)
        peak = next(iter(results.values())).matmul_peak_flops_per_second
        peaks[f"{parallelism}/{dtype}/{b}"] = peak
        log(f"{parallelism} {dtype} batch {b}: dense matmul peak in the same rounds {peak / 1e9:.1f} GFLOP/s")
        for r in results.values():
          row = r.to_json()
          row.update(parallelism=parallelism, ratio_to_ln=paired_ratio(r, results.get(BASELINE)),
                     ratio_to_no_norm=paired_ratio(r, results.get(FLOOR)))
          rows.append(throughput.nan_to_none(row))
  return dict(
      setup=dict(mode="train", model=dict(base_cfg), models=names, batch_sizes=list(batch_sizes),
                 parallelisms=list(parallelisms), dtypes=list(dtypes), bn_group_size=bn_group_size,
                 warmup=warmup, iterations=iterations, repeats=repeats,
                 steps_in_flight=STEPS_IN_FLIGHT, backend=jax.default_backend(),
                 device_kind=jax.local_devices()[0].device_kind, num_devices=n, interleaved=True),
      matmul_peak=dict(per_group=peaks, size=matmul.size, num_devices=matmul.num_devices,
                       interleaved=True),
      results=rows)


def format_train_report(report: dict) -> str:
  """Markdown table, one row per (parallelism, dtype, batch, model), and the A/A lines."""
  s, m = report["setup"], report["setup"]["model"]
  head = (f"Train step (forward, backward, AdamW, BN statistics) of {m['variant']} @ {m['image_size']}px "
          f"on {s['num_devices']} {s['backend']} device(s) ({s['device_kind']}), interleaved over "
          f"{s['repeats']} rounds of {s['iterations']} steps (+{s['warmup']} warm-up) with a "
          f"{report['matmul_peak']['size']}^2 matmul per device; ghost BN groups of {s['bn_group_size']}")
  headers = ["placement", "dtype", "model", "batch", "img/s (median)", "min-max", "ms/step", "vs LN",
             "vs no-norm", "train GFLOP/img", "achieved GFLOP/s", "of matmul peak", "compile s"]
  rows, notes = [], []
  for r in report["results"]:
    f = lambda key, spec=".1f", scale=1.0: throughput.fmt(  # noqa: E731
        None if r.get(key) is None else r[key] * scale, spec)
    ips = r["images_per_second"]
    lead = [r["parallelism"], r["dtype"], r["model"], r["batch_size"]]
    if r["status"] != "ok":
      rows.append(lead + [r["status"].replace("_", " ")] + ["-"] * 7 + [f("compile_seconds")])
      continue
    rows.append(lead + [throughput.fmt(ips["median"]),
                        f"{throughput.fmt(ips['min'])}-{throughput.fmt(ips['max'])}", f("latency_ms", ".2f"),
                        f("ratio_to_ln", ".3f"), f("ratio_to_no_norm", ".3f"),
                        f("flops_per_image", ".3g", 1e-9), f("achieved_flops_per_second", ".1f", 1e-9),
                        f("fraction_of_matmul_peak", ".1%"), f("compile_seconds")])
    if r["model"] == AA_COPY and r.get("ratio_to_ln") is not None:
      notes.append(f"A/A ({r['parallelism']} {r['dtype']} batch {r['batch_size']}): {AA_COPY} and ln run "
                   f"identical programs; their ratio {r['ratio_to_ln']:.3f} is the noise of this measurement.")
  return head + "\n\n" + throughput.markdown_table(headers, rows) + ("\n\n" + "\n".join(notes) if notes else "")
