"""A sweep's folder ROOT/<sweep>/: its manifest (the settings it was started with), the --resume
rules, and results.json (what is known about every run, rewritten as runs finish).

Used by experiments.run_sweep (both launchers), the SLURM tasks (experiments.slurm_task) and
experiments.report.
"""
import contextlib
import datetime
import fcntl
import os
import tempfile
from typing import List, Optional, Sequence

from experiments import run_files
from vitnorm.errors import UserError

MANIFEST = "sweep.json"
RESULTS = "results.json"
# What the runner knows about a run beyond the run's own files; kept in results.json across resumes.
RUNNER_NOTES = ("error", "wall_s", "eval_error", "source", "cores", "machine_cores")
_LOCK = ".results.lock"  # serializes results.json updates of tasks running at the same time


def _check_writable(root: str) -> None:
  if os.path.exists(root) and not os.path.isdir(root):
    raise UserError(f"--root: {root} is a file, not a directory; choose a directory for the sweep outputs")
  try:
    os.makedirs(root, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, prefix=".write_test"):
      pass
  except OSError as e:
    raise UserError(f"--root: cannot write to {root} ({e.strerror or e}); choose a writable directory") from None


def _has_results(sweep, sweep_dir: str) -> bool:
  """Whether any run of the sweep has trained (a status, metrics or checkpoints)."""
  return any(os.path.exists(os.path.join(sweep_dir, r.name, name)) for r in sweep.runs
             for name in ("status.json", "metrics.jsonl", "checkpoints"))


def prepare_sweep_dir(sweep, root: str, *, num_steps: Optional[int], resume: bool,
                      overrides: Sequence[str] = (), seeds: Sequence[int] = ()) -> str:
  """Checks the root and the --resume rules; creates ROOT/<sweep> and its manifest."""
  _check_writable(root)
  sweep_dir = os.path.join(os.path.abspath(root), sweep.name)
  manifest_path = os.path.join(sweep_dir, MANIFEST)
  manifest = run_files.read_json(manifest_path)
  started = manifest is not None or (os.path.isdir(sweep_dir) and any(
      os.path.isdir(os.path.join(sweep_dir, r.name)) for r in sweep.runs))
  if started and not resume:
    raise UserError(
        f"--root: {sweep_dir} already holds this sweep from an earlier invocation; pass --resume "
        "to continue it (finished runs are skipped, interrupted ones resume from their checkpoints)"
        " or choose another --root")
  if manifest is not None and not _has_results(sweep, sweep_dir) and (
      manifest.get("num_steps") != num_steps or list(manifest.get("overrides") or []) != list(overrides)
      or list(manifest.get("seeds") or []) != list(seeds)):
    manifest = None  # nothing trained with the old settings (every run failed at once): start over
  if manifest is not None and manifest.get("num_steps") != num_steps:
    raise UserError(
        f"--num_steps: {sweep_dir} was started with --num_steps {manifest.get('num_steps')}, not "
        f"{num_steps}; resume with the same value (results of different lengths must not mix) or "
        "choose another --root")
  if manifest is not None and list(manifest.get("overrides") or []) != list(overrides):
    raise UserError(
        f"--set: {sweep_dir} was started with --set {' '.join(manifest.get('overrides') or []) or '(none)'}"
        f", not {' '.join(overrides) or '(none)'}; resume with the same overrides or choose another --root")
  if manifest is not None and list(manifest.get("seeds") or []) != list(seeds):
    raise UserError(
        f"--seeds: {sweep_dir} was started with seeds {','.join(map(str, manifest.get('seeds') or [])) or '(none)'}"
        f", not {','.join(map(str, seeds)) or '(none)'}; resume with the same seeds or choose another --root")
  os.makedirs(sweep_dir, exist_ok=True)
  if manifest is None:
    run_files.write_json(manifest_path, {
        "sweep": sweep.name, "num_steps": num_steps, "overrides": list(overrides), "seeds": list(seeds),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
  return sweep_dir


def results_doc(sweep, num_steps, summaries, benchmark=None):
  doc = {
      "sweep": sweep.name, "scale": sweep.scale, "question": sweep.question,
      "num_steps": num_steps,
      "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "runs": summaries,
  }
  if benchmark is not None:
    doc["benchmark"] = benchmark
  return doc


def collect(sweep, sweep_dir: str, extra: Optional[dict] = None) -> List[dict]:
  """Summaries of every run of the sweep, as found on disk (+ runner notes from `extra`)."""
  summaries = []
  for run in sweep.runs:
    summary = run_files.summarize_run(run, os.path.join(sweep_dir, run.name))
    summary["workdir"] = run.name  # relative to the sweep directory
    summary.update((extra or {}).get(run.name, {}))
    if summary.get("error") and summary["status"] not in run_files.FINISHED:
      summary["status"] = "failed"  # the trainer stopped with an error and wrote no status
    summaries.append(summary)
  return summaries


def runner_notes(doc: Optional[dict]) -> dict:
  """{run name: its RUNNER_NOTES} from a results document."""
  return {r["name"]: {k: r[k] for k in RUNNER_NOTES if k in r}
          for r in (doc or {}).get("runs", []) if isinstance(r, dict) and "name" in r}


@contextlib.contextmanager
def _locked(sweep_dir: str):
  with open(os.path.join(sweep_dir, _LOCK), "a", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def update_results(sweep, sweep_dir: str, num_steps: Optional[int], run_name: str, note: dict) -> dict:
  """Merges one run's runner notes into results.json and rewrites it from the runs' files.

  Tasks of a cluster sweep finish at the same time: the lock makes each rewrite see the files
  of every run that finished before it (the last one to finish writes the complete document).
  """
  path = os.path.join(sweep_dir, RESULTS)
  with _locked(sweep_dir):
    extra = runner_notes(run_files.read_json(path))
    extra.setdefault(run_name, {}).update(note)
    extra[run_name] = {k: v for k, v in extra[run_name].items() if v is not None}
    doc = results_doc(sweep, num_steps, collect(sweep, sweep_dir, extra))
    run_files.write_json(path, doc)
  return doc
