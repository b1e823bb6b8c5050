"""Inference timing harness shared by `vitnorm.evaluate` and `vitnorm.benchmark`.

How a forward pass is timed (one place, so evaluate and benchmark agree):
  1. compile once with `jax.jit(f).lower(...).compile()`; the compile seconds are reported apart;
     FLOPs per image come from XLA's `cost_analysis()` of that compiled program;
  2. the images are split over all local devices (mesh axis 'data'), the variables replicated;
     a batch not divisible by the device count is a one-line UserError;
  3. `warmup` untimed calls, then `repeats` timed runs of exactly `iterations` calls each:
     `time.perf_counter()` before the first call and after `block_until_ready` on the last
     output (calls on a device run in order, so the last one finishing means all have);
  4. images/s of each repeat; median and min/max over repeats, and the median latency per batch.

`measure` times several models **interleaved**: all are compiled and warmed up, then each repeat
is one round A B C A B C ..., so slow drift of the machine (other jobs, clocks, heat) hits every
model alike and their ratios stay fair. With a single model it is a plain measurement.

A batch size that does not fit in memory (XLA RESOURCE_EXHAUSTED at compile or run time) gives a
result with status 'out_of_memory' and the harness carries on with the next one.

A dense matmul (`prepare_matmul`) can join the rounds, so the device's matmul FLOP/s is measured
under the same conditions as the models and each model's achieved FLOP/s (flops_per_image *
images/s) reads as a fraction of what the hardware does (`matmul_peak` measures it on its own).
"""
import dataclasses
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from vitnorm import parallel

Forward = Callable[[Any, jax.Array], jax.Array]  # forward(variables, images) -> logits


# ----------------------------------------------------------------------------------------------
# The timed loop
# ----------------------------------------------------------------------------------------------


def timed_loop(step: Callable[[], Any], *, iterations: int, repeats: int = 1, warmup: int = 0,
               block: Callable[[Any], Any] = jax.block_until_ready) -> List[float]:
  """Calls `step()` exactly warmup + repeats * iterations times; returns the seconds of each repeat.

  A repeat's clock starts before its first call and stops after `block` on its last output.
  """
  if iterations < 1 or repeats < 1 or warmup < 0:
    raise ValueError(f"need iterations >= 1, repeats >= 1, warmup >= 0; got {iterations}, {repeats}, "
                     f"{warmup}")
  warm_up(step, warmup, block)
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(iterations):
      out = step()
    block(out)
    seconds.append(time.perf_counter() - start)
  return seconds


def warm_up(step: Callable[[], Any], count: int, block: Callable[[Any], Any] = jax.block_until_ready):
  """Calls `step()` exactly `count` times (untimed) and waits for the last output."""
  out = None
  for _ in range(count):
    out = step()
  if count:
    block(out)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  """Timing of one model at one batch size."""

  name: str
  batch_size: int
  num_devices: int
  dtype: str
  status: str = "ok"  # 'ok' | 'out_of_memory'
  message: str = ""  # why it did not run (status != 'ok')
  compile_seconds: float = float("nan")
  flops_per_image: float = float("nan")  # XLA cost analysis, whole forward pass
  iterations: int = 0  # timed calls per repeat
  warmup: int = 0
  seconds_per_repeat: List[float] = dataclasses.field(default_factory=list)
  # Dense matmul FLOP/s (median) timed in the same interleaved rounds, if measure() was given one.
  matmul_peak_flops_per_second: float = float("nan")

  @property
  def ok(self) -> bool:
    return self.status == "ok" and bool(self.seconds_per_repeat)

  @property
  def images_per_second(self) -> List[float]:
    return [self.batch_size * self.iterations / s for s in self.seconds_per_repeat]

  @property
  def median_images_per_second(self) -> float:
    return statistics.median(self.images_per_second) if self.ok else float("nan")

  @property
  def min_images_per_second(self) -> float:
    return min(self.images_per_second) if self.ok else float("nan")

  @property
  def max_images_per_second(self) -> float:
    return max(self.images_per_second) if self.ok else float("nan")

  @property
  def latency_ms(self) -> float:
    """Median milliseconds per batch: a repeat's time over its calls (back-to-back calls, so on
    an accelerator this is the pipelined time per batch, not an isolated request's latency)."""
    if not self.ok:
      return float("nan")
    return 1000 * statistics.median(s / self.iterations for s in self.seconds_per_repeat)

  @property
  def achieved_flops_per_second(self) -> float:
    return self.flops_per_image * self.median_images_per_second

  @property
  def fraction_of_matmul_peak(self) -> float:
    return self.achieved_flops_per_second / self.matmul_peak_flops_per_second

  def to_json(self) -> dict:
    """JSON-able dict; NaN (not measured) becomes null."""
    out = dict(model=self.name, batch_size=self.batch_size, num_devices=self.num_devices,
               dtype=self.dtype, status=self.status, message=self.message,
               compile_seconds=self.compile_seconds, flops_per_image=self.flops_per_image,
               warmup=self.warmup, iterations=self.iterations, repeats=len(self.seconds_per_repeat),
               seconds_per_repeat=list(self.seconds_per_repeat),
               images_per_second=dict(median=self.median_images_per_second,
                                      min=self.min_images_per_second,
                                      max=self.max_images_per_second,
                                      per_repeat=self.images_per_second),
               latency_ms=self.latency_ms,
               achieved_flops_per_second=self.achieved_flops_per_second,
               matmul_peak_flops_per_second=self.matmul_peak_flops_per_second,
               fraction_of_matmul_peak=self.fraction_of_matmul_peak)
    return nan_to_none(out)


def nan_to_none(tree):
  if isinstance(tree, dict):
    return {k: nan_to_none(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [nan_to_none(v) for v in tree]
  if isinstance(tree, float) and not np.isfinite(tree):
    return None
  return tree


def is_out_of_memory(error: BaseException) -> bool:
  """Whether an exception is XLA running out of device memory."""
  text = str(error)
  return isinstance(error, (jax.errors.JaxRuntimeError, MemoryError)) and (
      "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or isinstance(error, MemoryError))


def _first_line(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return (lines[0] if lines else type(error).__name__)[:300]


# ----------------------------------------------------------------------------------------------
# Compiling a forward pass for one batch size
# ----------------------------------------------------------------------------------------------


def local_mesh() -> Mesh:
  """Mesh 'data' over this process's devices (throughput is measured per host)."""
  return parallel.data_mesh(jax.local_devices())


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "--batch_sizes"):
  """One-line UserError unless batch_size splits evenly over the mesh's devices."""
  parallel.check_batch_divisible(batch_size, field, num_devices=mesh.devices.size)


@dataclasses.dataclass
class Compiled:
  """A forward pass compiled for one batch size, with its inputs already on the devices."""

  call: Callable[[], jax.Array]
  compile_seconds: float
  flops_per_image: float


def compile_forward(forward: Forward, variables: Any, batch_size: int, image_shape: Sequence[int],
                    mesh: Mesh, *, seed: int = 0) -> Compiled:
  """Compiles forward(variables, images[batch_size, *image_shape]) sharded over `mesh`.

  The images are random normal float32 (the data pipeline's input type). FLOPs per image are
  the per-device cost of the sharded program times the device count over the batch size.
  """
  rep, shard = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  images = np.random.default_rng(seed).standard_normal((batch_size, *image_shape), np.float32)
  images = jax.device_put(images, shard)
  variables = jax.device_put(variables, rep)
  start = time.perf_counter()
  compiled = jax.jit(forward, in_shardings=(rep, shard), out_shardings=shard).lower(
      variables, images).compile()
  compile_seconds = time.perf_counter() - start
  flops_per_image = float("nan")
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and cost.get("flops", -1) > 0:
      flops_per_image = float(cost["flops"]) * mesh.devices.size / batch_size
  except Exception:  # pylint: disable=broad-except  # cost analysis is optional on some backends
    pass
  return Compiled(call=lambda: compiled(variables, images), compile_seconds=compile_seconds,
                  flops_per_image=flops_per_image)


def dtype_name(dtype) -> str:
  return {jnp.dtype(jnp.float32): "float32", jnp.dtype(jnp.bfloat16): "bfloat16"}.get(
      jnp.dtype(dtype), str(jnp.dtype(dtype)))


def model_forward(model) -> Forward:
  """forward(variables, images) for a vitnorm ViT in eval mode (no mutable collections)."""
  return lambda variables, images: model.apply(variables, images, train=False)


def inference_variables(variables: Mapping) -> dict:
  """Only what inference reads: params and (if present) batch_stats."""
  return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Candidate:
  """One model to time: a name, forward(variables, images), its variables and compute dtype."""

  name: str
  forward: Forward
  variables: Any
  dtype: str = "float32"


def measure(candidates: Sequence[Candidate], batch_size: int, image_shape: Sequence[int], *,
            warmup: int = 2, iterations: int = 10, repeats: int = 5, mesh: Optional[Mesh] = None,
            matmul: Optional["MatmulProgram"] = None,
            log: Callable[[str], None] = lambda _: None) -> Dict[str, Result]:
  """Times every candidate at one batch size, interleaved: repeats rounds of A B C ...

  Each candidate is compiled once and warmed up; then in every round each candidate runs
  `iterations` timed calls in turn. A candidate that runs out of memory is reported as such
  and left out of the remaining rounds. With `matmul` (see `prepare_matmul`), each round ends
  with `iterations` timed dense matmuls too, so the peak each result is compared with
  (`Result.matmul_peak_flops_per_second`) was measured under the same conditions.
  Returns {name: Result} in the candidates' order.
  """
  mesh = mesh or local_mesh()
  check_batch_size(batch_size, mesh)
  num_devices = int(mesh.devices.size)
  results, compiled = {}, {}
  for c in candidates:
    result = Result(name=c.name, batch_size=batch_size, num_devices=num_devices, dtype=c.dtype,
                    iterations=iterations, warmup=warmup)
    results[c.name] = result
    log(f"{c.name} @ batch {batch_size}: compiling and warming up ({warmup} calls) ...")
    try:
      comp = compile_forward(c.forward, c.variables, batch_size, image_shape, mesh)
      result.compile_seconds, result.flops_per_image = comp.compile_seconds, comp.flops_per_image
      warm_up(comp.call, warmup)
      compiled[c.name] = comp
      log(f"{c.name} @ batch {batch_size}: compiled in {comp.compile_seconds:.1f}s")
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      result.status, result.message = "out_of_memory", _first_line(e)
      log(f"{c.name} @ batch {batch_size}: out of memory ({result.message}); skipped")
  if matmul is not None:
    warm_up(matmul.call, warmup)
  matmul_seconds = []
  rounds_started = time.perf_counter()
  for round_index in range(repeats):
    for name in list(compiled):
      try:
        results[name].seconds_per_repeat += timed_loop(compiled[name].call, iterations=iterations)
      except Exception as e:  # pylint: disable=broad-except
        if not is_out_of_memory(e):
          raise
        results[name].status, results[name].message = "out_of_memory", _first_line(e)
        results[name].seconds_per_repeat = []
        del compiled[name]
    if matmul is not None:
      matmul_seconds += timed_loop(matmul.call, iterations=iterations)
    elapsed = time.perf_counter() - rounds_started
    per_model = ", ".join(f"{n} {results[n].seconds_per_repeat[-1] * 1e3 / iterations:.1f} ms/call"
                          for n in compiled if results[n].seconds_per_repeat)
    log(f"batch {batch_size}: round {round_index + 1}/{repeats} timed in {elapsed / (round_index + 1):.1f}s"
        f" ({per_model}); about {elapsed / (round_index + 1) * (repeats - round_index - 1):.0f}s left")
  if matmul_seconds:
    peak = statistics.median(matmul.flops_per_call * iterations / s for s in matmul_seconds)
    for result in results.values():
      result.matmul_peak_flops_per_second = peak
  return results


def measure_batch_sizes(candidates: Sequence[Candidate], batch_sizes: Sequence[int],
                        image_shape: Sequence[int], **kwargs) -> List[Result]:
  """`measure` at each batch size in turn (all sizes checked for divisibility first)."""
  mesh = kwargs.setdefault("mesh", None) or local_mesh()
  kwargs["mesh"] = mesh
  for b in batch_sizes:
    check_batch_size(b, mesh)
  out = []
  for b in batch_sizes:
    out.extend(measure(candidates, b, image_shape, **kwargs).values())
  return out


# ----------------------------------------------------------------------------------------------
# Dense matmul peak
# ----------------------------------------------------------------------------------------------


def default_matmul_size() -> int:
  """Square matrix side for the matmul peak: big enough to saturate the device, small on CPU."""
  return 1024 if jax.default_backend() == "cpu" else 8192


@dataclasses.dataclass
class MatmulProgram:
  """A compiled dense matmul on every local device, ready to call; FLOPs of one call (all devices)."""

  call: Callable[[], Any]
  flops_per_call: float
  size: int
  dtype: str
  num_devices: int


def prepare_matmul(dtype="float32", *, size: Optional[int] = None,
                   mesh: Optional[Mesh] = None) -> MatmulProgram:
  """One size x size @ size x size matmul per device (inputs sharded over 'data'), compiled."""
  mesh = mesh or local_mesh()
  size = int(size or default_matmul_size())
  n = int(mesh.devices.size)
  shard = parallel.batch_sharding(mesh)
  rng = np.random.default_rng(0)
  a = jax.device_put(rng.standard_normal((n, size, size), np.float32).astype(jnp.dtype(dtype)), shard)
  b = jax.device_put(rng.standard_normal((n, size, size), np.float32).astype(jnp.dtype(dtype)), shard)
  compiled = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), in_shardings=(shard, shard),
                     out_shardings=shard).lower(a, b).compile()
  return MatmulProgram(call=lambda: compiled(a, b), flops_per_call=2.0 * size ** 3 * n, size=size,
                       dtype=dtype_name(dtype), num_devices=n)


def matmul_peak(dtype="float32", *, size: Optional[int] = None, mesh: Optional[Mesh] = None,
                warmup: int = 2, iterations: int = 5, repeats: int = 3) -> dict:
  """Dense matmul FLOP/s of all local devices together, measured on its own.

  Returns dict(flops_per_second=median, min_flops_per_second, max_flops_per_second, size, dtype,
  num_devices). Uses the default matmul precision, as the models do. To compare models with the
  peak under the same conditions, pass `prepare_matmul(...)` to `measure` instead.
  """
  program = prepare_matmul(dtype, size=size, mesh=mesh)
  seconds = timed_loop(program.call, iterations=iterations, repeats=repeats, warmup=warmup)
  rates = [program.flops_per_call * iterations / s for s in seconds]
  return dict(flops_per_second=statistics.median(rates), min_flops_per_second=min(rates),
              max_flops_per_second=max(rates), size=program.size, dtype=program.dtype,
              num_devices=program.num_devices)


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; floats are printed as given (format them before)."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
  return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] +
                   [line(r) for r in cells[1:]])


def fmt(value: float, spec: str = ".1f", missing: str = "-") -> str:
  """Formats a number, or `missing` for None/NaN."""
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return missing
  return format(value, spec)
