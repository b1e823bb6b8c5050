"""Runs a check as named parts and keeps what each part measured, whatever happens to the process.

The results live in one JSON document (experiments.accelerator_check writes it as <device>.json):

  {"format": 2, "device": ..., "reduced": bool, "ok": bool, "complete": bool, "wall_seconds": ...,
   "parts": {NAME: {"ok": true | false | null, "wall_seconds": s, "finished": "UTC time",
                    "xla_flags": ..., "matmul_precision": ..., "result": {...}}
                  | {"ok": false, "error": "Type: message", ...}}}

After every part the document (and the caller's rendering of it, e.g. Markdown) is written to a
temporary file and renamed over the old one, so a process killed at any moment leaves every part
that finished and no half-written file. A re-run skips the parts already in the document (a part
that raised is run again); `force` redoes the named ones.

A part's `ok` is True / False for a correctness check and None for a measurement; the document's
`ok` is False as soon as one part failed or raised.
"""
import dataclasses
import json
import os
import signal
import time
import traceback
from typing import Callable, Dict, Optional, Sequence

from vitnorm.errors import UserError

FORMAT = 2


@dataclasses.dataclass(frozen=True)
class Part:
  """One named piece of the check.

  run(context) returns (ok, result): ok True/False for a check, None for a measurement; result a
  JSON-able dict. estimate_seconds: the expected wall time on one H100/H200-class GPU, compilation
  included (used by the plan until a measured time exists).
  """
  name: str
  run: Callable
  estimate_seconds: float
  description: str
  timing: bool = False  # a measurement of speed: kept apart from --xla_gpu_deterministic_ops runs


def load(path: str, *, device: str, reduced: bool) -> dict:
  """The document at `path`, or a new one; UserError if it belongs to another mode or device."""
  if not os.path.exists(path):
    return dict(format=FORMAT, device=device, reduced=reduced, parts={})
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"--out: cannot read {path} ({e}); move it away or pass another --out") from None
  if doc.get("format") != FORMAT or not isinstance(doc.get("parts"), dict):
    raise UserError(f"--out: {path} was written by an older version of the check (no per-part results); "
                    "move it away or pass another --out")
  if bool(doc.get("reduced")) != reduced:
    mode = lambda r: "reduced" if r else "full"  # noqa: E731
    raise UserError(f"--out: {path} holds a {mode(doc.get('reduced'))} check and this run is "
                    f"{mode(reduced)}; pass another --out (or --reduced to match)")
  return doc


def summarize(doc: dict, all_parts: Sequence[str]) -> dict:
  """Sets the document's ok / complete / wall_seconds from its parts."""
  parts = doc["parts"]
  doc["ok"] = all(p.get("ok") is not False and "error" not in p for p in parts.values())
  doc["complete"] = all(name in parts and "error" not in parts[name] for name in all_parts)
  doc["missing_parts"] = [name for name in all_parts if name not in parts or "error" in parts[name]]
  doc["wall_seconds"] = sum(p.get("wall_seconds", 0.0) for p in parts.values())
  return doc


def write_atomically(path: str, text: str):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def run_parts(parts: Sequence[Part], selected: Sequence[str], doc: dict, *, save: Callable[[dict], None],
              context, force: bool = False, kill_at_part: Optional[str] = None,
              log: Callable[[str], None] = print, labels: Callable[[], Dict] = dict) -> dict:
  """Runs the selected parts not yet in `doc` (all selected with `force`), saving after each one.

  labels() adds the conditions a part ran under (XLA flags, matmul precision) to its entry.
  kill_at_part: SIGKILL this process when that part starts (tests: a killed run keeps its parts).
  """
  names = [p.name for p in parts]
  by_name = {p.name: p for p in parts}
  for name in selected:
    part = by_name[name]
    done = doc["parts"].get(name)
    if done is not None and "error" not in done and not force:
      log(f"part {name}: already in the results ({done.get('wall_seconds', 0):.0f} s), skipped "
          "(--force redoes it)")
      continue
    if kill_at_part == name:
      os.kill(os.getpid(), signal.SIGKILL)
    log(f"part {name}: {part.description}")
    start = time.perf_counter()
    try:
      ok, result = part.run(context)
      entry = dict(ok=None if ok is None else bool(ok), result=result)
    except Exception as e:  # pylint: disable=broad-except  # one broken part must not lose the others
      entry = dict(ok=False, error=f"{type(e).__name__}: {e}".strip(),
                   traceback=traceback.format_exc(limit=8)[-4000:])
    entry.update(wall_seconds=time.perf_counter() - start,
                 finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **labels())
    doc["parts"][name] = entry
    doc["parts"] = {n: doc["parts"][n] for n in names if n in doc["parts"]}  # the parts' order
    summarize(doc, names)
    save(doc)
    verdict = {True: "OK", False: "FAILED", None: "measured"}[entry["ok"]]
    log(f"part {name}: {verdict if 'error' not in entry else 'ERROR ' + entry['error']} "
        f"in {entry['wall_seconds']:.1f} s")
  return summarize(doc, names)


def plan_commands(parts: Sequence[Part], budget_seconds: float):
  """Splits the parts into commands of at most `budget_seconds` each, correctness parts first.

  The check parts (no timing) share one command, which runs with --xla_gpu_deterministic_ops;
  the timing parts share the other(s), which run without it. Returns [(part names, estimated
  seconds)]; a part estimated above the budget gets a command of its own.
  """
  commands = []
  for group in ([p for p in parts if not p.timing], [p for p in parts if p.timing]):
    current, total = [], 0.0
    for p in group:
      s = p.estimate_seconds
      if current and total + s > budget_seconds:
        commands.append((current, total))
        current, total = [], 0.0
      current.append(p.name)
      total += s
    if current:
      commands.append((current, total))
  return commands
