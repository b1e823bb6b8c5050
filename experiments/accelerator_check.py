r"""Accelerator check, in parts: python -m experiments.accelerator_check --out experiments/results/accelerator/

Writes <device>.json and <device>.md (device = the device kind, e.g. NVIDIA_H200) after every part,
so a run that is killed (or hits a command time limit) keeps what it measured, and a re-run skips
the parts already written (--force redoes the parts named in --parts). The parts, in order:

  env            device, JAX / jaxlib / CUDA / Flax / Optax / Orbax versions, XLA flags
  fold           BN folding exactness (small models, every foldable variant; fold in float64)
  sync           BN statistics, jit vs pmap (4 steps). On ONE device this proves nothing about
                 synchronisation (there is nothing to synchronise): it checks that the two code
                 paths compute the same thing on this backend; the report says so
  resume         a run preempted at step 6 and resumed ends identical to an uninterrupted one:
                 bit-identical, or (XLA:GPU without --xla_gpu_deterministic_ops=true, which
                 does not promise bit-identical reductions, jax #13672) within RESUME_TOLERANCE
  quickstart     the quickstart trained to completion in bf16 (--data_npz, else sklearn digits)
  peaks          dense matmul peak: bf16, and f32 at the default precision (the models' own: TF32
                 on recent NVIDIA GPUs) and at 'highest'; every figure names its precision
  inference_s16  the interleaved inference benchmark (vitnorm.inference.comparison, every norm
  inference_b16  variant) at S/16 resp. B/16, 224 px, batch 256, bf16 and f32, with FLOPs from
                 XLA's cost analysis and from the analytic count (vitnorm.inference.flops)
  train          train-step img/s and MFU (both FLOP counts) for LN and BN + FFN-BN, S/16 bf16

The check parts (env..quickstart) are exact comparisons: by default they run with
--xla_gpu_deterministic_ops=true when every selected part is a check part (as in the plan's first
command); the timing parts run without it. `--plan` prints the two commands (at most 8 minutes
each on one H100/H200) that fit a 15-minute device budget, and the install recipe is in README
("Offline accelerator host"). Needs JAX, Flax >= 0.12.7, Optax, Orbax, etils, NumPy and
ml-collections; scikit-learn only without --data_npz; never TensorFlow, tfds, clu or mlxtend, nor
a network. It checks its imports before any part runs and stops with one line naming what is
missing.

On CPU (or with --reduced) every part runs at tiny sizes in seconds, so the test suite runs the
whole script (tests/test_accelerator_check.py) and it cannot rot.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

from experiments import accelerator_markdown, accelerator_runner
from experiments import accelerator_parts as parts_lib
from experiments.accelerator_parts import (DETERMINISTIC_FLAG, FULL, REDUCED, Context, Sizes, _jax, _log,
                                           deterministic_ops, matmul_precision)
from experiments.accelerator_runner import Part

# The plan: parts are grouped into commands estimated at COMMAND_BUDGET_SECONDS or less, each run
# under `timeout COMMAND_TIMEOUT_SECONDS` (8 min; the device allows 10 min a command, 15 min in all,
# machine start included). The estimates are for one H100/H200, compilation included; they are
# not measured yet (the JSON records each part's measured wall time).
COMMAND_BUDGET_SECONDS = 360
COMMAND_TIMEOUT_SECONDS = 480


# ----------------------------------------------------------------------------------------------
# Preflight: every import the selected parts need, before any part runs
# ----------------------------------------------------------------------------------------------

# The modules the parts import (their third-party imports come along). scikit-learn is only
# needed for the digits fallback of resume / quickstart.
_MODULES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "etils.epath", "ml_collections",
            "configs.common", "configs.quickstart", "vitnorm.parallel", "vitnorm.model.fold",
            "vitnorm.inference.comparison", "vitnorm.inference.flops", "vitnorm.training.loop",
            "vitnorm.training.placement", "vitnorm.checkpoints", "vitnorm.data.arrays")
_FLAX_FOR_JAX_0_10 = (0, 12, 7)  # flax.jax_utils.replicate without jax.device_put_replicated


def _version(text) -> tuple:
  return tuple(int(x) for x in re.findall(r"\d+", str(text))[:3])


def missing_requirements(parts, data_npz) -> list:
  """Human-readable names of what is missing ([] when everything imports)."""
  needed = list(_MODULES)
  if data_npz is None and {"resume", "quickstart"} & set(parts):
    needed.append("sklearn")
  missing = []
  for module in needed:
    try:
      importlib.import_module(module)
    except ImportError as e:
      name = getattr(e, "name", None) or module
      label = {"sklearn": "scikit-learn (or pass --data_npz)", "ml_collections": "ml-collections"}.get(
          name.split(".")[0], name.split(".")[0])
      if label not in missing:
        missing.append(label)
  if "flax" not in " ".join(missing) and "jax" not in missing:
    import flax  # pylint: disable=import-outside-toplevel
    jax = _jax()
    if _version(jax.__version__) >= (0, 10) and _version(flax.__version__) < _FLAX_FOR_JAX_0_10:
      missing.append(f"flax >= 0.12.7 (found {flax.__version__}; with jax {jax.__version__} "
                     "flax.jax_utils.replicate needs it)")
  return missing


def parts_for(sizes: Sizes) -> list:
  inference = [Part(f"inference_{v.replace('/', '').lower()}",
                    lambda ctx, v=v: parts_lib.inference_benchmark(ctx, v), est,
                    f"interleaved inference benchmark at {v}", timing=True)
               for v, est in zip(sizes.variants, (100, 130))]
  return ([Part("env", parts_lib.environment, 10, "device and versions"),
           Part("fold", parts_lib.fold_exactness, 20, "BN folding exactness"),
           Part("sync", parts_lib.bn_sync, 25, "BN statistics, jit vs pmap"),
           Part("resume", parts_lib.resume_exactness, 60, "preempted and resumed run vs uninterrupted"),
           Part("quickstart", parts_lib.quickstart, 120, "the quickstart trained in bf16"),
           Part("peaks", parts_lib.matmul_peaks, 15, "dense matmul peaks", timing=True)]
          + inference +
          [Part("train", parts_lib.training_throughput, 45, "train-step img/s and MFU", timing=True)])


def select_parts(text: Optional[str], parts) -> list:
  """--parts 'env,fold,inference' -> part names in the check's order ('inference': every size)."""
  names = [p.name for p in parts]
  if not text:
    return names
  wanted = [w.strip() for w in text.split(",") if w.strip()]
  chosen = set()
  for w in wanted:
    matches = [n for n in names if n == w or (w == "inference" and n.startswith("inference_"))]
    if not matches:
      raise _user_error(f"--parts: unknown part {w!r}; choose from {', '.join(names)} (or 'inference')")
    chosen.update(matches)
  return [n for n in names if n in chosen]


def _user_error(message):
  from vitnorm.errors import UserError  # pylint: disable=import-outside-toplevel
  return UserError(message)


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
def device_name() -> str:
  jax = _jax()
  device = jax.local_devices()[0]
  kind = device.device_kind if jax.default_backend() != "cpu" else "cpu"
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", kind).strip("_") or "device"


def run(out_dir, *, reduced=None, data_npz=None, parts=None, force=False, kill_at_part=None) -> dict:
  """Runs the selected parts (default: all) not yet in <out_dir>/<device>.json, writing the JSON and
  the Markdown after each one; returns the results document."""
  from vitnorm.inference import throughput  # pylint: disable=import-outside-toplevel
  jax = _jax()
  reduced = jax.default_backend() == "cpu" if reduced is None else reduced
  sizes = REDUCED if reduced else FULL
  all_parts = parts_for(sizes)
  names = [p.name for p in all_parts]
  selected = select_parts(parts, all_parts)
  os.makedirs(out_dir, exist_ok=True)
  name = device_name()
  json_path, md_path = (os.path.join(out_dir, f"{name}.{ext}") for ext in ("json", "md"))
  doc = accelerator_runner.load(json_path, device=name, reduced=bool(reduced))
  _log(f"{name}: JAX {jax.__version__}, reduced={reduced}, parts {','.join(selected)}; "
       f"deterministic ops: {deterministic_ops()}")

  def save(d):
    accelerator_runner.write_atomically(
        json_path, json.dumps(throughput.nan_to_none(d), indent=1, default=str))
    accelerator_runner.write_atomically(md_path, accelerator_markdown.markdown(d, names))

  labels = lambda: dict(xla_flags=os.environ.get("XLA_FLAGS", ""), matmul_precision=matmul_precision())  # noqa: E731
  with tempfile.TemporaryDirectory(prefix="vitnorm-accel-") as tmp:
    ctx = Context(sizes=sizes, reduced=bool(reduced), data_npz=data_npz, tmp=tmp, doc=doc)
    doc = accelerator_runner.run_parts(all_parts, selected, doc, save=save, context=ctx, force=force,
                                       kill_at_part=kill_at_part, log=_log, labels=labels)
  save(doc)
  _log(f"wrote {json_path} and .md: {'OK' if doc['ok'] else 'FAILED'}"
       + (f"; not run yet: {', '.join(doc['missing_parts'])}" if doc["missing_parts"] else ""))
  return doc


def xla_accepts(xla_flags: str) -> bool:
  """Whether a fresh process starts its JAX backend with these XLA_FLAGS (XLA aborts on a flag it
  does not know, and this check gets one try on a lent GPU). Costs one backend start."""
  probe = "import jax; jax.devices()"
  try:
    proc = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, XLA_FLAGS=xla_flags),
                          capture_output=True, timeout=300, check=False)
  except subprocess.TimeoutExpired:
    return False
  return proc.returncode == 0


# Installs the carried wheels: ml-collections always; flax only over one older than 0.12.7 (never
# a downgrade of a newer flax that the image's jax may need).
INSTALL_COMMAND = (
    "pip install --no-deps --no-index accel_carry/wheels/ml_collections-*.whl && "
    "{ python -c \"import flax, re, sys; sys.exit(tuple(map(int, re.findall(r'\\d+', flax.__version__)[:3]))"
    " < (0, 12, 7))\" || pip install --no-deps --no-index accel_carry/wheels/flax-*.whl; }")


def plan_text(data_npz="accel_carry/mnist5k.npz", out="experiments/results/accelerator") -> str:
  """The commands that fit the device budget: check parts first (deterministic), timing parts after."""
  commands = accelerator_runner.plan_commands(parts_for(FULL), COMMAND_BUDGET_SECONDS)
  install = INSTALL_COMMAND + " && "
  lines = [f"# {len(commands)} device command(s), estimated at most {COMMAND_BUDGET_SECONDS} s, "
           f"killed at {COMMAND_TIMEOUT_SECONDS} s (estimated seconds per part; the JSON records the "
           "measured ones). Run from the repository root; a killed or timed-out command keeps its "
           "finished parts, and running it again resumes.",
           "# Install recipe and what to carry: README, 'Offline accelerator host'."]
  for i, (names, seconds) in enumerate(commands):
    lines.append(f"# command {i + 1}: {', '.join(names)} (~{seconds:.0f} s)")
    lines.append(f"{install}timeout {COMMAND_TIMEOUT_SECONDS} python -m experiments.accelerator_check "
                 f"--out {out} --data_npz {data_npz} --parts {','.join(names)}")
  return "\n".join(lines)


def main(argv=None):
  from vitnorm.errors import UserError, exit_on_user_error  # pylint: disable=import-outside-toplevel

  @exit_on_user_error
  def checked():
    parser = argparse.ArgumentParser(prog="python -m experiments.accelerator_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="output folder for <device>.json / .md (required unless --plan)")
    parser.add_argument("--parts", default=None, help="comma-separated parts (default: all): "
                        + ",".join(p.name for p in parts_for(FULL)) + " ('inference': every size)")
    parser.add_argument("--force", action="store_true", help="redo the selected parts already written")
    parser.add_argument("--data_npz", "--mnist_npz", dest="data_npz", default=None,
                        help="dataset .npz for resume and the quickstart (python -m vitnorm.data.export_npz "
                        "--name mnist5k); default: scikit-learn digits")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes (default on CPU)")
    parser.add_argument("--deterministic_ops", choices=("auto", "on", "off"), default="auto",
                        help=f"add {DETERMINISTIC_FLAG} to XLA_FLAGS; auto: on when no timing part is "
                        "selected")
    parser.add_argument("--plan", action="store_true", help="print the device commands that fit the budget")
    parser.add_argument("--debug_kill_at_part", default=None,
                        help="SIGKILL this process when the named part starts (tests)")
    args = parser.parse_args(argv)
    if args.plan:
      print(plan_text(args.data_npz or "accel_carry/mnist5k.npz", args.out or "experiments/results/accelerator"))
      return 0
    if not args.out:
      raise UserError("--out: required; give the output folder, e.g. experiments/results/accelerator")
    if args.data_npz and not os.path.isfile(args.data_npz):
      raise UserError(f"--data_npz: no such file {args.data_npz!r}; write it with `python -m "
                      "vitnorm.data.export_npz --name mnist5k --out FILE.npz`")
    selected = select_parts(args.parts, parts_for(FULL))
    timing = {p.name for p in parts_for(FULL) if p.timing}
    if args.deterministic_ops == "on" or (args.deterministic_ops == "auto" and not timing & set(selected)):
      if not deterministic_ops():  # before the backend starts, which reads XLA_FLAGS once
        flags = f"{os.environ.get('XLA_FLAGS', '')} {DETERMINISTIC_FLAG}".strip()
        if xla_accepts(flags):
          os.environ["XLA_FLAGS"] = flags
        else:  # the resume part then reports its largest difference against RESUME_TOLERANCE
          _log(f"warning: this XLA does not accept {DETERMINISTIC_FLAG}; running without it")
    elif args.deterministic_ops == "off" and deterministic_ops():
      raise UserError(f"--deterministic_ops=off: XLA_FLAGS already holds {DETERMINISTIC_FLAG}; unset it")
    missing = missing_requirements(selected, args.data_npz)
    if missing:
      raise UserError(f"missing: {', '.join(missing)}; install the wheels you carried "
                      "(README, 'Offline accelerator host'); no part was run")
    doc = run(args.out, reduced=True if args.reduced else None, data_npz=args.data_npz, parts=args.parts,
              force=args.force, kill_at_part=args.debug_kill_at_part)
    return 0 if doc["ok"] else 1

  sys.exit(checked())


if __name__ == "__main__":
  main()
