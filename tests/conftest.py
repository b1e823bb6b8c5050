"""Test setup: 8 CPU devices, so pmap, sharding and BatchNorm sync really run on several devices.

This must run before JAX starts its backend, hence the environment variable at import time.
"""
import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# No test may touch the network: tfds must never try GCS or a download.
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "multiprocess: starts several JAX processes on localhost (kept small; runs in CI; "
      "select with -m multiprocess, skip with -m 'not multiprocess')")
