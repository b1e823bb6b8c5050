r"""What the integrity manifest costs: checkpoint save time with and without SHA-256 hashing.

  python -m experiments.checkpoint_hashing [--variant=S/16] [--repeats=5] [--dir=/tmp/ckpt_bench]

Saves a train state of the given ViT's size (LN model params, AdamW mu and nu,
an EMA copy: what the trainer writes) with the trainer's Checkpointer, synchronously, `repeats`
times each way, alternating: `hashing=True` (the default: size + SHA-256 of every file after the
commit) and `hashing=False` (sizes only). Prints the median seconds of each, their ratio, the
checkpoint size, and the time `integrity.damage` takes to verify one step (the cost at resume).
`--tiny` uses a 2-layer width-32 model, to check that the script runs (numbers meaningless).
Run on a quiet machine with a local --dir on the disk the workdirs use.
"""
import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from configs import common
from vitnorm.model import vit
from vitnorm import checkpoints, checkpoint_integrity as integrity


def state_like(variant: str, tiny: bool):
  cfg = common.model_config(variant=None if tiny else variant, norm="layer", num_classes=1000)
  if tiny:
    cfg.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=16))
  model = vit.build_model(cfg)
  shapes = vit.variable_shapes(model, vit.input_shape(cfg))["params"]
  rng = np.random.default_rng(0)
  fill = lambda s: rng.standard_normal(s.shape, dtype=np.float32)  # noqa: E731
  params = jax.tree.map(fill, shapes)
  model_item = {"params": params, "ema_params": jax.tree.map(fill, shapes)}
  train_item = {"step": np.int32(1), "opt_state": {"mu": jax.tree.map(fill, shapes),
                                                   "nu": jax.tree.map(fill, shapes)}}
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  return model_item, train_item, count


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="S/16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
  parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the script only")
  args = parser.parse_args()
  model_item, train_item, count = state_like(args.variant, args.tiny)
  root = args.dir or tempfile.mkdtemp(prefix="ckpt_hashing_")
  times = {True: [], False: []}
  step, verify, size = 0, [], 0
  for _ in range(args.repeats):
    for hashing in (False, True):
      workdir = os.path.join(root, f"hashing_{hashing}")
      shutil.rmtree(workdir, ignore_errors=True)
      ckpt = checkpoints.Checkpointer(workdir, keep=1, async_save=False, hashing=hashing)
      step += 1
      started = time.perf_counter()
      ckpt.save(step, model_item, train_item)  # returns after the commit and the manifest
      times[hashing].append(time.perf_counter() - started)
      ckpt.close()
      if hashing:
        step_dir = os.path.join(ckpt.directory, str(step))
        size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(step_dir) for n in ns)
        started = time.perf_counter()
        assert integrity.damage(step_dir) is None
        verify.append(time.perf_counter() - started)
  shutil.rmtree(root, ignore_errors=True)
  with_hash, without = statistics.median(times[True]), statistics.median(times[False])
  print(f"model {'tiny' if args.tiny else args.variant}: {count / 1e6:.1f} M params, checkpoint "
        f"{size / 2**20:.0f} MiB (params, EMA, AdamW mu and nu), {args.repeats} saves each way")
  print(f"save without hashing (sizes only): {without:.3f} s   with SHA-256: {with_hash:.3f} s   "
        f"ratio {with_hash / without:.2f}x ({with_hash - without:+.3f} s per checkpoint)")
  print(f"verify at resume (integrity.damage): {statistics.median(verify):.3f} s")


if __name__ == "__main__":
  main()
