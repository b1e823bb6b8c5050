"""The timing harness: exact iteration counts, interleaving, sharding, FLOPs, OOM handling, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitnorm import parallel
from vitnorm.inference import throughput
from vitnorm.errors import UserError


def test_timed_loop_calls_exactly_warmup_plus_repeats_times_iterations():
  calls, blocked = [], []
  seconds = throughput.timed_loop(lambda: calls.append(1) or len(calls), iterations=7, repeats=3,
                                  warmup=2, block=blocked.append)
  assert len(calls) == 2 + 3 * 7
  assert len(seconds) == 3 and all(s > 0 for s in seconds)
  # Blocks on the last warm-up output, then on the last output of each repeat.
  assert blocked == [2, 2 + 7, 2 + 14, 2 + 21]


def test_timed_loop_measures_the_timed_calls_only():
  import time
  calls = []

  def step():  # warm-up calls are slow (0.2 s), timed calls fast (0.01 s)
    calls.append(1)
    time.sleep(0.2 if len(calls) <= 2 else 0.01)

  seconds = throughput.timed_loop(step, iterations=3, repeats=2, warmup=2, block=lambda _: None)
  assert all(0.03 <= s < 0.2 for s in seconds)  # 3 fast calls each, no warm-up call


def test_timed_loop_rejects_empty_runs():
  with pytest.raises(ValueError):
    throughput.timed_loop(lambda: None, iterations=0)


def _counting_candidate(name, log):
  """A tiny forward pass that records each execution on the device (via a host callback)."""

  def forward(variables, images):
    jax.debug.callback(lambda: log.append(name))
    return images.reshape(images.shape[0], -1) @ variables["w"]

  return throughput.Candidate(name, forward, {"w": jnp.ones((4 * 4 * 3, 5))})


def test_measure_runs_each_model_exactly_as_asked_and_interleaved():
  log = []
  mesh = parallel.data_mesh(jax.local_devices()[:1])  # one device: one callback per execution
  cands = [_counting_candidate(n, log) for n in ("A", "B", "C")]
  matmul = throughput.MatmulProgram(call=lambda: log.append("M"), flops_per_call=1e6, size=1,
                                    dtype="float32", num_devices=1)
  results = throughput.measure(cands, 4, (4, 4, 3), warmup=2, iterations=3, repeats=2, mesh=mesh,
                               matmul=matmul)
  jax.effects_barrier()
  assert log == (["A"] * 2 + ["B"] * 2 + ["C"] * 2 + ["M"] * 2 +
                 (["A"] * 3 + ["B"] * 3 + ["C"] * 3 + ["M"] * 3) * 2)
  peak = results["A"].matmul_peak_flops_per_second
  assert peak > 0 and all(r.matmul_peak_flops_per_second == peak for r in results.values())
  assert results["A"].fraction_of_matmul_peak == pytest.approx(results["A"].achieved_flops_per_second / peak)
  for name in "ABC":
    r = results[name]
    assert r.ok and r.iterations == 3 and len(r.seconds_per_repeat) == 2
    assert r.images_per_second == pytest.approx([4 * 3 / s for s in r.seconds_per_repeat])
    assert r.min_images_per_second <= r.median_images_per_second <= r.max_images_per_second
    assert r.latency_ms == pytest.approx(1000 * float(np.median(r.seconds_per_repeat)) / 3)
    assert r.num_devices == 1 and r.compile_seconds > 0


def test_measure_shards_over_all_devices_and_counts_flops_per_image():
  n = jax.local_device_count()
  assert n == 8
  seen = []

  def forward(v, x):
    jax.debug.inspect_array_sharding(x, callback=seen.append)
    return x.reshape(x.shape[0], -1) @ v

  matmul = throughput.Candidate("mm", forward, jnp.ones((12, 10)))
  results = throughput.measure([matmul], 16, (2, 2, 3), warmup=1, iterations=2, repeats=1)
  r = results["mm"]
  assert r.num_devices == 8 and r.batch_size == 16 and r.ok
  assert seen[0].num_devices == 8 and seen[0].shard_shape((16, 2, 2, 3)) == (2, 2, 2, 3)
  # A (16, 12) @ (12, 10) matmul: 2 * 12 * 10 FLOPs per image, whichever the device count.
  assert r.flops_per_image == pytest.approx(2 * 12 * 10)
  assert r.achieved_flops_per_second == pytest.approx(240 * r.median_images_per_second)


def test_batch_not_divisible_by_device_count_is_a_one_line_user_error():
  cand = throughput.Candidate("mm", lambda v, x: x, {})
  with pytest.raises(UserError, match=r"^--batch_sizes: 12 is not divisible by the 8 devices; use a multiple of 8$"):
    throughput.measure_batch_sizes([cand], [16, 12], (2, 2, 3))


def test_out_of_memory_is_reported_and_the_next_batch_size_still_runs(monkeypatch):
  real = throughput.compile_forward

  def fake_compile(forward, variables, batch_size, image_shape, mesh, **kw):
    if batch_size == 16:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB.")
    return real(forward, variables, batch_size, image_shape, mesh, **kw)

  monkeypatch.setattr(throughput, "compile_forward", fake_compile)
  cand = throughput.Candidate("mm", lambda v, x: x.reshape(x.shape[0], -1) @ v, jnp.ones((12, 3)))
  results = throughput.measure_batch_sizes([cand], [16, 8], (2, 2, 3), warmup=0, iterations=1, repeats=1)
  assert [(r.batch_size, r.status) for r in results] == [(16, "out_of_memory"), (8, "ok")]
  assert results[0].message.startswith("RESOURCE_EXHAUSTED") and not results[0].ok
  assert results[0].to_json()["images_per_second"]["median"] is None
  assert results[1].to_json()["images_per_second"]["median"] == results[1].median_images_per_second
  assert results[1].median_images_per_second > 0


def test_other_errors_are_not_swallowed(monkeypatch):
  def broken(*a, **k):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(throughput, "compile_forward", broken)
  with pytest.raises(jax.errors.JaxRuntimeError):
    throughput.measure([throughput.Candidate("x", lambda v, x: x, {})], 8, (1, 1, 1))


def test_prepared_matmul_computes_a_per_device_matmul():
  program = throughput.prepare_matmul("float32", size=16)
  out = program.call()
  assert out.shape == (8, 16, 16) and program.flops_per_call == 2 * 16 ** 3 * 8
  assert len(out.sharding.device_set) == 8


def test_matmul_peak_reports_flops_per_second_over_all_devices():
  peak = throughput.matmul_peak("float32", size=64, warmup=1, iterations=2, repeats=2)
  assert peak["num_devices"] == 8 and peak["size"] == 64 and peak["dtype"] == "float32"
  assert 0 < peak["min_flops_per_second"] <= peak["flops_per_second"] <= peak["max_flops_per_second"]
  bf16 = throughput.matmul_peak(jnp.bfloat16, size=32, warmup=0, iterations=1, repeats=1)
  assert bf16["dtype"] == "bfloat16"


def test_markdown_table_and_number_format():
  table = throughput.markdown_table(["model", "img/s"], [["ln", throughput.fmt(12.345)],
                                                         ["bn", throughput.fmt(float("nan"))]])
  assert table.splitlines() == ["| model | img/s |", "|-------|-------|", "| ln    | 12.3  |",
                                "| bn    | -     |"]
