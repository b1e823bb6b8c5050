"""Reading what a run left in its workdir, for the runner and the report.

The trainer (`python -m vitnorm.train`) writes, in its workdir:
  status.json    {"status": "completed" | "diverged" | "preempted", "step": int, "metrics": {...},
                 diverged: "reason", "divergence": non_finite_loss | non_finite_gradient | loss_spike}
  metrics.jsonl  one JSON object per line: "step" plus keys such as "train/loss", "eval/top1",
                 "diag/block_0/residual_rms" (a resumed run appends after its checkpoint step)
  config.json    the run's config ({"model": {"norm": ..., ...}, ...})
and `python -m vitnorm.evaluate --workdir D` writes evaluation.json.
Everything here tolerates missing or half-written files: a run that has not started simply has
no status.
"""
import json
import math
import os
import re
import threading
from typing import Dict, List, Optional, Tuple

Series = List[Tuple[int, float]]

FINISHED = ("completed", "diverged")  # statuses the runner never re-runs
_SHORT_NORM = {"layer": "ln", "ln": "ln", "batch": "bn", "bn": "bn", "rms": "rms", "none": "none",
               "dyt": "dyt", "prepbn": "prepbn"}
# Model fields shown in the report (those that vary across a sweep's runs get a column).
MODEL_FIELDS = ("norm", "ffn_norm", "qk_norm", "ffn_norm_position", "bn_group_size", "bn_momentum",
                "bn_epsilon", "bn_include_cls", "classifier")
_MODEL_DEFAULTS = {"norm": "ln", "ffn_norm": "none", "qk_norm": "none", "ffn_norm_position": "pre_act",
                   "bn_group_size": None, "bn_momentum": 0.9, "bn_epsilon": 1e-5,
                   "bn_include_cls": True, "classifier": "token"}


def read_json(path: str) -> Optional[dict]:
  """The JSON object in `path`, or None if it is missing or not (yet) valid JSON."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def write_json(path: str, value) -> None:
  """Writes atomically (temp file + rename), so readers never see half a file."""
  tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"  # one per writer, threads included
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=False, default=str)
    f.write("\n")
  os.replace(tmp, path)


def read_status(workdir: str) -> Optional[dict]:
  return read_json(os.path.join(workdir, "status.json"))


def _to_float(value) -> Optional[float]:
  if value is None:
    return math.nan  # null: how some writers spell a non-finite value
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str):
    try:
      return float(value)  # 'nan', 'inf'
    except ValueError:
      return None
  return None


def _parse_record(line: str) -> Optional[dict]:
  """One metrics line; a line that a kill cut off and the resumed run appended to is recovered."""
  for start in (0, line.rfind('{"step"')):
    if start < 0:
      continue
    try:
      record = json.loads(line[start:])
      int(record["step"])
      return record
    except (ValueError, KeyError, TypeError):
      continue
  return None


def read_metrics(workdir: str) -> Dict[str, Series]:
  """metrics.jsonl as {key: [(step, value), ...]} in step order.

  When a resumed run logs a step again (it restarted from an earlier checkpoint), the entries
  the interrupted attempt logged at or after that step are dropped: the series is what the run
  that finished actually went through. Non-finite values are kept (as nan/inf) so a plot can
  show where a run blew up. A line cut off by a kill is skipped (and the record a resumed run
  appended to it is recovered).
  """
  series: Dict[str, Series] = {}
  try:
    f = open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")
  except OSError:
    return series
  with f:
    for line in f:
      record = _parse_record(line)
      if record is None:
        continue
      step = int(record["step"])
      for key, raw in record.items():
        value = _to_float(raw)
        if key == "step" or value is None:
          continue
        points = series.setdefault(key, [])
        if points and points[-1][0] >= step:
          points[:] = [p for p in points if p[0] < step]
        points.append((step, value))
  return series


def last_finite(points: Series) -> Optional[Tuple[int, float]]:
  for step, value in reversed(points or ()):
    if math.isfinite(value):
      return step, value
  return None


def block_diagnostics(series: Dict[str, Series]) -> Dict[str, Dict[int, Series]]:
  """{'residual_rms': {0: series of block 0, 1: ...}, 'max_attention_logit': {...}, ...}."""
  out: Dict[str, Dict[int, Series]] = {}
  for key, points in series.items():
    m = re.fullmatch(r"diag/block_(\d+)/(\w+)", key)
    if m:
      out.setdefault(m.group(2), {})[int(m.group(1))] = points
  return out


def _short(norm) -> str:
  return _SHORT_NORM.get(str(norm), str(norm))


def _parse_config_args(config: str) -> dict:
  """'configs/quickstart.py:norm=bn,ffn_norm=bn' -> {'norm': 'bn', 'ffn_norm': 'bn'}."""
  _, _, args = config.partition(":")
  return dict(part.split("=", 1) for part in args.split(",") if "=" in part)


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"True": True, "False": False, "None": None}.get(text, text)


def model_fields(run_config: Optional[dict], run=None) -> dict:
  """The normalization fields of a run: from the config the trainer wrote, else from the sweep.

  Norm kinds are given by their short names (ln, bn, rms, none).
  """
  fields = dict(_MODEL_DEFAULTS)
  model = (run_config or {}).get("model") if isinstance(run_config, dict) else None
  if isinstance(model, dict):
    fields.update({k: model[k] for k in MODEL_FIELDS if k in model})
  elif run is not None:
    args = _parse_config_args(run.config)
    fields.update({k: v for k, v in args.items() if k in ("norm", "ffn_norm")})
    for field, value in run.overrides:
      if field.startswith("model.") and field[6:] in MODEL_FIELDS:
        fields[field[6:]] = _parse_value(value)
  fields["norm"] = _short(fields["norm"])
  fields["ffn_norm"] = _short(fields["ffn_norm"])
  return fields


_THROUGHPUT_KEYS = ("images_per_second", "images_per_sec", "img_per_s", "img/s", "imgs_per_sec")


def throughput(evaluation: Optional[dict]) -> Dict[str, float]:
  """Inference images/s from evaluation.json: {'unfolded': x, 'folded': y} (whichever exist).

  Takes, for each of the folded / unfolded models, the best (largest) median images/s over the
  batch sizes measured; an entry whose path mentions 'fold' (but not 'unfold') is the folded one.
  """
  found: Dict[str, float] = {}

  def visit(node, path):
    if isinstance(node, dict):
      for key, value in node.items():
        key_l = str(key).lower()
        if key_l in _THROUGHPUT_KEYS or key_l.startswith("images_per_second"):
          value = _to_float(value[("median")] if isinstance(value, dict) and "median" in value
                            else value)
          if value is not None and math.isfinite(value):
            kind = ("folded" if re.search(r"(?<!un)fold", path + "/" + key_l) else "unfolded")
            found[kind] = max(found.get(kind, 0.0), value)
        else:
          visit(value, f"{path}/{key_l}")
    elif isinstance(node, list):
      for item in node:
        visit(item, path + "/" + str(item.get("model", "") if isinstance(item, dict) else "").lower())

  visit(evaluation or {}, "")
  return found


def accuracy_of(evaluation: Optional[dict]) -> Dict[str, object]:
  """Test-split accuracy from evaluation.json (`python -m vitnorm.evaluate`): {'top1': as trained,
  'folded_top1': with BN folded into the Dense layers, 'folded_agrees': the evaluator's check}
  (whichever exist; {} when the run was not evaluated)."""
  accuracy = (evaluation or {}).get("accuracy") or {}
  out: Dict[str, object] = {}
  for key, name in (("as_trained", "top1"), ("folded", "folded_top1")):
    value = _to_float((accuracy.get(key) or {}).get("top1"))
    if value is not None and math.isfinite(value):
      out[name] = value
  if "folded_agrees" in accuracy:
    out["folded_agrees"] = bool(accuracy["folded_agrees"])
  return out


def summarize_run(run, workdir: str) -> dict:
  """One run's outcome: status, final metrics, model fields and throughput, as a JSON-able dict.

  status: 'completed', 'diverged', 'preempted' (stopped, resumable), 'incomplete' (files but no
  status: killed or still running), or 'not_run'.
  """
  status = read_status(workdir)
  series = read_metrics(workdir)
  evaluation = read_json(os.path.join(workdir, "evaluation.json"))
  final = dict((status or {}).get("metrics") or {})
  for key in ("train/loss", "eval/top1", "eval/loss"):
    if _to_float(final.get(key)) is None or not math.isfinite(_to_float(final.get(key))):
      last = last_finite(series.get(key, []))
      if last is not None:
        final[key] = last[1]
  if status is not None:
    state, step = str(status.get("status")), status.get("step")
  else:
    state = "incomplete" if (series or os.path.isdir(os.path.join(workdir, "checkpoints"))) else "not_run"
    step = max((pts[-1][0] for pts in series.values() if pts), default=None)
  run_config = read_json(os.path.join(workdir, "config.json"))
  summary = {
      "name": run.name,
      "group": getattr(run, "variant", run.name),
      "seed": getattr(run, "seed", None),
      "note": run.note,
      "config": run.config,
      "overrides": run.override_flags(),
      "workdir": workdir,
      "status": state,
      "step": step,
      "final": {k: final[k] for k in ("train/loss", "eval/top1", "eval/loss") if k in final},
      "model": model_fields(run_config, run),
      "throughput": throughput(evaluation),
      "evaluated": accuracy_of(evaluation),
  }
  if status is not None and status.get("reason"):
    summary["reason"] = str(status["reason"])  # why a diverged run was stopped
  if status is not None and status.get("divergence"):
    summary["divergence"] = str(status["divergence"])  # non_finite_loss | non_finite_gradient | loss_spike
  skipped = final.get("train/skipped_steps")
  if skipped is not None:  # float16 runs: steps the loss scaler skipped (not crashes)
    summary["skipped_steps"] = int(skipped)
  return summary
