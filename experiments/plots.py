"""The report's figures: training curves per run, per-block diagnostics, and the shared PNG writer.

`save_png` writes a 256-colour palette PNG (a third of matplotlib's RGBA size); the study's maps
(experiments.study) use it too.
"""
import math

from experiments import run_files

DIAGNOSTICS = (
    ("residual_rms", "residual stream RMS"),
    ("ffn_hidden_rms", "FFN hidden RMS"),
    ("max_attention_logit", "max attention logit"),
    ("grad_norm", "gradient norm"),
)


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _plain_log_axis(ax):
  """Log y axis with plain tick labels (3, 0.5) instead of 3x10^0."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_yscale("log")
  plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
  ax.yaxis.set_major_formatter(plain)

  def minor(v, _):  # every minor tick within about a decade, else only the 2s and 5s
    low, high = ax.get_ylim()
    narrow = low > 0 and high / low < 8
    return f"{float(f'{v:.2g}'):g}" if narrow or f"{v:.0e}"[0] in "25" else ""

  ax.yaxis.set_minor_formatter(ticker.FuncFormatter(minor))


def save_png(fig, path: str, dpi: int) -> None:
  """PNG with a 256-colour palette: a third of the size of matplotlib's RGBA, same look."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top  (matplotlib depends on pillow)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  buf.seek(0)
  with Image.open(buf) as image:
    image.convert("RGB").quantize(colors=256).save(path, optimize=True)


def _finite(points):
  pts = [(s, v) for s, v in points if math.isfinite(v)]
  return [s for s, _ in pts], [v for _, v in pts]


def _diverged_step(run):
  return run.get("step") if run.get("status") == "diverged" else None


def plot_curves(doc: dict, key: str, ylabel: str, path: str, *, log_y=False, percent=False) -> bool:
  """One line per run of `key` vs step; diverged runs end in an x with 'diverged @ step'."""
  runs = [r for r in doc["runs"] if _finite(r["series"].get(key, []))[0]]
  if not runs:
    return False
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(8, 5))
  for r in runs:
    steps, values = _finite(r["series"][key])
    if percent and max(values) <= 1.0:
      values = [100 * v for v in values]
    label = r["name"]
    stop = _diverged_step(r)
    if stop is not None:
      label += f" (diverged @ {stop})"
    (line,) = ax.plot(steps, values, label=label, lw=1.4,
                      ls="--" if stop is not None else "-", marker="o" if len(steps) < 15 else None, ms=3)
    if stop is not None:
      ax.plot(steps[-1], values[-1], "x", color=line.get_color(), ms=12, mew=3)
      ax.axvline(stop, color=line.get_color(), ls=":", lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel + (" (%)" if percent else ""))
  if log_y:
    _plain_log_axis(ax)
  ax.set_title(f"{doc['sweep']}: {ylabel}")
  ax.grid(True, alpha=0.3, which="both")
  ax.legend(fontsize=9)
  fig.tight_layout()
  save_png(fig, path, dpi=110)
  plt.close(fig)
  return True


def diagnostics_runs(runs: list) -> list:
  """The runs the diagnostics figure shows, in sweep order: every run of an unseeded sweep; of a
  seeded one, one per variant (its group): the first seed that diverged, else the first seed.
  The seeds of a variant share the shape of their curves, and every seed's result is in the
  tables and spread.png; a row per seed made the figure unreadable (and slow to draw)."""
  chosen = {}
  for r in runs:
    group = r.get("group") or r["name"]
    if group not in chosen or (_diverged_step(r) is not None and _diverged_step(chosen[group]) is None):
      chosen[group] = r
  return list(chosen.values())


def plot_diagnostics(doc: dict, path: str) -> bool:
  """A row per run (per variant in a seeded sweep: diagnostics_runs), a column per diagnostic, a
  line per block (dark = first, light = last)."""
  rows = [(r, run_files.block_diagnostics(r["series"])) for r in doc["runs"]]
  rows = [(r, d) for r, d in rows if d]
  keep = {id(r) for r in diagnostics_runs([r for r, _ in rows])}
  rows = [(r, d) for r, d in rows if id(r) in keep]
  cols = [(k, label) for k, label in DIAGNOSTICS if any(k in d for _, d in rows)]
  if not rows or not cols:
    return False
  plt = pyplot()
  fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.2 * len(cols), 2.6 * len(rows) + 0.6),
                           sharex=True, sharey="col", squeeze=False)
  cmap = plt.get_cmap("viridis")
  for i, (r, diag) in enumerate(rows):
    stop = _diverged_step(r)
    for j, (key, label) in enumerate(cols):
      ax = axes[i][j]
      blocks = diag.get(key, {})
      for b in sorted(blocks):
        steps, values = _finite(blocks[b])
        if steps:
          ax.plot(steps, [max(v, 1e-12) for v in values], color=cmap(b / max(len(blocks) - 1, 1)),
                  lw=1.2, label=f"block {b}")
      if stop is not None:
        ax.axvline(stop, color="red", ls="--", lw=1)
      _plain_log_axis(ax)
      ax.grid(True, alpha=0.3, which="both")
      if i == 0:
        ax.set_title(label)
      if j == 0:
        ax.set_ylabel(r["name"] + ("\n(diverged)" if stop is not None else ""), fontsize=10,
                      color="red" if stop is not None else "black")
      if i == len(rows) - 1:
        ax.set_xlabel("step")
  handles, labels = axes[0][0].get_legend_handles_labels()
  for row in axes:
    for ax in row:
      h, l = ax.get_legend_handles_labels()
      if len(h) > len(handles):
        handles, labels = h, l
  if handles:
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=min(len(handles), 12))
  fig.suptitle(f"{doc['sweep']}: per-block diagnostics (red dashes: divergence)", x=0.01, ha="left")
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  save_png(fig, path, dpi=90)
  plt.close(fig)
  return True


def plot_speed_ratios(ratios: dict, title: str, path: str) -> bool:
  """Inference img/s relative to LN against the batch size, a line per model (log x axis)."""
  if not ratios:
    return False
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  for model, per_batch in ratios.items():
    points = sorted((int(b), v) for b, v in per_batch.items() if v is not None)
    style = dict(ls="--", color="grey") if model.endswith("_aa") else {}
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=4, label=model, **style)
  ax.axhline(1.0, color="black", lw=0.8)
  ax.set_xscale("log", base=2)
  batches = sorted({int(b) for per_batch in ratios.values() for b in per_batch})
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.set_xlabel("batch size")
  ax.set_ylabel("img/s relative to LN")
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  save_png(fig, path, dpi=100)
  plt.close(fig)
  return True
