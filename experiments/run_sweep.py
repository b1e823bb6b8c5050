"""Runs a named sweep: one `python -m vitnorm.train` process per run, results in ROOT/<sweep>/.

    python -m experiments.run_sweep --sweep norm_variants_cpu --root runs/ [--num_steps 300]
    python -m experiments.run_sweep --sweep norm_variants_cpu --root runs/ --dry_run   # commands only
    python -m experiments.run_sweep --sweep norm_variants_cpu --root runs/ --resume    # continue it
    python -m experiments.run_sweep --sweep norm_variants_cpu --root runs/ --seeds 0,1,2,3  # other seeds
    python -m experiments.run_sweep --sweep norm_variants_imagenet --root runs/ \
        --set data.data_dir=/data/tfds --set batch_size=512     # extra overrides for every run
    python -m experiments.run_sweep --sweep norm_variants_imagenet --root /shared/runs --launcher slurm \
        --slurm.partition gpu --slurm.gpus_per_task 1 --slurm.tasks_per_node 8   # one job array
    python -m experiments.run_sweep --sweep norm_variants_imagenet --root /shared/runs --status

Each run trains in its own workdir ROOT/<sweep>/<run> (its output goes to <run>/train.log).
- A diverged run (the paper's "crash") is a result, not an error: it is recorded and the sweep goes on.
- Finished runs (status.json: completed or diverged) are never run again. An interrupted run is
  run again with the same command and the trainer resumes it from its latest checkpoint.
- A sweep directory that already exists is only continued with --resume (with the --num_steps,
  --seeds and --set overrides it was started with), so results of different settings never mix and
  nothing is overwritten.
- Seeds: each run is repeated per seed (`<run>_seed<k>`, trained with --config.seed=k): the sweep's
  declared seeds, or --seeds. --num_steps defaults to the sweep's own length, else each config's.
- With --evaluate, `python -m vitnorm.evaluate --workdir <run>` runs after each completed training.
- After every run, ROOT/<sweep>/results.json is rewritten with what is known so far.
- Ctrl-C or SIGTERM: the training in progress saves a checkpoint and stops (the trainer does
  that), results.json is written, and the same command with --resume continues later.
- Every --set override is checked against each run's config before anything starts: a typo
  (`--set model.nrom=ln`) is one 'error: --set: ...' line, exit 2, and nothing is created.
- A trainer that exits 75 (vitnorm.cli.EXIT_PREEMPTED: SIGTERM / Ctrl-C, checkpoint saved) left a
  preempted run: it is recorded as such (not as a failure) and --resume continues it.
- On a terminal, the run in progress shows its step, loss and ETA on one updating line.
- --jobs N (local): N runs at once, each pinned to its share of this process's CPU cores (for small
  runs on one CPU device each, e.g. the crash study: --jobs 2 on 2 cores); each run's `cores` and
  `machine_cores` go to results.json, and SIGTERM / Ctrl-C stop every run in progress.
- --launcher slurm submits the runs that are not finished as one SLURM job array (experiments/slurm.py:
  one task per run and seed, requeued on preemption) and returns; --status shows every run's state.
Exit status: 0 when every run finished (completed or diverged), 1 if a run failed (an error in
the trainer, e.g. a bad override), 2 for bad arguments, 75 when a run was preempted (run again
with --resume), 130/143 when the runner itself was interrupted.
"""
import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from experiments import run_files
from experiments.commands import (PROJECT_ROOT, benchmark_command, evaluate_command,  # noqa: F401
                                  parse_overrides, source_drift, source_fingerprint, train_command,
                                  validate_overrides)
from experiments import slurm, sweep_status
from experiments import sweeps as sweeps_lib
from experiments.execute import Interrupted, elapsed as _elapsed, execute, on_sigterm
from experiments.sweep_dir import (MANIFEST, RESULTS, RUNNER_NOTES, collect,  # noqa: F401 (report)
                                   prepare_sweep_dir, results_doc, runner_notes)
from vitnorm import cli
from vitnorm.errors import UserError, exit_on_user_error


def _describe(summary: dict) -> str:
  state = summary["status"]
  if state == "diverged":
    return f"diverged at step {summary['step']}"
  if state == "completed":
    top1 = summary["final"].get("eval/top1")
    return f"completed at step {summary['step']}" + (f", eval top-1 {top1:.4g}" if top1 is not None else "")
  if state == "failed":
    return f"failed: {summary.get('error')}"
  if state == "preempted":
    return f"preempted at step {summary.get('step')} (checkpoint saved; --resume continues it)"
  return state


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def print_dry_run(sweep, root: str, *, num_steps, evaluate, overrides=(), out=None, **modules) -> None:
  out = out or sys.stdout
  sweep_dir = os.path.join(os.path.abspath(root), sweep.name)
  out.write(f"# sweep {sweep.name}: {sweep.question}\n# commands run from {PROJECT_ROOT}\n")
  if sweep.is_benchmark:
    out.write(shlex.join(benchmark_command(sweep, sweep_dir, **_pick(modules, "python", "benchmark_module"))) + "\n")
    return
  for run in sweep.runs:
    workdir = os.path.join(sweep_dir, run.name)
    status = run_files.read_status(workdir)
    if status and status.get("status") in run_files.FINISHED:
      out.write(f"# {run.name}: already {status['status']} (skipped)\n")
    else:
      out.write(f"# {run.name}: {run.note}\n")
    out.write(shlex.join(train_command(run, workdir, num_steps=num_steps, scale=sweep.scale,
                                       overrides=overrides,
                                       **_pick(modules, "python", "train_module"))) + "\n")
    if evaluate:
      out.write(shlex.join(evaluate_command(sweep, workdir, **_pick(modules, "python", "evaluate_module"))) + "\n")


def _pick(d, *keys):
  return {k: d[k] for k in keys if k in d}


def run_benchmark(sweep, sweep_dir: str, *, verbose=False, out=None, **modules) -> dict:
  out = out or sys.stdout
  previous = run_files.read_json(os.path.join(sweep_dir, RESULTS)) or {}
  bench = previous.get("benchmark") or {}
  if bench.get("status") == "completed":
    out.write(f"{sweep.name}: benchmark already completed (skipped)\n")
    return bench
  cmd = benchmark_command(sweep, sweep_dir, **_pick(modules, "python", "benchmark_module"))
  log_path = os.path.join(sweep_dir, "benchmark.log")
  out.write(f"{sweep.name}: benchmarking (log: {log_path})\n")
  out.flush()
  start = time.time()
  rc, last = execute(cmd, log_path, verbose=verbose, out=out)
  bench = {"command": cmd, "status": "completed" if rc == 0 else "failed", "log": "benchmark.log",
           "wall_s": round(time.time() - start, 1)}
  if rc != 0:
    bench["error"] = last
  if os.path.exists(os.path.join(sweep_dir, "benchmark.json")):
    bench["output"] = "benchmark.json"
  run_files.write_json(os.path.join(sweep_dir, RESULTS), results_doc(sweep, None, [], bench))
  out.write(f"{sweep.name}: benchmark {bench['status']} ({_elapsed(bench['wall_s'])})"
            + (f": {last}" if rc else "") + "\n")
  return bench


def run_sweep(sweep, root: str, *, num_steps: Optional[int] = None, resume: bool = False,
              evaluate: bool = False, overrides: Sequence[str] = (), verbose: bool = False, out=None,
              jobs: int = 1, **modules) -> dict:
  """Runs (or continues) a sweep and returns the results document written to results.json.

  `modules` may replace the commands' python / train_module / evaluate_module /
  benchmark_module (the tests use a fake trainer).
  """
  out = out or sys.stdout
  if sweep.is_benchmark and num_steps is not None:
    raise UserError(f"--num_steps: {sweep.name} trains nothing (it runs the benchmark); leave it out")
  if jobs > 1:
    cpu_slots(jobs)  # enough cores, or a clear error before anything is created
  if sweep.is_benchmark and jobs > 1:
    raise UserError(f"--jobs: {sweep.name} measures speed; it runs alone (leave --jobs out)")
  if sweep.is_benchmark and overrides:
    raise UserError(f"--set: {sweep.name} trains nothing (it runs the benchmark); leave it out")
  parse_overrides(overrides)  # bad --set values fail before anything is created
  validate_overrides(sweep, overrides, num_steps)
  sweep_dir = prepare_sweep_dir(sweep, root, num_steps=num_steps, resume=resume, overrides=overrides,
                                seeds=sweep.seeds)
  results_path = os.path.join(sweep_dir, RESULTS)
  if sweep.is_benchmark:
    return results_doc(sweep, None, [], run_benchmark(sweep, sweep_dir, verbose=verbose, out=out, **modules))

  # Runner notes that are not in the run's own files (failures, wall time), kept across resumes.
  previous = run_files.read_json(results_path) or {}
  extra = runner_notes(previous)
  out.write(f"sweep {sweep.name} ({len(sweep.runs)} runs) in {sweep_dir}\n")

  def save():
    doc = results_doc(sweep, num_steps, collect(sweep, sweep_dir, extra))
    run_files.write_json(results_path, doc)
    return doc

  save()
  try:
    _run_all(sweep, sweep_dir, num_steps, overrides, evaluate, verbose, out, extra, save, modules, jobs)
  finally:
    doc = save()  # also when interrupted: what is known so far, failures included
  return doc


def _run_all(sweep, sweep_dir, num_steps, overrides, evaluate, verbose, out, extra, save, modules, jobs=1):
  """Trains (and evaluates) every run not finished yet: one after another, or `jobs` at a time,
  each on its own share of the CPU cores (so two runs never compete for one core)."""
  todo = list(enumerate(sweep.runs, 1))
  if jobs <= 1:
    for i, run in todo:
      _run_one(sweep, sweep_dir, i, run, num_steps, overrides, evaluate, verbose, out, extra, modules)
      save()
    return
  lock, stop = threading.Lock(), threading.Event()
  shared_out = _LockedOutput(out, lock)

  def worker(cpus, done):
    try:
      while not stop.is_set():
        with lock:
          if not todo:
            return
          i, run = todo.pop(0)
        summary = _run_one(sweep, sweep_dir, i, run, num_steps, overrides, evaluate, False, shared_out,
                           extra, modules, cpus=cpus, lock=lock)
        with lock:
          save()
        if summary["status"] == "preempted":
          stop.set()  # a trainer stopped by a signal: take no new run
    finally:
      done.set()

  # Each worker sets its event when it has finished (saved included). The main thread waits on the
  # events in short waits, free to take SIGTERM / Ctrl-C (Thread.join interrupted by a signal
  # can report a live thread as finished; Event.wait cannot).
  finished = [threading.Event() for _ in range(jobs)]
  for cpus, done in zip(cpu_slots(jobs), finished):
    threading.Thread(target=worker, args=(cpus, done), daemon=True).start()

  def wait_all():
    while not all(done.wait(timeout=0.2) for done in finished):
      pass

  try:
    wait_all()
  except BaseException:
    stop.set()  # each trainer was signalled; let them save, then stop
    wait_all()
    raise


class _LockedOutput:
  """`out` shared by the --jobs threads: one whole line at a time."""

  def __init__(self, out, lock):
    self._out, self._lock = out, lock

  def write(self, text):
    with self._lock:
      self._out.write(text)
      self._out.flush()

  def flush(self):
    pass

  def isatty(self):
    return False  # no updating progress line for several runs at once


def cpu_slots(jobs: int):
  """The CPU cores of each of `jobs` runs side by side: this process's cores split evenly."""
  cores = sorted(os.sched_getaffinity(0))
  if jobs > len(cores):
    raise UserError(f"--jobs: {jobs} runs at once need at least {jobs} CPU cores, this process has "
                    f"{len(cores)}; use --jobs {len(cores)} or fewer")
  per = len(cores) // jobs
  return [cores[k * per:(k + 1) * per] for k in range(jobs)]


def _run_one(sweep, sweep_dir, i, run, num_steps, overrides, evaluate, verbose, out, extra, modules,
             cpus=None, lock=None):
  lock = lock or contextlib.nullcontext()
  tag = f"[{i}/{len(sweep.runs)}] {run.name}"
  workdir = os.path.join(sweep_dir, run.name)
  summary = run_files.summarize_run(run, workdir)
  if summary["status"] in run_files.FINISHED:
    out.write(f"{tag}: already {_describe(summary)} (skipped)\n")
  else:
    os.makedirs(workdir, exist_ok=True)
    out.write(f"{tag}: training{' (resuming)' if summary['status'] != 'not_run' else ''}"
              + (f" on cores {','.join(map(str, cpus))}" if cpus else "")
              + f" -- log: {os.path.join(workdir, 'train.log')}\n")
    with lock:
      note = extra.setdefault(run.name, {})
      note["source"] = source_fingerprint()
      drift = source_drift([dict(name=n, source=e.get("source")) for n, e in extra.items()])
    for line in drift:
      out.write(f"{tag}: warning: {line}; results will not be comparable (a new --root redoes them)\n")
    out.flush()
    start = time.time()
    rc, last = execute(train_command(run, workdir, num_steps=num_steps, scale=sweep.scale,
                                     overrides=overrides, **_pick(modules, "python", "train_module")),
                       os.path.join(workdir, "train.log"), verbose=verbose, out=out, progress=tag, cpus=cpus)
    summary = run_files.summarize_run(run, workdir)
    with lock:
      note["wall_s"] = round(note.get("wall_s", 0.0) + time.time() - start, 1)
      # The cores it could use, of the machine's: with --jobs 2 on 2 cores each run had half.
      note["cores"] = len(cpus) if cpus else len(os.sched_getaffinity(0))
      note["machine_cores"] = os.cpu_count()
      note.pop("error", None)
      # An error exit leaves an earlier attempt's status.json (e.g. 'preempted') in place.
      preempted = rc in (0, cli.EXIT_PREEMPTED) and summary["status"] == "preempted"
      # Killed by the stop signal itself (-SIGTERM / -SIGINT: it came before the trainer's handler
      # was installed, i.e. during start-up): stopped, not failed; --resume starts it again from
      # its last checkpoint, if any.
      stopped = rc in (-signal.SIGTERM, -signal.SIGINT) and summary["status"] in ("not_run", "preempted", "incomplete")
      if summary["status"] not in run_files.FINISHED and not (preempted or stopped):
        note["error"] = (last or f"exit code {rc}") if rc else "the trainer exited 0 without a final status.json"
        summary["status"] = "failed"
      summary["error"] = note.get("error")
    out.write(f"{tag}: {_describe(summary)} ({_elapsed(time.time() - start)})\n")
  if evaluate and summary["status"] == "completed" and not os.path.exists(
      os.path.join(workdir, "evaluation.json")):
    out.write(f"{tag}: evaluating\n")
    out.flush()
    rc, last = execute(evaluate_command(sweep, workdir, **_pick(modules, "python", "evaluate_module")),
                       os.path.join(workdir, "evaluate.log"), verbose=verbose, out=out, cpus=cpus)
    with lock:
      if rc:
        extra.setdefault(run.name, {})["eval_error"] = last or f"exit code {rc}"
      else:
        extra.setdefault(run.name, {}).pop("eval_error", None)
    if rc:
      out.write(f"{tag}: evaluation failed: {last}\n")
  return summary


def _positive_int(text):
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
  return value


def _seed_list(text):
  try:
    seeds = tuple(int(part) for part in text.split(",") if part.strip())
  except ValueError:
    seeds = ()
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    raise argparse.ArgumentTypeError(f"must be distinct non-negative integers like 0,1,2, got {text!r}")
  return seeds


def resolve_sweep(name: str, seeds=None, num_steps=None, root: Optional[str] = None,
                  best_lrs: Optional[str] = None, freeze: bool = True):
  """(the sweep with its runs repeated per seed, the training steps of every run).

  An 'accuracy' sweep's runs are built from the best learning rates (`resolve_best_lrs`).
  """
  sweep = sweeps_lib.get_sweep(name)
  if sweep.kind == "accuracy":
    lrs = resolve_best_lrs(sweep, root, best_lrs, freeze=freeze)
    sweep = dataclasses.replace(sweep, runs=sweeps_lib.accuracy_runs(lrs))
  sweep = sweeps_lib.with_seeds(sweep, seeds)
  return sweep, (num_steps if num_steps is not None else sweep.num_steps)


DEFAULT_RESULTS = os.path.join(PROJECT_ROOT, "experiments", "results")


def frozen_best_lrs(sweep_dir: str) -> Optional[dict]:
  """The {arm: lr} an accuracy sweep was started with (ROOT/<sweep>/best_lrs.json), if any."""
  doc = run_files.read_json(os.path.join(sweep_dir, sweeps_lib.BEST_LRS))
  return None if doc is None else doc.get("best_lr")


def resolve_best_lrs(sweep, root: Optional[str], results: Optional[str], freeze: bool = True) -> dict:
  """{arm: best lr} for an accuracy sweep.

  A sweep already started keeps the lrs it was started with (ROOT/<sweep>/best_lrs.json).
  Otherwise they are read from the sensitivity sweeps' generated summaries in `results` (the
  --out of experiments.report; default experiments/results) and, with `freeze`, written there.
  """
  if root is not None:
    frozen = frozen_best_lrs(os.path.join(os.path.abspath(root), sweep.name))
    if frozen is not None:
      return frozen
  results = results or DEFAULT_RESULTS
  best, sources = {}, []
  for source in sweeps_lib.ACCURACY_SOURCES:
    path = os.path.join(results, source, "summary.json")
    doc = run_files.read_json(path)
    if doc is None or "best_lr" not in doc:
      raise UserError(f"--best_lrs: {path} is missing or has no best_lr; run the sensitivity sweep "
                      f"{source} and python -m experiments.report --root ROOT --out {results} first")
    best.update({arm: v.get("lr") if isinstance(v, dict) else v for arm, v in doc["best_lr"].items()})
    sources.append(path)
  best = {arm: best.get(arm) for arm in sweeps_lib.ACCURACY_ARMS}
  sweeps_lib.accuracy_runs(best)  # every arm has one, or a clear error
  if root is not None and freeze:
    sweep_dir = os.path.join(os.path.abspath(root), sweep.name)
    os.makedirs(sweep_dir, exist_ok=True)
    run_files.write_json(os.path.join(sweep_dir, sweeps_lib.BEST_LRS),
                         {"best_lr": best, "sources": [os.path.relpath(p, PROJECT_ROOT) for p in sources]})
  return best


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m experiments.run_sweep", description=__doc__.split("\n")[0],
      epilog="sweeps: " + ", ".join(sweeps_lib.SWEEPS))
  parser.add_argument("--sweep", required=True, help="sweep name, e.g. norm_variants_cpu (see experiments/README.md)")
  parser.add_argument("--root", required=True, help="directory for the sweep's outputs: ROOT/<sweep>/<run>")
  parser.add_argument("--dry_run", action="store_true", help="print the exact commands and run nothing")
  parser.add_argument("--launcher", choices=("local", "slurm"), default="local",
                      help="local: train the runs one after another here (default); slurm: submit them "
                      "as one SLURM job array through submitit and return")
  parser.add_argument("--status", action="store_true",
                      help="print every run's state (and its SLURM job) and exit")
  parser.add_argument("--num_steps", type=_positive_int, default=None,
                      help="training steps of every run (default: each config's own)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override for every run, e.g. --set data.data_dir=/data/tfds (repeatable)")
  parser.add_argument("--seeds", type=_seed_list, default=None, metavar="0,1,2",
                      help="repeat every run once per seed (default: the sweep's declared seeds, if any)")
  parser.add_argument("--resume", action="store_true", help="continue a sweep that was started before")
  parser.add_argument("--best_lrs", default=None, metavar="RESULTS_DIR",
                      help="accuracy sweeps: the results folder whose sensitivity summaries give each "
                      "variant's best lr (default experiments/results; a started sweep keeps its own)")
  parser.add_argument("--evaluate", action="store_true",
                      help="run python -m vitnorm.evaluate (accuracy + img/s) after each completed run")
  parser.add_argument("--jobs", type=_positive_int, default=1,
                      help="local: train this many runs at once, each pinned to its share of the CPU "
                      "cores (default 1; e.g. 2 on 2 cores for runs that use one CPU device each)")
  parser.add_argument("--verbose", action="store_true", help="echo the trainer's output (it always goes to train.log)")
  parser.add_argument("--train_module", default="vitnorm.train", help="python module that trains (for tests)")
  parser.add_argument("--evaluate_module", default="vitnorm.evaluate", help="python module that evaluates")
  parser.add_argument("--benchmark_module", default="vitnorm.benchmark", help="python module that benchmarks")
  slurm.add_flags(parser, _positive_int)
  args = parser.parse_args(argv)
  if args.launcher == "local" and slurm.slurm_flags_given(args):
    parser.error(f"{slurm.slurm_flags_given(args)[0]}: only used with --launcher slurm; add it or leave the flag out")
  return args


def print_status(sweep_name: str, root: str, seeds=None) -> int:
  sweep_dir = os.path.join(os.path.abspath(root), sweep_name)
  manifest = run_files.read_json(os.path.join(sweep_dir, MANIFEST))
  if manifest is None:
    raise UserError(f"--sweep: {sweep_dir} holds no sweep (no {MANIFEST}); start it first, without --status")
  sweep, _ = resolve_sweep(sweep_name, seeds or tuple(manifest.get("seeds") or ()) or None, root=root,
                          freeze=False)
  sys.stdout.write(sweep_status.format_states(sweep, sweep_dir, sweep_status.sweep_states(sweep, sweep_dir)))
  return 0


def submit_to_slurm(sweep, args, num_steps, modules) -> int:
  if sweep.is_benchmark:
    raise UserError(f"--launcher: {sweep.name} measures speed on this machine; run it with --launcher local")
  parse_overrides(args.set)
  validate_overrides(sweep, args.set, num_steps)
  new = not os.path.exists(os.path.join(os.path.abspath(args.root), sweep.name, MANIFEST))
  sweep_dir = prepare_sweep_dir(sweep, args.root, num_steps=num_steps, resume=args.resume, overrides=args.set,
                                seeds=sweep.seeds)
  try:
    slurm.submit_sweep(sweep, sweep_dir, num_steps=num_steps, overrides=args.set, evaluate=args.evaluate,
                       options=slurm.options_from_args(args), out=sys.stdout, **modules)
  except UserError:
    if new:  # nothing was submitted: the same command (without --resume) may be tried again
      os.remove(os.path.join(sweep_dir, MANIFEST))
    raise
  print(f"states: python -m experiments.run_sweep --sweep {sweep.name} --root {args.root} --status; "
        f"report: python -m experiments.report --root {args.root}")
  return 0


@exit_on_user_error
def main(argv=None):
  args = parse_args(argv)
  if args.status:
    return print_status(args.sweep, args.root, args.seeds)
  sweep, num_steps = resolve_sweep(args.sweep, args.seeds, args.num_steps,
                                   root=args.root, best_lrs=args.best_lrs, freeze=not args.dry_run)
  modules = dict(train_module=args.train_module, evaluate_module=args.evaluate_module,
                 benchmark_module=args.benchmark_module)
  if args.dry_run:
    parse_overrides(args.set)
    validate_overrides(sweep, args.set, num_steps)
    print_dry_run(sweep, args.root, num_steps=num_steps, evaluate=args.evaluate,
                  overrides=args.set, **modules)
    return 0
  if args.launcher == "slurm":
    return submit_to_slurm(sweep, args, num_steps, modules)
  previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
  try:
    doc = run_sweep(sweep, args.root, num_steps=num_steps, resume=args.resume, overrides=args.set,
                    evaluate=args.evaluate, verbose=args.verbose, jobs=args.jobs, **modules)
  except (Interrupted, KeyboardInterrupt) as e:
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    print(f"\nstopped by {signal.Signals(signum).name}; continue with the same command plus --resume",
          file=sys.stderr)
    return 128 + signum
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
  runs = doc["runs"] + ([doc["benchmark"]] if "benchmark" in doc else [])
  counts = {}
  for r in runs:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  print(f"{sweep.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
        + f"; results in {os.path.join(os.path.abspath(args.root), sweep.name, RESULTS)}; "
        f"report: python -m experiments.report --root {args.root}")
  if counts.get("failed"):
    return 1
  return cli.EXIT_PREEMPTED if counts.get("preempted") else 0


if __name__ == "__main__":
  sys.exit(main())
