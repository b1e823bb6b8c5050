"""The commands a sweep runs, and what they are made with.

`train_command` / `evaluate_command` / `benchmark_command` build the exact `python -m vitnorm.*`
command lines of a sweep's runs; `parse_overrides` / `validate_overrides` check `run_sweep --set`
values against each run's real config before anything starts; `source_fingerprint` /
`source_drift` record which configs and code a run was trained with and flag runs of one sweep
that differ. Used by experiments.run_sweep (which runs them) and experiments.report.
"""
import glob
import hashlib
import os
import re
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from experiments import sweeps as sweeps_lib
from vitnorm.errors import UserError

# Commands run from the project root, where the config paths (configs/...) are.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_overrides(items: Sequence[str]) -> List[Tuple[str, str]]:
  """['data.data_dir=/x', ...] (the --set values) -> [('data.data_dir', '/x'), ...]."""
  out = []
  for item in items or ():
    field, sep, value = item.partition("=")
    if not sep or not field.strip() or " " in field.strip() or field.startswith("-"):
      raise UserError(f"--set: expected FIELD=VALUE (a config field, e.g. data.data_dir=/data/tfds), got {item!r}")
    out.append((field.strip(), value))
  return out


def train_command(run: sweeps_lib.Run, workdir: str, *, num_steps: Optional[int] = None,
                  scale: Optional[str] = None, overrides: Sequence[str] = (),
                  python: str = sys.executable, train_module: str = "vitnorm.train") -> List[str]:
  """python -m vitnorm.train --config=C --workdir=D [--config.num_steps=N] [logging] [run's
  overrides] [--set overrides, which apply to every run and come last]."""
  cmd = [python, "-m", train_module, f"--config={run.config}", f"--workdir={workdir}"]
  if num_steps is not None:
    cmd.append(f"--config.num_steps={num_steps}")
  own = {field for field, _ in run.overrides}  # a run's own logging intervals win
  cmd += [f"--config.{field}={value}" for field, value in sweeps_lib.logging_overrides(scale, num_steps)
          if field not in own]
  cmd += run.override_flags()
  return cmd + [f"--config.{field}={value}" for field, value in parse_overrides(overrides)]


def validate_overrides(sweep, overrides: Sequence[str], num_steps: Optional[int] = None) -> None:
  """Loads each run's config with its overrides and the --set ones, as the trainer would; a bad
  field or value is a UserError '--set: ...' (one line) before anything is created."""
  if not overrides or sweep.is_benchmark:
    return
  from vitnorm import train  # pylint: disable=import-outside-toplevel  (loads configs: imports JAX)
  seen = set()
  for run in sweep.runs:
    cmd = train_command(run, os.devnull, num_steps=num_steps, scale=sweep.scale, overrides=overrides)
    argv = [cmd[2]] + [f"--config={os.path.join(PROJECT_ROOT, run.config)}"] + cmd[4:]
    if tuple(argv[1:]) in seen:
      continue
    seen.add(tuple(argv[1:]))
    try:
      train.parse(argv)
    except UserError as e:
      message = str(e)
      if not any(message.startswith(f"config.{f}") for f, _ in parse_overrides(overrides)):
        message = f"{message} (run {run.name})"
      raise UserError("--set: " + re.sub(r"\bconfig\.", "", message)) from None


def evaluate_command(sweep: sweeps_lib.Sweep, workdir: str, *, python: str = sys.executable,
                     evaluate_module: str = "vitnorm.evaluate") -> List[str]:
  return [python, "-m", evaluate_module, f"--workdir={workdir}", *sweep.evaluate_args]


def benchmark_command(sweep: sweeps_lib.Sweep, sweep_dir: str, *, python: str = sys.executable,
                      benchmark_module: str = "vitnorm.benchmark") -> List[str]:
  return [python, "-m", benchmark_module, *sweep.benchmark_args,
          f"--output={os.path.join(sweep_dir, 'benchmark.json')}"]


def source_fingerprint(root: str = PROJECT_ROOT) -> dict:
  """What a run is made with: hashes of the config files (configs/**.py) and of the vitnorm code
  (vitnorm/**.py) as they are on disk now, and the git commit when there is one.

  Runs of one sweep are comparable only if they were trained with the same configs and code; the
  runner warns when they were not, and the report says so under the table.
  """
  def digest(folder):
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, folder, "**", "*.py"), recursive=True)):
      h.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:12]

  out = {"configs": digest("configs"), "code": digest("vitnorm"), "git": None}
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, timeout=10)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "configs", "vitnorm"],
                           capture_output=True, text=True, timeout=10)
    if commit.returncode == 0:
      out["git"] = commit.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    pass
  return out


def source_drift(summaries: List[dict]) -> List[str]:
  """One line per kind of source (configs, code) that differs between the runs that recorded it."""
  lines = []
  for kind, what in (("configs", "config files (configs/)"), ("code", "vitnorm code")):
    groups = {}
    for r in summaries:
      if (r.get("source") or {}).get(kind):
        groups.setdefault(r["source"][kind], []).append(r["name"])
    if len(groups) > 1:
      lines.append(f"runs were trained with different {what}: " + "; ".join(
          f"{', '.join(names)} ({kind} {digest})" for digest, names in groups.items()))
  return lines
