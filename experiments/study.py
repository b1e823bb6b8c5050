"""The study's statistics: seeds aggregated with intervals, stability maps, the mechanism figure.

Pure functions over the run summaries that `experiments.run_sweep.collect` returns (plus each
run's metric series, as `experiments.report.load_sweep` attaches them); `experiments.report`
calls them to write the tables and figures, so the report stays the one source of every number.

- `aggregate`: per variant (a run's `group`), over its seeds: mean, standard deviation, n and the
  95% interval of the mean (Student's t with n - 1 degrees of freedom) of the final eval top-1,
  plus how many seeds crashed.
- `outcome`: the stability criterion, fixed before the runs (experiments.sweeps):
  'crashed' (diverged: non-finite loss or gradient, or the loss-spike detector fired; in float16
  runs only a non-finite loss, a non-finite gradient is a skipped step of the loss scaler),
  'failed to learn' (completed with final eval top-1 below sweeps.FAILED_TO_LEARN_TOP1),
  'trained'; runs that have not finished are 'not finished' and count for nothing.
- `stability_map`: variant x peak learning rate -> success rate and mean final top-1.
- `mechanism`: per variant and learning rate, the peak over training (and over blocks) of the FFN
  hidden RMS, the residual RMS and the max attention logit, averaged over seeds.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

from experiments import sweeps as sweeps_lib

CRASHED, FAILED, TRAINED, UNFINISHED = "crashed", "failed to learn", "trained", "not finished"
REFERENCE = "ln"  # the variant the tables' paired differences are taken against
MECHANISM = (("ffn_hidden_rms", "FFN hidden RMS"), ("residual_rms", "residual stream RMS"),
             ("max_attention_logit", "max attention logit"))


def t_critical_95(df: int) -> float:
  """The two-sided 95% quantile of Student's t with `df` degrees of freedom."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (scikit-learn depends on scipy)
  return float(stats.t.ppf(0.975, df))


def mean_interval(values: Sequence[float]) -> dict:
  """{n, mean, std (sample, n - 1), ci95: (low, high) of the mean or None when n < 2}."""
  values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  n = len(values)
  if not n:
    return dict(n=0, mean=None, std=None, ci95=None)
  mean = sum(values) / n
  if n < 2:
    return dict(n=1, mean=mean, std=None, ci95=None)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  half = t_critical_95(n - 1) * std / math.sqrt(n)
  return dict(n=n, mean=mean, std=std, ci95=(mean - half, mean + half))


def final_top1(run: dict) -> Optional[float]:
  value = (run.get("final") or {}).get("eval/top1")
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def outcome(run: dict, threshold: float = sweeps_lib.FAILED_TO_LEARN_TOP1) -> str:
  if run.get("status") == "diverged":
    return CRASHED
  if run.get("status") != "completed":
    return UNFINISHED
  top1 = final_top1(run)
  return FAILED if top1 is None or top1 < threshold else TRAINED


def _groups(runs: List[dict]) -> Dict[str, List[dict]]:
  out: Dict[str, List[dict]] = {}
  for r in runs:
    out.setdefault(r.get("group") or r["name"], []).append(r)
  return out


def _completed_top1_by_seed(members: List[dict]) -> Dict[object, float]:
  return {r.get("seed"): final_top1(r) for r in members
          if r.get("status") == "completed" and final_top1(r) is not None}


def aggregate(runs: List[dict], reference: Optional[str] = REFERENCE) -> List[dict]:
  """One row per variant: top-1 statistics over its completed seeds and the count of crashes.

  `difference`: the paired difference to the `reference` variant (same seed, so the same data
  order; top-1 of this variant minus the reference's), over the seeds both completed: the seeds'
  shared luck cancels, so it is the interval to read for "does X match LN". None for the
  reference itself, or when it is not in the runs.
  `folded_top1`: the evaluator's top-1 with BN folded into the Dense layers (runs evaluated with
  `run_sweep --evaluate`), and `folded_agrees` / `folded_checked`: in how many runs the evaluator
  found folded and unfolded predictions equal within round-off.
  """
  groups = _groups(runs)
  ref = _completed_top1_by_seed(groups[reference]) if reference in groups else None
  rows = []
  for group, members in groups.items():
    completed = [r for r in members if r.get("status") == "completed"]
    stats = mean_interval([final_top1(r) for r in completed])
    difference = None
    if ref is not None and group != reference:
      mine = _completed_top1_by_seed(members)
      difference = mean_interval([mine[s] - ref[s] for s in sorted(mine, key=str) if s in ref])
    evaluated = [r.get("evaluated") or {} for r in completed]
    checked = [e["folded_agrees"] for e in evaluated if "folded_agrees" in e]
    rows.append(dict(variant=group, seeds=[r.get("seed") for r in members], runs=len(members),
                     completed=len(completed),
                     crashed=sum(r.get("status") == "diverged" for r in members),
                     unfinished=sum(r.get("status") not in ("completed", "diverged") for r in members),
                     top1=stats, difference=difference, reference=reference if ref is not None else None,
                     folded_top1=mean_interval([e.get("folded_top1") for e in evaluated]),
                     folded_agrees=sum(checked), folded_checked=len(checked),
                     model=members[0].get("model", {}), note=members[0].get("note", "")))
  return rows


def _variant_of(group: str) -> str:
  """'bn_ffnbn_lr3e-3' -> 'bn_ffnbn' (stability runs are named <variant>_lr<value>)."""
  return group.rsplit("_lr", 1)[0]


def stability_map(runs: List[dict], lrs: Dict[str, float]) -> Dict[str, Dict[float, dict]]:
  """{variant: {lr: {n, trained, crashed, failed, success_rate, top1 (mean_interval)}}}.

  `lrs` maps a run's name to its peak learning rate (experiments.sweeps.stability_lr).
  """
  out: Dict[str, Dict[float, dict]] = {}
  for r in runs:
    lr = lrs.get(r["name"])
    if lr is None:
      continue
    cell = out.setdefault(_variant_of(r.get("group") or r["name"]), {}).setdefault(
        lr, {"runs": [], CRASHED: 0, FAILED: 0, TRAINED: 0, UNFINISHED: 0})
    cell["runs"].append(r)
    cell[outcome(r)] += 1
  for cells in out.values():
    for cell in cells.values():
      finished = cell[CRASHED] + cell[FAILED] + cell[TRAINED]
      cell["n"] = finished
      cell["success_rate"] = cell[TRAINED] / finished if finished else None
      # Mean final top-1 over the seeds that completed; a crashed seed has no final accuracy.
      cell["top1"] = mean_interval([final_top1(r) for r in cell["runs"] if r.get("status") == "completed"])
      del cell["runs"]
  return out


def variant_totals(smap: Dict[str, Dict[float, dict]]) -> Dict[str, dict]:
  """Per variant over its whole row of the map: finished runs, crashed / failed / trained counts,
  the lowest learning rate at which any seed crashed, and the highest at which every seed trained."""
  out = {}
  for variant, cells in smap.items():
    finished = {lr: c for lr, c in cells.items() if c["n"]}
    crash_lrs = [lr for lr, c in finished.items() if c[CRASHED]]
    all_trained = [lr for lr, c in finished.items() if c[TRAINED] == c["n"]]
    out[variant] = dict(runs=sum(c["n"] for c in finished.values()),
                        crashed=sum(c[CRASHED] for c in finished.values()),
                        failed=sum(c[FAILED] for c in finished.values()),
                        trained=sum(c[TRAINED] for c in finished.values()),
                        unfinished=sum(c[UNFINISHED] for c in cells.values()),
                        lowest_crash_lr=min(crash_lrs) if crash_lrs else None,
                        highest_all_trained_lr=max(all_trained) if all_trained else None)
  return out


def totals_table(totals: Dict[str, dict]) -> str:
  """Markdown: a row per variant with its counts over the map's row."""
  lr = lambda v: "-" if v is None else f"{v:g}"  # noqa: E731
  lines = ["| variant | runs finished | crashed | failed to learn | trained | lowest lr with a crash | "
           "highest lr where every seed trained |", "|---|---|---|---|---|---|---|"]
  for variant, t in totals.items():
    lines.append(f"| {variant} | {t['runs']} | {t['crashed']} | {t['failed']} | {t['trained']} | "
                 f"{lr(t['lowest_crash_lr'])} | {lr(t['highest_all_trained_lr'])} |")
  return "\n".join(lines)


def _peak(series: Dict[str, list], name: str) -> Optional[float]:
  best = None
  for key, points in series.items():
    if key.startswith("diag/block_") and key.endswith("/" + name):
      for _, value in points:
        if math.isfinite(value):
          best = value if best is None else max(best, value)
  return best


def mechanism(runs: List[dict], lrs: Dict[str, float]) -> Dict[str, Dict[str, List[Tuple[float, float]]]]:
  """{diagnostic: {variant: [(lr, mean over seeds of the peak value), ...] sorted by lr}}."""
  acc: Dict[str, Dict[str, Dict[float, List[float]]]] = {}
  for r in runs:
    lr = lrs.get(r["name"])
    if lr is None:
      continue
    for name, _ in MECHANISM:
      peak = _peak(r.get("series") or {}, name)
      if peak is not None:
        acc.setdefault(name, {}).setdefault(_variant_of(r.get("group") or r["name"]), {}).setdefault(
            lr, []).append(peak)
  return {name: {variant: sorted((lr, sum(v) / len(v)) for lr, v in by_lr.items())
                 for variant, by_lr in variants.items()}
          for name, variants in acc.items()}


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def _pct(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}"


def _interval(s: Optional[dict]) -> str:
  return "-" if not s or s["ci95"] is None else f"{_pct(s['ci95'][0])} - {_pct(s['ci95'][1])}"


def _signed_pct(value) -> str:
  return "-" if value is None else f"{100 * value:+.2f}"


def aggregate_table(rows: List[dict]) -> str:
  """Markdown: variant, n, mean top-1, std, 95% interval, the paired difference to the reference
  with its interval, the folded top-1 (when evaluated), crashed / unfinished seeds."""
  reference = next((r["reference"] for r in rows if r.get("reference")), None)
  folded = any(r.get("folded_top1", {}).get("n") for r in rows)
  header = ["variant", "seeds completed", "mean top-1 %", "std", "95% interval of the mean"]
  if reference:
    header += [f"paired difference to {reference} (pp)", "its 95% interval"]
  if folded:
    header += ["top-1 % BN folded", "folded = unfolded"]
  header += ["crashed", "not finished"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  for row in rows:
    s = row["top1"]
    cells = [row["variant"], f"{row['completed']}/{row['runs']}", _pct(s["mean"]), _pct(s["std"]),
             _interval(s)]
    if reference:
      d = row.get("difference")
      if row["variant"] == reference:
        cells += ["(reference)", "-"]
      elif not d or not d["n"]:
        cells += ["-", "-"]
      else:
        ci = "-" if d["ci95"] is None else f"{_signed_pct(d['ci95'][0])} to {_signed_pct(d['ci95'][1])}"
        cells += [_signed_pct(d["mean"]), ci]
    if folded:
      f = row.get("folded_top1") or {}
      cells += [_pct(f.get("mean")) if f.get("n") else "-",
                f"{row['folded_agrees']}/{row['folded_checked']}" if row.get("folded_checked") else "-"]
    cells += [str(row["crashed"]), str(row["unfinished"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def stability_table(smap: Dict[str, Dict[float, dict]]) -> str:
  """Markdown: a row per variant, a column per lr; cell 'trained/n, mean top-1' ('C' per crash)."""
  lrs = sorted({lr for cells in smap.values() for lr in cells})
  lines = ["| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
           "|---|" + "|".join("---" for _ in lrs) + "|"]
  for variant, cells in smap.items():
    row = []
    for lr in lrs:
      cell = cells.get(lr)
      if not cell or not cell["n"]:
        row.append("not run")
        continue
      text = f"{cell[TRAINED]}/{cell['n']} trained"
      if cell["top1"]["mean"] is not None:
        text += f", {_pct(cell['top1']['mean'])}%"
      extra = [f"{cell[k]} {k}" for k in (CRASHED, FAILED) if cell[k]]
      if cell[UNFINISHED]:
        extra.append(f"{cell[UNFINISHED]} not finished")
      row.append(text + (f" ({', '.join(extra)})" if extra else ""))
    lines.append(f"| {variant} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def criterion_text(threshold: float = sweeps_lib.FAILED_TO_LEARN_TOP1) -> str:
  return (f"Criterion, fixed before the runs: **crashed** = the trainer stopped the run as diverged "
          f"(non-finite loss or gradient, or the loss-spike detector fired); **failed to learn** = "
          f"completed with final eval top-1 below {100 * threshold:.0f}%; **trained** = otherwise. "
          "A cell reads 'trained seeds / finished seeds, mean final top-1 of the completed seeds'. "
          "In float16 runs a step the loss scaler skipped (non-finite gradient) is not a crash, a "
          "non-finite loss is (as in DeiT); each crashed run's status.json names its `divergence`: "
          "non_finite_loss, non_finite_gradient or loss_spike.")


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def plot_stability(smap: Dict[str, Dict[float, dict]], title: str, path: str, save, plt) -> bool:
  """Two heat maps side by side: success rate and mean final top-1, variant x lr."""
  if not smap:
    return False
  variants = list(smap)
  lrs = sorted({lr for cells in smap.values() for lr in cells})
  fig, axes = plt.subplots(1, 2, figsize=(3.2 + 1.3 * len(lrs) * 2, 1.4 + 0.6 * len(variants)))
  for ax, (key, label, cmap) in zip(axes, (("success_rate", "success rate", "RdYlGn"),
                                           ("top1", "mean final top-1 (%)", "viridis"))):
    grid = []
    for v in variants:
      row = []
      for lr in lrs:
        cell = smap[v].get(lr)
        value = None
        if cell and cell["n"]:
          value = cell["success_rate"] if key == "success_rate" else cell["top1"]["mean"]
        row.append(float("nan") if value is None else (value if key == "success_rate" else 100 * value))
      grid.append(row)
    image = ax.imshow(grid, cmap=cmap, aspect="auto", vmin=0, vmax=1 if key == "success_rate" else 100)
    for i, row in enumerate(grid):
      for j, value in enumerate(row):
        cell = smap[variants[i]].get(lrs[j])
        if key == "success_rate":
          text = "-" if not cell or not cell["n"] else f"{cell[TRAINED]}/{cell['n']}" + "".join(
              f"\n{cell[k]} {mark}" for k, mark in ((CRASHED, "crashed"), (FAILED, "failed")) if cell[k])
        else:
          text = "-" if math.isnan(value) else f"{value:.0f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs], rotation=30)
    ax.set_yticks(range(len(variants)), variants)
    ax.set_xlabel("peak learning rate")
    ax.set_title(label)
    fig.colorbar(image, ax=ax, fraction=0.04)
  fig.suptitle(title + " (cells: trained / finished seeds, then crashed and failed-to-learn counts)",
               x=0.01, ha="left", fontsize=10)
  fig.tight_layout()
  save(fig, path, dpi=100)
  plt.close(fig)
  return True


def plot_mechanism(mech: Dict[str, Dict[str, List[Tuple[float, float]]]], title: str, path: str,
                   save, plt) -> bool:
  """One panel per diagnostic: its peak over training vs peak lr, a line per variant (log-log)."""
  panels = [(k, label) for k, label in MECHANISM if mech.get(k)]
  if not panels:
    return False
  fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    for variant, points in mech[key].items():
      ax.plot([p[0] for p in points], [max(p[1], 1e-12) for p in points], marker="o", ms=3,
              label=variant)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib import ticker  # pylint: disable=g-import-not-at-top
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 3, not 3x10^0
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(  # label the 2s and 5s between decades
        lambda v, _: f"{float(f'{v:.1g}'):g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel("peak learning rate")
    ax.set_title(f"peak {label} (max over blocks and steps)", fontsize=9)
    ax.grid(True, alpha=0.3, which="both")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title, x=0.01, ha="left", fontsize=10)
  fig.tight_layout()
  save(fig, path, dpi=100)
  plt.close(fig)
  return True


def plot_spread(rows: List[dict], runs: List[dict], title: str, path: str, save, plt) -> bool:
  """Final top-1 per variant: a point per seed, the mean and its 95% interval as an error bar."""
  rows = [r for r in rows if r["top1"]["n"]]
  if not rows:
    return False
  fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 4))
  by_group = _groups(runs)
  for i, row in enumerate(rows):
    values = [100 * v for v in (final_top1(r) for r in by_group[row["variant"]]
                                if r.get("status") == "completed") if v is not None]
    ax.plot([i] * len(values), values, "o", color="tab:blue", alpha=0.6, ms=4)
    s = row["top1"]
    if s["ci95"] is not None:
      ax.errorbar([i + 0.15], [100 * s["mean"]], yerr=[[100 * (s["mean"] - s["ci95"][0])],
                                                       [100 * (s["ci95"][1] - s["mean"])]],
                  fmt="s", color="black", capsize=4, ms=4)
    crashed = row["crashed"]
    if crashed:
      ax.annotate(f"{crashed} crashed", (i, ax.get_ylim()[0]), fontsize=7, color="red")
  ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30)
  ax.set_ylabel("final eval top-1 (%)")
  ax.set_title(title, fontsize=10)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  save(fig, path, dpi=100)
  plt.close(fig)
  return True
