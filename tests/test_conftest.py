"""tests/conftest.py runs the suite on 8 CPU devices even where the environment names another platform."""
import os
import subprocess
import sys

import numpy as np

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


def test_the_suite_compiles_cheaply_on_8_devices_and_keeps_a_users_own_flags():
  import xla_test_flags  # pylint: disable=import-outside-toplevel
  flags = os.environ["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=8" in flags
  assert set(xla_test_flags.FAST_COMPILE_FLAGS) <= set(flags)
  assert xla_test_flags.FAST_COMPILE_FLAGS == ("--xla_backend_optimization_level=0",
                                               "--xla_cpu_use_fusion_emitters=false",
                                               "--xla_cpu_parallel_codegen_split_count=1")
  child = xla_test_flags.xla_flags(2).split()
  assert child.count("--xla_force_host_platform_device_count=2") == 1
  assert not any(f.endswith("count=8") for f in child) and set(xla_test_flags.FAST_COMPILE_FLAGS) <= set(child)
  assert xla_test_flags.xla_flags(base="--xla_backend_optimization_level=3 --foo") == \
      "--xla_backend_optimization_level=3 --foo --xla_cpu_use_fusion_emitters=false " \
      "--xla_cpu_parallel_codegen_split_count=1"
  assert xla_test_flags.xla_flags(base="--xla_cpu_use_fusion_emitters=true") == \
      "--xla_cpu_use_fusion_emitters=true --xla_backend_optimization_level=0 " \
      "--xla_cpu_parallel_codegen_split_count=1"


# One BN train step's loss and gradients, saved to OUT (set by the caller).
STEP_PROBE = """
import jax, jax.numpy as jnp, numpy as np
from vitnorm.model import vit
cfg = dict(hidden_size=32, num_layers=1, mlp_dim=64, num_heads=2, patch_size=4, num_classes=10,
           image_size=8, num_channels=1, norm="batch", ffn_norm="batch")
model = vit.build_model(cfg)
variables = vit.init_variables(model, jax.random.key(0), vit.input_shape(cfg))
x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
labels = jnp.arange(16) % 10

def loss(params):
  logits, _ = model.apply(dict(variables, params=params), x, train=True, mutable=["batch_stats"])
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels])

value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
np.savez(OUT, loss=value, **{str(i): g for i, g in enumerate(jax.tree.leaves(grads))})
"""


def test_the_fast_compile_flags_compute_a_train_step_as_the_default_build_does_up_to_float32_rounding(tmp_path):
  import xla_test_flags  # pylint: disable=import-outside-toplevel
  assert all(f in os.environ["XLA_FLAGS"] for f in xla_test_flags.FAST_COMPILE_FLAGS)
  exec(STEP_PROBE, {"OUT": str(tmp_path / "fast.npz")})  # pylint: disable=exec-used  (this process: the suite's flags)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # XLA's defaults
  proc = subprocess.run([sys.executable, "-c", "import sys; OUT = sys.argv[1]\n" + STEP_PROBE,
                         str(tmp_path / "default.npz")], env=env, capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = {}
  for name in ("fast", "default"):
    with np.load(tmp_path / f"{name}.npz") as f:
      out[name] = {k: f[k] for k in f.files}
  assert out["fast"].keys() == out["default"].keys()
  # Rounding, not a different function: each array agrees to a few float32 ulps of its own scale.
  for key, a in out["default"].items():
    b = out["fast"][key]
    scale = float(np.max(np.abs(a)))
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(scale, 1e-6), err_msg=key)


def test_the_longest_files_start_first_and_the_shuffled_order_holds_elsewhere():
  import conftest  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  missing = [f for f in conftest.LONGEST_FILES if not os.path.exists(os.path.join(root, f))]
  assert not missing, f"renamed or removed: update conftest.LONGEST_FILES ({missing})"

  class Item:  # what the hook reads of a pytest item
    def __init__(self, nodeid):
      self.nodeid = nodeid

  longest, second = conftest.LONGEST_FILES[:2]
  shuffled = ["tests/b.py::t2", f"{second}::x", "tests/a.py::t1", f"{longest}::y", "tests/b.py::t1",
              f"{longest}::z"]
  items = [Item(n) for n in shuffled]
  conftest.pytest_collection_modifyitems(items)
  assert [i.nodeid for i in items] == [f"{longest}::y", f"{longest}::z", f"{second}::x", "tests/b.py::t2",
                                       "tests/a.py::t1", "tests/b.py::t1"]


def test_the_jax_backend_has_the_suites_device_count_even_after_a_test_changed_xla_flags(monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")  # as tests/test_slurm.py does
  assert jax.device_count() == 8  # started by conftest's session fixture, before any test ran


def test_run_cli_removes_the_commands_flags_and_keeps_those_a_library_defined(run_cli, monkeypatch):
  """grain and array_record define absl flags when first imported, e.g. inside an in-process
  `benchmark --mode=input`: removing them broke every later grain test in that worker."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from vitnorm import benchmark  # pylint: disable=import-outside-toplevel
  command_defines = benchmark.define_flags

  def define_flags_and_import_a_library():
    command_defines()
    flags.DEFINE_integer("library_flag_of_this_test", 1, "defined as a library defines its flags")

  monkeypatch.setattr(benchmark, "define_flags", define_flags_and_import_a_library)
  try:
    code, _, _ = run_cli("benchmark", "--help")
    assert code == 0
    assert "library_flag_of_this_test" in flags.FLAGS and "mode" not in flags.FLAGS
  finally:
    if "library_flag_of_this_test" in flags.FLAGS:
      delattr(flags.FLAGS, "library_flag_of_this_test")
