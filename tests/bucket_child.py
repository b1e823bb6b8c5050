"""Child process of tests/test_bucket_workdir.py: trains into a gs:// workdir on a local emulator.

Run as `python tests/bucket_child.py RESULTS_JSON` with the emulator's environment already set
(STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL, ...: the parent sets them before this process
starts, so they are in place before anything imports gcsfs or tensorstore). Python-level network
access to anything but localhost is refused and recorded (DNS lookups and connects); the C++
layers (tensorstore's curl, gRPC) get a dead proxy for every host but localhost.

Steps: a tiny quickstart-family model trained into gs://test-bucket/run, preempted at PREEMPT_AT, re-run to
the end; the same config uninterrupted into a local directory; then the `vitnorm.evaluate` CLI
(its main(), in this process) on the bucket workdir. Writes what it found to RESULTS_JSON.
"""
import json
import socket
import sys
import time

LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")
ATTEMPTS = []


def _guard_network():
  connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

  def check(address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in LOCAL_HOSTS and not host.startswith("/"):
      ATTEMPTS.append(str(address))
      raise OSError(f"test guard: no network access to {address} (only localhost)")

  def guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
      check(address)
    return connect(self, address)

  def guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
      check(address)
    return connect_ex(self, address)

  def guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None:
      check((host.decode() if isinstance(host, bytes) else host, 0))
    return getaddrinfo(host, *args, **kwargs)

  socket.socket.connect, socket.socket.connect_ex = guarded_connect, guarded_connect_ex
  socket.getaddrinfo = guarded_getaddrinfo


def main(results_path, local_workdir, bucket_workdir, num_steps, preempt_at):
  _guard_network()
  started = time.time()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  from vitnorm import evaluate as evaluate_cli, paths, workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vitnorm import checkpoints  # pylint: disable=g-import-not-at-top
  from vitnorm.training import loop  # pylint: disable=g-import-not-at-top

  def config(**debug):
    c = quickstart.get_config()
    # The quickstart family at its smallest: the 8x8 in-memory digits, a 2-block width-32 ViT (what
    # travels through the bucket, not the model, is under test here).
    c.data.name, c.data.image_size, c.data.random_shift_pad = "numpy:digits", 8, 1
    c.model.update(dict(image_size=8, patch_size=4, hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2))
    c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = num_steps, 50, 0, 50
    c.diagnostics_every, c.progress_bar = 0, "off"
    c.optim.ema_decay = 0.9  # the EMA (params and BN statistics) goes through the bucket too
    c.debug.update(debug)
    return c

  out = {"seconds": {"imports": time.time() - started}}
  first = loop.train_and_evaluate(config(preempt_at_step=preempt_at), bucket_workdir)
  out["first"] = dict(status=first["status"], step=first["step"],
                      status_file=workdir_lib.read_status(bucket_workdir)["status"],
                      steps=checkpoints.all_steps(bucket_workdir))
  out["seconds"]["first"] = first["wall_seconds"]
  second = loop.train_and_evaluate(config(), bucket_workdir)
  out["second"] = dict(status=second["status"], step=second["step"], workdir=second["workdir"],
                       checkpoint_dir=second["checkpoint_dir"], steps=checkpoints.all_steps(bucket_workdir),
                       status_file=workdir_lib.read_status(bucket_workdir)["status"])
  out["seconds"]["second"] = second["wall_seconds"]
  described = loop.describe_run(config(), bucket_workdir)  # --print_config on a bucket workdir
  out["described_workdir"] = next(l for l in described.splitlines() if l.startswith("workdir "))
  local = loop.train_and_evaluate(config(), local_workdir)
  out["seconds"]["local"] = local["wall_seconds"]
  out["local"] = dict(status=local["status"], step=local["step"], top1=local["metrics"]["eval/top1"])

  identical = True
  for use_ema in (False, True):
    a, _ = checkpoints.restore_variables(bucket_workdir, use_ema=use_ema)
    b, _ = checkpoints.restore_variables(local_workdir, use_ema=use_ema)
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)
    identical &= all(jax.tree.leaves(same)) and set(a) == set(b)
  out["identical"] = identical

  def losses(w):
    return [(r["step"], r["train/loss"]) for r in workdir_lib.read_metrics(w) if "train/loss" in r]
  out["losses"] = dict(bucket=losses(bucket_workdir), local=losses(local_workdir))
  out["tensorboard"] = sorted(p.name for p in paths.as_path(paths.join(bucket_workdir, "tensorboard")).iterdir())

  tick = time.time()
  evaluate_cli.define_flags()
  flags.FLAGS(["vitnorm.evaluate", "--workdir", bucket_workdir, "--no_throughput"])
  evaluate_cli.main(["vitnorm.evaluate"])  # the CLI's own main (exits 1 if the fold disagrees)
  report = json.loads(paths.read_text(paths.join(bucket_workdir, "evaluation.json")))
  out["evaluate"] = dict(top1=report["accuracy"]["as_trained"]["top1"],
                         folded_agrees=report["accuracy"].get("folded_agrees"),
                         workdir=report["source"]["workdir"])
  out["seconds"]["evaluate"] = time.time() - tick
  out["seconds"]["total"] = time.time() - started
  out["network_attempts"] = ATTEMPTS
  with open(results_path, "w", encoding="utf-8") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
