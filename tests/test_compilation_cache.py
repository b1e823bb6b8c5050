"""The trainer turns JAX's persistent compilation cache off on several CPU devices (XLA:CPU
all-reduce deadlock with executables loaded from it), in one line, and leaves it alone otherwise."""
import jax

from vitnorm import parallel


def test_cache_is_turned_off_on_several_cpu_devices_with_one_line(tmp_path):
  assert jax.device_count() > 1 and jax.default_backend() == "cpu"
  lines = []
  try:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    jax.config.update("jax_enable_compilation_cache", True)
    assert parallel.avoid_compilation_cache_on_cpu_devices(lines.append)
    assert not jax.config.jax_enable_compilation_cache
    assert len(lines) == 1 and lines[0].startswith("warning: the persistent compilation cache (")
    # Already off (or no cache directory): nothing to do, nothing said.
    assert not parallel.avoid_compilation_cache_on_cpu_devices(lines.append) and len(lines) == 1
  finally:  # tests run without the cache (tests/conftest.py)
    jax.config.update("jax_enable_compilation_cache", False)
    jax.config.update("jax_compilation_cache_dir", None)
