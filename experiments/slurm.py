"""`run_sweep --launcher slurm`: a sweep submitted to SLURM through submitit, as one job array.

Every run (and seed) that has not finished becomes one array task (experiments.slurm_task.TrainTask:
the same `python -m vitnorm.train` command the local launcher runs, in the same workdir). A run over
several processes (`--slurm.nodes N --slurm.tasks_per_node k`) is started by srun as N x k tasks,
and the trainer's `jax.distributed.initialize()` finds its coordinator in SLURM's environment.
What was submitted where (job ids, submitit's log folder, the options) is appended to
ROOT/<sweep>/slurm.json; `run_sweep --status` reads it back together with the runs' own files.
"""
import argparse
import dataclasses
import datetime
import getpass
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

from experiments import run_files
from experiments.commands import evaluate_command, train_command
from experiments.slurm_task import TrainTask
from vitnorm.errors import UserError

RECORD = "slurm.json"  # in the sweep folder: every submission (job ids per run, log folder, options)
LOG_FOLDER = "slurm"  # submitit's pickles and logs: ROOT/<sweep>/slurm/<job id>/
# Scheduler states after which a job does nothing more (anything else is queued or running).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "SPECIAL_EXIT", "PREEMPTED")
RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT")


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
  """The --slurm.* flags: what each array task asks the scheduler for."""

  partition: Optional[str] = None  # sbatch --partition (None: the cluster's default partition).
  time_min: int = 24 * 60  # time limit of one attempt, minutes; a requeued task starts a new attempt.
  array_parallelism: Optional[int] = None  # tasks of the array running at once (None: all).
  nodes: int = 1  # nodes per run.
  tasks_per_node: int = 1  # processes per node per run (one per GPU on GPU nodes).
  gpus_per_task: Optional[int] = None  # sbatch --gpus-per-task (None: no GPUs requested).
  cpus_per_task: Optional[int] = None  # sbatch --cpus-per-task (None: the cluster's default).
  additional_parameters: Tuple[Tuple[str, str], ...] = ()  # any other sbatch option, e.g. account.
  setup: Tuple[str, ...] = ()  # shell lines run before srun in the job script (module load ...).
  signal_delay_s: int = 120  # the warning signal (SIGUSR2) comes this long before the time limit.

  @property
  def processes(self) -> int:
    return self.nodes * self.tasks_per_node


def time_minutes(text: str) -> int:
  """SLURM's time formats MINUTES, HH:MM:SS, D-HH[:MM[:SS]] -> whole minutes (at least 1)."""
  m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
  if not m:
    raise argparse.ArgumentTypeError(f"expected MINUTES, HH:MM:SS or D-HH:MM:SS, got {text!r}")
  days, a, b, c = (int(g) if g else None for g in m.groups())
  if days is None and b is None:
    seconds = a * 60  # a bare number is minutes
  elif days is None and c is None:
    seconds = a * 60 + b  # MM:SS
  else:
    seconds = (days or 0) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
  if seconds <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive time, got {text!r}")
  return max(1, -(-seconds // 60))


def _key_values(text: str) -> Tuple[Tuple[str, str], ...]:
  pairs = []
  for part in text.split(","):
    key, sep, value = part.partition("=")
    if not sep or not key.strip():
      raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE] (sbatch options without --, e.g. "
                                       f"account=myproject,qos=high), got {text!r}")
    pairs.append((key.strip().lstrip("-").replace("-", "_"), value))
  return tuple(pairs)


def add_flags(parser: argparse.ArgumentParser, positive_int) -> None:
  group = parser.add_argument_group("--launcher slurm", "what each array task asks the scheduler for")
  add = group.add_argument
  add("--slurm.partition", dest="slurm_partition", default=None, help="partition (default: the cluster's)")
  add("--slurm.time", dest="slurm_time", type=time_minutes, default=SlurmOptions.time_min,
      metavar="D-HH:MM:SS", help="time limit of one attempt (default 24:00:00; requeues start anew)")
  add("--slurm.array_parallelism", dest="slurm_array_parallelism", type=positive_int, default=None,
      help="array tasks running at once (default: all)")
  add("--slurm.nodes", dest="slurm_nodes", type=positive_int, default=1, help="nodes per run (default 1)")
  add("--slurm.tasks_per_node", dest="slurm_tasks_per_node", type=positive_int, default=1,
      help="processes per node per run, one per GPU on GPU nodes (default 1)")
  add("--slurm.gpus_per_task", dest="slurm_gpus_per_task", type=positive_int, default=None,
      help="GPUs per process (default: none requested)")
  add("--slurm.cpus_per_task", dest="slurm_cpus_per_task", type=positive_int, default=None,
      help="CPUs per process (default: the cluster's)")
  add("--slurm.additional_parameters", dest="slurm_additional_parameters", type=_key_values,
      action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
      help="other sbatch options, e.g. account=proj,qos=high,constraint=a100 (repeatable)")
  add("--slurm.setup", dest="slurm_setup", action="append", default=[], metavar="SHELL_LINE",
      help="a line the job script runs before the training, e.g. 'module load cuda' (repeatable)")
  add("--slurm.signal_delay_s", dest="slurm_signal_delay_s", type=positive_int,
      default=SlurmOptions.signal_delay_s, help="SIGUSR2 this long before the time limit (default 120 s)")


def options_from_args(args) -> SlurmOptions:
  return SlurmOptions(
      partition=args.slurm_partition, time_min=args.slurm_time, array_parallelism=args.slurm_array_parallelism,
      nodes=args.slurm_nodes, tasks_per_node=args.slurm_tasks_per_node, gpus_per_task=args.slurm_gpus_per_task,
      cpus_per_task=args.slurm_cpus_per_task,
      additional_parameters=tuple(p for group in args.slurm_additional_parameters for p in group),
      setup=tuple(args.slurm_setup), signal_delay_s=args.slurm_signal_delay_s)


def slurm_flags_given(args) -> List[str]:
  """The --slurm.* flags given a value other than their default (refused with --launcher local)."""
  given, default = options_from_args(args), SlurmOptions()
  return [f"--slurm.{f.name}" for f in dataclasses.fields(SlurmOptions)
          if getattr(given, f.name) != getattr(default, f.name)]


def import_submitit():
  """submitit, imported without its logging set-up: `import submitit` calls logging.config.dictConfig,
  which closes every logging handler that exists (absl's closes the stream it was created with,
  e.g. a test's captured stderr). Its warnings then reach stderr through logging's defaults. (In
  the job, submitit's own start-up configures its logging as usual.)"""
  if "submitit" not in sys.modules:
    previous = os.environ.get("SUBMITIT_LOG_LEVEL")
    os.environ["SUBMITIT_LOG_LEVEL"] = "NOCONFIG"
    try:
      import submitit  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    finally:
      if previous is None:
        os.environ.pop("SUBMITIT_LOG_LEVEL")
      else:
        os.environ["SUBMITIT_LOG_LEVEL"] = previous
  return sys.modules["submitit"]


def make_executor(sweep_dir: str, options: SlurmOptions, num_tasks: int, cluster: Optional[str] = None):
  """submitit's executor for the sweep: SLURM (`cluster='local'`: submitit's local processes)."""
  submitit = import_submitit()
  if cluster in (None, "slurm") and shutil.which("sbatch") is None:
    raise UserError("--launcher slurm: sbatch is not on PATH; run this on a SLURM login node "
                    "(or use --launcher local)")
  executor = submitit.AutoExecutor(folder=os.path.join(sweep_dir, LOG_FOLDER, "%j"),
                                   cluster=cluster or "slurm")
  parameters = dict(
      name=os.path.basename(sweep_dir), timeout_min=options.time_min, nodes=options.nodes,
      tasks_per_node=options.tasks_per_node, cpus_per_task=options.cpus_per_task,
      slurm_partition=options.partition, slurm_gpus_per_task=options.gpus_per_task,
      slurm_array_parallelism=options.array_parallelism or max(1, num_tasks),
      slurm_signal_delay_s=options.signal_delay_s, slurm_setup=list(options.setup) or None,
      slurm_additional_parameters=dict(options.additional_parameters) or None)
  executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None})
  return executor


def read_record(sweep_dir: str) -> dict:
  return run_files.read_json(os.path.join(sweep_dir, RECORD)) or {"submissions": []}


def latest_jobs(sweep_dir: str) -> Dict[str, str]:
  """{run name: the job id it was last submitted as}."""
  jobs = {}
  for submission in read_record(sweep_dir).get("submissions", []):
    jobs.update(submission.get("runs") or {})
  return jobs


def scheduler_states(job_ids) -> Optional[Dict[str, Tuple[str, str]]]:
  """{job id: (state, reason)} for the jobs squeue still knows; None where squeue cannot be run
  (not a SLURM host). Array tasks are listed one by one ('123_4')."""
  if not job_ids or shutil.which("squeue") is None:
    return None
  try:
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%r"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  wanted, states = set(job_ids), {}
  for line in out.splitlines():
    job_id, _, rest = line.strip().partition("|")
    state, _, reason = rest.partition("|")
    if job_id in wanted:
      states[job_id] = (state, reason)
  return states


def submit_sweep(sweep, sweep_dir: str, *, num_steps: Optional[int], overrides=(), evaluate: bool = False,
                 options: SlurmOptions = SlurmOptions(), out=None, cluster: Optional[str] = None,
                 **modules) -> dict:
  """Submits every run that has not finished and is not queued or running; returns the submission
  (also appended to ROOT/<sweep>/slurm.json). Does not wait for the jobs."""
  out = out or sys.stdout
  todo, skipped = [], []
  jobs = latest_jobs(sweep_dir)
  states = scheduler_states(list(jobs.values())) or {}
  for run in sweep.runs:
    status = run_files.read_status(os.path.join(sweep_dir, run.name)) or {}
    state = states.get(jobs.get(run.name), ("", ""))[0]
    if status.get("status") in run_files.FINISHED:
      skipped.append(f"{run.name}: already {status['status']}")
    elif state and state not in ENDED:
      skipped.append(f"{run.name}: job {jobs[run.name]} is {state.lower()}")
    else:
      todo.append(run)
  for line in skipped:
    out.write(f"{line} (not submitted)\n")
  if not todo:
    out.write(f"{sweep.name}: nothing to submit\n")
    return {}
  pick = lambda *keys: {k: modules[k] for k in keys if k in modules}  # noqa: E731
  tasks = []
  for run in todo:
    workdir = os.path.join(sweep_dir, run.name)
    command = train_command(run, workdir, num_steps=num_steps, scale=sweep.scale, overrides=overrides,
                            **pick("python", "train_module"))
    if options.processes > 1:  # one JAX process per task; the coordinator comes from SLURM's variables
      command.append("--config.distributed.auto=True")
    tasks.append(TrainTask(sweep, sweep_dir, num_steps, run.name, command,
                           evaluate_command(sweep, workdir, **pick("python", "evaluate_module"))
                           if evaluate else None))
  executor = make_executor(sweep_dir, options, len(tasks), cluster)
  submitit = import_submitit()
  try:
    with executor.batch():
      submitted = [executor.submit(task) for task in tasks]
  except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedSubmissionError, OSError) as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise UserError(f"--launcher slurm: the job array was not submitted: {lines[-1] if lines else e!r} "
                    "(check the --slurm.* options)") from None
  submission = {
      "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "cluster": cluster or "slurm",
      "array_job_id": str(submitted[0].job_id).split("_")[0],
      "log_folder": os.path.join(sweep_dir, LOG_FOLDER),
      "options": dataclasses.asdict(options),
      "runs": {task.run_name: str(job.job_id) for task, job in zip(tasks, submitted)},
  }
  record = read_record(sweep_dir)
  record.setdefault("submissions", []).append(submission)
  run_files.write_json(os.path.join(sweep_dir, RECORD), record)
  out.write(f"{sweep.name}: submitted {len(tasks)} run(s) as job array {submission['array_job_id']} "
            f"({options.processes} process(es) per run); job ids in {os.path.join(sweep_dir, RECORD)}\n")
  for name, job_id in submission["runs"].items():
    out.write(f"  {name}: job {job_id}\n")
  return submission
