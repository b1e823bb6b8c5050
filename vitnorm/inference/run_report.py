"""Accuracy, folding check and inference throughput of a trained run (or of a config with random weights).

  python -m vitnorm.evaluate --workdir=DIR [--step=N] [--use_ema] [--batch_sizes=1,8,64]
      [--eval_batch_size=256] [--dtype=bfloat16] [--no_throughput] [--no_accuracy]
  python -m vitnorm.evaluate --config=configs/F.py[:args] [--output_dir=DIR] ...

With --workdir the run's config.json and a checkpoint (the latest, or --step) are read; with
--config the model gets random weights (throughput; accuracy too if the dataset is available).

Accuracy: top-1 and mean cross-entropy over *every* example of data.eval_split (the last batch
padded and masked out, see vitnorm.evaluation). A BN model whose norms all fold
(vitnorm.model.fold) is evaluated both as trained and folded into the norm-free ViT; the two must
agree (their difference is reported). The accuracy pass, and with it the fold check, runs at
`jax.default_matmul_precision("highest")` (float32 matmuls in full float32 on every backend): at
the default precision (TF32-like on recent NVIDIA GPUs, bfloat16 passes on TPU) the folded and
unfolded models round differently and a correct fold could miss the float32 tolerance (loss
within 1e-5 relative; bfloat16 compute gets 2e-2). Throughput is measured at
the default precision, as the models run in practice; the report names the precision of each.
A PRepBN checkpoint is evaluated with lam at its step (vitnorm.model.vit.at_step) and folded only
once lam is 0; DyT and QK-norm models, like LN ones, are reported as not foldable, with the reason.

Throughput: for each batch size, the model as trained and (for BN models) its folded version
are compiled once (compile seconds reported apart), warmed up and timed interleaved over
`repeats` rounds of `iterations` calls (vitnorm.inference.throughput): images/s median and min-max, latency
per batch, FLOPs per image from XLA's cost analysis, device count and dtype. A batch size that
does not fit in memory is reported as such and the next one is measured.

Results: DIR/evaluation.json, DIR/evaluation.md (markdown tables) and the same tables on stdout
(DIR: --output_dir, default the --workdir; with --config and no --output_dir, stdout only).
"""
import json
from typing import Optional, Sequence

import jax
import ml_collections

from vitnorm import parallel, paths
from vitnorm.errors import ConfigError, UserError
from vitnorm.inference import throughput
from vitnorm.model import fold, norms, vit
from vitnorm import checkpoints, evaluation

JSON_FILE = "evaluation.json"
MARKDOWN_FILE = "evaluation.md"
AS_TRAINED, FOLDED = "as_trained", "folded"  # names of the two models in the results
CHECK_PRECISION = "highest"  # matmul precision of the accuracy pass and the fold check


def default_precision() -> str:
  """The matmul precision the models run at outside the check (jax_default_matmul_precision)."""
  return str(jax.config.jax_default_matmul_precision or "default")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def default_batch_sizes(num_devices: int, backend: str) -> list:
  per_device = (1, 8) if backend == "cpu" else (1, 8, 64)
  return [num_devices * b for b in per_device]


def parse_batch_sizes(values: Optional[Sequence[str]], num_devices: int) -> list:
  """--batch_sizes -> ints, each divisible by the device count, or a one-line ConfigError."""
  if not values:
    return default_batch_sizes(num_devices, jax.default_backend())
  sizes = []
  for v in values:
    try:
      sizes.append(int(str(v).strip()))
    except ValueError:
      raise ConfigError("--batch_sizes", f"{v!r} is not an integer; give a list like 8,64") from None
    parallel.check_batch_divisible(sizes[-1], "--batch_sizes", num_devices)
  return sizes


def eval_batch_size(cfg, override: Optional[int], num_devices: int) -> int:
  """The accuracy pass's global batch: the flag, config.eval_batch_size, or batch_size // accum_steps."""
  if override is not None:
    size, field = override, "--eval_batch_size"
  elif cfg.get("eval_batch_size"):
    size, field = int(cfg.eval_batch_size), "config.eval_batch_size (or set --eval_batch_size)"
  else:
    size = int(cfg.get("batch_size", 256)) // max(int(cfg.get("accum_steps", 1) or 1), 1)
    field = "--eval_batch_size (default batch_size // accum_steps)"
  parallel.check_batch_divisible(size, field, num_devices)
  return size


def load_model(workdir: Optional[str], config: Optional[ml_collections.ConfigDict], *,
               step: Optional[int] = None, use_ema: bool = False, dtype: Optional[str] = None):
  """(config, model, variables, source) of a trained run (workdir) or with random weights (config).

  `dtype` overrides the compute dtype (model.dtype) of the config; the weights stay float32.
  """
  if (workdir is None) == (config is None):
    raise UserError("give either --workdir=DIR (a trained run) or --config=FILE (random weights), "
                    "not both and not neither")
  if config is not None:
    if step is not None or use_ema:
      raise UserError("--step and --use_ema need --workdir (a trained run); --config evaluates "
                      "random weights")
    if dtype:
      config.model.dtype = dtype
    spec = vit.model_spec(config.model)
    model = vit.build_model(spec)
    seed = int(config.get("seed", 0) or 0)
    variables = vit.init_variables(model, jax.random.key(seed), spec.input_shape(1))
    source = dict(weights="random", seed=seed)
    return config, model, throughput.inference_variables(variables), source
  if not paths.is_dir(workdir):
    raise UserError(f"--workdir {workdir} does not exist; pass the workdir of a training run")
  config = checkpoints.load_run_config(workdir)
  if not checkpoints.all_steps(workdir):
    raise UserError(f"no checkpoint in {checkpoints.checkpoint_dir(workdir)}: the run saved none "
                    "yet; train longer or pass another --workdir")
  if dtype:
    config.model.dtype = dtype
  variables, step = checkpoints.restore_variables(workdir, step, use_ema=use_ema)
  model = vit.at_step(vit.build_model(config.model), step)  # PRepBN: lam at the checkpoint's step
  source = dict(weights="checkpoint", workdir=paths.resolve(workdir), step=int(step), use_ema=use_ema)
  return config, model, variables, source


def has_batchnorm(model) -> bool:
  """BatchNorm or PRepBN (the latter folds once its lam is 0)."""
  return any(norms.uses_batch_stats(k) for k in (model.norm, model.ffn_norm))


# ----------------------------------------------------------------------------------------------
# Accuracy and throughput
# ----------------------------------------------------------------------------------------------


def evaluate_accuracy(config, models: dict, *, global_batch_size: int, mesh, required: bool,
                      dtype: str = "float32") -> dict:
  """{name: {top1, loss, num_examples}} over the eval split for each model in `models`.

  If the dataset is not available: UserError when `required`, else {'skipped': reason}.
  """
  from vitnorm import data  # pylint: disable=g-import-not-at-top  # TensorFlow only when needed
  try:
    info = data.dataset_info(config.data)
    data.check_model_compatible(config.data, config.model, info)
  except UserError as e:
    if required:
      raise
    return dict(skipped=f"dataset not available: {e}")
  out = dict(dataset=info.name, split=str(config.data.get("eval_split", "")),
             eval_batch_size=global_batch_size)
  out["matmul_precision"] = CHECK_PRECISION
  with jax.default_matmul_precision(CHECK_PRECISION):  # the fold check must not see TF32 / bf16 passes
    for name, (model, variables) in models.items():
      batches = data.eval_batches(config.data, global_batch_size=global_batch_size)
      out[name] = evaluation.evaluate_classifier(model, variables, batches, mesh=mesh)
  if AS_TRAINED in out and FOLDED in out:
    a, b = out[AS_TRAINED], out[FOLDED]
    top1_diff = abs(a["top1"] - b["top1"])
    loss_diff = abs(a["loss"] - b["loss"])
    # Folding changes float round-off only: a few near-tie predictions may flip. bfloat16
    # computes with ~3 significant digits (float16 ~4), so both get wider bounds than float32. In float32 at
    # "highest" the two losses differ by ~1e-7 relative (tiny ViTs: 0 to 2e-8), so 1e-5 leaves a
    # wide margin and still catches one BN scale off by 1% (~1e-4 on a random-weight ViT).
    top1_tol, loss_tol = (1e-2, 2e-2) if dtype in ("bfloat16", "float16") else (1e-3, 1e-5)
    out["folded_agrees"] = bool(
        top1_diff <= max(2.0 / max(a["num_examples"], 1), top1_tol) + 1e-12 and
        loss_diff <= loss_tol * max(1.0, abs(a["loss"])))
    out["folded_top1_difference"], out["folded_loss_difference"] = top1_diff, loss_diff
  return out


def measure_throughput(models: dict, dtype: str, batch_sizes: Sequence[int], image_shape, *,
                       warmup: int, iterations: int, repeats: int, log=lambda _: None) -> list:
  candidates = [throughput.Candidate(name, throughput.model_forward(model), variables, dtype=dtype)
                for name, (model, variables) in models.items()]
  results = throughput.measure_batch_sizes(candidates, batch_sizes, image_shape, warmup=warmup,
                                           iterations=iterations, repeats=repeats, log=log)
  return [dict(r.to_json(), matmul_precision=default_precision()) for r in results]


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------


def format_markdown(report: dict) -> str:
  """Markdown: a header about the model and source, the accuracy table and the throughput table."""
  src, m = report["source"], report["model"]
  if src["weights"] == "checkpoint":
    title = f"# Evaluation of {src['workdir']} (step {src['step']}{', EMA weights' if src['use_ema'] else ''})"
  else:
    title = f"# Evaluation of {report.get('config_name') or 'a config'} with random weights (seed {src['seed']})"
  sizes = report["resolved_model"]
  lines = [title, "",
           f"Model: {m.get('variant') or 'custom'} (hidden {sizes['hidden_size']}, {sizes['num_layers']} "
           f"layers), {sizes['image_size']}px, norm={sizes['norm']}, ffn_norm={sizes['ffn_norm']}"
           f"{' (' + sizes['ffn_norm_position'] + ')' if sizes['ffn_norm'] != 'none' else ''}, "
           f"{'qk_norm=' + sizes['qk_norm'] + ', ' if sizes['qk_norm'] != 'none' else ''}"
           f"classifier={sizes['classifier']}, dtype={sizes['dtype']}.",
           f"Folding: {'folded' if report['folding']['applied'] else 'not applied'} -- "
           f"{report['folding']['reason']}.",
           f"Devices: {report['devices']['num_devices']} x {report['devices']['backend']} "
           f"({report['devices']['device_kind']}).", ""]
  acc = report["accuracy"]
  lines.append("## Accuracy")
  lines.append("")
  if "skipped" in acc:
    lines.append(f"Skipped: {acc['skipped']}.")
  else:
    rows = [[name, throughput.fmt(100 * acc[name]["top1"], ".2f"), throughput.fmt(acc[name]["loss"], ".4f"),
             acc[name]["num_examples"]] for name in (AS_TRAINED, FOLDED) if name in acc]
    lines.append(f"{acc['dataset']} split '{acc['split']}', every example counted (batch "
                 f"{acc['eval_batch_size']}, last batch padded and masked), matmul precision "
                 f"{acc.get('matmul_precision', CHECK_PRECISION)}.")
    lines.append("")
    lines.append(throughput.markdown_table(["model", "top-1 %", "loss", "examples"], rows))
    if "folded_agrees" in acc:
      lines.append("")
      lines.append(f"Folded vs as trained: top-1 differs by {100 * acc['folded_top1_difference']:.3f} "
                   f"points, loss by {acc['folded_loss_difference']:.2e} "
                   f"({'agree' if acc['folded_agrees'] else 'DISAGREE: folding is broken'}).")
  lines += ["", "## Inference throughput", ""]
  tp = report["throughput"]
  if isinstance(tp, dict):
    lines.append(f"Skipped: {tp['skipped']}.")
  else:
    rows = []
    for r in tp:
      ips = r["images_per_second"]
      if r["status"] != "ok":
        rows.append([r["model"], r["batch_size"], r["status"].replace("_", " "), "-", "-", "-",
                     throughput.fmt(r["compile_seconds"]), r["num_devices"], r["dtype"]])
        continue
      rows.append([r["model"], r["batch_size"], throughput.fmt(ips["median"]),
                   f"{throughput.fmt(ips['min'])}-{throughput.fmt(ips['max'])}",
                   throughput.fmt(r["latency_ms"], ".2f"),
                   throughput.fmt(None if r["flops_per_image"] is None else r["flops_per_image"] / 1e9, ".3g"),
                   throughput.fmt(r["compile_seconds"]), r["num_devices"], r["dtype"]])
    first = tp[0] if tp else {}
    lines.append(f"Interleaved over {first.get('repeats', 0)} repeats of {first.get('iterations', 0)} "
                 f"calls after {first.get('warmup', 0)} warm-up calls; images/s median and min-max over "
                 f"repeats; FLOPs from XLA cost analysis; matmul precision "
                 f"{first.get('matmul_precision', 'default')}.")
    lines.append("")
    lines.append(throughput.markdown_table(
        ["model", "batch", "img/s", "min-max", "ms/batch", "GFLOP/img", "compile s", "devices", "dtype"],
        rows))
  return "\n".join(lines) + "\n"


def evaluate(*, workdir: Optional[str] = None, config: Optional[ml_collections.ConfigDict] = None,
             config_name: Optional[str] = None, step: Optional[int] = None, use_ema: bool = False,
             batch_sizes: Optional[Sequence[str]] = None, eval_batch_size_override: Optional[int] = None,
             accuracy: bool = True, measure: bool = True, warmup: int = 2, iterations: int = 10,
             repeats: int = 3, output_dir: Optional[str] = None, dtype: Optional[str] = None,
             log=lambda _: None) -> dict:
  """Everything `python -m vitnorm.evaluate` does; returns the report written to evaluation.json."""
  if iterations < 1 or repeats < 1 or warmup < 0:
    raise ConfigError("--iterations/--repeats/--warmup", "need iterations >= 1, repeats >= 1, warmup >= 0")
  if workdir is not None and not paths.is_dir(workdir):
    raise UserError(f"--workdir {workdir} does not exist; pass the workdir of a training run")
  num_local = jax.local_device_count()
  sizes = parse_batch_sizes(batch_sizes, num_local) if measure else []
  output_dir = output_dir or workdir
  if output_dir and not paths.is_url(output_dir) and not paths.is_dir(output_dir):
    raise ConfigError("--output_dir", f"{output_dir} does not exist; create it first")
  if dtype is not None and dtype not in vit.DTYPES:
    raise ConfigError("--dtype", f"unknown dtype {dtype!r}; choose one of {', '.join(vit.DTYPES)}")
  # Check the eval batch size on the config before restoring anything.
  preview = config if config is not None else (
      checkpoints.load_run_config(workdir) if workdir is not None else None)
  eval_bs = None
  if accuracy and preview is not None:
    eval_bs = eval_batch_size(preview, eval_batch_size_override, jax.device_count())
  config, model, variables, source = load_model(workdir, config, step=step, use_ema=use_ema,
                                                dtype=dtype)
  foldable, reason = fold.foldability(model)
  models = {AS_TRAINED: (model, variables)}
  applied = has_batchnorm(model) and foldable
  if applied:
    models[FOLDED] = fold.fold_batchnorm(model, variables)
  elif foldable:
    reason = "no BatchNorm to fold"
  mesh = parallel.data_mesh()
  spec = vit.model_spec(config.model)
  dtype = throughput.dtype_name(spec.dtype)
  resolved = {k: v for k, v in spec.as_dict().items() if k != "norm_options"}
  report = dict(
      source=source, config_name=config_name, model=config.model.to_dict(),
      resolved_model=dict(resolved, dtype=dtype),
      devices=dict(backend=jax.default_backend(), device_kind=jax.local_devices()[0].device_kind,
                   num_devices=num_local, num_processes=jax.process_count()),
      folding=dict(foldable=foldable, applied=applied, reason=reason))
  if accuracy:
    log(f"accuracy over the eval split (global batch {eval_bs}) ...")
    report["accuracy"] = evaluate_accuracy(config, models, global_batch_size=eval_bs, mesh=mesh,
                                           required=source["weights"] == "checkpoint", dtype=dtype)
  else:
    report["accuracy"] = dict(skipped="--no_accuracy")
  if measure:
    image_shape = spec.input_shape()[1:]
    report["throughput"] = measure_throughput(
        models, dtype, sizes, image_shape, warmup=warmup,
        iterations=iterations, repeats=repeats, log=log)
  else:
    report["throughput"] = dict(skipped="--no_throughput")
  markdown = format_markdown(report)
  report["markdown"] = markdown
  if output_dir and parallel.is_main_process():
    doc = throughput.nan_to_none({k: v for k, v in report.items() if k != "markdown"})
    paths.write_text_atomic(paths.join(output_dir, JSON_FILE),
                            json.dumps(doc, indent=2, default=_json_default, allow_nan=False) + "\n")
    paths.write_text_atomic(paths.join(output_dir, MARKDOWN_FILE), markdown)
  return report


def _json_default(value):
  if hasattr(value, "item"):
    return value.item()
  return str(value)

