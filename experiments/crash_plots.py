"""The crash study's figures (issue 21), from the run summaries and series the report loads.

Each function returns False (and writes nothing) when it has nothing to draw. Learning rates are on
a log axis; a crashed seed is an x drawn at L0 = log(num_classes), the loss it counts as.

  plot_loss_vs_lr         final train loss against peak lr, a line per arm (mean of min(L, L0)
                          over seeds) with every seed as a point; optional panels (per variant)
  plot_peaks_vs_lr        one panel per diagnostic (FFN pre-norm / output RMS, attention logit,
                          ...): its peak over training against lr, a line per arm
  plot_max_activation     the largest |x| at any matmul output against lr, with float16's 65,504
  plot_crash_traces       for the runs that crashed: the max attention logit of each block over
                          training (log) with the train loss overlaid on a second axis
  plot_bn_mismatch        BN evaluated with running vs batch statistics: the eval-loss gap against lr
  plot_loss_panels        train loss over training, a panel per variant, a line per run coloured
                          by its lr (or seed): the readable replacement of the one-axis loss.png
  plot_forest             accuracy differences to the reference with intervals and the margin
"""
import math
import textwrap
from typing import Dict, List, Optional, Sequence

import numpy as np

from experiments import plots, run_files, study
from experiments import sweeps as sweeps_lib


def _log_x(ax, label="peak learning rate"):
  ax.set_xscale("log")
  ax.set_xlabel(label)
  ax.grid(True, alpha=0.3, which="both")


def _finish(fig, path, title):
  wrapped = "\n".join(textwrap.wrap(title, max(40, int(fig.get_figwidth() * 13))))
  fig.suptitle(wrapped, x=0.01, ha="left", fontsize=10)
  fig.tight_layout()
  plots.save_png(fig, path, dpi=100)
  plots.pyplot().close(fig)
  return True


def _seed_points(runs: List[dict], arm: str):
  """[(lr, min(L, L0), crashed)] for every finished seed of an arm."""
  out = []
  for r in runs:
    parsed = sweeps_lib.parse_crash_arm(r.get("name", ""))
    if parsed is None or parsed["arm"] != arm or "lr" not in parsed:
      continue
    loss = study.clipped_loss(r)
    if loss is not None:
      out.append((parsed["lr"], loss, study.loss_outcome(r) == study.LOSS_CRASHED))
  return out


def plot_loss_vs_lr(runs: List[dict], path: str, title: str,
                    panels: Optional[Dict[str, Sequence[str]]] = None) -> bool:
  """`panels`: {panel title: arms drawn in it}; default one panel with every arm. False (nothing
  drawn) while no run has finished: a sweep in progress has arms whose cells have no loss yet."""
  curves = {arm: cells for arm, cells in study.loss_curves(runs).items()
            if any(c["loss"] is not None for c in cells.values())}
  if not curves:
    return False
  panels = {k: list(v) for k, v in (panels or {"": list(curves)}).items() if any(a in curves for a in v)}
  if not panels:
    return False
  plt = plots.pyplot()
  cols = min(4, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.6 * rows + 0.5), squeeze=False, sharey=True)
  l0 = study.initial_loss()
  for ax, (name, arms) in zip(axes.flat, panels.items()):
    for i, arm in enumerate(arms):  # an arm keeps its colour (its place in the panel) when another is missing
      if arm not in curves:
        continue
      cells = curves[arm]
      lrs = [lr for lr, c in cells.items() if c["loss"] is not None]
      (line,) = ax.plot(lrs, [cells[lr]["loss"] for lr in lrs], marker="o", ms=4, label=arm, color=f"C{i % 10}")
      points = _seed_points(runs, arm)
      ax.scatter([p[0] for p in points if not p[2]], [p[1] for p in points if not p[2]],
                 s=10, color=line.get_color(), alpha=0.5)
      ax.scatter([p[0] for p in points if p[2]], [p[1] for p in points if p[2]], marker="x", s=60,
                 color=line.get_color(), linewidths=2)
    ax.axhline(l0, color="black", lw=0.8, ls="--")
    ax.text(0.01, l0, "L0 = log 10", va="bottom", fontsize=7, transform=ax.get_yaxis_transform())
    _log_x(ax)
    ax.set_title(name, fontsize=9)
    ax.set_ylabel("final train loss, min(L, L0)")
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  return _finish(fig, path, title + " (line: mean over seeds; dots: seeds; x: a crashed seed)")


def plot_peaks_vs_lr(peaks: Dict[str, Dict[str, Dict[float, float]]], path: str, title: str,
                     names: Sequence[str] = ("ffn_pre_norm_rms", "ffn_out_rms")) -> bool:
  names = [n for n in names if peaks.get(n)]
  if not names:
    return False
  plt = plots.pyplot()
  labels = dict(study.PEAKS)
  fig, axes = plt.subplots(1, len(names), figsize=(4.8 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    for arm, by_lr in peaks[name].items():
      ax.plot(list(by_lr), [max(v, 1e-12) for v in by_lr.values()], marker="o", ms=3, label=arm)
    _log_x(ax)
    plots._plain_log_axis(ax)  # pylint: disable=protected-access
    ax.set_title(f"peak {labels.get(name, name)}\n(max over blocks and steps, mean over seeds)", fontsize=8)
    ax.legend(fontsize=7)
  return _finish(fig, path, title)


def plot_max_activation(peaks: Dict[str, Dict[str, Dict[float, float]]], path: str, title: str) -> bool:
  """The largest |x| at any matmul output (and the unscaled q.k) against lr, with the fp16 limit."""
  names = [n for n in ("max_abs_matmul", "max_abs_qk") if peaks.get(n)]
  if not names:
    return False
  plt = plots.pyplot()
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
  for ax, name in zip(axes[0], names):
    for arm, by_lr in peaks[name].items():
      ax.plot(list(by_lr), [max(v, 1e-12) for v in by_lr.values()], marker="o", ms=3, label=arm)
    ax.axhline(study.FP16_MAX, color="red", lw=1, ls="--")
    ax.text(0.01, study.FP16_MAX, "float16 max 65,504", color="red", va="bottom", fontsize=7,
            transform=ax.get_yaxis_transform())
    _log_x(ax)
    plots._plain_log_axis(ax)  # pylint: disable=protected-access
    ax.set_title("peak max |x| at any matmul output" if name == "max_abs_matmul"
                 else "peak max |q.k| (unscaled)", fontsize=9)
    ax.legend(fontsize=7)
  return _finish(fig, path, title)


def plot_crash_traces(runs: List[dict], path: str, title: str, limit: int = 8) -> bool:
  """A panel per crashed run (at most `limit`, lowest lr first): per block the max attention logit
  over training (log, left axis), the train loss (right axis), the crash step as a red line."""
  crashed = [r for r in runs if r.get("status") == "diverged"
             and run_files.block_diagnostics(r.get("series") or {}).get("max_attention_logit")]
  crashed.sort(key=lambda r: ((sweeps_lib.parse_crash_arm(r["name"]) or {}).get("lr", 0), r["name"]))
  crashed = crashed[:limit]
  if not crashed:
    return False
  plt = plots.pyplot()
  cols = min(4, len(crashed))
  rows = math.ceil(len(crashed) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.5), squeeze=False)
  cmap = plt.get_cmap("viridis")
  for ax, r in zip(axes.flat, crashed):
    blocks = run_files.block_diagnostics(r["series"]).get("max_attention_logit", {})
    drawn = 0
    for b in sorted(blocks):
      pts = [(s, v) for s, v in blocks[b] if math.isfinite(v)]
      ax.plot([p[0] for p in pts], [max(p[1], 1e-6) for p in pts], color=cmap(b / max(len(blocks) - 1, 1)),
              lw=1.2, label=f"block {b}")
      drawn += len(pts)
    if drawn:  # a run that crashed before its first diagnostics record has no logits to draw
      ax.set_yscale("log")
    else:
      ax.text(0.5, 0.5, "no diagnostics record\nbefore the crash", ha="center", va="center",
              transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("max attention logit")
    loss = [(s, v) for s, v in r["series"].get("train/loss", []) if math.isfinite(v)]
    twin = ax.twinx()
    twin.plot([p[0] for p in loss], [p[1] for p in loss], color="black", lw=1, ls=":")
    twin.set_ylabel("train loss (dotted)", fontsize=8)
    if r.get("step") is not None:
      ax.axvline(r["step"], color="red", lw=1, ls="--")
    ax.set_title(f"{r['name']}\ncrashed at step {r.get('step')}", fontsize=8)
    ax.legend(fontsize=6, loc="upper left")
  for ax in list(axes.flat)[len(crashed):]:
    ax.axis("off")
  return _finish(fig, path, title)


def plot_bn_mismatch(runs: List[dict], path: str, title: str) -> bool:
  """Eval loss with running statistics minus eval loss with batch statistics (last evaluation),
  against lr, a line per arm (mean over seeds): above 0, the running averages hurt."""
  acc: Dict[str, Dict[float, List[float]]] = {}
  for r in runs:
    parsed = sweeps_lib.parse_crash_arm(r.get("name", ""))
    m = study.bn_mismatch(r)
    if parsed is None or "lr" not in parsed or m is None:
      continue
    acc.setdefault(parsed["arm"], {}).setdefault(parsed["lr"], []).append(m["loss_running"] - m["loss_batch"])
  if not acc:
    return False
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for arm, by_lr in sorted(acc.items()):
    lrs = sorted(by_lr)
    ax.plot(lrs, [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs], marker="o", ms=3, label=arm)
  ax.axhline(0, color="black", lw=0.8)
  ax.set_yscale("symlog", linthresh=0.01)
  _log_x(ax)
  ax.set_ylabel("eval loss: running - batch statistics")
  ax.legend(fontsize=7)
  return _finish(fig, path, title)


def plot_loss_panels(runs: List[dict], path: str, title: str) -> bool:
  """Train loss over training: a panel per variant (a run's group without its lr), a line per run
  coloured by its peak lr (crash-study runs) or its seed; a crashed run ends in an x."""
  panels: Dict[str, List[dict]] = {}
  for r in runs:
    if not [v for _, v in r.get("series", {}).get("train/loss", []) if math.isfinite(v)]:
      continue
    parsed = sweeps_lib.parse_crash_arm(r.get("name", ""))
    panels.setdefault(parsed["arm"] if parsed else (r.get("group") or r["name"]), []).append(r)
  if not panels:
    return False
  plt = plots.pyplot()
  cols = min(4, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.6), squeeze=False,
                           sharex=True, sharey=True)
  cmap = plt.get_cmap("plasma")
  all_lrs = sorted({(sweeps_lib.parse_crash_arm(r["name"]) or {}).get("lr") for rs in panels.values()
                    for r in rs} - {None})
  from matplotlib import cm, colors  # pylint: disable=g-import-not-at-top
  norm = colors.LogNorm(all_lrs[0], all_lrs[-1] if len(all_lrs) > 1 else all_lrs[0] * 10) if all_lrs else None
  for ax, (name, members) in zip(axes.flat, panels.items()):
    for i, r in enumerate(sorted(members, key=lambda r: r["name"])):
      lr = (sweeps_lib.parse_crash_arm(r["name"]) or {}).get("lr")
      color = cmap(0.9 * float(norm(lr))) if lr in all_lrs else f"C{i % 10}"
      pts = [(s, v) for s, v in r["series"]["train/loss"] if math.isfinite(v)]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, lw=1, alpha=0.8)
      if r.get("status") == "diverged":
        ax.plot(pts[-1][0], pts[-1][1], "x", color=color, ms=9, mew=2)
    ax.set_title(name, fontsize=9)
    ax.grid(True, alpha=0.3, which="both")
  values = [v for rs in panels.values() for r in rs for _, v in r["series"]["train/loss"]
            if math.isfinite(v) and v > 0]
  if values and max(values) / min(values) > 10:  # a log axis only where the losses span decades
    plots._plain_log_axis(axes.flat[0])  # pylint: disable=protected-access  (shared y)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  for ax in axes[-1]:
    ax.set_xlabel("step")
  if all_lrs:
    # The colours use 0-0.9 of the map (its last tenth is too pale to see); the bar shows the same.
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=colors.ListedColormap(cmap(np.linspace(0, 0.9, 256)))),
                 ax=list(axes.flat), label="peak lr", fraction=0.02)
    fig.suptitle(title + " (x: crashed)", x=0.01, ha="left", fontsize=10)
    plots.save_png(fig, path, dpi=90)
    plt.close(fig)
    return True
  return _finish(fig, path, title + " (a line per seed; x: crashed)")


def plot_forest(rows: List[dict], reference: str, margin: float, path: str, title: str) -> bool:
  """Each variant's difference to the reference with its 95% interval; 0 and -margin marked."""
  rows = [r for r in rows if r.get("difference_ci95") is not None]
  if not rows:
    return False
  plt = plots.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 1.0 + 0.45 * len(rows)))
  for i, r in enumerate(rows):
    lo, hi = r["difference_ci95"]
    color = "tab:green" if r.get("verdict") == "non-inferior" else "tab:gray"
    ax.plot([100 * lo, 100 * hi], [i, i], color=color, lw=2)
    ax.plot([100 * r["difference"]], [i], "o", color=color)
    if r.get("crashed"):
      ax.text(100 * hi, i, f"  {r['crashed']} crashed", va="center", fontsize=7, color="red")
  ax.axvline(0, color="black", lw=0.8)
  ax.axvline(-100 * margin, color="red", lw=1, ls="--")
  ax.set_yticks(range(len(rows)), [f"{r['variant']} ({r.get('verdict')})" for r in rows], fontsize=8)
  ax.set_ylim(len(rows) - 0.5, -0.5)  # the first variant on top
  ax.set_xlabel(f"top-1 difference to {reference} (points), 95% bootstrap interval\n"
                f"red dashes: the non-inferiority margin, -{100 * margin:g} point", fontsize=8)
  ax.grid(True, axis="x", alpha=0.3)
  return _finish(fig, path, title)
