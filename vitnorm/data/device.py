"""Placing host batches on the local devices, and prefetching them ahead of the step.

  shard_for_pmap(batch)              [b, ...] -> [n_local_devices, b / n, ...] on the local devices,
                                     one slice per device, in the device order jax.pmap uses.
  to_global_arrays(batch, sharding)  this process's rows -> global jax.Arrays (jit / NamedSharding),
                                     via jax.make_array_from_process_local_data.
  prefetch(iterator, place_fn, size) keeps `size` placed batches in flight ahead of the consumer.

Device transfers in JAX are asynchronous, so placing the next batches eagerly (as
flax.jax_utils.prefetch_to_device does) overlaps the copy with the running step; the tf.data
pipeline already prepares batches in its own background threads.
"""
import collections
import itertools
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax
import numpy as np

from vitnorm.errors import UserError


def _check_divisible(batch, n, what):
  for leaf in jax.tree_util.tree_leaves(batch):
    if np.ndim(leaf) == 0 or leaf.shape[0] % n:
      shape = np.shape(leaf)
      raise UserError(f"a batch leaf of shape {shape} cannot be split over {n} {what}; make the "
                      f"per-process batch size a multiple of {n}")


def shard_for_pmap(batch, devices: Optional[Sequence[jax.Device]] = None):
  """Splits every leaf's leading axis to [n, per_device, ...] and puts slice i on device i.

  `devices` defaults to jax.local_devices() (pmap's order). The result feeds jax.pmap without
  another copy."""
  devices = list(devices) if devices is not None else jax.local_devices()
  n = len(devices)
  _check_divisible(batch, n, "local devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
  sharding = jax.NamedSharding(mesh, jax.P("devices"))

  def place(x):
    x = np.asarray(x)
    return jax.device_put(x.reshape((n, x.shape[0] // n) + x.shape[1:]), sharding)

  return jax.tree_util.tree_map(place, batch)


def to_global_arrays(batch, sharding: jax.sharding.Sharding):
  """This process's rows of a global batch -> global jax.Arrays laid out by `sharding`.

  `sharding` (e.g. NamedSharding(mesh, P('data'))) applies to every leaf; the global leading axis
  is the sum of all processes' local rows."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def prefetch(iterator: Iterable, place_fn: Callable, size: int = 2) -> Iterator:
  """Yields place_fn(batch) for each batch; while the consumer holds one, the next `size` are placed."""
  if size < 1:
    raise UserError(f"prefetch size must be >= 1, got {size}")
  iterator = iter(iterator)
  queue = collections.deque()

  def enqueue(count):
    for batch in itertools.islice(iterator, count):
      queue.append(place_fn(batch))

  enqueue(size)
  while queue:
    batch = queue.popleft()
    enqueue(1)  # while the consumer runs on `batch`, the next `size` batches are in flight
    yield batch
