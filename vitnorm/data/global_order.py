"""One global example order: global batch k is a function of (seed, k), whatever the process count.

The stream of a split of n records: epoch e visits the records in the order of a permutation
drawn from (seed, e) (NumPy's PCG64 seeded with [seed, ORDER_SALT, e]: the same on every machine
and NumPy version that keeps `Generator.permutation`'s algorithm); stream position j is record
`epoch_permutation(seed, j // n, n)[j % n]`. Global batch k (of B examples) is stream positions
[k * B, (k + 1) * B); with P processes, process p holds rows [p * b, (p + 1) * b) of it (b = B / P)
and reads them by random access, so the P processes together hold exactly global batch k, and
resuming at step k starts there with no skipping.

Each example's random augmentation is drawn from (seed, its stream position), so it too is the
same on every topology. Pure NumPy, no TensorFlow.
"""
import functools

import numpy as np

ORDER_SALT, AUGMENT_SALT = 0x0D, 0xA6


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The record indices of epoch `epoch`, in visiting order (int64 [n], read-only)."""
  order = np.random.default_rng([int(seed), ORDER_SALT, int(epoch)]).permutation(int(n))
  order.setflags(write=False)
  return order


def record_index(seed: int, position: int, n: int) -> int:
  """The record at global stream position `position`."""
  return int(epoch_permutation(seed, position // n, n)[position % n])


def global_position(local_position: int, process_index: int, process_count: int, local_batch: int) -> int:
  """Global stream position of this process's `local_position`-th example (row local_position % b
  of its slice of global batch local_position // b)."""
  step, row = divmod(int(local_position), local_batch)
  return step * local_batch * process_count + process_index * local_batch + row


def example_rng(seed: int, position: int) -> np.random.Generator:
  """The random generator of the example at global stream position `position`."""
  return np.random.default_rng([int(seed), AUGMENT_SALT, int(position)])
