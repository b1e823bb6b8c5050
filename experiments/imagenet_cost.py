"""What the study costs at ImageNet scale: the exact sweep commands and their compute.

    python -m experiments.imagenet_cost [--out experiments/results/imagenet_cost] [--mfu 0.4]

For each ImageNet sweep of the study (`experiments.sweeps`, DeiT-Ti/16 at 224 px, the DeiT recipe
of configs/deit.py) it counts the runs (seeds included) and their training steps, takes the
FLOPs of one training image from XLA's cost analysis of the compiled train step (forward,
backward and AdamW: `python -m vitnorm.benchmark --mode train`, run here on the CPU; the FLOPs do
not depend on the device), and turns the total into accelerator-hours at an assumed sustained
rate: `--peak_tflops` (default: the bf16 matmul peak measured on one H200, ../shared/FACTS.md)
times `--mfu`, the fraction of that peak a training run sustains (an assumption), or at
`--images_per_s` when the input pipeline is slower (ViT-Ti is small: it is often input-bound).
Evaluation passes are not counted (a validation pass is 50,000 forward passes per evaluation).

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


def estimate(flops_per_image: float, *, peak_tflops: float, mfu: float,
             images_per_s: Optional[float] = None) -> dict:
  """Accelerator-hours per sweep at the compute-bound rate, or at `images_per_s` if slower."""
  rate = peak_tflops * 1e12 * mfu
  compute_images_per_s = rate / flops_per_image
  speed = min(compute_images_per_s, images_per_s or float("inf"))
  rows = []
  for name, seeds in STUDY:
    sweep = sweeps_lib.with_seeds(sweeps_lib.get_sweep(name), seeds)
    steps = steps_of(sweep)
    images = len(sweep.runs) * steps * sweeps_lib.IMAGENET_BATCH
    hours = images / speed / 3600
    rows.append(dict(sweep=name, runs=len(sweep.runs), seeds=list(sweep.seeds), steps_per_run=steps,
                     epochs_per_run=steps * sweeps_lib.IMAGENET_BATCH / sweeps_lib.IMAGENET_TRAIN_IMAGES,
                     train_images=images, accelerator_hours=hours, command=command_of(name, seeds)))
  return dict(model="DeiT-Ti/16 @ 224 px", flops_per_train_image=flops_per_image,
              peak_tflops=peak_tflops, mfu=mfu, sustained_tflops=rate / 1e12,
              compute_bound_images_per_s=compute_images_per_s, input_images_per_s=images_per_s,
              images_per_s=speed,
              batch=sweeps_lib.IMAGENET_BATCH, sweeps=rows,
              total_accelerator_hours=sum(r["accelerator_hours"] for r in rows),
              inference_command=("python -m experiments.run_sweep --sweep inference_speed_imagenet "
                                 "--root gs://BUCKET/vitnorm_study"))


def markdown(doc: dict) -> str:
  lines = [f"Model {doc['model']}: {doc['flops_per_train_image'] / 1e9:.2f} GFLOP per training image "
           "(forward + backward + AdamW, XLA cost analysis of the compiled step). Assumed sustained "
           f"rate: {doc['peak_tflops']:g} TFLOP/s peak x {doc['mfu']:g} = {doc['sustained_tflops']:.0f} "
           f"TFLOP/s per accelerator, {doc['compute_bound_images_per_s']:,.0f} training images/s. "
           + (f"Input pipeline: {doc['input_images_per_s']:,.0f} images/s per accelerator (given), so "
              f"the hours are at {doc['images_per_s']:,.0f} images/s. " if doc.get("input_images_per_s") else
              "The hours are compute-bound, a lower bound: a host that decodes and augments fewer "
              "images/s than that makes the run input-bound (measure it with `python -m "
              "vitnorm.benchmark --mode loop` and pass `--images_per_s`). ")
           + "Evaluation passes are not counted.", "",
           "| sweep | runs | seeds | epochs per run | training images | accelerator-hours |",
           "|---|---|---|---|---|---|"]
  for r in doc["sweeps"]:
    lines.append(f"| {r['sweep']} | {r['runs']} | {','.join(map(str, r['seeds'])) or '-'} | "
                 f"{r['epochs_per_run']:.0f} | {r['train_images']:.3g} | {r['accelerator_hours']:,.0f} |")
  lines.append(f"| **total** | {sum(r['runs'] for r in doc['sweeps'])} | | | | "
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
                      help="the input pipeline's training images/s per accelerator, if it is slower")
  parser.add_argument("--flops_per_image", type=float, default=None,
                      help="skip the measurement: FLOPs per training image")
  args = parser.parse_args(argv)
  if not 0 < args.mfu <= 1:
    raise UserError(f"--mfu: {args.mfu} must be in (0, 1]; e.g. 0.4")
  if not args.peak_tflops > 0:
    raise UserError(f"--peak_tflops: {args.peak_tflops} must be positive")
  flops = args.flops_per_image or train_flops_per_image()
  if args.images_per_s is not None and not args.images_per_s > 0:
    raise UserError(f"--images_per_s: {args.images_per_s} must be positive")
  doc = estimate(flops, peak_tflops=args.peak_tflops, mfu=args.mfu, images_per_s=args.images_per_s)
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
