"""What a training run writes about itself, besides checkpoints.

  WORKDIR/metrics.jsonl   one JSON object per logged step: {"step": 100, "train/loss": ..., ...}
  WORKDIR/tensorboard/    the same scalars as TensorBoard events (tensorboardX: no TensorFlow)
  WORKDIR/status.json     {"status": "running"|"completed"|"diverged"|"preempted", "step", "metrics", ...}

Only the main process (process 0) writes files; every process may call these functions. WORKDIR may
be a bucket URL (gs://...; vitnorm.paths): objects cannot be appended to, so there metrics.jsonl is
rewritten whole at each logged row, and TensorBoard events are written to a local temporary
directory and copied to WORKDIR/tensorboard/ (one object per events file) at each write and at
close; status.json is one object upload. On an
interactive terminal a tqdm progress bar shows step, loss, img/s and ETA; otherwise each log step
prints one plain line.
"""
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Optional

from vitnorm import paths

METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
TENSORBOARD_DIR = "tensorboard"
STATUSES = ("running", "completed", "diverged", "preempted", "failed")  # failed: status.json says why


def format_duration(seconds: float) -> str:
  """62.5 -> '1m02s', 3725 -> '1h02m05s'."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def json_safe(value: Any) -> Any:
  """Plain JSON values: numpy scalars -> Python numbers, NaN/inf -> the strings 'nan'/'inf'/'-inf'."""
  if isinstance(value, Mapping):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
  return value


def _atomic_write_json(path: str, obj: Any):
  paths.write_text_atomic(path, json.dumps(json_safe(obj), indent=2, sort_keys=True) + "\n")


def write_status(workdir: str, status: str, step: int, metrics: Mapping[str, Any], **extra) -> str:
  """Writes WORKDIR/status.json atomically (readers never see half a file); returns its path."""
  if status not in STATUSES:
    raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
  path = paths.join(workdir, STATUS_FILE)
  _atomic_write_json(path, dict(status=status, step=int(step), metrics=dict(metrics), **extra))
  return path


def read_status(workdir: str) -> Optional[dict]:
  """WORKDIR/status.json as a dict, or None if there is none."""
  path = paths.join(workdir, STATUS_FILE)
  if not paths.is_file(path):
    return None
  return json.loads(paths.read_text(path))


def read_metrics(workdir: str) -> list:
  """Every row of WORKDIR/metrics.jsonl (list of dicts, in file order)."""
  path = paths.join(workdir, METRICS_FILE)
  if not paths.is_file(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def _rows_text(rows) -> str:
  return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def truncate_metrics(workdir: str, last_step: int) -> int:
  """Drops rows with step > last_step (logged after the checkpoint a run resumes from, and
  logged again by the resumed run); returns how many were dropped."""
  path = paths.join(workdir, METRICS_FILE)
  if not paths.is_file(path):
    return 0
  rows = read_metrics(workdir)
  keep = [r for r in rows if int(r.get("step", 0)) <= last_step]
  if len(keep) != len(rows):
    paths.write_text_atomic(path, _rows_text(keep))
  return len(rows) - len(keep)


class RunLogger:
  """Scalars to TensorBoard and metrics.jsonl (main process only), progress to the console.

  Args:
    workdir: the run's directory.
    total_steps: the step the run ends at (for the bar and the ETA).
    start_step: the step the run starts (or resumes) from.
    is_main: whether this process writes files and prints.
    progress_bar: 'auto' (a bar if stderr is a terminal), 'on' or 'off'.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, is_main: bool = True,
               progress_bar: str = "auto"):
    self.workdir = workdir
    self.total_steps = total_steps
    self.is_main = is_main
    self._start_step = start_step
    self._start_time = time.time()
    self._tb = None
    self._jsonl = None
    self._bar = None
    self._bucket_rows = None  # bucket workdir: every row of metrics.jsonl, rewritten whole
    self._tb_local = None  # bucket workdir: local directory of the TensorBoard events
    if not is_main:
      return
    paths.makedirs(workdir)
    try:
      # tensorboardX writes TensorBoard's event files without TensorFlow (clu's writer imports it).
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError:  # a host without it: metrics.jsonl only
      tensorboardX = None
      print(f"note: tensorboardX not installed: no TensorBoard events; metrics go to "
            f"{paths.join(workdir, METRICS_FILE)}", file=sys.stderr, flush=True)
    if paths.is_url(workdir):
      self._bucket_rows = read_metrics(workdir)
      if tensorboardX is not None:
        self._tb_local = tempfile.mkdtemp(prefix="vitnorm_tensorboard_")
        self._tb = tensorboardX.SummaryWriter(self._tb_local)
    else:
      if tensorboardX is not None:
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")
    use_bar = progress_bar == "on" or (progress_bar == "auto" and sys.stderr.isatty())
    if use_bar:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

  def write(self, step: int, scalars: Mapping[str, float]):
    """One row in metrics.jsonl and TensorBoard scalars at `step`."""
    if not self.is_main or not scalars:
      return
    row = {"step": int(step), **{k: json_safe(float(v)) for k, v in scalars.items()}}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))
    if self._bucket_rows is not None:
      self._bucket_rows.append(row)
      paths.write_text_atomic(paths.join(self.workdir, METRICS_FILE), _rows_text(self._bucket_rows))
      self._upload_tensorboard()
      return
    self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
    self._jsonl.flush()

  def _upload_tensorboard(self):
    """Bucket workdir: copies each local events file to WORKDIR/tensorboard/ (whole objects)."""
    if self._tb is None:
      return
    self._tb.flush()
    for name in sorted(os.listdir(self._tb_local)):
      local = os.path.join(self._tb_local, name)
      if os.path.isfile(local):
        with open(local, "rb") as f:
          paths.as_path(paths.join(self.workdir, TENSORBOARD_DIR, name)).write_bytes(f.read())

  def write_config(self, hparams: Mapping[str, Any], config_text: str):
    """The run's main hyperparameters (TensorBoard's hparams tab) and its whole config (a text)."""
    if not self.is_main or self._tb is None:
      return
    from tensorboardX.summary import hparams as hparams_summaries  # pylint: disable=g-import-not-at-top
    # The hparams tab: one experiment / session-start / session-end triple in this run's own file
    # (SummaryWriter.add_hparams would open a second run directory).
    values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    for summary in hparams_summaries(values, {}):
      self._tb.file_writer.add_summary(summary)
    self._tb.add_text("config", "```\n" + config_text + "\n```", 0)

  def eta(self, step: int) -> float:
    done = step - self._start_step
    if done <= 0:
      return float("nan")
    return (time.time() - self._start_time) / done * (self.total_steps - step)

  def advance(self, step: int):
    """Moves the progress bar to `step` (no-op without a bar)."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def report(self, step: int, scalars: Mapping[str, float]):
    """The console view of a log step: the bar's postfix, or one plain line."""
    if not self.is_main:
      return
    loss, ips = scalars.get("train/loss"), scalars.get("train/img_per_s")
    if self._bar is not None:
      self.advance(step)
      self._bar.set_postfix_str(f"loss {loss:.4f} {ips:.0f} img/s" if loss is not None else "")
      return
    parts = [f"step {step}/{self.total_steps}"]
    for key, fmt in (("train/loss", "loss {:.4f}"), ("train/top1", "top1 {:.3f}"),
                     ("train/lr", "lr {:.2e}"), ("train/img_per_s", "{:.0f} img/s")):
      if key in scalars:
        parts.append(fmt.format(scalars[key]))
    parts.append(f"eta {format_duration(self.eta(step))}")
    self.print(" | ".join(parts))

  def print(self, message: str):
    """A line on the console that does not break the progress bar (main process only)."""
    if not self.is_main:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.flush()
      if self._tb_local is not None:
        self._upload_tensorboard()
      self._tb.close()
      self._tb = None
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
