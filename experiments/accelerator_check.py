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
import dataclasses
import importlib
import json
import os
import re
import sys
import tempfile
import time
from typing import Optional

import numpy as np

from experiments import accelerator_runner
from experiments.accelerator_runner import Part

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
# Without DETERMINISTIC_FLAG XLA:GPU may reduce in another order from run to run; 12 Adam steps of
# the small model then differ by float32 round-off amplified by the optimizer. Largest accepted
# |full - resumed| / max(1, |full|) over every parameter and BN statistic:
RESUME_TOLERANCE = 1e-3
FOLD_TOLERANCE = 1e-5  # max |folded - unfolded| / max |unfolded| logits at 'highest' (float32 round-off)
# The plan: parts are grouped into commands estimated at COMMAND_BUDGET_SECONDS or less, each run
# under `timeout COMMAND_TIMEOUT_SECONDS` (8 min; the device allows 10 min a command, 15 min in all,
# machine start included). The estimates are for one H100/H200, compilation included; they are
# not measured yet (the JSON records each part's measured wall time).
COMMAND_BUDGET_SECONDS = 360
COMMAND_TIMEOUT_SECONDS = 480
RESULTS_README = "experiments/results/accelerator/README.md"


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything that differs between the full check and the reduced (CPU, test) one."""
  variants: tuple = ("S/16", "B/16")  # one inference part each
  image_size: int = 224
  batch_size: int = 256
  dtypes: tuple = ("bfloat16", "float32")
  inference_models: Optional[tuple] = None  # None: every model of vitnorm.inference.comparison
  tiny_model: dict = None  # overrides of the ViT size (reduced mode)
  warmup: int = 2
  iterations: int = 10
  repeats: int = 5
  matmul_size: int = 0  # 0: throughput.default_matmul_size()
  train_batch: int = 256
  train_steps: int = 10
  train_models: tuple = ("ln", "bn_ffnbn")
  quickstart_steps: int = 0  # 0: the quickstart's own length (100 epochs)
  # The resume part's compute dtype. Reduced: bfloat16 and as many steps as the quickstart, so
  # the quickstart part reuses the compiled steps of the resume part (vitnorm.training.state.cached).
  resume_dtype: str = "float32"


FULL = Sizes()
_TINY = dict(hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2)
REDUCED = Sizes(image_size=16, batch_size=8, inference_models=("ln", "bn_ffnbn_folded", "none"),
                tiny_model=dict(_TINY, patch_size=8), warmup=1, iterations=1, repeats=2,
                matmul_size=64, train_batch=8, train_steps=2, train_models=("bn_ffnbn",),
                quickstart_steps=12, resume_dtype="bfloat16")


@dataclasses.dataclass
class Context:
  sizes: Sizes
  reduced: bool
  data_npz: Optional[str]
  tmp: str
  doc: dict  # the results so far (the train part reads the peaks part's bf16 peak)


def _log(message):
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _jax():
  import jax  # pylint: disable=import-outside-toplevel
  return jax


def deterministic_ops() -> bool:
  return DETERMINISTIC_FLAG in os.environ.get("XLA_FLAGS", "")


def matmul_precision() -> str:
  """JAX's default matmul precision in force ('default': TF32 for f32 on recent NVIDIA GPUs)."""
  return str(_jax().config.jax_default_matmul_precision or "default")


# ----------------------------------------------------------------------------------------------
# Preflight: every import the selected parts need, before any part runs
# ----------------------------------------------------------------------------------------------

# The modules the parts import (their third-party imports come along). scikit-learn is only
# needed for the digits fallback of resume / quickstart.
_MODULES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "etils.epath", "ml_collections",
            "configs.common", "configs.quickstart", "vitnorm.parallel", "vitnorm.model.fold",
            "vitnorm.inference.comparison", "vitnorm.inference.flops", "vitnorm.training.loop",
            "vitnorm.training.placement", "vitnorm.training.checkpoints", "vitnorm.data.arrays")
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


# ----------------------------------------------------------------------------------------------
# The parts
# ----------------------------------------------------------------------------------------------


def environment(_=None):
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  jax = _jax()
  device = jax.local_devices()[0]
  try:
    platform_version = device.client.platform_version
  except Exception:  # pylint: disable=broad-except
    platform_version = ""
  cuda = re.search(r"cuda[^0-9]*([0-9][0-9.]*)", platform_version, re.I)
  return None, dict(backend=jax.default_backend(), device_kind=device.device_kind,
                    num_devices=jax.local_device_count(), jax=jax.__version__,
                    jaxlib=getattr(jaxlib, "__version__", ""), flax=flax.__version__,
                    optax=optax.__version__, orbax=getattr(orbax.checkpoint, "__version__", ""),
                    numpy=np.__version__, python=sys.version.split()[0],
                    platform_version=platform_version, cuda=cuda.group(1) if cuda else None,
                    default_matmul_precision=matmul_precision(),
                    xla_flags=os.environ.get("XLA_FLAGS", ""))


def matmul_peaks(ctx: Context):
  """bf16 and f32 at the default precision (the models' own), and f32 at 'highest'."""
  from vitnorm.inference import throughput  # pylint: disable=import-outside-toplevel
  s = ctx.sizes
  measure = lambda dtype: throughput.matmul_peak(  # noqa: E731
      dtype, size=s.matmul_size or None, iterations=s.iterations, repeats=s.repeats)
  out = {}
  for key, dtype, precision in (("bfloat16", "bfloat16", None), ("float32", "float32", None),
                                ("float32_highest", "float32", "highest")):
    if precision:
      with _jax().default_matmul_precision(precision):
        out[key] = dict(measure(dtype), matmul_precision=precision)
    else:
      out[key] = dict(measure(dtype), matmul_precision=matmul_precision())
  return None, out


def _small_model_config(tiny, **overrides):
  from configs import common  # pylint: disable=import-outside-toplevel
  cfg = common.model_config(variant=None, num_classes=10, image_size=16, num_channels=3, **overrides)
  cfg.update(dict(hidden_size=64, num_layers=2, mlp_dim=128, num_heads=4, patch_size=4))
  if tiny:
    cfg.update(dict(_TINY, patch_size=4))
  return cfg.to_dict()


def fold_exactness(ctx: Context):
  """Folded vs unfolded BN ViT logits on random inputs, forward passes at 'highest' precision."""
  from vitnorm.inference import comparison  # pylint: disable=import-outside-toplevel
  from vitnorm.model import fold, vit  # pylint: disable=import-outside-toplevel
  jax = _jax()
  out = {}
  images = np.random.default_rng(0).standard_normal((16, 16, 16, 3), np.float32)
  for name in comparison.FOLDED_MODELS:
    cfg = _small_model_config(ctx.reduced, **comparison.MODELS[name][0])
    model = vit.build_model(cfg)
    variables = comparison.random_variables(model, cfg, seed=1)
    folded_model, folded_vars = fold.fold_batchnorm(model, variables)
    with jax.default_matmul_precision("highest"):
      a = np.asarray(model.apply(variables, images, train=False))
      b = np.asarray(folded_model.apply(folded_vars, images, train=False))
    rel = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))
    out[name] = dict(max_relative_difference=rel, tolerance=FOLD_TOLERANCE, ok=bool(rel < FOLD_TOLERANCE))
  return all(f["ok"] for f in out.values()), dict(models=out, matmul_precision="highest")


def _tiny_plan(parallelism, batch, reduced):
  from configs import common  # pylint: disable=import-outside-toplevel
  from vitnorm.training import plan as plan_lib  # pylint: disable=import-outside-toplevel
  c = common.base_config()
  c.model = common.model_config(variant=None, norm="batch", ffn_norm="batch", num_classes=10,
                                image_size=8, num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4))
  if reduced:
    c.model.update(_TINY)
  c.batch_size, c.parallelism = batch, parallelism
  c.optim.base_lr, c.optim.lr_scaling_batch, c.optim.warmup_steps = 3e-3, None, 1
  return plan_lib.Plan(config=plan_lib.canonical_config(c), num_steps=20, warmup_steps=1,
                       steps_per_epoch=10.0, eval_batch_size=batch, num_classes=10,
                       num_train_examples=10 * batch, num_eval_examples=batch)


def bn_sync(ctx: Context):
  """4 steps of a BN+FFN-BN ViT under jit and under pmap: losses agree to 1e-5 relative, BN
  running statistics to 1e-4 relative to max(1, |value|) (the variances are ~10 here)."""
  from vitnorm import parallel  # pylint: disable=import-outside-toplevel
  from vitnorm.training import placement as placement_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  jax = _jax()
  n = jax.local_device_count()
  batch = 8 * n
  rng = np.random.RandomState(0)
  labels = rng.randint(0, 10, (4, batch))
  images = rng.randn(4, batch, 8, 8, 1).astype(np.float32) * 0.5 + labels[..., None, None, None] / 5.0
  onehot = np.eye(10, dtype=np.float32)[labels]
  runs = {}
  with jax.default_matmul_precision("highest"):
    for mode in ("jit", "pmap"):
      plan = _tiny_plan(mode, batch, ctx.reduced)
      mesh = parallel.data_mesh(jax.local_devices())
      placement = placement_lib.make_placement(plan, mesh)
      state = placement.put_state(state_lib.create_train_state(plan, jax.random.PRNGKey(0)))
      losses = []
      for i in range(4):
        placed = placement.put_batch(dict(image=images[i], label=onehot[i]))
        state, m = placement.step(state, placed, jax.random.PRNGKey(1), False)
        losses.append(placement.metrics_to_host(m)["loss"])
      runs[mode] = (losses, jax.tree.map(np.asarray, placement.global_state(state).batch_stats))
  (lj, sj), (lp, sp) = runs["jit"], runs["pmap"]
  loss_rel = float(np.max(np.abs(np.subtract(lj, lp)) / np.abs(lj)))
  stats = tree_difference(sj, sp)["max_relative_difference"]
  ok = bool(loss_rel < 1e-5 and stats is not None and stats < 1e-4)
  return ok, dict(devices=n, losses_jit=lj, losses_pmap=lp, max_loss_relative_difference=loss_rel,
                  max_bn_stats_difference=stats, matmul_precision="highest",
                  proves_synchronisation=n > 1)


def tree_difference(a, b) -> dict:
  """Compares two pytrees leaf by leaf; a different structure (a missing or extra leaf, another
  shape) is reported as such instead of being cut short (zip stops at the shorter tree).

  Returns dict(same_structure, bit_identical, max_abs_difference, max_relative_difference) with
  relative = |a - b| / max(1, |a|); the differences are None when the structures differ.
  """
  jax = _jax()
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  shapes_a = [np.shape(x) for x in leaves_a]
  shapes_b = [np.shape(x) for x in leaves_b]
  if tree_a != tree_b or shapes_a != shapes_b:
    return dict(same_structure=False, bit_identical=False, max_abs_difference=None,
                max_relative_difference=None, structure=f"{tree_a} vs {tree_b}"[:2000])
  abs_diff, rel_diff, identical = 0.0, 0.0, True
  for x, y in zip(leaves_a, leaves_b):  # same structure: zip sees every leaf
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    identical = identical and np.array_equal(x, y)
    if x.size:
      d = np.abs(x - y)
      abs_diff = max(abs_diff, float(np.max(d)))
      rel_diff = max(rel_diff, float(np.max(d / np.maximum(np.abs(x), 1.0))))
  return dict(same_structure=True, bit_identical=bool(identical), max_abs_difference=abs_diff,
              max_relative_difference=rel_diff)


def _npz_shape(data_npz):
  with np.load(data_npz) as f:
    shape = f["train_images"].shape  # [n, H, W, C] or [n, H, W]
  return shape[1], shape[3] if len(shape) == 4 else 1


def _small_training_config(ctx: Context, num_steps, dtype="float32", **extra):
  """The quickstart on the .npz (--data_npz) or sklearn digits, shrunk to a few quick steps."""
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  c = quickstart.get_config()
  c.num_steps = num_steps
  if ctx.data_npz:
    size, channels = _npz_shape(ctx.data_npz)
    c.data.name = os.path.abspath(ctx.data_npz)
  else:
    size, channels = 8, 1
    c.data.name = "numpy:digits"
    c.data.normalize_mean, c.data.normalize_std = (0.5,), (0.5,)
  c.data.image_size, c.data.channels = size, channels
  c.data.random_shift_pad = 1 if size < 16 else 2
  c.model.image_size, c.model.num_channels, c.model.patch_size = size, channels, size // 4
  c.model.dtype = dtype
  if ctx.reduced:
    c.model.update(_TINY)
  c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = 5, 0, 1000, 0
  c.progress_bar = "off"
  for key, value in extra.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def resume_exactness(ctx: Context):
  """A run preempted (SIGTERM) at step 6 and resumed ends as an uninterrupted one: bit-identical on
  CPU and with --xla_gpu_deterministic_ops=true, else within RESUME_TOLERANCE."""
  from vitnorm.training import checkpoints, loop  # pylint: disable=import-outside-toplevel
  tmp = ctx.tmp
  config = lambda **extra: _small_training_config(ctx, 12, ctx.sizes.resume_dtype, **extra)  # noqa: E731
  full = loop.train_and_evaluate(config(), os.path.join(tmp, "full"))
  first = loop.train_and_evaluate(config(**{"debug.preempt_at_step": 6}), os.path.join(tmp, "resumed"))
  second = loop.train_and_evaluate(config(), os.path.join(tmp, "resumed"))
  a, _ = checkpoints.restore_variables(os.path.join(tmp, "full"))
  b, _ = checkpoints.restore_variables(os.path.join(tmp, "resumed"))
  diff = tree_difference(a, b)
  exact_required = _jax().default_backend() == "cpu" or deterministic_ops()
  close = diff["same_structure"] and (diff["bit_identical"] or (
      not exact_required and diff["max_relative_difference"] <= RESUME_TOLERANCE))
  ok = bool(close and first["status"] == "preempted" and full["step"] == second["step"] == 12)
  return ok, dict(preempted_at=first["step"], preempted_status=first["status"], final_step=second["step"],
                  dtype=ctx.sizes.resume_dtype, deterministic_ops=deterministic_ops(),
                  required="bit-identical" if exact_required else
                  f"max |full - resumed| / max(1, |full|) <= {RESUME_TOLERANCE:g}", **diff)


def quickstart(ctx: Context):
  """The quickstart (the .npz if given, else sklearn digits) trained to completion in bf16."""
  from configs import quickstart as quickstart_cfg  # pylint: disable=import-outside-toplevel
  from vitnorm.training import loop  # pylint: disable=import-outside-toplevel
  steps = ctx.sizes.quickstart_steps
  if ctx.data_npz and not ctx.reduced:
    c = quickstart_cfg.get_config()
    size, channels = _npz_shape(ctx.data_npz)
    if (size, channels) != (28, 1):
      raise ValueError(f"--data_npz {ctx.data_npz}: {size}x{size}x{channels} images; the full quickstart "
                       "wants mnist5k (28x28x1, python -m vitnorm.data.export_npz --name mnist5k)")
    c.data.name = os.path.abspath(ctx.data_npz)
    c.model.dtype = "bfloat16"
    c.progress_bar = "off"
  else:
    c = _small_training_config(ctx, steps or 0, "bfloat16")
    c.log_every = 50
  if steps:
    c.num_steps = steps
  else:
    c.num_steps = None  # the quickstart's 100 epochs
  data_name = (f"{os.path.basename(ctx.data_npz)} (.npz)" if ctx.data_npz
               else "digits (scikit-learn, 8x8; no --data_npz given)")
  start = time.time()
  summary = loop.train_and_evaluate(c, os.path.join(ctx.tmp, "quickstart"))
  m = summary["metrics"]
  return None, dict(data=data_name, status=summary["status"], steps=summary["step"],
                    eval_top1=m.get("eval/top1"), eval_loss=m.get("eval/loss"),
                    train_img_per_s=m.get("train/img_per_s_overall"), wall_seconds=time.time() - start,
                    deterministic_ops=deterministic_ops())


def benchmark_models(sizes: Sizes) -> list:
  """Every model of the comparison (new norms join automatically) but the extra unfolded copies."""
  from vitnorm.inference import comparison  # pylint: disable=import-outside-toplevel
  if sizes.inference_models:
    return list(sizes.inference_models)
  extra = [m for m in comparison.MODELS if m not in comparison.DEFAULT_MODELS and not m.endswith("_unfolded")]
  return list(comparison.DEFAULT_MODELS) + extra


def _analytic_flops(model_cfg) -> float:
  from vitnorm.inference import flops  # pylint: disable=import-outside-toplevel
  return flops.vit_forward_flops(model_cfg)


def inference_benchmark(ctx: Context, variant: str):
  """The interleaved comparison at one model size, each dtype; f32 at the default precision."""
  from vitnorm.inference import comparison  # pylint: disable=import-outside-toplevel
  s = ctx.sizes
  reports = []
  for dtype in s.dtypes:
    cfg = comparison.model_config(variant, s.image_size, dtype=dtype, **(s.tiny_model or {}))
    _log(f"inference benchmark {variant} {dtype} batch {s.batch_size}")
    report = comparison.run_benchmark(cfg, models=benchmark_models(s), batch_sizes=(s.batch_size,),
                                      warmup=s.warmup, iterations=s.iterations, repeats=s.repeats,
                                      matmul_size=s.matmul_size, log=lambda *_: None)
    report["matmul_precision"] = matmul_precision()  # models and their in-round peak alike
    peak = report["matmul_peak"]["flops_per_second"]
    for row in report["results"]:
      analytic = _analytic_flops(dict(cfg, **comparison.MODELS[row["model"]][0]))
      ips = (row.get("images_per_second") or {}).get("median")
      row["analytic_flops_per_image"] = analytic
      row["cost_analysis_to_analytic"] = (row["flops_per_image"] / analytic
                                          if row.get("flops_per_image") else None)
      row["fraction_of_matmul_peak_analytic"] = ips * analytic / peak if ips and peak else None
    report["markdown"] = comparison.format_report(report)
    reports.append(report)
  return None, dict(variant=variant, reports=reports)


def training_throughput(ctx: Context):
  """Train-step img/s (jit, synthetic batches) and MFU for LN and BN + FFN-BN at S/16 bf16."""
  from configs import common  # pylint: disable=import-outside-toplevel
  from vitnorm import parallel  # pylint: disable=import-outside-toplevel
  from vitnorm.inference import throughput  # pylint: disable=import-outside-toplevel
  from vitnorm.model import vit  # pylint: disable=import-outside-toplevel
  from vitnorm.training import placement as placement_lib, plan as plan_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  jax = _jax()
  sizes = ctx.sizes
  peaks = (ctx.doc["parts"].get("peaks") or {}).get("result") or {}
  bf16_peak = (peaks.get("bfloat16") or {}).get("flops_per_second")
  rows = []
  mesh = parallel.data_mesh(jax.local_devices())
  models = {"ln": dict(norm="ln", ffn_norm="none"), "bn_ffnbn": dict(norm="bn", ffn_norm="bn")}
  for name in sizes.train_models:
    norms = models[name]
    c = common.base_config()
    c.model = common.model_config(variant="S/16", num_classes=1000, image_size=sizes.image_size,
                                  norm=norms["norm"], ffn_norm=norms["ffn_norm"])
    c.model.dtype = "bfloat16"
    if sizes.tiny_model:
      c.model.update(sizes.tiny_model)
    c.batch_size = sizes.train_batch
    c.optim.lr_scaling_batch, c.optim.warmup_steps = None, 1
    plan = plan_lib.Plan(config=plan_lib.canonical_config(c), num_steps=100, warmup_steps=1,
                         steps_per_epoch=100.0, eval_batch_size=sizes.train_batch, num_classes=1000,
                         num_train_examples=100 * sizes.train_batch, num_eval_examples=sizes.train_batch)
    placement = placement_lib.make_placement(plan, mesh)
    state = placement.put_state(state_lib.create_train_state(plan, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    batch = placement.put_batch(dict(
        image=rng.standard_normal((sizes.train_batch, sizes.image_size, sizes.image_size, 3), np.float32),
        label=np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, sizes.train_batch)]))
    key = jax.random.PRNGKey(1)
    for _ in range(max(sizes.warmup, 1)):
      state, metrics = placement.step(state, batch, key, False)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(sizes.train_steps):
      state, metrics = placement.step(state, batch, key, False)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / sizes.train_steps
    model = vit.build_model(plan.config.model)
    forward = throughput.compile_forward(throughput.model_forward(model), throughput.inference_variables(
        jax.tree.map(np.asarray, {"params": placement.global_state(state).params,
                                  "batch_stats": placement.global_state(state).batch_stats})),
        sizes.train_batch, (sizes.image_size, sizes.image_size, 3), throughput.local_mesh())
    # 3 x forward: the backward pass costs about twice the forward (the usual MFU convention).
    cost_flops = 3.0 * forward.flops_per_image * sizes.train_batch
    analytic_flops = 3.0 * _analytic_flops(plan.config.model) * sizes.train_batch
    mfu = lambda flops: flops / seconds / bf16_peak if bf16_peak and np.isfinite(flops) else None  # noqa: E731
    rows.append(dict(model=name, variant="S/16", dtype="bfloat16", batch_size=sizes.train_batch,
                     step_seconds=seconds, images_per_second=sizes.train_batch / seconds,
                     model_flops_per_step=cost_flops, analytic_model_flops_per_step=analytic_flops,
                     mfu=mfu(cost_flops), mfu_analytic=mfu(analytic_flops),
                     bf16_peak_flops_per_second=bf16_peak, matmul_precision=matmul_precision()))
  return None, dict(rows=rows)


def parts_for(sizes: Sizes) -> list:
  inference = [Part(f"inference_{v.replace('/', '').lower()}",
                    lambda ctx, v=v: inference_benchmark(ctx, v), est,
                    f"interleaved inference benchmark at {v}", timing=True)
               for v, est in zip(sizes.variants, (100, 130))]
  return ([Part("env", environment, 10, "device and versions"),
           Part("fold", fold_exactness, 20, "BN folding exactness"),
           Part("sync", bn_sync, 25, "BN statistics, jit vs pmap"),
           Part("resume", resume_exactness, 60, "preempted and resumed run vs uninterrupted"),
           Part("quickstart", quickstart, 120, "the quickstart trained in bf16"),
           Part("peaks", matmul_peaks, 15, "dense matmul peaks", timing=True)]
          + inference +
          [Part("train", training_throughput, 45, "train-step img/s and MFU", timing=True)])


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


def _verdict(ok):
  return {True: "OK", False: "FAIL", None: "measured"}[ok]


def _flops_line(value):
  return "-" if not value else f"{value / 1e9:.2f}"


def markdown(doc: dict, all_parts) -> str:
  parts = doc["parts"]
  env = (parts.get("env") or {}).get("result")
  title = (f"{env['device_kind']} ({env['backend']}, {env['num_devices']} device(s))" if env
           else doc["device"])
  lines = [f"# Accelerator check: {title}", ""]
  if doc["reduced"]:
    lines += ["REDUCED mode (tiny sizes; numbers are not measurements).", ""]
  if env:
    lines += [f"JAX {env['jax']}, jaxlib {env['jaxlib']}, CUDA {env['cuda'] or '-'}, Flax {env['flax']}, "
              f"Optax {env['optax']}, Orbax {env['orbax']}, Python {env['python']}; default matmul "
              f"precision: {env['default_matmul_precision']}.", ""]
  lines += [f"Overall: {'OK' if doc['ok'] else 'FAILED'}; {doc['wall_seconds']:.0f} s over "
            f"{len(parts)} part(s)"
            + (f"; not run yet: {', '.join(doc['missing_parts'])}" if doc["missing_parts"] else "")
            + f". How these files are made: {RESULTS_README}.", "",
            "| part | result | wall s | XLA flags | matmul precision |", "|---|---|---|---|---|"]
  for name in all_parts:
    p = parts.get(name)
    if p is None:
      lines.append(f"| {name} | not run | - | - | - |")
    else:
      verdict = f"ERROR: {p['error']}"[:120] if "error" in p else _verdict(p["ok"])
      lines.append(f"| {name} | {verdict} | {p['wall_seconds']:.1f} | {p.get('xla_flags') or '-'} | "
                   f"{p.get('matmul_precision', '-')} |")
  result = lambda name: (parts.get(name) or {}).get("result")  # noqa: E731

  if result("peaks"):
    lines += ["", "## Dense matmul peak", ""]
    for key, p in result("peaks").items():
      lines.append(f"- {p['dtype']} at matmul precision '{p['matmul_precision']}': "
                   f"{p['flops_per_second'] / 1e12:.2f} TFLOP/s ({p['size']}^3 per device)")
  checks = [n for n in ("fold", "sync", "resume") if result(n)]
  if checks:
    lines += ["", "## Correctness (small models)", ""]
  if result("fold"):
    for name, f in result("fold")["models"].items():
      lines.append(f"- fold {name} (float64 fold, forward at 'highest'): max relative logit difference "
                   f"{f['max_relative_difference']:.2e} (tolerance {f['tolerance']:g}) -> {_verdict(f['ok'])}")
  if result("sync"):
    s = result("sync")
    lines.append(f"- BN sync jit == pmap ({s['devices']} device(s), 'highest'): loss rel. diff "
                 f"{s['max_loss_relative_difference']:.2e}, BN stats rel. diff "
                 f"{s['max_bn_stats_difference']:.2e} -> {_verdict(parts['sync']['ok'])}"
                 + ("" if s["proves_synchronisation"] else
                    ". With one device this proves nothing about synchronisation (there is nothing to "
                    "synchronise); it only shows the jit and pmap paths compute the same on this backend"))
  if result("resume"):
    r = result("resume")
    diff = "-" if r["max_abs_difference"] is None else f"{r['max_abs_difference']:.2e}"
    lines.append(f"- resume ({r['dtype']}): preempted at step {r['preempted_at']}, resumed to {r['final_step']}; "
                 f"bit-identical: {r['bit_identical']}, same tree structure: {r['same_structure']}, "
                 f"largest difference {diff} (required: {r['required']}; deterministic ops: "
                 f"{r['deterministic_ops']}) -> {_verdict(parts['resume']['ok'])}")
  inference = [n for n in all_parts if n.startswith("inference_") and result(n)]
  if inference:
    lines += ["", "## Inference (interleaved; ratios are medians of per-round ratios)", "",
              "f32 runs at the matmul precision named (on NVIDIA GPUs 'default' means TF32), its "
              "in-round peak too. GFLOP/img from XLA's cost analysis and from the analytic count "
              "(vitnorm.inference.flops); cost analysis has missed cuBLAS calls on GPU.", ""]
    for name in inference:
      for report in result(name)["reports"]:
        lines += [f"Matmul precision: '{report['matmul_precision']}'.", "", report["markdown"], "",
                  "| model | GFLOP/img cost analysis | GFLOP/img analytic | of peak (analytic) |",
                  "|---|---|---|---|"]
        for row in report["results"]:
          frac = row.get("fraction_of_matmul_peak_analytic")
          lines.append(f"| {row['model']} | {_flops_line(row.get('flops_per_image'))} | "
                       f"{_flops_line(row['analytic_flops_per_image'])} | "
                       f"{'-' if frac is None else f'{frac:.1%}'} |")
        lines.append("")
  if result("train"):
    lines += ["", "## Training step (jit, synthetic batches)", "",
              "| model | variant | dtype | batch | img/s | step ms | MFU (cost analysis) | MFU (analytic) | precision |",
              "|---|---|---|---|---|---|---|---|---|"]
    for t in result("train")["rows"]:
      pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
      lines.append(f"| {t['model']} | {t['variant']} | {t['dtype']} | {t['batch_size']} | "
                   f"{t['images_per_second']:.0f} | {1000 * t['step_seconds']:.2f} | {pct(t['mfu'])} | "
                   f"{pct(t['mfu_analytic'])} | {t['matmul_precision']} |")
    lines.append("\nMFU: 3 x forward FLOPs per step / step time / the bf16 matmul peak of the peaks part.")
  if result("quickstart"):
    q = result("quickstart")
    top1 = "-" if q["eval_top1"] is None else f"{100 * q['eval_top1']:.2f}%"
    lines += ["", "## Quickstart in bf16", "",
              f"{q['data']}: {q['status']} after {q['steps']} steps, eval top-1 {top1}, "
              f"{q['wall_seconds']:.0f} s wall"
              + (f", {q['train_img_per_s']:.0f} img/s incl. compilation" if q["train_img_per_s"] else "")]
  return "\n".join(lines) + "\n"


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
    accelerator_runner.write_atomically(md_path, markdown(d, names))

  labels = lambda: dict(xla_flags=os.environ.get("XLA_FLAGS", ""), matmul_precision=matmul_precision())  # noqa: E731
  with tempfile.TemporaryDirectory(prefix="vitnorm-accel-") as tmp:
    ctx = Context(sizes=sizes, reduced=bool(reduced), data_npz=data_npz, tmp=tmp, doc=doc)
    doc = accelerator_runner.run_parts(all_parts, selected, doc, save=save, context=ctx, force=force,
                                       kill_at_part=kill_at_part, log=_log, labels=labels)
  save(doc)
  _log(f"wrote {json_path} and .md: {'OK' if doc['ok'] else 'FAILED'}"
       + (f"; not run yet: {', '.join(doc['missing_parts'])}" if doc["missing_parts"] else ""))
  return doc


def plan_text(data_npz="accel_carry/mnist5k.npz", out="experiments/results/accelerator") -> str:
  """The commands that fit the device budget: check parts first (deterministic), timing parts after."""
  commands = accelerator_runner.plan_commands(parts_for(FULL), COMMAND_BUDGET_SECONDS)
  install = "pip install --no-deps --no-index accel_carry/wheels/*.whl && "
  lines = [f"# {len(commands)} device command(s), estimated at most {COMMAND_BUDGET_SECONDS} s, "
           f"killed at {COMMAND_TIMEOUT_SECONDS} s (estimated seconds per part; the JSON records the measured ones). Run from the repository "
           "root; a killed or timed-out command keeps its finished parts, and running it again resumes.",
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
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DETERMINISTIC_FLAG}".strip()
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
