"""One run of a sweep as a SLURM task (submitted by experiments.slurm through submitit).

`TrainTask(...)()` runs `python -m vitnorm.train` for the run's workdir as a child process (one
per SLURM task; a run over several tasks is one multi-process JAX job that finds its coordinator
in SLURM's environment) and turns its exit code into what the scheduler should do:

- completed (0) or diverged (3, a result): done; results.json is rewritten.
- preempted (75, checkpoint saved): the task asks submitit to requeue the job; the requeued task
  runs the same command, and the trainer resumes from its checkpoint.
- anything else: the task raises, the job ends FAILED, and nothing retries it (the error is in
  results.json and `run_sweep --status`).

Signals: the scheduler's warning signal (submitit's SIGUSR2, sent `--signal=USR2@delay` before the
time limit, or at preemption) reaches every process of the job step. The trainer ignores it; the
task passes it on as SIGTERM (the trainer saves a checkpoint and exits 75), waits for the save,
then lets submitit requeue the job (`checkpoint` below). A SIGTERM sent straight to the step
(`scancel --signal=TERM`, `scontrol requeue`, preemption without a user signal) reaches the trainer
itself (submitit's own process ignores it); the trainer exits 75 and the task requeues the job,
unless the scheduler is requeueing it already.
"""
import os
import signal
import subprocess
import threading
import time
from typing import List, Optional

from experiments import run_files
from experiments.commands import PROJECT_ROOT, source_fingerprint
from experiments.sweep_dir import RESULTS, update_results
from vitnorm import cli

SAVE_TIMEOUT_S = 600  # how long a signalled trainer may take to save its checkpoint


class RunFailed(Exception):
  """The trainer failed (not preempted, not diverged); the job ends FAILED and is not retried."""


def _last_error(log_path: str) -> str:
  """The trainer's last 'error: ...' line in its log, else its last line."""
  try:
    with open(log_path, encoding="utf-8", errors="replace") as f:
      lines = [line.strip() for line in f.readlines()[-200:] if line.strip()]
  except OSError:
    return ""
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or [""])[-1]


def _ignore_warning_signal():
  """In the trainer (between fork and exec): the scheduler's SIGUSR2 would kill it; the task turns
  it into a SIGTERM instead."""
  signal.signal(_warning_signal(), signal.SIG_IGN)


def _warning_signal() -> signal.Signals:
  import submitit  # pylint: disable=import-outside-toplevel
  return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


class TrainTask:
  """One run (one seed) of a sweep: picklable; submitit calls it in every task of the job."""

  def __init__(self, sweep, sweep_dir: str, num_steps: Optional[int], run_name: str,
               command: List[str], evaluate_command: Optional[List[str]] = None):
    self.sweep = sweep
    self.sweep_dir = sweep_dir
    self.num_steps = num_steps
    self.run_name = run_name
    self.workdir = os.path.join(sweep_dir, run_name)
    self.command = list(command)
    self.evaluate_command = list(evaluate_command) if evaluate_command else None
    self._child = None
    self._exited = None
    self._started = None

  def __getstate__(self):  # the running trainer stays out of the pickle submitit requeues
    return {k: v for k, v in self.__dict__.items() if k not in ("_child", "_exited", "_started")}

  def __setstate__(self, state):
    self.__dict__.update(state, _child=None, _exited=None, _started=None)

  def _record(self, **note) -> None:
    """Rank 0: this attempt's wall time (added to earlier attempts') and `note` into results.json;
    once per attempt."""
    if self._started is None:
      return
    wall_s, self._started = time.time() - self._started, None
    for r in (run_files.read_json(os.path.join(self.sweep_dir, RESULTS)) or {}).get("runs", []):
      if isinstance(r, dict) and r.get("name") == self.run_name and r.get("wall_s"):
        wall_s += r["wall_s"]  # earlier attempts of this run (before a requeue)
    update_results(self.sweep, self.sweep_dir, self.num_steps, self.run_name,
                   dict(note, wall_s=round(wall_s, 1), source=source_fingerprint()))

  def _start(self, rank: int, job_id: str) -> str:
    os.makedirs(self.workdir, exist_ok=True)
    log_path = os.path.join(self.workdir, "train.log" if rank == 0 else f"train.rank{rank}.log")
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n# SLURM job {job_id}, task {rank}\n$ {' '.join(self.command)}\n")
      log.flush()
      self._child = subprocess.Popen(self.command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                     preexec_fn=_ignore_warning_signal)
    self._exited = threading.Event()
    child, exited = self._child, self._exited
    threading.Thread(target=lambda: (child.wait(), exited.set()), daemon=True).start()
    return log_path

  def _wait(self) -> int:
    while not self._exited.wait(timeout=1.0):  # returns to Python often: signal handlers run
      pass
    return self._child.returncode

  def _stop_trainer(self) -> None:
    """SIGTERM to the trainer, then wait until it has saved its checkpoint and exited."""
    if self._child is not None and not self._exited.is_set():
      self._child.send_signal(signal.SIGTERM)
      if not self._exited.wait(timeout=SAVE_TIMEOUT_S):
        self._child.kill()
        self._exited.wait(timeout=60)

  def checkpoint(self, *args, **kwargs):
    """submitit's requeue hook (rank 0, on the warning signal): the trainer saves and stops; the
    requeued job runs this same task again, and the trainer resumes from its checkpoint."""
    import submitit  # pylint: disable=import-outside-toplevel
    self._stop_trainer()
    self._record(error=None)
    return submitit.helpers.DelayedSubmission(TrainTask(self.sweep, self.sweep_dir, self.num_steps,
                                                        self.run_name, self.command, self.evaluate_command),
                                              *args, **kwargs)

  def _install_signal_forwarding(self) -> None:
    """On every rank, the warning signal first stops this task's trainer, then goes on to
    submitit's handler (which requeues from rank 0)."""
    sig = _warning_signal()
    submitit_handler = signal.getsignal(sig)

    def handler(signum, frame):
      self._stop_trainer()
      if callable(submitit_handler):
        submitit_handler(signum, frame)

    signal.signal(sig, handler)

  def _requeue(self, rank: int) -> None:
    """The trainer was preempted by a signal the task did not see: requeue through submitit
    (its handler checkpoints, calls `scontrol requeue` and exits), from rank 0 only."""
    if rank != 0:
      return
    try:
      os.kill(os.getpid(), _warning_signal())  # the handler runs here, in this thread
      time.sleep(5)
    except subprocess.CalledProcessError as e:  # scontrol requeue refused: already being requeued
      print(f"not requeued by this task ({e}); the scheduler requeues the job itself", flush=True)

  def __call__(self) -> dict:
    import submitit  # pylint: disable=import-outside-toplevel
    env = submitit.JobEnvironment()
    rank, job_id = env.global_rank, env.job_id
    self._started = time.time()
    log_path = self._start(rank, job_id)
    self._install_signal_forwarding()
    rc = self._wait()
    run = next(r for r in self.sweep.runs if r.name == self.run_name)
    summary = run_files.summarize_run(run, self.workdir)
    # 75: saved and stopped; killed by SIGTERM: stopped while starting, before there was anything to save.
    if rc in (cli.EXIT_PREEMPTED, -signal.SIGTERM):
      if rank == 0:
        self._record(error=None)
      self._requeue(rank)
      return {"run": self.run_name, "status": "preempted", "step": summary["step"], "job_id": job_id}
    if rank != 0:
      if rc not in (cli.EXIT_COMPLETED, cli.EXIT_DIVERGED):
        raise RunFailed(f"{self.run_name}: the trainer of task {rank} exited {rc}: {_last_error(log_path)}")
      return {"run": self.run_name, "status": summary["status"], "task": rank}
    note = {}
    ok = rc in (cli.EXIT_COMPLETED, cli.EXIT_DIVERGED) and summary["status"] in run_files.FINISHED
    note["error"] = None if ok else (_last_error(log_path) or f"exit code {rc}")
    if ok and self.evaluate_command and summary["status"] == "completed":
      with open(os.path.join(self.workdir, "evaluate.log"), "a", encoding="utf-8") as log:
        erc = subprocess.run(self.evaluate_command, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                             check=False).returncode
      note["eval_error"] = None if erc == 0 else (_last_error(os.path.join(self.workdir, "evaluate.log"))
                                                  or f"exit code {erc}")
    self._record(**note)
    if not ok:
      raise RunFailed(f"{self.run_name}: {note['error']} (log: {log_path})")
    return {"run": self.run_name, "status": summary["status"], "step": summary["step"], "job_id": job_id}

