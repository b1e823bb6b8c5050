"""Devices and processes: CPU device count, multi-process start-up, the data-parallel mesh.

- `use_all_cpu_cores()`: one JAX CPU device keeps about one core busy, so on a CPU-only host we
  ask for one CPU device per core (must run before JAX starts its backend). It only affects the
  CPU backend, so it is harmless on GPU / TPU hosts.
- `maybe_initialize_distributed(...)`: `jax.distributed.initialize` when the job was launched as
  several processes (explicit arguments, the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID environment variables, or `auto=True` for TPU pods and SLURM, which JAX detects).
- `data_mesh()`: a 1-D `Mesh` with axis 'data' over every device of every process;
  `batch_sharding(mesh)` splits the leading (batch) axis over it, `replicated_sharding(mesh)`
  puts a full copy on every device.
"""
import logging
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vitnorm.errors import ConfigError, UserError

DATA_AXIS = "data"  # Mesh axis name of data parallelism (jit).
PMAP_AXIS = "batch"  # pmap axis name (gradients and BN statistics are averaged over it).

_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
_NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
_PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _backend_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  return xla_bridge.backends_are_initialized()


def use_all_cpu_cores(num_devices: Optional[int] = None) -> int:
  """Asks JAX for `num_devices` (default: os.cpu_count()) CPU devices; returns the count asked.

  Does nothing (returns 0) when XLA_FLAGS already sets a host device count, when
  jax_num_cpu_devices was already set, or when the backend already started (too late to change).
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 0
  if _backend_started():
    return 0
  if jax.config.jax_num_cpu_devices not in (-1, None, 0):
    return 0
  count = int(num_devices or os.cpu_count() or 1)
  jax.config.update("jax_num_cpu_devices", count)
  return count


def avoid_compilation_cache_on_cpu_devices(log=print) -> bool:
  """Turns JAX's persistent compilation cache off for a run on several CPU devices; returns
  whether it did (and says so in one line through `log`).

  XLA:CPU executables loaded back from that cache can deadlock in their all-reduces on several
  host devices (two all-reduces of one step wait for each other until XLA aborts the process:
  "Termination timeout for all reduce RendezvousKey ... of 40 seconds exceeded", exit 134; seen
  with jax 0.10.2). GPU and TPU runs keep the cache.
  """
  if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
    return False
  if jax.default_backend() != "cpu" or jax.device_count() < 2:
    return False
  jax.config.update("jax_enable_compilation_cache", False)
  log(f"warning: the persistent compilation cache ({jax.config.jax_compilation_cache_dir}) is off "
      f"for this run: XLA:CPU executables loaded from it can deadlock in all-reduces on "
      f"{jax.device_count()} CPU devices (README, 'Compilation cache on CPU')")
  return True


def maybe_initialize_distributed(coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None,
                                 local_device_ids: Optional[Sequence[int]] = None,
                                 *, auto: bool = False) -> bool:
  """Starts multi-process JAX if this job is one of several processes; returns whether it did.

  Arguments win over the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
  `auto=True` calls `jax.distributed.initialize()` without arguments: JAX then detects TPU pods,
  SLURM and Open MPI on its own. With none of these it returns False (one process). Calling it
  again after a successful start returns True without doing anything.
  """
  if jax.distributed.is_initialized():
    return True
  coordinator_address = coordinator_address or os.environ.get(_COORDINATOR_ENV) or None
  if num_processes is None and os.environ.get(_NUM_PROCESSES_ENV):
    num_processes = int(os.environ[_NUM_PROCESSES_ENV])
  if process_id is None and os.environ.get(_PROCESS_ID_ENV):
    process_id = int(os.environ[_PROCESS_ID_ENV])
  if coordinator_address is None and not auto:
    if num_processes not in (None, 1):
      raise UserError(f"distributed.num_processes={num_processes} but no coordinator address: set "
                      f"--config.distributed.coordinator_address=HOST:PORT or ${_COORDINATOR_ENV}")
    return False
  if coordinator_address is not None and num_processes is not None and num_processes > 1 and process_id is None:
    raise UserError("distributed.process_id is not set: give each process its index 0..N-1 "
                    f"(--config.distributed.process_id or ${_PROCESS_ID_ENV})")
  if _backend_started():
    raise UserError("multi-process JAX must start before anything touches a JAX device; call "
                    "maybe_initialize_distributed() first thing in main")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  logging.info("jax.distributed started: process %d of %d", jax.process_index(), jax.process_count())
  return True


def is_main_process() -> bool:
  """True on the process that writes what must be written once (config, metrics, status)."""
  return jax.process_index() == 0


def data_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh's 'data' axis; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch_size: int, field: str, num_devices: Optional[int] = None):
  """ConfigError naming `field` unless the global batch splits evenly over the devices."""
  num_devices = num_devices or jax.device_count()
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ConfigError(field, f"{global_batch_size} is not divisible by the {num_devices} devices; "
                      f"use a multiple of {num_devices}")


def host_copy(x) -> np.ndarray:
  """This process's copy of a replicated array as numpy (also for arrays spanning several hosts)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(jax.device_get(x))
