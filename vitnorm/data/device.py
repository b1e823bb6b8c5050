"""Placing host batches on the local devices, and prefetching them ahead of the step.

  shard_for_pmap(batch)              [b, ...] -> [n_local_devices, b / n, ...] on the local devices,
                                     one slice per device, in the device order jax.pmap uses.
  to_global_arrays(batch, sharding)  this process's rows -> global jax.Arrays (jit / NamedSharding),
                                     via jax.make_array_from_process_local_data.
  prefetch(iterator, place_fn, size) keeps `size` placed batches in flight ahead of the consumer,
                                     made and placed by a background thread.

Device transfers in JAX are asynchronous, so placing the next batches eagerly (as
flax.jax_utils.prefetch_to_device does) overlaps the copy with the running step. A background
thread also takes the host's own per-batch work (the NumPy feed's indexing, shifts and
normalization; pulling from tf.data or Grain; the placement call) off the thread that dispatches
the steps, so a feed that blocks (a slow read) does not hold up dispatch. On the 2-core CPU with
the in-memory quickstart feed it measured no faster than the inline prefetch (`background=False`;
the loop benchmark times both: experiments/results/speed_cpu/loop_quickstart_prefetch_thread*.txt).
"""
import collections
import itertools
import queue
import threading
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


class _Failed:
  """What the producer thread raised, re-raised by the consumer in its own thread."""

  def __init__(self, error: BaseException):
    self.error = error


_END = object()  # the iterator is exhausted


def prefetch(iterator: Iterable, place_fn: Callable, size: int = 2, background: bool = True) -> Iterator:
  """Yields place_fn(batch) for each batch, in order; `size` placed batches wait ahead of the consumer.

  With `background` (default) a daemon thread pulls and places them; an exception it meets is
  raised here, at the batch it concerns. Closing the generator (or dropping it) stops the thread
  and waits for it, so the caller may then close the underlying feed. Without `background` the
  consumer's thread does the work, `size` batches ahead (flax.jax_utils.prefetch_to_device's way).
  """
  if size < 1:
    raise UserError(f"prefetch size must be >= 1, got {size}")
  iterator = iter(iterator)
  if not background:
    yield from _prefetch_inline(iterator, place_fn, size)
    return
  ready, stop = queue.Queue(maxsize=size), threading.Event()

  def offer(item) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      for batch in iterator:
        if not offer(place_fn(batch)):
          return
      offer(_END)
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      offer(_Failed(e))

  thread = threading.Thread(target=produce, name="vitnorm-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item = ready.get()
      if item is _END:
        return
      if isinstance(item, _Failed):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join(timeout=60)  # at most the batch it is making; then the feed may be closed


def _prefetch_inline(iterator, place_fn, size):
  pending = collections.deque()

  def enqueue(count):
    for batch in itertools.islice(iterator, count):
      pending.append(place_fn(batch))

  enqueue(size)
  while pending:
    batch = pending.popleft()
    enqueue(1)  # while the consumer runs on `batch`, the next `size` batches are in flight
    yield batch
