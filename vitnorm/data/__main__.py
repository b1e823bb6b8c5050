"""python -m vitnorm.data [--data_dir DIR] [NAME ...]: prepares the offline datasets (no network).

Prints the split sizes of each prepared dataset. Training prepares them on first use anyway; this
is for preparing a shared data_dir ahead of time (e.g. before starting several processes).
"""
import argparse
import logging
import sys

from vitnorm import cli
from vitnorm.errors import UserError, exit_on_user_error


OFFLINE_DATASETS = ("mnist5k", "digits")  # vitnorm.data.offline.OFFLINE_DATASETS (not imported yet)


@exit_on_user_error
def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m vitnorm.data",
                                   description="Prepares the offline datasets (no network).")
  parser.add_argument("names", nargs="*", default=list(OFFLINE_DATASETS),
                      help=f"datasets to prepare (default: {' '.join(OFFLINE_DATASETS)})")
  parser.add_argument("--data_dir", default=None,
                      help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--verbose", action="store_true", help="show tfds' own output while preparing")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  cli.quiet_start(["--verbose"] if args.verbose else [])
  logging.getLogger("absl").setLevel(logging.INFO if args.verbose else logging.WARNING)
  from vitnorm.data import offline  # pylint: disable=import-outside-toplevel  (imports TensorFlow)
  for name in args.names:
    if name not in offline.OFFLINE_DATASETS:
      raise UserError(f"unknown offline dataset {name!r}; choose from {', '.join(offline.OFFLINE_DATASETS)}")
  for name in args.names:
    builder = offline.prepare(name, args.data_dir)
    sizes = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
    print(f"{name}: {sizes} examples in {builder.data_dir}", flush=True)


if __name__ == "__main__":
  main()
