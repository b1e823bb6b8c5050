"""Markdown tables and plots for the sweeps under a root directory.

    python -m experiments.report --root runs/ [--sweep norm_variants_cpu ...] [--out DIR]

For every sweep directory ROOT/<sweep>/ (made by `experiments.run_sweep`) it writes
  <out>/<sweep>/loss.png          train loss vs step, a panel per variant, a line per run (x: diverged)
  <out>/<sweep>/eval_top1.png     eval top-1 vs step
  <out>/<sweep>/diagnostics.png   per-block residual RMS, FFN hidden RMS, max attention logit and
                                  gradient norm vs step (a row per run; a seeded sweep: a row per
                                  variant, its first diverged seed else its first; a line per block)
and one markdown file <out>/report.md with a table per sweep (each also alone in
<out>/<sweep>/section.md, and its numbers in <out>/<sweep>/summary.json) (run, norm, ffn_norm, FFN-norm
position, the knobs that vary, final eval top-1, eval loss, status, img/s when evaluated), which
it also prints. <out> defaults to ROOT. The report reads the runs' own files afresh, so it can be
made while a sweep is still running.
"""
import argparse
import dataclasses
import math
import os
import sys
from typing import List, Optional

from experiments import crash_plots, plots, run_files
from experiments import run_sweep
from experiments import study
from experiments import sweeps as sweeps_lib
from vitnorm.errors import UserError, exit_on_user_error

SECTION = "section.md"  # <out>/<sweep>/section.md: the sweep's section without its title

# Knob columns shown when they vary across a sweep's runs.
_KNOBS = (("bn_group_size", "BN group"), ("bn_momentum", "BN momentum"),
          ("bn_epsilon", "BN epsilon"), ("bn_include_cls", "CLS in BN stats"),
          ("classifier", "classifier"))


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_sweep(sweep_dir: str) -> Optional[dict]:
  """The sweep's results document, refreshed from the runs' files; None if not a sweep dir."""
  name = os.path.basename(os.path.normpath(sweep_dir))
  doc = run_files.read_json(os.path.join(sweep_dir, run_sweep.RESULTS))
  if doc is None and run_files.read_json(os.path.join(sweep_dir, run_sweep.MANIFEST)) is None:
    return None
  doc = doc or {"sweep": name, "runs": []}
  manifest = run_files.read_json(os.path.join(sweep_dir, run_sweep.MANIFEST)) or {}
  sweep = sweeps_lib.SWEEPS.get(name)
  if sweep is not None and sweep.kind == "accuracy":  # its runs: the best lrs it was started with
    lrs = run_sweep.frozen_best_lrs(sweep_dir)
    sweep = dataclasses.replace(sweep, runs=sweeps_lib.accuracy_runs(lrs) if lrs else ())
    doc["best_lr"] = lrs
  if sweep is not None:
    sweep = sweeps_lib.with_seeds(sweep, tuple(manifest.get("seeds") or ()))
    doc["kind"] = sweep.kind
    doc["lrs"] = {r.name: sweeps_lib.stability_lr(r) for r in sweep.runs if sweeps_lib.stability_lr(r)}
    extra = {r["name"]: {k: r[k] for k in run_sweep.RUNNER_NOTES if k in r}
             for r in doc.get("runs", []) if isinstance(r, dict) and "name" in r}
    doc["runs"] = run_sweep.collect(sweep, sweep_dir, extra)
    doc.setdefault("question", sweep.question)
  doc["dir"] = sweep_dir
  doc["overrides"] = manifest.get("overrides") or []
  doc["seeds"] = manifest.get("seeds") or []
  for r in doc.get("runs", []):
    r["series"] = run_files.read_metrics(os.path.join(sweep_dir, r.get("workdir", r["name"])))
  return doc


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _percent(value) -> str:
  """Top-1 as a percentage; values <= 1 are read as fractions."""
  if value is None or not math.isfinite(float(value)):
    return "-"
  value = float(value)
  return f"{100 * value if value <= 1.0 else value:.2f}%"


def _number(value, fmt="{:.4f}") -> str:
  if value is None:
    return "-"
  try:
    value = float(value)
  except (TypeError, ValueError):
    return str(value)
  return fmt.format(value) if math.isfinite(value) else str(value)


def status_text(run: dict) -> str:
  state, step = run.get("status"), run.get("step")
  if state == "diverged":
    return f"diverged at step {step}"
  if state == "completed":
    return "completed" + (f" ({step} steps)" if step is not None else "")
  if state == "failed":
    return f"failed: {run.get('error', '')}".replace("|", "/")
  if state in ("running", "incomplete"):  # still training, or killed without a chance to say so
    return "running or killed " + (f"at step {step}" if step is not None else "before its first log")
  if state == "preempted":
    return f"interrupted at step {step} (resume with --resume)" if step is not None else "interrupted"
  return "not run"


def _throughput_text(run: dict) -> str:
  tp = run.get("throughput") or {}
  if not tp:
    return "-"
  parts = [f"{tp['unfolded']:.1f}"] if "unfolded" in tp else []
  if "folded" in tp:
    parts.append(f"{tp['folded']:.1f} folded")
  return " / ".join(parts)


def markdown_table(runs: List[dict], show_throughput: bool = True) -> str:
  knobs = [(key, label) for key, label in _KNOBS
           if len({str(r["model"].get(key)) for r in runs}) > 1]
  show_tp = show_throughput and any(r.get("throughput") for r in runs)
  header = (["run", "norm", "ffn_norm", "position"] + [label for _, label in knobs]
            + ["eval top-1", "eval loss", "train loss", "status"] + (["img/s"] if show_tp else []))
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for r in runs:
    m, final = r["model"], r.get("final", {})
    row = [r["name"], m["norm"], m["ffn_norm"],
           m["ffn_norm_position"] if m["ffn_norm"] != "none" else "-"]
    row += ["-" if m.get(key) is None else str(m.get(key)) for key, _ in knobs]
    row += [_percent(final.get("eval/top1")), _number(final.get("eval/loss")),
            _number(final.get("train/loss")), status_text(r)]
    if show_tp:
      row.append(_throughput_text(r))
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def readable_command(cmd: List[str]) -> str:
  """A command as a reader types it: `python -m ...`, paths relative to the project root."""
  words = []
  for i, word in enumerate(cmd):
    if i == 0 and os.path.basename(word).startswith("python"):
      word = "python"
    key, sep, value = word.partition("=")
    path = value if sep else key
    if os.path.isabs(path):
      rel = os.path.relpath(path, run_sweep.PROJECT_ROOT)
      path = rel if not rel.startswith("..") else os.path.join("ROOT", os.path.basename(path))
      word = f"{key}={path}" if sep else path
    words.append(word)
  return " ".join(words)


def benchmark_table(bench: dict) -> str:
  """The benchmark.json of `python -m vitnorm.benchmark --output` as a compact markdown table."""
  lines = ["| model | batch | img/s (median) | min-max | vs LN | vs no-norm | of matmul peak |",
           "|---|---|---|---|---|---|---|"]
  for r in bench.get("results", []):
    ips = r.get("images_per_second") or {}
    if r.get("status", "ok") != "ok" or ips.get("median") is None:
      lines.append(f"| {r.get('model')} | {r.get('batch_size')} | {r.get('status')} | - | - | - | - |")
      continue
    frac = r.get("fraction_of_matmul_peak")
    lines.append(f"| {r.get('model')} | {r.get('batch_size')} | {ips['median']:.1f} | "
                 f"{_number(ips.get('min'), '{:.1f}')}-{_number(ips.get('max'), '{:.1f}')} | "
                 f"{_number(r.get('ratio_to_ln'), '{:.3f}')} | {_number(r.get('ratio_to_no_norm'), '{:.3f}')} | "
                 + ("-" if frac is None else f"{100 * frac:.1f}%") + " |")
  setup = bench.get("setup") or {}
  model = setup.get("model") or {}
  head = (f"{model.get('variant')} @ {model.get('image_size')} px, {model.get('dtype', 'float32')}, "
          f"{setup.get('num_devices')} {setup.get('backend')} device(s) ({setup.get('device_kind')}), "
          f"{setup.get('repeats')} interleaved rounds of {setup.get('iterations')} calls")
  checks = bench.get("reliability") or {}
  notes = []
  for batch, check in sorted(checks.items(), key=lambda kv: int(kv[0])):
    aa = check.get("aa_ratio")
    notes.append(f"batch {batch}: A/A ratio (none_aa / none, two identical programs) "
                 f"{_number(aa, '{:.3f}')}, largest repeat spread {_number(check.get('max_spread'), '{:.1%}')}"
                 + ("" if check.get("reliable") else
                    " -- **UNRELIABLE: " + "; ".join(check.get("problems") or []) + "**"))
  if checks and not all(c.get("reliable") for c in checks.values()):
    head = ("**Warning: part of this measurement is flagged unreliable by the benchmark itself "
            "(A/A ratio further than 3% from 1, or a large repeat spread); read those rows as noise.**"
            "\n\n" + head)
  return head + "\n\n" + "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def ratio_table(ratios: dict) -> str:
  """Markdown: a row per model, a column per batch size: img/s relative to LN at that batch."""
  batches = sorted({int(b) for per_batch in ratios.values() for b in per_batch})
  lines = ["| model | " + " | ".join(f"batch {b}" for b in batches) + " |",
           "|---|" + "|".join("---" for _ in batches) + "|"]
  for model, per_batch in ratios.items():
    lines.append(f"| {model} | " + " | ".join(_number(per_batch.get(str(b)), "{:.3f}") for b in batches) + " |")
  return "\n".join(lines)


def benchmark_summary(bench: dict) -> dict:
  """The numbers a write-up cites: per model and batch the median img/s and the ratio to LN."""
  ratios, speeds = {}, {}
  for r in bench.get("results", []):
    ips = (r.get("images_per_second") or {}).get("median")
    if r.get("status", "ok") == "ok" and ips is not None:
      speeds.setdefault(r["model"], {})[str(r["batch_size"])] = ips
      if r.get("ratio_to_ln") is not None:
        ratios.setdefault(r["model"], {})[str(r["batch_size"])] = r["ratio_to_ln"]
  return dict(setup=bench.get("setup"), matmul_peak=bench.get("matmul_peak"),
              reliability=bench.get("reliability"),
              reliable=bench.get("reliable"), images_per_second=speeds, ratio_to_ln=ratios)


def _benchmark_section(doc: dict, plot_dir: str, rel_to: str) -> str:
  bench = doc.get("benchmark") or {}
  sweep_dir = doc["dir"]
  if not bench:
    return "_benchmark not run yet_"
  text = [f"status: {bench.get('status')}" + (f" ({bench['error']})" if bench.get("error") else "")
          + (f", {bench['wall_s'] / 60:.0f} min wall-clock" if bench.get("wall_s") else ""),
          "", "command: `" + readable_command(bench.get("command", [])) + "`", ""]
  output = run_files.read_json(os.path.join(sweep_dir, bench.get("output", "benchmark.json")))
  if output and output.get("results"):
    summary = benchmark_summary(output)
    os.makedirs(plot_dir, exist_ok=True)
    run_files.write_json(os.path.join(plot_dir, "summary.json"),
                         dict(sweep=doc["sweep"], wall_minutes=(bench.get("wall_s") or 0) / 60 or None, **summary))
    text += [benchmark_table(output)]
    if summary["ratio_to_ln"]:
      text += ["", "Images/s relative to LN at the same batch size (above 1: faster than LN):", "",
               ratio_table(summary["ratio_to_ln"])]
      if plots.plot_speed_ratios(summary["ratio_to_ln"], f"{doc['sweep']}: img/s relative to LN",
                                 os.path.join(plot_dir, "speed_vs_batch.png")):
        text += ["", f"![speed vs batch]({os.path.relpath(os.path.join(plot_dir, 'speed_vs_batch.png'), rel_to)})"]
    return "\n".join(text)
  try:  # no JSON: show what the benchmark printed last
    with open(os.path.join(sweep_dir, bench.get("log", "benchmark.log")), encoding="utf-8") as f:
      log = f.read()
  except OSError:
    log = ""
  table = log.rsplit("\n$ ", 1)[-1].split("\n", 1)[-1].strip() if log else ""
  if table:
    text += ["```", table, "```"]
  return "\n".join(text)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def sweep_section(doc: dict, plot_dir: str, rel_to: str) -> str:
  """Writes the sweep's plots into plot_dir and returns its markdown section."""
  lines = [f"## {doc['sweep']}", ""]
  if doc.get("question"):
    lines += [f"_{doc['question']}_", ""]
  if doc.get("num_steps"):
    lines += [f"{doc['num_steps']} training steps per run.", ""]
  if doc.get("overrides"):
    lines += ["Every run with " + " ".join(f"`--set {o}`" for o in doc["overrides"]) + ".", ""]
  if "benchmark" in doc or (not doc.get("runs") and doc["sweep"].startswith("inference_speed")):
    lines.append(_benchmark_section(doc, plot_dir, rel_to))
    lines += ["", f"Regenerate: `{regenerate_command(doc, rel_to)}`"]
    return "\n".join(lines)
  os.makedirs(plot_dir, exist_ok=True)
  rel = lambda name: os.path.relpath(os.path.join(plot_dir, name), rel_to)  # noqa: E731
  timed = [r for r in doc["runs"] if r.get("wall_s") is not None]
  walls = [float(r["wall_s"]) for r in timed]
  machine = sum(float(r["wall_s"]) * _machine_share(r) for r in timed)
  summary = {"sweep": doc["sweep"], "num_steps": doc.get("num_steps"), "seeds": doc.get("seeds"),
             "overrides": doc.get("overrides"), "runs": len(doc["runs"]),
             "wall_minutes": sum(walls) / 60 if walls else None,
             "machine_minutes": machine / 60 if walls else None}
  if walls:
    shared = any(_machine_share(r) < 1 for r in timed)
    lines += [f"Machine time: {machine / 60:.0f} min over {len(walls)} runs (the runner's `wall_s` per "
              "run" + (f", {sum(walls) / 60:.0f} min of wall-clock, weighted by the share of the "
                       "machine's cores each run had: runs side by side, each on its own cores (run_sweep --jobs)"
                       if shared else "") + "; evaluations not included).", ""]
  if doc.get("kind") == "sensitivity":
    lines += _sensitivity_section(doc, plot_dir, rel, summary)
    lines += [f"\n**Warning: {line}.**" for line in run_sweep.source_drift(doc["runs"])]
    run_files.write_json(os.path.join(plot_dir, "summary.json"), summary)
    lines += ["", f"Regenerate: `{regenerate_command(doc, rel_to)}`"]
    return "\n".join(lines)
  if doc.get("kind") == "accuracy":
    lines += _accuracy_section(doc, plot_dir, rel, summary)
    lines += [f"\n**Warning: {line}.**" for line in run_sweep.source_drift(doc["runs"])]
    run_files.write_json(os.path.join(plot_dir, "summary.json"), summary)
    lines += ["", f"Regenerate: `{regenerate_command(doc, rel_to)}`"]
    return "\n".join(lines)
  if doc.get("kind") == "stability":
    smap = study.stability_map(doc["runs"], doc.get("lrs") or {})
    mech = study.mechanism(doc["runs"], doc.get("lrs") or {})
    totals = study.variant_totals(smap)
    summary.update(stability_map={v: {f"{lr:g}": c for lr, c in cells.items()} for v, cells in smap.items()},
                   totals=totals, mechanism=mech,
                   overall={k: sum(t[k] for t in totals.values())
                            for k in ("runs", "crashed", "failed", "trained", "unfinished")})
    lines += [study.criterion_text(), "", study.stability_table(smap), "", "Per variant, over its row:",
              "", study.totals_table(totals)]
    plt = plots.pyplot()
    figures = []
    if study.plot_stability(smap, f"{doc['sweep']}: success rate and mean final top-1",
                            os.path.join(plot_dir, "stability_map.png"), plots.save_png, plt):
      figures.append(f"![stability map]({rel('stability_map.png')})")
    if study.plot_mechanism(mech, f"{doc['sweep']}: what grows with the learning rate",
                            os.path.join(plot_dir, "mechanism.png"), plots.save_png, plt):
      figures.append(f"![mechanism]({rel('mechanism.png')})")
    lines += [""] + figures
    lines += [f"\n**Warning: {line}.**" for line in run_sweep.source_drift(doc["runs"])]
    run_files.write_json(os.path.join(plot_dir, "summary.json"), summary)
    lines += ["", f"Regenerate: `{regenerate_command(doc, rel_to)}`"]
    return "\n".join(lines)
  if any(r.get("group") and r.get("group") != r["name"] for r in doc["runs"]):
    sweep = sweeps_lib.SWEEPS.get(doc["sweep"])
    rows = study.aggregate(doc["runs"], reference=sweep.reference if sweep else study.REFERENCE)
    summary["variants"] = rows
    lines += ["Final eval top-1 over seeds (completed seeds only; the intervals are Student's t "
              "over the seeds). The paired difference is this variant's top-1 minus the reference's "
              "for the same seed (same data order), averaged over the seeds both completed: an "
              "interval that contains 0 means no difference resolvable with these seeds.", "",
              study.aggregate_table(rows), ""]
    if study.plot_spread(rows, doc["runs"], f"{doc['sweep']}: final top-1 per seed",
                         os.path.join(plot_dir, "spread.png"), plots.save_png, plots.pyplot()):
      lines += [f"![spread]({rel('spread.png')})", ""]
    lines += ["<details><summary>every run</summary>", ""]
  # A seeded table is about accuracy: each evaluation's img/s was timed alone, at its own moment
  # (possibly beside other jobs), so speeds are left to the interleaved inference_speed_* sweep.
  seeded = "variants" in summary
  lines.append(markdown_table(doc["runs"], show_throughput=not seeded))
  if seeded:
    lines += ["", "</details>"]
  lines += [f"\n**Warning: {line}.**" for line in run_sweep.source_drift(doc["runs"])]
  run_files.write_json(os.path.join(plot_dir, "summary.json"), summary)
  if not seeded and any(r.get("throughput") for r in doc["runs"]):
    lines += ["", "img/s: inference images/s from each run's `vitnorm.evaluate` (best median over its "
              "batch sizes; unfolded / BN folded into the Dense layers). Each run is measured on its "
              "own, at a different time: compare speeds with the interleaved `inference_speed_*` sweep."]
  # A variant's note once (not once per seed); a run that stopped or failed to evaluate by name.
  notes, noted = [], set()
  for r in doc["runs"]:
    trouble = r.get("reason") or r.get("eval_error")
    label = r["name"] if trouble or not r.get("group") else r["group"]
    if not (r.get("note") or trouble) or (not trouble and label in noted):
      continue
    noted.add(label)
    notes.append(f"- `{label}`: {r.get('note', '')}"
                 + (f" -- stopped: {r['reason']}" if r.get("reason") else "")
                 + (f" -- evaluation failed: {r['eval_error']}" if r.get("eval_error") else ""))
  if notes:
    lines += [""] + notes
  figures = []
  for name, made in (
      ("loss.png", crash_plots.plot_loss_panels(doc["runs"], os.path.join(plot_dir, "loss.png"),
                                                f"{doc['sweep']}: train loss")),
      ("eval_top1.png", plots.plot_curves(doc, "eval/top1", "eval top-1", os.path.join(plot_dir, "eval_top1.png"), percent=True)),
      ("diagnostics.png", plots.plot_diagnostics(doc, os.path.join(plot_dir, "diagnostics.png")))):
    if made:
      figures.append(f"![{name}]({os.path.relpath(os.path.join(plot_dir, name), rel_to)})")
  if figures:
    lines += [""] + figures
  lines += ["", f"Regenerate: `{regenerate_command(doc, rel_to)}`"]
  return "\n".join(lines)


def _figures(made: List[tuple], rel) -> List[str]:
  return [f"![{alt}]({rel(name)})" for name, alt, ok in made if ok]


def _sensitivity_section(doc: dict, plot_dir: str, rel, summary: dict) -> List[str]:
  """A learning-rate sensitivity sweep: the criterion, the loss-vs-lr table with each arm's
  sensitivity and best lr, where crashed runs stopped, and the figures; fills `summary`."""
  runs = doc["runs"]
  curves = study.loss_curves(runs)
  grid = sweeps_lib.SENSITIVITY_LRS
  arms = {arm: study.sensitivity(cells, grid) for arm, cells in curves.items()}
  peaks = study.peaks_by_lr(runs)
  sites = {r["name"]: study.crash_site(r) for r in runs if r.get("status") == "diverged"}
  summary.update(
      criterion=study.loss_criterion_text(), lrs=list(grid), sensitivity=arms,
      best_lr={arm: s["best_lr"] for arm, s in arms.items()},
      outcomes={arm: {k: sum(c[k] for c in cells.values()) for k in
                      (study.LOSS_CRASHED, study.LOSS_DIVERGED, study.LOSS_TRAINED, study.UNFINISHED)}
                for arm, cells in curves.items()},
      curves={arm: {f"{lr:g}": c for lr, c in cells.items()} for arm, cells in curves.items()},
      peaks={name: {arm: {f"{lr:g}": v for lr, v in by_lr.items()} for arm, by_lr in by_arm.items()}
             for name, by_arm in peaks.items()},
      crash_sites=sites,
      bn_mismatch={r["name"]: study.bn_mismatch(r) for r in runs if study.bn_mismatch(r)})
  lines = [study.loss_criterion_text(), "", study.sensitivity_table(curves, grid), ""]
  if sites:
    lines += ["Where each crashed run stopped (the largest |x| among the recorded tensors at the last "
              "diagnostics record before the crash; float16's limit is 65,504):", "",
              "| run | crash step | kind | last record | block | tensor | max abs x | over fp16 max |",
              "|---|---|---|---|---|---|---|---|"]
    for name, site in sites.items():
      lines.append(f"| {name} | {site.get('step')} | {site.get('divergence') or '-'} | "
                   f"{site.get('diag_step') or '-'} | {site.get('block', '-')} | {site.get('tensor', '-')} | "
                   + ("-" if site.get("value") is None else f"{site['value']:.4g}")
                   + f" | {'yes' if site.get('over_fp16') else 'no' if 'over_fp16' in site else '-'} |")
    lines.append("")
  title = doc["sweep"]
  lines += _figures([
      ("loss_vs_lr.png", "final train loss vs lr", crash_plots.plot_loss_vs_lr(
          runs, os.path.join(plot_dir, "loss_vs_lr.png"), f"{title}: final train loss vs peak lr")),
      ("ffn_rms_vs_lr.png", "FFN RMS vs lr", crash_plots.plot_peaks_vs_lr(
          peaks, os.path.join(plot_dir, "ffn_rms_vs_lr.png"), f"{title}: FFN pre-norm and output RMS")),
      ("attention_vs_lr.png", "attention logits vs lr", crash_plots.plot_peaks_vs_lr(
          peaks, os.path.join(plot_dir, "attention_vs_lr.png"), f"{title}: attention logits and residual",
          names=("max_attention_logit", "max_abs_qk", "residual_rms"))),
      ("max_activation.png", "max activation vs fp16 limit", crash_plots.plot_max_activation(
          peaks, os.path.join(plot_dir, "max_activation.png"), f"{title}: largest activation vs float16's")),
      ("crash_traces.png", "crashed runs: attention logits and loss", crash_plots.plot_crash_traces(
          runs, os.path.join(plot_dir, "crash_traces.png"), f"{title}: crashed runs, max attention "
          "logit per block (lines) and train loss (dotted)")),
      ("bn_mismatch.png", "BN running vs batch statistics", crash_plots.plot_bn_mismatch(
          runs, os.path.join(plot_dir, "bn_mismatch.png"), f"{title}: BN eval, running vs batch statistics")),
      ("loss.png", "train loss", crash_plots.plot_loss_panels(
          runs, os.path.join(plot_dir, "loss.png"), f"{title}: train loss")),
  ], rel)
  return lines


def _accuracy_section(doc: dict, plot_dir: str, rel, summary: dict) -> List[str]:
  """The accuracy sweep: each variant at its best lr, non-inferiority to LN with Holm."""
  reference = sweeps_lib.crash_arm("ln", "fp32", 4)
  if not doc.get("best_lr"):
    return ["_not run yet: the sweep starts from the sensitivity sweeps' best learning rates_"]
  rows = study.noninferiority(doc["runs"], reference)
  summary.update(method=study.accuracy_method_text(reference), reference=reference,
                 margin=study.NONINFERIORITY_MARGIN, alpha=study.ALPHA, best_lr=doc["best_lr"],
                 variants=rows)
  lines = [study.accuracy_method_text(reference), "",
           "Learning rates: " + ", ".join(f"{arm} {lr:g}" for arm, lr in doc["best_lr"].items()), "",
           study.noninferiority_table(rows, reference), ""]
  lines += _figures([("forest.png", "forest plot", crash_plots.plot_forest(
      rows, reference, study.NONINFERIORITY_MARGIN, os.path.join(plot_dir, "forest.png"),
      f"{doc['sweep']}: top-1 difference to {reference}"))], rel)
  return lines


CRASH_STUDY = "crash_study"  # <out>/crash_study/: the sensitivity sweeps together


def first_crashes(runs: List[dict]) -> dict:
  """{arm: the crash site (study.crash_site) of its crashed run with the lowest lr (then the lowest
  name), with `run` and `lr`}: where the write-up says a variant overflows."""
  out = {}
  for r in sorted(runs, key=lambda r: r["name"]):
    parsed = sweeps_lib.parse_crash_arm(r.get("name", ""))
    site = study.crash_site(r)
    if parsed is None or site is None or "lr" not in parsed:
      continue
    if parsed["arm"] not in out or parsed["lr"] < out[parsed["arm"]]["lr"]:
      out[parsed["arm"]] = dict(site, run=r["name"], lr=parsed["lr"])
  return out


def _machine_share(run: dict) -> float:
  """The share of the machine a run had: its cores over the machine's (1 when not recorded)."""
  cores, total = run.get("cores"), run.get("machine_cores")
  return min(1.0, cores / total) if cores and total else 1.0


def crash_study_section(docs: List[dict], out: str) -> Optional[str]:
  """The sensitivity sweeps together: loss vs lr per variant across precision (fp32 vs fp16,
  4 blocks) and across depth (fp16, 4 / 8 / 12 blocks), and every arm's sensitivity and best lr
  in <out>/crash_study/summary.json. None when no sensitivity sweep has a run."""
  runs = [r for d in docs if d.get("kind") == "sensitivity" for r in d["runs"]]
  curves = study.loss_curves(runs)
  if not curves:
    return None
  plot_dir = os.path.join(out, CRASH_STUDY)
  os.makedirs(plot_dir, exist_ok=True)
  rel = lambda name: os.path.relpath(os.path.join(plot_dir, name), out)  # noqa: E731
  grid = sweeps_lib.SENSITIVITY_LRS
  arms = {arm: study.sensitivity(cells, grid) for arm, cells in curves.items()}
  arm = sweeps_lib.crash_arm
  precision = {v: [arm(v, "fp32", 4), arm(v, "fp16", 4)] for v in sweeps_lib.CRASH_VARIANTS}
  depth = {v: [arm(v, "fp16", d) for d in (4, 8, 12)] for v in sweeps_lib.CRASH_VARIANTS}
  summary = dict(sweeps=[d["sweep"] for d in docs if d.get("kind") == "sensitivity"],
                 sensitivity=arms, best_lr={a: s["best_lr"] for a, s in arms.items()},
                 crashed={a: sum(c[study.LOSS_CRASHED] for c in cells.values()) for a, cells in curves.items()},
                 finished={a: sum(c["n"] for c in cells.values()) for a, cells in curves.items()},
                 verdicts=study.verdicts(curves, grid), first_crash=first_crashes(runs))
  run_files.write_json(os.path.join(plot_dir, "summary.json"), summary)
  lines = ["## The crash study: every sensitivity sweep together", "", study.loss_criterion_text(), "",
           study.sensitivity_table(curves, grid), ""]
  lines += _figures([
      ("loss_vs_lr_precision.png", "fp32 vs fp16", crash_plots.plot_loss_vs_lr(
          runs, os.path.join(plot_dir, "loss_vs_lr_precision.png"),
          "final train loss vs lr, fp32 vs fp16 (4 blocks)", panels=precision)),
      ("loss_vs_lr_depth.png", "depth", crash_plots.plot_loss_vs_lr(
          runs, os.path.join(plot_dir, "loss_vs_lr_depth.png"),
          "final train loss vs lr, fp16, 4 / 8 / 12 blocks", panels=depth)),
  ], rel)
  text = "\n".join(lines)
  with open(os.path.join(plot_dir, SECTION), "w", encoding="utf-8") as f:
    f.write(text.split("\n", 1)[1].lstrip("\n") + "\n")
  return text


def regenerate_command(doc: dict, out: Optional[str] = None) -> str:
  """The run_sweep command (as a reader types it) that re-makes this sweep's results."""
  parts = [f"python -m experiments.run_sweep --sweep {doc['sweep']} --root runs"]
  sweep = sweeps_lib.SWEEPS.get(doc["sweep"])
  if doc.get("num_steps") and (sweep is None or doc["num_steps"] != sweep.num_steps):
    parts.append(f"--num_steps {doc['num_steps']}")
  if doc.get("seeds") and (sweep is None or tuple(doc["seeds"]) != tuple(sweep.seeds)):
    parts.append("--seeds " + ",".join(map(str, doc["seeds"])))
  parts += [f"--set {o}" for o in doc.get("overrides") or []]
  if any(r.get("evaluated") or r.get("throughput") for r in doc.get("runs") or []):
    parts.append("--evaluate")
  report_cmd = "python -m experiments.report --root runs"
  if out is not None:
    rel = os.path.relpath(os.path.abspath(out), run_sweep.PROJECT_ROOT)
    if not rel.startswith("..") and os.path.normpath(rel) != "runs":
      report_cmd += f" --out {rel}"
  return " ".join(parts) + " && " + report_cmd


def find_sweep_dirs(root: str, names: Optional[List[str]] = None) -> List[str]:
  if not os.path.isdir(root):
    raise UserError(f"--root: {root} is not a directory; give the --root a sweep was run with")
  if names:
    for name in names:
      sweeps_lib.get_sweep(name)
      if not os.path.isdir(os.path.join(root, name)):
        raise UserError(f"--sweep: {name} has no directory in {root}; run it first "
                        f"(python -m experiments.run_sweep --sweep {name} --root {root})")
    candidates = names
  else:
    known = list(sweeps_lib.SWEEPS)
    present = sorted(os.listdir(root))
    candidates = [n for n in known if n in present] + [n for n in present if n not in known]
  dirs = [os.path.join(root, n) for n in candidates
          if os.path.isdir(os.path.join(root, n)) and (
              os.path.exists(os.path.join(root, n, run_sweep.RESULTS))
              or os.path.exists(os.path.join(root, n, run_sweep.MANIFEST)))]
  if not dirs:
    raise UserError(f"--root: no sweep results under {root}; run one first, e.g. "
                    f"python -m experiments.run_sweep --sweep norm_variants_cpu --root {root}")
  return dirs


def make_report(root: str, *, sweeps: Optional[List[str]] = None, out: Optional[str] = None) -> str:
  """Writes plots and <out>/report.md for the sweeps under root; returns the markdown."""
  sweep_dirs = find_sweep_dirs(root, sweeps)
  out = out or root
  os.makedirs(out, exist_ok=True)
  sections = ["# vitnorm sweep report", ""]
  docs = []
  for sweep_dir in sweep_dirs:
    doc = load_sweep(sweep_dir)
    if doc is None:
      continue
    docs.append(doc)
    section = sweep_section(doc, os.path.join(out, doc["sweep"]), out)
    sections += [section, ""]
    # The section on its own (figure paths relative to the results folder), for the write-up.
    os.makedirs(os.path.join(out, doc["sweep"]), exist_ok=True)
    with open(os.path.join(out, doc["sweep"], SECTION), "w", encoding="utf-8") as f:
      f.write(section.split("\n", 1)[1].lstrip("\n") + "\n")
  crash = crash_study_section(docs, out)
  if crash:
    sections += [crash, ""]
  text = "\n".join(sections)
  with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text


@exit_on_user_error
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="the --root the sweeps were run with")
  parser.add_argument("--sweep", action="append", help="only this sweep (repeatable); default: all under root")
  parser.add_argument("--out", default=None, help="where report.md and the plots go (default: ROOT)")
  args = parser.parse_args(argv)
  print(make_report(args.root, sweeps=args.sweep, out=args.out))
  print(f"\nwritten: {os.path.join(args.out or args.root, 'report.md')}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
