"""What the study costs at ImageNet scale: the exact sweep commands and their compute.

    python -m experiments.imagenet_cost [--out experiments/results/imagenet_cost] [--mfu 0.4]

For each ImageNet sweep of the study (`experiments.sweeps`, DeiT-Ti/16 at 224 px, the DeiT recipe
of configs/deit.py) it counts the runs (seeds included) and their training steps, takes the
FLOPs of one training image from XLA's cost analysis of the compiled train step (forward,
backward and AdamW: `python -m vitnorm.benchmark --mode train`, run here on the CPU; the FLOPs do
not depend on the device), and turns the total into accelerator-hours at an assumed sustained
rate: `--peak_tflops` (default: the bf16 matmul peak measured on one H200, ../shared/FACTS.md)
times `--mfu`, the fraction of that peak a training run sustains (an assumption).

A run is as fast as the slower of its accelerator and its host's input pipeline, so each sweep's
hours are max(compute-bound hours, input-bound hours). The input rate per accelerator is
`--host_cores` (host CPU cores feeding one accelerator) times the per-core images/s of the DeiT
recipe read from `--input_benchmark FILE`, the JSON of
`python -m vitnorm.benchmark --mode input --output FILE` (its threads=1 group), or given directly as
`--images_per_s`. The table says which bound applies. Without either, the hours are compute-bound,
a lower bound. Evaluation passes are not counted (a validation pass is 50,000 forward passes).

Writes <out>.md (the table and commands) and <out>.json; prints the markdown.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import List, Optional

from experiments import sweeps as sweeps_lib
from experiments.commands import PROJECT_ROOT
from vitnorm.errors import UserError, exit_on_user_error

MODEL = ("--variant=Ti/16", "--image_size=224", "--num_classes=1000")
# The study at ImageNet scale: (sweep, the seeds its command sets, or None for the declared ones).
STUDY = (("norm_variants_imagenet", (0, 1, 2)), ("stability_imagenet", None),
         ("stability_harsh_imagenet", None))
DEIT_EPOCHS = 300  # configs/deit.py's default length
H200_BF16_MATMUL_TFLOPS = 790.0  # ../shared/FACTS.md: 8192^3 bf16 matmul on the device machine's H200


def train_flops_per_image(python: str = sys.executable, log=None) -> float:
  """FLOPs of one image's training step (DeiT-Ti/16, LN, batch 8, f32), from the train benchmark."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "train.json")
    cmd = [python, "-m", "vitnorm.benchmark", "--mode=train", *MODEL, "--models=ln",
           "--batch_sizes=8", "--parallelism=jit", "--dtypes=float32", "--iterations=1",
           "--repeats=1", f"--output={out}"]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not os.path.exists(out):
      raise RuntimeError(f"{' '.join(cmd[1:])} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    with open(out, encoding="utf-8") as f:
      doc = json.load(f)
  for group in doc.get("groups", [doc]):
    for result in group.get("results", []):
      if result.get("model") == "ln" and result.get("flops_per_image"):
        return float(result["flops_per_image"])
  raise RuntimeError(f"the train benchmark reported no FLOPs per image (JSON keys: {sorted(doc)})")


def steps_of(sweep) -> int:
  return sweep.num_steps or sweeps_lib.imagenet_steps(DEIT_EPOCHS)


def command_of(name: str, seeds) -> str:
  return (f"python -m experiments.run_sweep --sweep {name} --root gs://BUCKET/vitnorm_study"
          + (f" --seeds {','.join(map(str, seeds))}" if seeds else "")
          + " --set data.data_dir=gs://BUCKET/tensorflow_datasets")


def input_rate(benchmark_json: str, host_cores: float, variant: str = "deit") -> dict:
  """Input images/s per accelerator: host_cores x the per-core rate of `variant` (deit: the tf.data
  feed with the DeiT recipe; grain: the Grain feed) in the input benchmark's JSON."""
  from vitnorm.data import input_speed  # pylint: disable=import-outside-toplevel
  try:
    with open(benchmark_json, encoding="utf-8") as f:
      report = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"--input_benchmark: cannot read {benchmark_json}: {e}") from None
  if report.get("mode") != "input":
    raise UserError(f"--input_benchmark: {benchmark_json} is not the JSON of "
                    "`python -m vitnorm.benchmark --mode input --output FILE`")
  try:
    per_core = input_speed.per_core_rate(report, variant)
  except (KeyError, ValueError) as e:
    raise UserError(f"--input_variant: {benchmark_json}: {e}; run the benchmark with the "
                    f"{variant!r} variant") from None
  return dict(per_core_images_per_s=per_core, host_cores=host_cores, variant=variant,
              images_per_s=per_core * host_cores, source=benchmark_json,
              image_size=report.get("image_size"), cpu_count=report.get("cpu_count"))


def estimate(flops_per_image: float, *, peak_tflops: float, mfu: float,
             images_per_s: Optional[float] = None, input_source: Optional[dict] = None) -> dict:
  """Accelerator-hours per sweep: max(compute-bound, input-bound at `images_per_s`)."""
  rate = peak_tflops * 1e12 * mfu
  compute_images_per_s = rate / flops_per_image
  speed = min(compute_images_per_s, images_per_s or float("inf"))
  bound = "input" if images_per_s and images_per_s < compute_images_per_s else "compute"
  rows = []
  for name, seeds in STUDY:
    sweep = sweeps_lib.with_seeds(sweeps_lib.get_sweep(name), seeds)
    steps = steps_of(sweep)
    images = len(sweep.runs) * steps * sweeps_lib.IMAGENET_BATCH
    compute_hours = images / compute_images_per_s / 3600
    input_hours = images / images_per_s / 3600 if images_per_s else None
    rows.append(dict(sweep=name, runs=len(sweep.runs), seeds=list(sweep.seeds), steps_per_run=steps,
                     epochs_per_run=steps * sweeps_lib.IMAGENET_BATCH / sweeps_lib.IMAGENET_TRAIN_IMAGES,
                     train_images=images, compute_bound_hours=compute_hours,
                     input_bound_hours=input_hours, bound=bound,
                     accelerator_hours=max(compute_hours, input_hours or 0.0),
                     command=command_of(name, seeds)))
  return dict(model="DeiT-Ti/16 @ 224 px", flops_per_train_image=flops_per_image,
              peak_tflops=peak_tflops, mfu=mfu, sustained_tflops=rate / 1e12,
              compute_bound_images_per_s=compute_images_per_s, input_images_per_s=images_per_s,
              input_source=input_source, images_per_s=speed, bound=bound,
              batch=sweeps_lib.IMAGENET_BATCH, sweeps=rows,
              total_accelerator_hours=sum(r["accelerator_hours"] for r in rows),
              inference_command=("python -m experiments.run_sweep --sweep inference_speed_imagenet "
                                 "--root gs://BUCKET/vitnorm_study"))


def _input_sentence(doc: dict) -> str:
  if not doc.get("input_images_per_s"):
    return ("The hours are compute-bound, a lower bound: a host that decodes and augments fewer "
            "images/s than that makes the run input-bound (measure the host with `python -m "
            "vitnorm.benchmark --mode input --output FILE` and pass `--input_benchmark FILE "
            "--host_cores N`). ")
  source = doc.get("input_source")
  feed = ("the tf.data feed, DeiT recipe" if source and source["variant"] == "deit" else
          f"input variant {source['variant']}" if source else "")
  where = (f"{source['host_cores']:g} host cores x {source['per_core_images_per_s']:,.1f} images/s per "
           f"core ({feed} at {source['image_size']} px, one thread, measured by the input "
           f"benchmark in {source['source']})" if source else "given")
  which = ("input-bound: the host, not the accelerator, sets the hours" if doc["bound"] == "input"
           else "compute-bound: the host keeps up")
  return (f"Input pipeline: {doc['input_images_per_s']:,.0f} images/s per accelerator ({where}), so "
          f"every sweep is {which}; hours = max(compute-bound, input-bound). ")


def markdown(doc: dict) -> str:
  lines = [f"Model {doc['model']}: {doc['flops_per_train_image'] / 1e9:.2f} GFLOP per training image "
           "(forward + backward + AdamW, XLA cost analysis of the compiled step). Assumed sustained "
           f"rate: {doc['peak_tflops']:g} TFLOP/s peak x {doc['mfu']:g} = {doc['sustained_tflops']:.0f} "
           f"TFLOP/s per accelerator, {doc['compute_bound_images_per_s']:,.0f} training images/s. "
           + _input_sentence(doc) + "Evaluation passes are not counted.", "",
           "| sweep | runs | seeds | epochs per run | training images | compute-bound hours | "
           "input-bound hours | bound | accelerator-hours |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in doc["sweeps"]:
    input_hours = "-" if r["input_bound_hours"] is None else f"{r['input_bound_hours']:,.0f}"
    lines.append(f"| {r['sweep']} | {r['runs']} | {','.join(map(str, r['seeds'])) or '-'} | "
                 f"{r['epochs_per_run']:.0f} | {r['train_images']:.3g} | {r['compute_bound_hours']:,.0f} | "
                 f"{input_hours} | {r['bound']} | {r['accelerator_hours']:,.0f} |")
  lines.append(f"| **total** | {sum(r['runs'] for r in doc['sweeps'])} | | | | | | | "
               f"**{doc['total_accelerator_hours']:,.0f}** |")
  lines += ["", "Commands (each resumes where it stopped; `--dry_run` prints every training command):",
            "", "```bash"] + [r["command"] for r in doc["sweeps"]] + [doc["inference_command"], "```"]
  return "\n".join(lines)


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.imagenet_cost",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="experiments/results/imagenet_cost",
                      help="writes OUT.md and OUT.json")
  parser.add_argument("--peak_tflops", type=float, default=H200_BF16_MATMUL_TFLOPS,
                      help="accelerator peak, TFLOP/s (default: one H200, bf16 matmul)")
  parser.add_argument("--mfu", type=float, default=0.4,
                      help="fraction of the peak a training run sustains (assumption)")
  parser.add_argument("--images_per_s", type=float, default=None,
                      help="the input pipeline's training images/s per accelerator (instead of "
                      "--input_benchmark)")
  parser.add_argument("--input_benchmark", default=None,
                      help="JSON of `python -m vitnorm.benchmark --mode input`: its per-core rate "
                      "times --host_cores is the input rate per accelerator")
  parser.add_argument("--input_variant", default="deit",
                      help="which feed of the input benchmark to price: deit (tf.data, DeiT recipe) "
                      "or grain (the Grain feed)")
  parser.add_argument("--host_cores", type=float, default=None,
                      help="host CPU cores feeding one accelerator (with --input_benchmark)")
  parser.add_argument("--flops_per_image", type=float, default=None,
                      help="skip the measurement: FLOPs per training image")
  args = parser.parse_args(argv)
  if not 0 < args.mfu <= 1:
    raise UserError(f"--mfu: {args.mfu} must be in (0, 1]; e.g. 0.4")
  if not args.peak_tflops > 0:
    raise UserError(f"--peak_tflops: {args.peak_tflops} must be positive")
  if args.images_per_s is not None and not args.images_per_s > 0:
    raise UserError(f"--images_per_s: {args.images_per_s} must be positive")
  if args.input_benchmark and args.images_per_s is not None:
    raise UserError("--images_per_s: give either --images_per_s or --input_benchmark, not both")
  if (args.input_benchmark is None) != (args.host_cores is None):
    raise UserError("--host_cores: --input_benchmark FILE and --host_cores N go together (the "
                    "input rate is N x the benchmark's per-core rate)")
  if args.host_cores is not None and not args.host_cores > 0:
    raise UserError(f"--host_cores: {args.host_cores} must be positive")
  source = (input_rate(args.input_benchmark, args.host_cores, args.input_variant)
            if args.input_benchmark else None)
  flops = args.flops_per_image or train_flops_per_image()
  images_per_s = source["images_per_s"] if source else args.images_per_s
  doc = estimate(flops, peak_tflops=args.peak_tflops, mfu=args.mfu, images_per_s=images_per_s,
                 input_source=source)
  doc["regenerate"] = "python -m experiments.imagenet_cost" + "".join(
      f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
  text = markdown(doc) + f"\n\nRegenerate: `{doc['regenerate']}`\n"
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".md", "w", encoding="utf-8") as f:
    f.write(text)
  with open(args.out + ".json", "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=2)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
