"""Placing batches on the 8 CPU devices (conftest) and prefetching ahead of the consumer."""
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


def test_prefetch_places_size_batches_ahead_in_order():
  placed = []

  def place(batch):
    placed.append(batch)
    return batch * 10

  it = device.prefetch(iter(range(5)), place, size=2)
  assert next(it) == 0 and placed == [0, 1, 2]  # one consumed, two more already placed
  assert list(it) == [10, 20, 30, 40]
  assert placed == [0, 1, 2, 3, 4]
  with pytest.raises(UserError):
    next(device.prefetch(iter([]), place, size=0))
