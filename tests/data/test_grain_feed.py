"""vitnorm.data.grain_feed: ArrayRecord + Grain, one global order for every process count.

A 2-process run (2 x 1 CPU device) and a 1-process run (1 x 2) read identical global batches
(assembled on the devices and gathered back); a resume at step k yields batch k; the first global
epoch is the split once; no TensorFlow is imported.
"""
import collections
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vitnorm.data import config as config_lib
from vitnorm.data import global_order, grain_feed, imagenet_like, pil_preprocess
from vitnorm.errors import ConfigError
import xla_test_flags  # tests/xla_test_flags.py (tests/ is on sys.path: conftest.py)

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    port, pid, nproc, devices, data_dir, start, out = sys.argv[1:8]
    pid, nproc, devices, start = int(pid), int(nproc), int(devices), int(start)
    jax.config.update("jax_num_cpu_devices", devices)
    if nproc > 1:
      jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    import numpy as np
    from jax.experimental import multihost_utils
    import vitnorm.data as data
    from vitnorm.data import device

    cfg = data.default_data_config(name="imagenet_like/tiny", data_dir=data_dir, image_size=16,
                                   inception_crop=False, reader="grain")
    batches = data.train_batches(cfg, global_batch_size=8, seed=5, start_step=start)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.NamedSharding(mesh, jax.P("data"))
    out_batches = []
    for _ in range(8):
      global_batch = device.to_global_arrays(next(batches), sharding)
      gathered = multihost_utils.process_allgather(global_batch, tiled=True)
      out_batches.append({k: np.asarray(v).tolist() for k, v in gathered.items()})
    assert "tensorflow" not in sys.modules, "the grain feed imported TensorFlow"
    if pid == 0:
      json.dump(out_batches, open(out, "w"))
    if nproc > 1:
      jax.distributed.shutdown()
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds"))
  imagenet_like.prepare("tiny", root, file_format="array_record")
  return root


def _run(tmp_path, data_dir, nproc, devices, start, tag):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=xla_test_flags.xla_flags())
  out = tmp_path / f"{tag}.json"
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), str(nproc), str(devices),
                             data_dir, str(start), str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(nproc)]
  for p in procs:
    log, _ = p.communicate(timeout=240)
    assert p.returncode == 0, log.decode()[-3000:]
  return json.loads(out.read_text())


def test_two_processes_and_one_read_the_same_global_batches_and_resume_at_step_k(tmp_path, data_dir):
  two = _run(tmp_path, data_dir, nproc=2, devices=1, start=0, tag="two")
  one = _run(tmp_path, data_dir, nproc=1, devices=2, start=0, tag="one")
  resumed = _run(tmp_path, data_dir, nproc=2, devices=1, start=3, tag="resumed")
  assert len(two) == len(one) == 8
  for k in range(8):
    for key in ("image", "label"):
      np.testing.assert_array_equal(two[k][key], one[k][key], err_msg=f"batch {k} {key}")
  for k in range(5):  # the resumed run's i-th batch is batch 3 + i
    np.testing.assert_array_equal(resumed[k]["image"], two[3 + k]["image"])
  # The first global epoch (48 records = 6 batches of 8) is the split once, in a shuffled order;
  # the second epoch is another order.
  cfg = config_lib.resolve_data_config(dict(name="imagenet_like/tiny", data_dir=data_dir, image_size=16,
                                            inception_crop=False, reader="grain"))
  source = grain_feed._source(cfg, "train", "image", "data.train_split")  # pylint: disable=protected-access
  records = [(pil_preprocess.train_crop(source[i]["image"], None, cfg, 3).tobytes(), int(source[i]["label"]))
             for i in range(len(source))]
  rows = [(np.asarray(b["image"], np.uint8)[r].tobytes(), b["label"][r]) for b in two for r in range(8)]
  assert collections.Counter(rows[:48]) == collections.Counter(records)
  assert rows[:48] != records and rows[48:64] != rows[:16]


def test_order_is_the_documented_function_of_seed_and_position():
  n = 10
  perm = global_order.epoch_permutation(7, 2, n)
  assert sorted(perm) == list(range(n))
  assert list(perm) == list(np.random.default_rng([7, global_order.ORDER_SALT, 2]).permutation(n))
  assert global_order.record_index(7, 2 * n + 3, n) == perm[3]
  assert list(global_order.epoch_permutation(8, 2, n)) != list(perm)
  # process 1 of 2, local batch 4: its 6th example is row 5 of global batch 1 = position 13
  assert global_order.global_position(5, 1, 2, 4) == 13
  assert [global_order.global_position(t, 0, 2, 4) for t in range(8)] == [0, 1, 2, 3, 8, 9, 10, 11]


def test_random_crop_box_lies_inside_and_matches_the_area_and_aspect_ranges():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, w, h = pil_preprocess.random_resized_crop_box(rng, 500, 375, 0.08)
    assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
    assert 0.08 * 500 * 375 * 0.97 <= w * h <= 500 * 375
    assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_tfrecord_data_is_refused_with_the_fix(tmp_path):
  tfrecord_dir = str(tmp_path / "tfrecord")
  imagenet_like.prepare("tiny", tfrecord_dir)
  with pytest.raises(ConfigError, match=r"data\.reader: .*array_record"):
    grain_feed.dataset_info(dict(name="imagenet_like/tiny", data_dir=tfrecord_dir, reader="grain"))
  with pytest.raises(ConfigError, match=r"data\.reader"):
    config_lib.resolve_data_config(dict(name="x", reader="dali"))


def test_eval_batches_cover_the_split_once_over_processes(data_dir):
  cfg = dict(name="imagenet_like/tiny", data_dir=data_dir, image_size=16, reader="grain",
             eval_split="validation")
  parts = [list(grain_feed.eval_batches(cfg, global_batch_size=6, process_index=p, process_count=2))
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == grain_feed.num_eval_batches(cfg, global_batch_size=6,
                                                                       process_count=2) == 3
  labels = [int(l) for part in parts for b in part for l, m in zip(b["label"], b["mask"]) if m]
  assert sorted(labels) == sorted(i % 10 for i in range(16))


def test_grain_worker_processes_yield_the_same_batches(data_dir):
  base = dict(name="imagenet_like/tiny", data_dir=data_dir, image_size=16, reader="grain")
  threads = grain_feed.train_batches(base, global_batch_size=8, seed=2, process_index=0, process_count=1)
  workers = grain_feed.train_batches(dict(base, grain_workers=2), global_batch_size=8, seed=2,
                                     process_index=0, process_count=1)
  for _ in range(7):  # past the end of the first epoch
    a, b = next(threads), next(workers)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  del workers


def test_randaugment_runs_on_the_host_after_the_crop(data_dir):
  base = dict(name="imagenet_like/tiny", data_dir=data_dir, image_size=16, reader="grain")
  plain = next(grain_feed.train_batches(base, global_batch_size=8, seed=2, process_index=0, process_count=1))
  ra = next(grain_feed.train_batches(dict(base, randaugment_layers=2), global_batch_size=8, seed=2,
                                     process_index=0, process_count=1))
  np.testing.assert_array_equal(plain["label"], ra["label"])  # same order
  changed = [not np.array_equal(a, b) for a, b in zip(plain["image"], ra["image"])]
  assert 0 < sum(changed) < 8  # each of 2 ops applies with p = 0.5: some images keep their crop
