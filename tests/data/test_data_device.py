"""Placing batches on the 8 CPU devices (conftest) and prefetching ahead of the consumer."""
import itertools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitnorm.data import device
from vitnorm.errors import UserError

BATCH = {"image": np.arange(16 * 2 * 3, dtype=np.float32).reshape(16, 2, 3),
         "label": np.arange(16, dtype=np.int32)}


def test_shard_for_pmap_puts_one_slice_per_device():
  assert jax.local_device_count() == 8
  sharded = device.shard_for_pmap(BATCH)
  assert sharded["image"].shape == (8, 2, 2, 3) and sharded["label"].shape == (8, 2)
  for shard in sharded["label"].addressable_shards:
    i = shard.index[0].start
    assert shard.device == jax.local_devices()[i]
    np.testing.assert_array_equal(shard.data[0], BATCH["label"][2 * i:2 * i + 2])
  sums = jax.pmap(lambda b: jax.lax.psum(b["label"].sum(), "d"), axis_name="d")(sharded)
  np.testing.assert_array_equal(sums, np.full(8, BATCH["label"].sum()))
  two = device.shard_for_pmap(BATCH, devices=jax.local_devices()[:2])
  assert two["label"].shape == (2, 8)
  with pytest.raises(UserError, match="cannot be split over 8 local devices"):
    device.shard_for_pmap({"x": np.zeros((12, 3))})


def test_to_global_arrays_for_jit():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.NamedSharding(mesh, jax.P("data"))
  arrays = device.to_global_arrays(BATCH, sharding)
  assert arrays["image"].sharding == sharding and arrays["image"].shape == (16, 2, 3)
  np.testing.assert_array_equal(np.asarray(arrays["image"]), BATCH["image"])
  assert float(jax.jit(lambda b: jnp.sum(b["label"]))(arrays)) == BATCH["label"].sum()
  assert len({s.device for s in arrays["label"].addressable_shards}) == 8


def test_prefetch_inline_places_size_batches_ahead_in_order():
  placed = []

  def place(batch):
    placed.append(batch)
    return batch * 10

  it = device.prefetch(iter(range(5)), place, size=2, background=False)
  assert next(it) == 0 and placed == [0, 1, 2]  # one consumed, two more already placed
  assert list(it) == [10, 20, 30, 40]
  assert placed == [0, 1, 2, 3, 4]
  with pytest.raises(UserError):
    next(device.prefetch(iter([]), place, size=0))


def test_prefetch_thread_makes_batches_ahead_in_order_and_stops_when_closed():
  """The background thread: batches in order, made off the consumer's thread, at most `size`
  waiting (plus the one in the making), its error raised at the batch it concerns, and closing
  the generator stops the thread before the caller closes the feed."""
  made = []

  def feed():
    for k in itertools.count():
      made.append((k, threading.current_thread().name))
      if k == 50:
        raise ValueError("bad record at batch 50")
      yield k

  it = device.prefetch(feed(), lambda b: b * 10, size=2)
  assert [next(it) for _ in range(5)] == [0, 10, 20, 30, 40]
  time.sleep(0.2)  # the thread fills the queue, then waits
  assert {name for _, name in made} == {"vitnorm-prefetch"}
  assert len(made) <= 5 + 2 + 1
  rest = []
  with pytest.raises(ValueError, match="bad record at batch 50"):
    rest.extend(it)
  assert rest == [10 * k for k in range(5, 50)]  # every batch before the bad one, in order
  it = device.prefetch(feed(), lambda b: b, size=2)
  next(it)
  it.close()
  threads = [t for t in threading.enumerate() if t.name == "vitnorm-prefetch"]
  assert not threads  # joined
  with pytest.raises(StopIteration):
    next(device.prefetch(iter([]), lambda b: b))
