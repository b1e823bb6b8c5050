"""The XLA_FLAGS the test suite runs under (tests/conftest.py), and the ones its child processes get.

FAST_COMPILE: XLA:CPU's LLVM backend at optimization level 0 (the default is 3). The suite is
dominated by compiling many tiny programs once each, not by running them. Level 0 made compiling
a small ViT train step about 1.7x cheaper in CPU time (measured while other jobs ran, so a ratio
to re-measure alone, not a figure); --xla_llvm_disable_expensive_passes alone changed nothing and
is not used. The suite-level effect, measured alone, is in the README.

What changes: XLA's HLO passes (fusion, layout, sharding) run as before; LLVM's code generation
does less, and the floating-point results differ from the default build's in the last bits (a
train step's loss and gradients: tests/test_conftest.py bounds the difference). Every equivalence
the suite asserts (bit-identical resumes, jit == pmap, 2 processes == 1, folded == unfolded)
compares programs built the same way, in this process or in children given these flags. Users'
runs are untouched: only the tests set it, and an XLA_FLAGS that names its own
xla_backend_optimization_level keeps that level.
"""
import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices=None, base=None) -> str:
  """XLA_FLAGS for a test process: `base` (default: this process's, without its device count),
  FAST_COMPILE unless base sets an optimization level, and `devices` host devices if given."""
  base = os.environ.get("XLA_FLAGS", "") if base is None else base
  flags = [f for f in base.split() if not f.startswith("--xla_force_host_platform_device_count")]
  if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
    flags += FAST_COMPILE.split()
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)
