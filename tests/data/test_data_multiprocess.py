"""Two real JAX processes on localhost (2 CPU devices each) read one dataset through the defaults.

Each process takes its part from jax.process_index(); the parts are disjoint and cover the split
(train, cached: its slice of each global batch of one global order, the first global epoch is the
split once; eval: every example once);
both yield the same number of eval batches; to_global_arrays assembles a global batch.
"""
import collections
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow_datasets as tfds

import vitnorm.data as data
import xla_test_flags  # tests/xla_test_flags.py (tests/ is on sys.path: conftest.py)

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    port, pid, data_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    import vitnorm.data as data
    from vitnorm.data import device

    cfg = data.default_data_config(name="digits", data_dir=data_dir, image_size=8, inception_crop=False,
                                   hflip=False, normalize_mean=(0.0,), normalize_std=(1 / 255,),
                                   eval_crop_fraction=1.0, cache=True)
    train = data.train_batches(cfg, global_batch_size=8, seed=0)
    batch = next(train)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    global_batch = device.to_global_arrays(batch, sharding)
    gathered = multihost_utils.process_allgather(global_batch["label"], tiled=True)
    gathered_images = multihost_utils.process_allgather(global_batch["image"], tiled=True)
    # This process's first 180 local batches of 4 (720 rows: one epoch of its ~719-example part).
    stream = [batch] + [next(train) for _ in range(179)]
    train_rows = [(b["image"][i].round().astype(np.uint8).tobytes().hex(), int(b["label"][i].argmax()))
                  for b in stream for i in range(len(b["label"]))]
    evals = list(data.eval_batches(cfg, global_batch_size=64))
    rows = [(b["image"][i].round().astype(np.uint8).tobytes().hex(), int(b["label"][i]))
            for b in evals for i in np.flatnonzero(b["mask"])]
    json.dump({"global_shape": list(global_batch["image"].shape), "local_label": batch["label"].tolist(),
               "gathered": np.asarray(gathered).tolist(), "num_eval": len(evals),
               "local_image": batch["image"].tolist(), "gathered_image": np.asarray(gathered_images).tolist(),
               "train_rows": train_rows,
               "expected_eval": data.num_eval_batches(cfg, global_batch_size=64), "rows": rows},
              open(out, "w"))
    jax.distributed.shutdown()
""")


def _train_split_rows(data_dir):
  arrays = tfds.as_numpy(tfds.builder("digits", data_dir=data_dir).as_dataset(split="train", batch_size=-1))
  return collections.Counter((img.astype(np.uint8).tobytes().hex(), int(label))
                             for img, label in zip(arrays["image"], arrays["label"]))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_covering_parts(tmp_path):
  data_dir = str(tmp_path / "tfds")
  data.dataset_info({"name": "digits", "data_dir": data_dir, "normalize_mean": (0.5,), "normalize_std": (0.5,)})
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_test_flags.xla_flags())
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), data_dir, str(tmp_path / f"{i}.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out.decode()[-3000:]
  results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
  for r in results:
    assert r["global_shape"] == [8, 8, 8, 1]
    assert r["num_eval"] == r["expected_eval"] == 6  # 360 / 2 = 180 per process: 6 batches of 32, padded
  # The global batch holds process 0's rows, then process 1's.
  np.testing.assert_array_equal(results[0]["gathered"], results[0]["local_label"] + results[1]["local_label"])
  np.testing.assert_array_equal(results[0]["gathered_image"],
                                results[0]["local_image"] + results[1]["local_image"])  # images too
  # Training (cache=True): every process walks the same global order and takes its slice of each
  # global batch (process 0 rows 0-3, process 1 rows 4-7), so the first epoch of the global
  # stream (1,437 rows) is the train split once, and the two processes' rows in it are disjoint.
  n_train = tfds.builder("digits", data_dir=data_dir).info.splits["train"].num_examples
  assert n_train == 1437
  local = [[tuple(r) for r in res["train_rows"]] for res in results]
  global_rows = [row for k in range(180) for part in local for row in part[4 * k:4 * k + 4]]
  first_epoch = global_rows[:n_train]
  assert collections.Counter(first_epoch) == _train_split_rows(data_dir)
  owner = [p for k in range(180) for p in (0, 1) for _ in range(4)][:n_train]
  by_process = [collections.Counter(r for r, o in zip(first_epoch, owner) if o == p) for p in (0, 1)]
  assert len(set(by_process[0]) & set(by_process[1])) == 0
  rows = [tuple(r) for res in results for r in res["rows"]]
  assert len(rows) == 360  # every example once over both processes (the multiset check below)
  expected = data.eval_batches(data.default_data_config(
      name="digits", data_dir=data_dir, image_size=8, inception_crop=False, hflip=False,
      normalize_mean=(0.0,), normalize_std=(1 / 255,), eval_crop_fraction=1.0), global_batch_size=360)
  (whole,) = list(expected)
  assert sorted(rows) == sorted((img.round().astype(np.uint8).tobytes().hex(), int(label))
                                for img, label in zip(whole["image"], whole["label"]))
