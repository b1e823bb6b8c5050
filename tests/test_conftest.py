"""tests/conftest.py runs the suite on 8 CPU devices even where the environment names another platform."""
import os
import subprocess
import sys

PROBE = """
import runpy, sys
runpy.run_path("tests/conftest.py")
import jax
print(jax.default_backend(), jax.device_count())
"""


def test_conftest_forces_the_cpu_platform_over_a_preset_one():
  env = dict(os.environ, JAX_PLATFORMS="cuda")  # as an accelerator image may preset it
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["cpu", "8"]
