"""`run_sweep --status`: every run's state, from the runs' own files, results.json and (for a sweep
submitted to SLURM) the scheduler's queue.

States: queued (submitted, waiting to start), running (at step s), preempted (a checkpoint was
saved; requeued, or resubmitted by --resume), completed, diverged, failed (with the reason), and
not started.
"""
import os
from typing import List, Optional

from experiments import run_files, slurm
from experiments.sweep_dir import RESULTS, runner_notes

_FAILED_SCHEDULER = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _step(workdir: str, status: Optional[dict]) -> Optional[int]:
  series = run_files.read_metrics(workdir)
  steps = [points[-1][0] for points in series.values() if points]
  if status and isinstance(status.get("step"), int):
    steps.append(status["step"])
  return max(steps) if steps else None


def run_state(workdir: str, scheduler: Optional[tuple], note: dict) -> dict:
  """{'state', 'step', 'detail'} of one run. `scheduler`: (state, reason) from squeue, or None
  when the scheduler does not know the job (or the sweep runs locally)."""
  status = run_files.read_status(workdir) or {}
  file_state = status.get("status")
  step = _step(workdir, status)
  sched_state, reason = scheduler or ("", "")
  if file_state in run_files.FINISHED:
    detail = f"reason: {status['reason']}" if status.get("reason") else ""
    return dict(state=file_state, step=status.get("step"), detail=detail)
  if sched_state in slurm.RUNNING:
    return dict(state="running", step=step, detail="resuming" if file_state == "preempted" else "")
  if sched_state and sched_state not in slurm.ENDED:  # PENDING, REQUEUED, REQUEUE_HOLD, SUSPENDED, ...
    if file_state == "preempted":
      return dict(state="preempted", step=step, detail=f"checkpoint saved; requeued ({sched_state.lower()})")
    return dict(state="queued", step=step, detail=f"{sched_state.lower()}: {reason}" if reason not in ("", "None") else "")
  error = note.get("error") or (status.get("reason") if file_state == "failed" else None)
  if file_state == "failed" or error:
    return dict(state="failed", step=step, detail=error or "")
  if file_state == "preempted":
    return dict(state="preempted", step=step, detail="checkpoint saved; not queued: --resume continues it")
  if sched_state in _FAILED_SCHEDULER:
    return dict(state="failed", step=step, detail=f"the job ended {sched_state} without a final status")
  if file_state == "running":
    return dict(state="running", step=step, detail="" if scheduler is None else "no job: stopped?")
  if step is not None or file_state is not None:
    return dict(state="incomplete", step=step, detail="stopped without a status; --resume continues it")
  return dict(state="not started", step=None, detail="")


def sweep_states(sweep, sweep_dir: str) -> List[dict]:
  """One dict per run: name, state, step, detail, job_id, scheduler state."""
  jobs = slurm.latest_jobs(sweep_dir)
  states = slurm.scheduler_states(list(jobs.values())) or {}
  notes = runner_notes(run_files.read_json(os.path.join(sweep_dir, RESULTS)))
  rows = []
  for run in sweep.runs:
    job_id = jobs.get(run.name)
    scheduler = states.get(job_id)
    row = run_state(os.path.join(sweep_dir, run.name), scheduler, notes.get(run.name, {}))
    row.update(name=run.name, job_id=job_id, scheduler=scheduler[0] if scheduler else None)
    rows.append(row)
  return rows


def format_states(sweep, sweep_dir: str, rows: List[dict]) -> str:
  record = slurm.read_record(sweep_dir).get("submissions") or []
  where = (f"SLURM job array(s) {', '.join(s['array_job_id'] for s in record)}; logs in "
           f"{os.path.join(sweep_dir, slurm.LOG_FOLDER)}") if record else "run locally"
  lines = [f"sweep {sweep.name} in {sweep_dir} ({len(rows)} runs; {where})"]
  width = max(len(r["name"]) for r in rows) if rows else 0
  for r in rows:
    state = r["state"] + (f" at step {r['step']}" if r["step"] is not None and r["state"] != "not started" else "")
    job = f"job {r['job_id']} ({(r['scheduler'] or 'not in the queue').lower()})" if r["job_id"] else ""
    lines.append(f"  {r['name']:<{width}}  {state:<28} {job}" + (f"  {r['detail']}" if r["detail"] else ""))
  counts = {}
  for r in rows:
    counts[r["state"]] = counts.get(r["state"], 0) + 1
  lines.append("  " + ", ".join(f"{n} {s}" for s, n in counts.items()))
  return "\n".join(line.rstrip() for line in lines) + "\n"
