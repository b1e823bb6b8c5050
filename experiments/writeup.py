"""experiments/RESULTS.md from its template: the prose is written by hand, every number comes
from the generated files.

    python -m experiments.report --root runs --out experiments/results   # the tables, figures, JSON
    python -m experiments.writeup                                         # RESULTS.md from them

The template (experiments/RESULTS.template.md) is markdown with three kinds of placeholder:

  {{section:SWEEP}}          the sweep's generated section (results/SWEEP/section.md), its figure
                             paths made relative to RESULTS.md
  {{file:NAME}}              a generated markdown file of the results folder, e.g. imagenet_cost.md
  {{FILE:PATH|FORMAT}}       one number of a generated JSON file: FILE relative to the results
                             folder, PATH a '/'-separated walk through it, where a list is entered
                             by index or by the element whose variant / model / sweep / name is
                             the segment; FORMAT one of FORMATS (default: as it is)

e.g. {{norm_variants_cpu/summary.json:variants/bn/top1/mean|pct}} -> 96.10.
A placeholder that does not resolve is an error naming it: RESULTS.md never carries a stale or
typed-in number. With --allow_missing it becomes "(not yet run)" instead, for a write-up whose
sweeps have only partly run.
"""
import argparse
import json
import math
import os
import re
import sys
from typing import List, Optional

from vitnorm.errors import UserError, exit_on_user_error

HERE = os.path.dirname(os.path.abspath(__file__))
PLACEHOLDER = re.compile(r"\{\{([^{}]+)\}\}")
_NAME_FIELDS = ("variant", "model", "sweep", "name")


def _pct(v):
  return f"{100 * v:.2f}"


FORMATS = {
    "pct": _pct,                                   # a fraction as a percentage: 0.9612 -> 96.12
    "pct1": lambda v: f"{100 * v:.1f}",            # 0.9612 -> 96.1
    "pp": lambda v: f"{100 * v:+.2f}",             # a difference of fractions in points: +0.35
    "ppabs": lambda v: f"{abs(100 * v):.2f}",      # its size, for "trails by": -0.0135 -> 1.35
    "ci": lambda v: f"{_pct(v[0])} to {_pct(v[1])}",  # an interval of fractions: 95.10 to 96.90
    "cipp": lambda v: f"{100 * v[0]:+.2f} to {100 * v[1]:+.2f}",  # an interval of differences
    "f3": lambda v: f"{v:.3f}",
    "f2": lambda v: f"{v:.2f}",
    "f1": lambda v: f"{v:.1f}",
    "int": lambda v: f"{int(round(v)):,}" if math.isfinite(v) else str(v),  # inf: an overflow
    "yesno": lambda v: "yes" if v else "no",
    "lrs": lambda v: ", ".join(f"{x:.0e}".replace("e-0", "e-") for x in v) if v else "none",  # [0.03] -> 3e-2
    "giga": lambda v: f"{v / 1e9:.0f}",             # FLOP/s as GFLOP/s: 2.05e11 -> 205
    "lr": lambda v: f"{v:.0e}".replace("e-0", "e-"),  # a learning rate: 0.01 -> 1e-2
    "pctratio": lambda v: f"{100 * (v - 1):+.1f}%",  # a speed ratio as a change: 1.09 -> +9.0%
}


def _walk(node, segments: List[str], where: str):
  for seg in segments:
    if isinstance(node, dict):
      if seg not in node:
        raise KeyError(f"{where}: no key {seg!r} (keys: {', '.join(map(str, list(node)[:12]))})")
      node = node[seg]
    elif isinstance(node, list):
      if seg.isdigit() and int(seg) < len(node):
        node = node[int(seg)]
        continue
      match = [e for e in node if isinstance(e, dict) and any(e.get(f) == seg for f in _NAME_FIELDS)]
      if not match:
        raise KeyError(f"{where}: no list element named {seg!r}")
      node = match[0]
    else:
      raise KeyError(f"{where}: {seg!r} walks into a {type(node).__name__}")
  return node


def _value(spec: str, results: str, cache: dict) -> str:
  spec, _, fmt = spec.partition("|")
  file, _, path = spec.partition(":")
  if fmt and fmt not in FORMATS:
    raise KeyError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
  if file not in cache:
    full = os.path.join(results, file)
    if not os.path.exists(full):
      raise KeyError(f"{file} does not exist in {results}: run the command that generates it")
    with open(full, encoding="utf-8") as f:
      cache[file] = json.load(f)
  value = _walk(cache[file], [s for s in path.split("/") if s], file)
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    raise KeyError(f"{file}:{path} is {value!r}: the runs behind it did not produce it")
  return FORMATS[fmt](value) if fmt else str(value)


def _section(sweep: str, results: str, out_dir: str) -> str:
  path = os.path.join(results, sweep, "section.md")
  if not os.path.exists(path):
    raise KeyError(f"{path} does not exist: python -m experiments.report --root runs --out {results}")
  with open(path, encoding="utf-8") as f:
    text = f.read().rstrip("\n")
  prefix = os.path.relpath(results, out_dir)
  # Figure paths in a section are relative to the results folder.
  return re.sub(r"\]\((?!https?:|/)([^)]+\.png)\)", lambda m: f"]({prefix}/{m.group(1)})", text)


NOT_YET_RUN = "*(not yet run)*"  # what --allow_missing writes for a placeholder with no result


def render(template: str, results: str, out_dir: str, allow_missing: bool = False) -> str:
  """The template with every placeholder resolved; with `allow_missing`, a placeholder whose file
  or value does not exist yet becomes NOT_YET_RUN instead of an error (a typo in a placeholder's
  format is still an error)."""
  cache: dict = {}

  def replace(match):
    spec = match.group(1).strip()
    try:
      if spec.startswith("section:"):
        return _section(spec[len("section:"):], results, out_dir)
      if spec.startswith("file:"):
        path = os.path.join(results, spec[len("file:"):])
        if not os.path.exists(path):
          raise KeyError(f"{path} does not exist: run the command that generates it")
        with open(path, encoding="utf-8") as f:
          return f.read().rstrip("\n")
      return _value(spec, results, cache)
    except (KeyError, TypeError, ValueError, IndexError) as e:
      message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
      if allow_missing and not str(message).startswith("unknown format"):
        return NOT_YET_RUN
      raise UserError(f"template placeholder {{{{{spec}}}}}: {message}") from None

  return PLACEHOLDER.sub(replace, template)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.writeup", description=__doc__.split("\n")[0])
  parser.add_argument("--template", default=os.path.join(HERE, "RESULTS.template.md"))
  parser.add_argument("--results", default=os.path.join(HERE, "results"),
                      help="the --out of python -m experiments.report")
  parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
  parser.add_argument("--allow_missing", action="store_true",
                      help=f"write {NOT_YET_RUN} for results that do not exist yet instead of failing")
  args = parser.parse_args(argv)
  if not os.path.exists(args.template):
    raise UserError(f"--template: {args.template} does not exist")
  with open(args.template, encoding="utf-8") as f:
    template = f.read()
  text = render(template, os.path.abspath(args.results), os.path.dirname(os.path.abspath(args.out)),
                allow_missing=args.allow_missing)
  text = ("<!-- Generated by `python -m experiments.writeup` from experiments/RESULTS.template.md "
          "and the files in experiments/results/: edit the template, not this file. -->\n" + text)
  with open(args.out, "w", encoding="utf-8") as f:
    f.write(text)
  print(f"written: {os.path.relpath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
