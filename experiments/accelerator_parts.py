"""The parts of experiments.accelerator_check: what each one measures or checks, at full size on an
accelerator or at tiny sizes on CPU (Sizes). Each part is part(ctx) -> (ok, result); see
experiments.accelerator_runner for how they are run and kept."""
import dataclasses
import os
import re
import sys
import time
from typing import Optional

import numpy as np

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
# Without DETERMINISTIC_FLAG XLA:GPU may reduce in another order from run to run; 12 Adam steps of
# the small model then differ by float32 round-off amplified by the optimizer. Largest accepted
# |full - resumed| / max(1, |full|) over every parameter and BN statistic:
RESUME_TOLERANCE = 1e-3
FOLD_TOLERANCE = 1e-5  # max |folded - unfolded| / max |unfolded| logits at 'highest' (float32 round-off)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything that differs between the full check and the reduced (CPU, test) one."""
  variants: tuple = ("S/16", "B/16")  # ViT sizes of the inference benchmark: one part each
  image_size: int = 224  # image side of the inference and train-step benchmarks
  batch_size: int = 256  # global batch of the inference benchmark
  dtypes: tuple = ("bfloat16", "float32")  # compute dtypes of the inference benchmark
  inference_models: Optional[tuple] = None  # None: every model of vitnorm.inference.comparison
  tiny_model: dict = None  # overrides of the ViT size (reduced mode); None: the variant's own
  warmup: int = 2  # untimed calls before timing (benchmarks and the matmul peaks)
  iterations: int = 10  # timed calls per round
  repeats: int = 5  # rounds (the median over rounds is reported)
  matmul_size: int = 0  # side of the peak matmul; 0: throughput.default_matmul_size()
  train_batch: int = 256  # global batch of the train-step benchmark
  train_steps: int = 10  # timed train steps
  train_models: tuple = ("ln", "bn_ffnbn")  # models of the train-step benchmark
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
  """What every part gets."""
  sizes: Sizes  # FULL or REDUCED
  reduced: bool  # tiny sizes (CPU, tests): the numbers mean nothing
  data_npz: Optional[str]  # --data_npz (resume, quickstart); None: scikit-learn digits
  tmp: str  # a scratch folder for the parts' workdirs, removed at the end
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
  from vitnorm import checkpoints  # pylint: disable=import-outside-toplevel
  from vitnorm.training import loop  # pylint: disable=import-outside-toplevel
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
    model = vit.build_model(plan.model)
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
