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

from experiments import run_files
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


# ----------------------------------------------------------------------------------------------
# The crash study (issue 21): outcome from the train loss, learning-rate sensitivity, accuracy
# at each variant's best lr. Everything here is fixed before the runs.
# ----------------------------------------------------------------------------------------------

# Outcome of a sensitivity run, from its train loss (not its accuracy):
#   crashed   the trainer stopped it for a non-finite loss (status 'diverged'; in float16 only a
#             non-finite *loss* stops a run, as in DeiT, a non-finite gradient is a step the loss
#             scaler skips; in float32 a non-finite gradient stops it too, one step before the
#             loss would be non-finite);
#   diverged  it completed, but its final train loss is above L0 = log(num_classes), the loss of
#             a uniform prediction at initialization (or the final loss is not finite);
#   trained   otherwise.
# The final train loss is the last `train/loss` the trainer logged: the mean over the last
# log_every steps (25 in these sweeps), not one batch.
LOSS_CRASHED, LOSS_DIVERGED, LOSS_TRAINED = "crashed", "diverged", "trained"
NUM_CLASSES = 10  # mnist5k


def initial_loss(num_classes: int = NUM_CLASSES) -> float:
  """L0 = log(num_classes): the cross-entropy of a uniform prediction."""
  return math.log(num_classes)


def final_train_loss(run: dict) -> Optional[float]:
  value = (run.get("final") or {}).get("train/loss")
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def loss_outcome(run: dict, num_classes: int = NUM_CLASSES) -> str:
  """crashed / diverged / trained by the criterion above; 'not finished' for any other status."""
  if run.get("status") == "diverged":
    return LOSS_CRASHED
  if run.get("status") != "completed":
    return UNFINISHED
  loss = final_train_loss(run)
  if loss is None or not math.isfinite(loss) or loss > initial_loss(num_classes):
    return LOSS_DIVERGED
  return LOSS_TRAINED


def clipped_loss(run: dict, num_classes: int = NUM_CLASSES) -> Optional[float]:
  """min(L, L0) for a finished run (a crash counts as L0); None for an unfinished one."""
  result = loss_outcome(run, num_classes)
  if result == UNFINISHED:
    return None
  loss = final_train_loss(run)
  if result == LOSS_CRASHED or loss is None or not math.isfinite(loss):
    return initial_loss(num_classes)
  return min(loss, initial_loss(num_classes))


def loss_curves(runs: List[dict], num_classes: int = NUM_CLASSES) -> Dict[str, Dict[float, dict]]:
  """{arm: {lr: {n, crashed, diverged, trained, unfinished, loss (mean over finished seeds of
  min(L, L0)), losses [per seed]}}} for the runs named like the crash study's
  (experiments.sweeps.parse_crash_arm) that have started; other runs are left out."""
  out: Dict[str, Dict[float, dict]] = {}
  for r in runs:
    parsed = sweeps_lib.parse_crash_arm(r.get("name", ""))
    if parsed is None or "lr" not in parsed or r.get("status") == "not_run":
      continue
    cell = out.setdefault(parsed["arm"], {}).setdefault(parsed["lr"], {
        "n": 0, LOSS_CRASHED: 0, LOSS_DIVERGED: 0, LOSS_TRAINED: 0, UNFINISHED: 0, "losses": []})
    result = loss_outcome(r, num_classes)
    cell[result] += 1
    if result != UNFINISHED:
      cell["n"] += 1
      cell["losses"].append(clipped_loss(r, num_classes))
  for cells in out.values():
    for cell in cells.values():
      cell["loss"] = sum(cell["losses"]) / len(cell["losses"]) if cell["losses"] else None
  return {arm: dict(sorted(cells.items())) for arm, cells in sorted(out.items())}


def sensitivity(cells: Dict[float, dict], grid: Sequence[float], num_classes: int = NUM_CLASSES) -> dict:
  """Wortsman et al.'s LR sensitivity of one arm: E_lr[min(L(lr), L0) - L*] over the lr grid,
  L(lr) the mean over seeds of min(L, L0) (a crashed seed counts as L0), L* = min over the grid.

  {value, best_loss (L*), best_lr, complete}: value None until every lr of the grid has a finished
  run. best_lr: the lr with the lowest L(lr) among those where every seed trained (None if none
  did); it is what the accuracy sweep uses.
  """
  losses = {lr: cells[lr]["loss"] for lr in grid if lr in cells and cells[lr]["loss"] is not None}
  complete = len(losses) == len(grid)
  best_loss = min(losses.values()) if losses else None
  value = (sum(losses.values()) / len(losses) - best_loss) if complete else None
  all_trained = [lr for lr in losses if cells[lr][LOSS_TRAINED] == cells[lr]["n"] > 0
                 and not cells[lr][UNFINISHED]]
  best_lr = min(all_trained, key=lambda lr: (losses[lr], lr)) if all_trained else None
  return dict(value=value, best_loss=best_loss, best_lr=best_lr, complete=complete,
              initial_loss=initial_loss(num_classes))


def sensitivity_table(curves: Dict[str, Dict[float, dict]], grid: Sequence[float]) -> str:
  """Markdown: a row per arm; per lr the mean min(L, L0) with the outcomes ('C' crashed,
  'D' diverged per seed), then the sensitivity, L* and the best lr."""
  lines = ["| arm | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | sensitivity | L* | best lr |",
           "|---|" + "|".join("---" for _ in grid) + "|---|---|---|"]
  for arm, cells in curves.items():
    row = []
    for lr in grid:
      cell = cells.get(lr)
      if not cell or not cell["n"]:
        row.append("not run" if not cell or not cell[UNFINISHED] else "not finished")
        continue
      marks = "C" * cell[LOSS_CRASHED] + "D" * cell[LOSS_DIVERGED]
      row.append(f"{cell['loss']:.3f}" + (f" {marks}" if marks else "")
                 + (f" ({cell['n']}/{cell['n'] + cell[UNFINISHED]})" if cell[UNFINISHED] else ""))
    s = sensitivity(cells, grid)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines.append(f"| {arm} | " + " | ".join(row) + f" | {fmt(s['value'], '.3f')} | "
                 f"{fmt(s['best_loss'], '.3f')} | {fmt(s['best_lr'], 'g')} |")
  return "\n".join(lines)


def loss_criterion_text(num_classes: int = NUM_CLASSES) -> str:
  return (f"Criterion, fixed before the runs (experiments/study.py): a run **crashed** if the trainer "
          f"stopped it for a non-finite loss (in float16 a non-finite gradient is a skipped step, not "
          f"a crash; in float32 the trainer stops on it, one step before the loss); it **diverged** "
          f"if it completed with a final train loss above L0 = log {num_classes} = "
          f"{initial_loss(num_classes):.3f}; it **trained** otherwise. A cell is the mean over seeds "
          f"of min(final train loss, L0) (a crash counts as L0), then C per crashed and D per "
          f"diverged seed. **Sensitivity** = E_lr[min(L(lr), L0) - L*] over the grid (Wortsman et "
          f"al. 2023), L* the arm's best cell: 0 means every lr reaches the best loss, "
          f"{initial_loss(num_classes):.2f} would mean only one lr trains at all.")


# Accuracy at each variant's own best lr (sweep crash_accuracy_cpu), declared before the runs:
NONINFERIORITY_MARGIN = 0.01  # a variant is non-inferior to LN if its top-1 is at most 1 point lower
ALPHA = 0.05  # one-sided level of each non-inferiority test, after Holm's correction over the variants
TEST_IMAGES = 1000  # mnist5k's test split: each run's final eval top-1 is a proportion of these
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def bootstrap_top1(by_seed_variant: Dict[object, float], by_seed_reference: Optional[Dict[object, float]] = None,
                   *, test_images: int = TEST_IMAGES, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED):
  """Bootstrap draws of a variant's mean top-1 over seeds, or of its paired difference to the
  reference (same seeds), as a numpy array of `resamples` values.

  Two levels, so the interval carries both sources of noise and stays inside [0, 1]: seeds are
  resampled with replacement, then each drawn seed's top-1 on the test images is redrawn as
  Binomial(test_images, its top-1) / test_images (the test images resampled). The two variants'
  test draws are independent, which ignores that they share the test images: conservative (the
  paired difference of correlated errors varies less than this).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  seeds = sorted(by_seed_variant, key=str)
  if by_seed_reference is not None:
    seeds = [s for s in seeds if s in by_seed_reference]
  if not seeds:
    return np.zeros(0)
  rng = np.random.default_rng(seed)
  pick = rng.integers(0, len(seeds), size=(resamples, len(seeds)))
  p = np.array([by_seed_variant[s] for s in seeds])[pick]
  draws = rng.binomial(test_images, p).mean(axis=1) / test_images
  if by_seed_reference is None:
    return draws
  q = np.array([by_seed_reference[s] for s in seeds])[pick]
  return draws - rng.binomial(test_images, q).mean(axis=1) / test_images


def percentile_interval(draws, level: float = 0.95):
  import numpy as np  # pylint: disable=g-import-not-at-top
  if len(draws) == 0:
    return None
  low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def noninferiority_p(draws, margin: float = NONINFERIORITY_MARGIN) -> Optional[float]:
  """One-sided bootstrap p-value of H0 'the difference to the reference is <= -margin':
  (1 + #draws <= -margin) / (1 + #draws)."""
  if len(draws) == 0:
    return None
  return float((1 + (draws <= -margin).sum()) / (1 + len(draws)))


def holm(pvalues: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
  """Holm's step-down adjusted p-values (family: the non-None entries)."""
  ordered = sorted((p, k) for k, p in pvalues.items() if p is not None)
  m, running, out = len(ordered), 0.0, {k: None for k in pvalues}
  for i, (p, k) in enumerate(ordered):
    running = max(running, min(1.0, (m - i) * p))
    out[k] = running
  return out


def accuracy_by_seed(members: List[dict], num_classes: int = NUM_CLASSES) -> Dict[object, float]:
  """{seed: final eval top-1} of a variant's finished seeds; a crashed seed counts as chance
  (1 / num_classes), so crashes count against the variant and seeds stay paired."""
  out = {}
  for r in members:
    if r.get("status") == "diverged":
      out[r.get("seed")] = 1.0 / num_classes
    elif r.get("status") == "completed" and final_top1(r) is not None:
      out[r.get("seed")] = final_top1(r)
  return out


def noninferiority(runs: List[dict], reference: str, *, margin: float = NONINFERIORITY_MARGIN,
                   alpha: float = ALPHA, **bootstrap) -> List[dict]:
  """A row per variant: mean top-1 with its bootstrap interval, the paired difference to the
  reference with its interval, the non-inferiority p-value, Holm-adjusted over the variants,
  and the verdict ('non-inferior' / 'not shown' / '-' for the reference or without data)."""
  groups = _groups(runs)
  ref = accuracy_by_seed(groups.get(reference, []))
  rows, pvals = [], {}
  for variant, members in groups.items():
    mine = accuracy_by_seed(members)
    draws = bootstrap_top1(mine, **bootstrap)
    row = dict(variant=variant, seeds=len(mine), crashed=sum(r.get("status") == "diverged" for r in members),
               unfinished=sum(r.get("status") not in ("completed", "diverged") for r in members),
               top1=(sum(mine.values()) / len(mine)) if mine else None,
               top1_ci95=percentile_interval(draws), difference=None, difference_ci95=None, p=None)
    if variant != reference and ref and mine:
      diff = bootstrap_top1(mine, ref, **bootstrap)
      paired = [s for s in mine if s in ref]
      row.update(difference=sum(mine[s] - ref[s] for s in paired) / len(paired),
                 difference_ci95=percentile_interval(diff), p=noninferiority_p(diff, margin))
      pvals[variant] = row["p"]
    rows.append(row)
  adjusted = holm(pvals)
  for row in rows:
    row["p_holm"] = adjusted.get(row["variant"])
    row["verdict"] = ("-" if row["p_holm"] is None else
                      "non-inferior" if row["p_holm"] < alpha else "not shown")
  return rows


def noninferiority_table(rows: List[dict], reference: str, margin: float = NONINFERIORITY_MARGIN) -> str:
  pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
  ci = lambda v, f: "-" if v is None else f"{f(v[0])} to {f(v[1])}"  # noqa: E731
  signed = lambda v: "-" if v is None else f"{100 * v:+.2f}"  # noqa: E731
  lines = [f"| variant | seeds | crashed | mean top-1 % | 95% interval | difference to {reference} (pp) | "
           f"95% interval | p (H0: <= -{100 * margin:g} pp) | Holm p | verdict |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['seeds']} | {r['crashed']} | {pct(r['top1'])} | "
                 f"{ci(r['top1_ci95'], pct)} | "
                 + ("(reference)" if r["variant"] == reference else signed(r["difference"]))
                 + f" | {ci(r['difference_ci95'], signed)} | "
                 f"{'-' if r['p'] is None else format(r['p'], '.4f')} | "
                 f"{'-' if r['p_holm'] is None else format(r['p_holm'], '.4f')} | {r['verdict']} |")
  return "\n".join(lines)


def accuracy_method_text(reference: str, margin: float = NONINFERIORITY_MARGIN, alpha: float = ALPHA) -> str:
  return (f"Declared before the runs (experiments/study.py): each variant trains at its own best lr "
          f"from the sensitivity sweeps; a crashed seed counts as chance accuracy. Intervals: "
          f"{BOOTSTRAP_RESAMPLES:,} bootstrap draws over seeds x the {TEST_IMAGES:,} test images "
          f"(seeds resampled, each seed's top-1 redrawn as a binomial proportion), percentile 95%; "
          f"they stay inside [0, 100]. Non-inferiority to {reference}: H0 'difference <= "
          f"-{100 * margin:g} points', one-sided bootstrap p, Holm-corrected over the variants, "
          f"verdict non-inferior when the corrected p < {alpha:g}. 'not shown' is not 'inferior'.")


# Per-run peaks the crash-study figures plot against lr: diagnostic -> where it is in the series.
PEAKS = (("ffn_pre_norm_rms", "FFN pre-norm RMS (after Dense_0, before the FFN norm)"),
         ("ffn_out_rms", "FFN output RMS (after Dense_1)"),
         ("max_attention_logit", "max attention logit (scaled)"),
         ("max_abs_qk", "max |q.k| (unscaled product)"),
         ("residual_rms", "residual stream RMS"))
FP16_MAX = 65504.0  # the largest finite float16
# Tensors whose max |x| the blocks record, for locating an overflow: diagnostic -> what it is.
OVERFLOW_TENSORS = (("max_abs_qk", "q.k product"), ("ffn_pre_norm_max_abs", "FFN Dense_0 output"),
                    ("ffn_out_max_abs", "FFN Dense_1 output"), ("max_abs_matmul", "a matmul output"))


def run_peaks(run: dict) -> Dict[str, float]:
  """{diagnostic: its largest finite value over blocks and steps} for PEAKS, plus 'max_abs_matmul'
  (the whole model's, diag/max_abs_matmul)."""
  series = run.get("series") or {}
  out = {name: _peak(series, name) for name, _ in PEAKS}
  values = [v for _, v in series.get("diag/max_abs_matmul", []) if math.isfinite(v)]
  out["max_abs_matmul"] = max(values) if values else None
  return {k: v for k, v in out.items() if v is not None}


def peaks_by_lr(runs: List[dict]) -> Dict[str, Dict[str, Dict[float, float]]]:
  """{diagnostic: {arm: {lr: mean over seeds of the run's peak}}} for the crash study's runs."""
  acc: Dict[str, Dict[str, Dict[float, List[float]]]] = {}
  for r in runs:
    parsed = sweeps_lib.parse_crash_arm(r.get("name", ""))
    if parsed is None or "lr" not in parsed:
      continue
    for name, value in run_peaks(r).items():
      acc.setdefault(name, {}).setdefault(parsed["arm"], {}).setdefault(parsed["lr"], []).append(value)
  return {name: {arm: {lr: sum(v) / len(v) for lr, v in sorted(by_lr.items())}
                 for arm, by_lr in sorted(arms.items())} for name, arms in acc.items()}


def bn_mismatch(run: dict) -> Optional[dict]:
  """The last evaluation with both BN modes: {step, loss_running, loss_batch, top1_running,
  top1_batch} (eval/* with running statistics, eval/*_batch_stats with the batch's own)."""
  series = run.get("series") or {}
  batch = dict(series.get("eval/loss_batch_stats", []))
  running = dict(series.get("eval/loss", []))
  steps = [s for s in batch if s in running and math.isfinite(batch[s]) and math.isfinite(running[s])]
  if not steps:
    return None
  step = max(steps)
  top1_b, top1_r = dict(series.get("eval/top1_batch_stats", [])), dict(series.get("eval/top1", []))
  return dict(step=step, loss_running=running[step], loss_batch=batch[step],
              top1_running=top1_r.get(step), top1_batch=top1_b.get(step))


def crash_site(run: dict) -> Optional[dict]:
  """Where a crashed run was when it stopped: {step (the crash), divergence, diag_step (the last
  diagnostics record before it), block, tensor, value, over_fp16 (value > 65,504)} for the
  largest recorded |x| among OVERFLOW_TENSORS at that record (an infinite value, an overflow that
  was recorded, counts as the largest; NaN is skipped); None for a run that did not crash."""
  if run.get("status") != "diverged":
    return None
  diag = run_files.block_diagnostics(run.get("series") or {})
  at = {}  # (block, diagnostic) -> {step: value}
  for name, _ in OVERFLOW_TENSORS:
    for block, points in diag.get(name, {}).items():
      at[(block, name)] = {s: v for s, v in points if not math.isnan(v)}
  steps = [s for values in at.values() for s in values]
  out = dict(step=run.get("step"), divergence=run.get("divergence"), diag_step=max(steps) if steps else None)
  labels = dict(OVERFLOW_TENSORS)
  best = None
  # On a tie the more specific tensor wins (OVERFLOW_TENSORS order: max_abs_matmul includes q.k).
  order = [name for name, _ in OVERFLOW_TENSORS]
  for (block, name), values in sorted(at.items(), key=lambda kv: (order.index(kv[0][1]), kv[0][0])):
    value = values.get(out["diag_step"])
    if value is not None and (best is None or value > best["value"]):
      best = dict(block=block, tensor=labels[name], diagnostic=name, value=value)
  if best:
    out.update(best, over_fp16=best["value"] > FP16_MAX)
  return out


# Verdicts on the claims, by rules fixed before the runs (the write-up quotes them as generated):
REPRODUCED, NOT_REPRODUCED, NOT_RESOLVABLE = "reproduced", "not reproduced", "not resolvable here"


def _all_trained(cell: Optional[dict]) -> bool:
  return bool(cell) and cell["n"] > 0 and cell[LOSS_TRAINED] == cell["n"] and not cell[UNFINISHED]


def _complete(cells: Optional[Dict[float, dict]], grid: Sequence[float]) -> bool:
  return bool(cells) and all(lr in cells and cells[lr]["n"] > 0 and not cells[lr][UNFINISHED] for lr in grid)


def crash_lrs(curves: Dict[str, Dict[float, dict]], arm: str, control: str) -> List[float]:
  """The lrs at which some seed of `arm` crashed while every seed of `control` trained."""
  cells, ref = curves.get(arm) or {}, curves.get(control) or {}
  return sorted(lr for lr, c in cells.items() if c[LOSS_CRASHED] and _all_trained(ref.get(lr)))


def crash_verdict(curves, grid, arm: str, control: str) -> str:
  """'BN crashes (where LN trains)': reproduced if some seed of `arm` crashed at an lr where every
  seed of `control` trained; not reproduced if both arms finished the whole grid and that never
  happened; not resolvable here otherwise."""
  if crash_lrs(curves, arm, control):
    return REPRODUCED
  if _complete(curves.get(arm), grid) and _complete(curves.get(control), grid):
    return NOT_REPRODUCED
  return NOT_RESOLVABLE


def fix_verdict(curves, grid, fixed: str, broken: str, control: str) -> str:
  """'`fixed` prevents the crash of `broken`': resolvable only where `broken` crashed while
  `control` trained; reproduced if `fixed` trained in every seed at every such lr, not reproduced
  if it crashed or diverged at one of them."""
  lrs = crash_lrs(curves, broken, control)
  cells = curves.get(fixed) or {}
  if not lrs or any(lr not in cells or not cells[lr]["n"] or cells[lr][UNFINISHED] for lr in lrs):
    return NOT_RESOLVABLE
  return REPRODUCED if all(_all_trained(cells[lr]) for lr in lrs) else NOT_REPRODUCED


def verdicts(curves: Dict[str, Dict[float, dict]], grid: Sequence[float]) -> dict:
  """{claim: {setting: verdict}} for the crash study's arms (names from sweeps.crash_arm), plus the
  lrs each crash verdict rests on and, per depth, BN's sensitivity minus LN's (descriptive: two
  seeds give it no interval)."""
  arm = sweeps_lib.crash_arm
  out = {"bn_crashes": {}, "ffnbn_prevents": {}, "qknorm_prevents": {}, "crash_lrs": {},
         "depth_gap": {}}
  for precision in ("fp32", "fp16"):
    ln, bn = arm("ln", precision, 4), arm("bn", precision, 4)
    out["bn_crashes"][precision] = crash_verdict(curves, grid, bn, ln)
    out["crash_lrs"][precision] = crash_lrs(curves, bn, ln)
    out["ffnbn_prevents"][precision] = fix_verdict(curves, grid, arm("bn_ffnbn", precision, 4), bn, ln)
    out["qknorm_prevents"][precision] = fix_verdict(curves, grid, arm("bn_qknorm", precision, 4), bn, ln)
  for depth in (4, 8, 12):
    ln, bn = arm("ln", "fp16", depth), arm("bn", "fp16", depth)
    out["bn_crashes"][f"fp16_d{depth}"] = crash_verdict(curves, grid, bn, ln)
    s_ln, s_bn = (sensitivity(curves[a], grid)["value"] if a in curves else None for a in (ln, bn))
    out["depth_gap"][f"d{depth}"] = None if s_ln is None or s_bn is None else s_bn - s_ln
  gaps = [out["depth_gap"][f"d{d}"] for d in (4, 8, 12)]
  out["depth_gap_grows"] = (NOT_RESOLVABLE if None in gaps else
                            "grows with depth" if gaps[0] < gaps[1] < gaps[2] else "does not grow steadily")
  return out
