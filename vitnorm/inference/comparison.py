"""The paper's inference-speed comparison, in one process.

For one model size (default ViT-S/16 at 224 px) it builds the variants

  ln               LayerNorm ViT (the standard model)
  bn_folded        BN ViT with its BatchNorms folded into the Dense layers (vitnorm.model.fold)
  bn_unfolded      the same BN ViT run as trained (BN layers applied with running statistics)
  bn_ffnbn_folded  BN ViT with an extra BN in the FFN (the paper's model), folded
  bn_ffnbn_unfolded  the same, unfolded (not in the default list)
  rms              RMSNorm ViT
  dyt              DyT ViT (Dynamic Tanh in place of every LN; not foldable, no statistics)
  prepbn_folded    PRepBN ViT (SLAB) at the end of training (lam = 0), its RepBNs folded
  prepbn_unfolded  the same, RepBN layers applied (not in the default list)
  ln_qknorm        LN ViT with LayerNorm on queries and keys (not in the default list)
  none             no normalization at all: the floor a folded model should reach

and times them interleaved (A B C A B C ..., see vitnorm.inference.throughput) at each batch size, so machine
drift hits every model alike. It prints images/s (median and min-max over the repeats), latency per
batch, the ratio to the LN model and to the no-norm model (median over rounds of the ratio within
each round), FLOPs per image (XLA cost analysis), the
achieved FLOP/s and its fraction of the device's dense matmul FLOP/s, measured in the same
interleaved rounds (a matmul joins every round), so the fraction is not skewed by drift either.

  python -m vitnorm.benchmark --variant=S/16 --image_size=224 --batch_sizes=8,64 \
      --dtype=float32 --iterations=10 --repeats=5 --output=/tmp/benchmark.json

Weights are random (speed does not depend on their values; the BN running statistics are
random too, so the folds are real). All flags are listed with `--help`.
"""
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from vitnorm.errors import ConfigError
from vitnorm.inference import throughput
from vitnorm.model import fold, vit

# name -> (model config overrides, folded?)
MODELS = {
    "ln": (dict(norm="layer"), False),
    "bn_folded": (dict(norm="batch"), True),
    "bn_unfolded": (dict(norm="batch"), False),
    "bn_ffnbn_folded": (dict(norm="batch", ffn_norm="batch"), True),
    "bn_ffnbn_unfolded": (dict(norm="batch", ffn_norm="batch"), False),
    "rms": (dict(norm="rms"), False),
    "dyt": (dict(norm="dyt"), False),
    # A model built without a step is at the end of training: lam = 0, only RepBN runs.
    "prepbn_folded": (dict(norm="prepbn"), True),
    "prepbn_unfolded": (dict(norm="prepbn"), False),
    "ln_qknorm": (dict(norm="layer", qk_norm="layer"), False),
    "none": (dict(norm="none"), False),
    # A second copy of the no-norm program (same weights, compiled apart): its ratio to `none` is
    # the A/A line, the noise floor of the measurement.
    "none_aa": (dict(norm="none"), False),
}
AA_PAIR = ("none_aa", "none")
AA_TOLERANCE = 0.03  # an A/A ratio further than this from 1.0 flags the batch size as unreliable
SPREAD_TOLERANCE = 0.10  # so does a model whose (max - min) / median images/s over repeats exceeds this
DEFAULT_MODELS = ("ln", "bn_folded", "bn_unfolded", "bn_ffnbn_folded", "rms", "dyt", "prepbn_folded",
                  "none")
FOLDED_MODELS = tuple(name for name, (_, folded) in MODELS.items() if folded)
BASELINE, FLOOR = "ln", "none"

def parse_int_list(values: Sequence[str], field: str) -> List[int]:
  """['8', '64'] -> [8, 64], or a ConfigError naming the flag."""
  out = []
  for v in values:
    try:
      out.append(int(str(v).strip()))
    except ValueError:
      raise ConfigError(field, f"{v!r} is not an integer; give a comma-separated list like 8,64") from None
    if out[-1] <= 0:
      raise ConfigError(field, f"{out[-1]} must be positive")
  if not out:
    raise ConfigError(field, "is empty; give at least one batch size, e.g. 8")
  return out


def random_variables(model, model_cfg, seed: int) -> dict:
  """Random params and (for BN) running statistics, drawn on the host from the model's shapes.

  Kernels ~ N(0, 1/fan_in), biases and embeddings ~ N(0, 0.02), norm scales ~ 1 + N(0, 0.1),
  BN means ~ N(0, 0.1) and variances ~ U(0.5, 2).
  """
  shapes = vit.variable_shapes(model, vit.input_shape(model_cfg, 1))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif name.endswith("['mean']"):
      value = 0.1 * rng.standard_normal(leaf.shape)
    elif name.endswith("['scale']"):
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name.endswith("['kernel']"):
      value = rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[0] if len(leaf.shape) == 2 else
                                                        np.prod(leaf.shape[:-1]))
    else:
      value = 0.02 * rng.standard_normal(leaf.shape)
    return np.asarray(value, leaf.dtype)

  shapes = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
  return jax.tree_util.tree_map_with_path(draw, shapes)


def model_config(variant: str, image_size: int, *, num_classes: int = 1000, num_channels: int = 3,
                 classifier: str = "token", ffn_norm_position: str = "pre_act", dtype: str = "float32",
                 **sizes) -> dict:
  """The common model config of the compared variants (validated; bad fields raise ConfigError)."""
  cfg = dict(variant=variant, image_size=image_size, num_classes=num_classes,
             num_channels=num_channels, classifier=classifier,
             ffn_norm_position=ffn_norm_position, dtype=dtype)
  cfg.update({k: v for k, v in sizes.items() if v is not None})
  try:
    vit.model_spec(cfg)
  except ConfigError as e:  # name the flag the user typed, not the config field
    flag = "--" + e.field.split(".")[-1]
    raise ConfigError(flag, str(e)[len(e.field) + 2:]) from None
  return cfg


def build_candidates(base_cfg: dict, names: Sequence[str], seed: int = 0) -> List[throughput.Candidate]:
  """One throughput.Candidate per model name (folded ones rewritten by vitnorm.model.fold)."""
  unknown = [n for n in names if n not in MODELS]
  if unknown:
    raise ConfigError("--models", f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
  cache = {}  # models sharing a config share weights (bn_folded is the fold of bn_unfolded)
  out = []
  for name in names:
    overrides, folded = MODELS[name]
    cfg = dict(base_cfg, **overrides)
    key = tuple(sorted(overrides.items()))
    model = vit.build_model(cfg)
    if key not in cache:
      cache[key] = random_variables(model, cfg, seed + len(cache))
    variables = cache[key]
    if folded:
      model, variables = fold.fold_batchnorm(model, variables)
    out.append(throughput.Candidate(name, throughput.model_forward(model), variables, dtype=cfg["dtype"]))
  return out


def run_benchmark(base_cfg: dict, *, models: Sequence[str] = DEFAULT_MODELS, batch_sizes=(8,),
                  warmup: int = 2, iterations: int = 10, repeats: int = 5, matmul_size: int = 0,
                  seed: int = 0, log=print) -> dict:
  """Runs the comparison; returns a JSON-able dict (setup, matmul peak, one row per model x batch)."""
  if iterations < 1 or repeats < 1 or warmup < 0:
    raise ConfigError("--iterations/--repeats/--warmup", "need iterations >= 1, repeats >= 1, warmup >= 0")
  if not models:
    raise ConfigError("--models", "is empty; name at least one model")
  mesh = throughput.local_mesh()
  for b in batch_sizes:
    throughput.check_batch_size(b, mesh)
  image_shape = vit.model_spec(base_cfg).input_shape()[1:]
  candidates = build_candidates(base_cfg, models, seed)
  matmul = throughput.prepare_matmul(base_cfg.get("dtype", "float32"), size=matmul_size or None,
                                     mesh=mesh)
  rows, peaks, checks = [], {}, {}
  for b in batch_sizes:
    results = throughput.measure(candidates, b, image_shape, warmup=warmup, iterations=iterations,
                                 repeats=repeats, mesh=mesh, matmul=matmul, log=log)
    peaks[b] = next(iter(results.values())).matmul_peak_flops_per_second
    log(f"batch {b}: dense matmul peak in the same rounds {peaks[b] / 1e9:.1f} GFLOP/s "
        f"({matmul.size}x{matmul.size} {matmul.dtype} on each of {matmul.num_devices} devices)")
    batch_rows = [_row(r, results) for r in results.values()]
    checks[str(b)] = reliability(batch_rows)
    if not checks[str(b)]["reliable"]:
      log(f"batch {b}: warning: unreliable measurement: {'; '.join(checks[str(b)]['problems'])}")
    rows.extend(batch_rows)
  peak = dict(flops_per_second=float(np.median(list(peaks.values()))),
              per_batch_size={str(b): p for b, p in peaks.items()}, size=matmul.size,
              dtype=matmul.dtype, num_devices=matmul.num_devices, interleaved=True)
  return dict(
      setup=dict(model=dict(base_cfg), models=list(models), batch_sizes=list(batch_sizes),
                 warmup=warmup, iterations=iterations, repeats=repeats,
                 backend=jax.default_backend(), device_kind=jax.local_devices()[0].device_kind,
                 num_devices=int(mesh.devices.size), interleaved=True),
      matmul_peak=peak, results=rows, reliability=checks,
      reliable=all(c["reliable"] for c in checks.values()))


def reliability(rows: Sequence[dict]) -> dict:
  """The measurement's own verdict for one batch size: the A/A ratio and the largest repeat spread.

  Unreliable when the A/A pair (two identical programs) is further than AA_TOLERANCE from 1.0, or
  when a model's images/s varied over the repeats by more than SPREAD_TOLERANCE of its median.
  Without the A/A pair in the models, only the spread is checked (and the JSON says so).
  """
  by_model = {r["model"]: r for r in rows}
  problems = []
  aa = None
  if all(name in by_model for name in AA_PAIR) and by_model[AA_PAIR[0]].get("status") == "ok":
    aa = by_model[AA_PAIR[0]].get("ratio_to_no_norm")  # paired per round, like every ratio
    if aa is not None and abs(aa - 1.0) > AA_TOLERANCE:
      problems.append(f"A/A ratio {aa:.3f} is further than {AA_TOLERANCE:.0%} from 1")
  spreads = {}
  for r in rows:
    ips = r.get("images_per_second") or {}
    if r.get("status") == "ok" and ips.get("median"):
      spreads[r["model"]] = (ips["max"] - ips["min"]) / ips["median"]
  worst = max(spreads, key=spreads.get) if spreads else None
  if worst is not None and spreads[worst] > SPREAD_TOLERANCE:
    problems.append(f"{worst} varied by {spreads[worst]:.1%} over the repeats (more than "
                    f"{SPREAD_TOLERANCE:.0%})")
  return dict(aa_ratio=aa, aa_checked=aa is not None, max_spread=spreads.get(worst),
              max_spread_model=worst, reliable=not problems, problems=problems)



def paired_ratio(result: throughput.Result, reference: Optional[throughput.Result]) -> float:
  """Median over rounds of (images/s of `result` / images/s of `reference` in the same round).

  The models of one round ran back to back, so each round's ratio is free of the drift between
  rounds; the median over rounds is then robust to a round that a neighbour job disturbed.
  """
  if reference is None or not result.ok or not reference.ok:
    return float("nan")
  a, b = result.images_per_second, reference.images_per_second
  if len(a) != len(b):
    return float("nan")
  return float(np.median([x / y for x, y in zip(a, b)]))


def _row(result: throughput.Result, results: Dict[str, throughput.Result]) -> dict:
  row = result.to_json()
  row["ratio_to_ln"] = paired_ratio(result, results.get(BASELINE))
  row["ratio_to_no_norm"] = paired_ratio(result, results.get(FLOOR))
  return throughput.nan_to_none(row)


def format_report(report: dict) -> str:
  """The markdown table (one row per model and batch size) with a header line about the setup."""
  s, peak = report["setup"], report["matmul_peak"]
  m = s["model"]
  head = (f"{m['variant']} @ {m['image_size']}px, {m.get('dtype', 'float32')}, {s['num_devices']} "
          f"{s['backend']} device(s) ({s['device_kind']}), interleaved over {s['repeats']} rounds of "
          f"{s['iterations']} calls (+{s['warmup']} warm-up); dense matmul peak in the same rounds "
          f"({peak['size']}x{peak['size']} per device): "
          + ", ".join(f"{p / 1e9:.1f} GFLOP/s at batch {b}" for b, p in peak["per_batch_size"].items()))
  headers = ["model", "batch", "img/s (median)", "min-max", "ms/batch", "vs LN", "vs no-norm",
             "GFLOP/img", "achieved GFLOP/s", "of matmul peak", "compile s"]
  rows = []
  for r in report["results"]:
    f = lambda key, spec=".1f", scale=1.0: throughput.fmt(  # noqa: E731
        None if r.get(key) is None else r[key] * scale, spec)
    ips = r["images_per_second"]
    if r["status"] != "ok":
      rows.append([r["model"], r["batch_size"], r["status"].replace("_", " ")] + ["-"] * 7 +
                  [f("compile_seconds")])
      continue
    rows.append([r["model"], r["batch_size"], throughput.fmt(ips["median"]),
                 f"{throughput.fmt(ips['min'])}-{throughput.fmt(ips['max'])}", f("latency_ms", ".2f"),
                 f("ratio_to_ln", ".3f"), f("ratio_to_no_norm", ".3f"), f("flops_per_image", ".3g", 1e-9),
                 f("achieved_flops_per_second", ".1f", 1e-9), f("fraction_of_matmul_peak", ".1%"),
                 f("compile_seconds")])
  notes = []
  for r in report["results"]:  # A/A check: a folded BN model *is* the no-norm model
    if r["model"] in FOLDED_MODELS and r.get("ratio_to_no_norm") is not None:
      notes.append(f"{r['model']} and none run the same program (batch {r['batch_size']}): their "
                   f"ratio {r['ratio_to_no_norm']:.3f} shows the noise of this measurement.")
  for batch, check in sorted((report.get("reliability") or {}).items(), key=lambda kv: int(kv[0])):
    aa = "not measured (add none_aa to --models)" if check["aa_ratio"] is None else f"{check['aa_ratio']:.3f}"
    notes.append(f"batch {batch}: A/A ratio {aa}, largest repeat spread "
                 f"{throughput.fmt(100 * (check['max_spread'] or 0), '.1f')}% ({check['max_spread_model']})"
                 + ("" if check["reliable"] else " -- UNRELIABLE: " + "; ".join(check["problems"])))
  return (head + "\n\n" + throughput.markdown_table(headers, rows) +
          ("\n\n" + "\n".join(notes) if notes else ""))

