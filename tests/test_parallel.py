"""Devices, mesh and shardings on the 8 test CPU devices; multi-process start-up decisions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitnorm import parallel
from vitnorm.errors import ConfigError, UserError


def test_mesh_and_shardings_cover_every_device():
  mesh = parallel.data_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count() == 8
  x = jax.device_put(np.arange(16.0).reshape(16, 1), parallel.batch_sharding(mesh))
  assert [s.data.shape for s in x.addressable_shards] == [(2, 1)] * 8
  y = jax.device_put(np.ones(3), parallel.replicated_sharding(mesh))
  assert all(s.data.shape == (3,) for s in y.addressable_shards) and len(y.addressable_shards) == 8
  # A jit over the sharded batch computes the global mean.
  assert float(jax.jit(jnp.mean)(x)) == pytest.approx(7.5)


def test_use_all_cpu_cores_leaves_an_explicit_device_count_alone():
  # conftest sets XLA_FLAGS=--xla_force_host_platform_device_count=8 and the backend has started.
  assert parallel.use_all_cpu_cores() == 0
  assert jax.device_count() == 8


def test_single_process_by_default(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  assert parallel.maybe_initialize_distributed(num_processes=1) is False
  assert parallel.is_main_process()


def test_distributed_misconfiguration_is_a_user_error(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  with pytest.raises(UserError, match="no coordinator address"):
    parallel.maybe_initialize_distributed(num_processes=2)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
  with pytest.raises(UserError, match="process_id is not set"):
    parallel.maybe_initialize_distributed()
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  # The backend already runs in this test process: too late to start multi-process JAX.
  with pytest.raises(UserError, match="must start before"):
    parallel.maybe_initialize_distributed()


def test_check_batch_divisible():
  parallel.check_batch_divisible(64, "batch_size")
  with pytest.raises(ConfigError, match="^batch_size: 60 is not divisible by the 8 devices"):
    parallel.check_batch_divisible(60, "batch_size")
