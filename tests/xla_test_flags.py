"""The XLA_FLAGS the test suite runs under (tests/conftest.py), and the ones its child processes get.

FAST_COMPILE: the suite is dominated by compiling many tiny programs once each, not by running
them, so XLA:CPU is told to compile cheaply:
- --xla_backend_optimization_level=0: LLVM's code generation at level 0 (the default is 3); a
  small ViT train step about 1.7x cheaper to compile in CPU time.
- --xla_cpu_use_fusion_emitters=false: XLA:CPU's earlier (non-MLIR) emitters for elementwise
  fusions. On top of level 0, compiling three tiny ViT train steps (jit and pmap, 8 devices) took
  1.7x less CPU time and an eager forward pass of a tiny ViT 1.9x less (one run each, alone:
  /tmp probe of tests/training/test_step.py's tiny plans, 26.2 -> 15.3 s and 6.2 -> 3.3 s).
- --xla_cpu_parallel_codegen_split_count=1: one LLVM module per program instead of up to 32
  compiled on threads (the tests' programs are tiny, and the two pytest workers already use both
  cores): on top of the two above, 9% less CPU for the same three train steps and 10% for the eager
  pass (three alternating runs each, alone: 19.6 -> 17.5 s and 4.6 -> 4.0 s on average).
- Tried and not used: --xla_llvm_disable_expensive_passes (no change), no XNNPACK, the sequential
  scheduler, the pre-thunk runtime (each within noise).

What changes: XLA's HLO passes (fusion decisions, layout, sharding) run as before; the code
generated for each fusion differs, and floating-point results differ from the default build's in
the last bits (a train step's loss and gradients: tests/test_conftest.py bounds the difference).
Every equivalence the suite asserts (bit-identical resumes, jit == pmap, 2 processes == 1,
folded == unfolded) compares programs built the same way, in this process or in children given
these flags. Users' runs are untouched: only the tests set them, and an XLA_FLAGS that names one
of these flags itself keeps its own value.
"""
import os

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                      "--xla_cpu_parallel_codegen_split_count=1")
FAST_COMPILE = " ".join(FAST_COMPILE_FLAGS)


def xla_flags(devices=None, base=None) -> str:
  """XLA_FLAGS for a test process: `base` (default: this process's, without its device count), each
  of FAST_COMPILE_FLAGS that base does not set itself, and `devices` host devices if given."""
  base = os.environ.get("XLA_FLAGS", "") if base is None else base
  flags = [f for f in base.split() if not f.startswith("--xla_force_host_platform_device_count")]
  named = {f.split("=")[0] for f in flags}
  flags += [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in named]
  if devices is not None:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  return " ".join(flags)
