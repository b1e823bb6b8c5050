"""Checkpoints that can be trusted: every kind of damage to the latest checkpoint is found by its
manifest, moved aside, and the run resumes bit-identical from the newest step that verifies; none
verifying is one error line (exit 2) with nothing moved; rotation keeps the newest verified step;
evaluation verifies too; a second run on a running workdir is refused; a full disk stops the run
with one error line and the same command resumes bit-identical once space is free.

One tiny run (24 steps, checkpoints 8 / 16 / 24) is trained per module and copied per case."""
import os
import shutil
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training.test_loop import tiny_config  # tests/ is on sys.path (its conftest.py); tests/training is a namespace package
from vitnorm import errors, workdir as run_logging
from vitnorm.errors import UserError
from vitnorm import checkpoints, checkpoint_integrity as integrity
from vitnorm.training import loop, workdir_lock


def params_of(workdir, step=None):
  variables, got = checkpoints.restore_variables(workdir, step)
  return jax.tree.map(np.asarray, variables), got


def snapshot(workdir, skip=()):
  """{relative path: bytes} of every file (directories as None), except the names in skip."""
  out = {}
  for root, dirs, files in os.walk(workdir):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), workdir)] = None
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return {k: v for k, v in out.items() if k not in skip}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The reference run; while it runs, a second run on the same workdir is attempted once."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  second = {}
  original_save = checkpoints.Checkpointer.save

  def save_and_try_a_second_run(self, step, *args, **kwargs):
    if not second:
      second["before"] = snapshot(workdir, skip=(workdir_lock.LOCK_FILE,))  # refreshed meanwhile
      second["lock"] = open(os.path.join(workdir, workdir_lock.LOCK_FILE)).read()
      try:
        loop.train_and_evaluate(tiny_config(), workdir)
        second["error"] = None
      except UserError as e:
        second["error"] = str(e)
      second["after"] = snapshot(workdir, skip=(workdir_lock.LOCK_FILE,))
    return original_save(self, step, *args, **kwargs)

  mp = pytest.MonkeyPatch()
  mp.setattr(checkpoints.Checkpointer, "save", save_and_try_a_second_run)
  try:
    summary = loop.train_and_evaluate(tiny_config(), workdir)
  finally:
    mp.undo()
  assert summary["status"] == "completed" and checkpoints.all_steps(workdir) == [8, 16, 24]
  return workdir, params_of(workdir)[0], second


def copy_run(trained, tmp_path):
  target = str(tmp_path / "copy")
  shutil.copytree(trained[0], target)
  return target


def _data_file(step_dir):
  """The largest array data file of the model item (ocdbt data under model/ocdbt.process_0/d)."""
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "model")) for n in ns
           if os.sep + "d" + os.sep in os.path.join(r, n) + os.sep or os.path.basename(r) == "d"]
  return max(files, key=os.path.getsize)


def _flip_bits(path, count=3):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(count):
      data[len(data) // 2 + 7 * i] ^= 1 << i
    f.seek(0)
    f.write(data)


def damage(step_dir, kind):
  data = _data_file(step_dir)
  if kind == "truncated":
    os.truncate(data, os.path.getsize(data) // 2)
  elif kind == "emptied":
    open(data, "wb").close()
  elif kind == "deleted_data":
    os.remove(data)
  elif kind == "garbage_metadata":
    path = os.path.join(step_dir, "model", "_METADATA")
    size = os.path.getsize(path)
    with open(path, "wb") as f:
      f.write(b"\x00garbage!" * (size // 9) + b"x" * (size % 9))  # same size: only the hash tells
  elif kind == "empty_step_dir":
    shutil.rmtree(step_dir)
    os.mkdir(step_dir)
  elif kind == "deleted_item":
    shutil.rmtree(os.path.join(step_dir, "train"))
  elif kind == "flipped_bits":
    _flip_bits(data)
  elif kind == "deleted_manifest":
    os.remove(os.path.join(step_dir, integrity.MANIFEST_FILE))
  elif kind == "garbage_manifest":
    with open(os.path.join(step_dir, integrity.MANIFEST_FILE), "w") as f:
      f.write("{not json")
  else:
    raise ValueError(kind)


KINDS = ["truncated", "emptied", "deleted_data", "garbage_metadata", "empty_step_dir", "deleted_item",
         "flipped_bits", "deleted_manifest", "garbage_manifest"]


def test_every_checkpoint_has_a_manifest_that_verifies(trained):
  directory = checkpoints.checkpoint_dir(trained[0])
  for step in (8, 16, 24):
    assert integrity.damage(os.path.join(directory, str(step))) is None
  assert not os.path.exists(os.path.join(trained[0], workdir_lock.LOCK_FILE))  # released at the end


@pytest.mark.parametrize("kind", KINDS)
def test_damaged_latest_is_detected_and_moved_aside(trained, tmp_path, kind):
  workdir = copy_run(trained, tmp_path)
  directory = checkpoints.checkpoint_dir(workdir)
  damage(os.path.join(directory, "24"), kind)
  assert integrity.damage(os.path.join(directory, "24")) is not None
  warnings = []
  ckpt = checkpoints.Checkpointer(workdir, async_save=False, warn=warnings.append)
  assert ckpt.restorable_step() == 16
  ckpt.close()
  assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint 24 in ")
  assert "damaged" in warnings[0] and "24.corrupt" in warnings[0] and "\n" not in warnings[0]
  assert os.path.isdir(os.path.join(directory, "24.corrupt"))  # moved aside, never deleted
  assert checkpoints.all_steps(workdir) == [8, 16]


@pytest.mark.parametrize("kind", ["flipped_bits", "deleted_item"])
def test_run_resumes_bit_identical_from_the_newest_verified_step(trained, tmp_path, capsys, kind):
  workdir = copy_run(trained, tmp_path)
  damage(os.path.join(checkpoints.checkpoint_dir(workdir), "24"), kind)
  summary = loop.train_and_evaluate(tiny_config(), workdir)
  assert summary["status"] == "completed" and summary["step"] == 24
  assert "Resuming" in capsys.readouterr().out
  resumed, step = params_of(workdir)
  assert step == 24
  jax.tree.map(np.testing.assert_array_equal, resumed, trained[1])  # bit-identical
  assert checkpoints.all_steps(workdir) == [8, 16, 24]  # rotation kept the verified ones
  assert os.path.isdir(os.path.join(checkpoints.checkpoint_dir(workdir), "24.corrupt"))


def test_when_no_checkpoint_verifies_one_error_line_exit_2_nothing_moved(trained, tmp_path, capsys):
  workdir = copy_run(trained, tmp_path)
  directory = checkpoints.checkpoint_dir(workdir)
  for step, kind in ((8, "flipped_bits"), (16, "emptied"), (24, "deleted_item")):
    damage(os.path.join(directory, str(step)), kind)
  before = snapshot(workdir)
  with pytest.raises(SystemExit) as exit_info:
    errors.exit_on_user_error(loop.train_and_evaluate)(tiny_config(), workdir)
  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[-1].startswith("error: workdir: none of the 3 checkpoints in ") and "verifies" in lines[-1]
  assert "nothing was moved or deleted" in lines[-1]
  assert snapshot(workdir) == before


def test_evaluate_verifies_the_same_way(trained, tmp_path, capsys):
  from vitnorm.inference import run_report
  workdir = copy_run(trained, tmp_path)
  damage(os.path.join(checkpoints.checkpoint_dir(workdir), "24"), "flipped_bits")
  before = snapshot(workdir)
  _, _, variables, source = run_report.load_model(workdir, None)
  assert source["step"] == 16
  assert "warning: checkpoint 24 in " in capsys.readouterr().err
  expected, _ = params_of(trained[0], 16)
  np.testing.assert_array_equal(np.asarray(variables["params"]["head"]["kernel"]),
                                expected["params"]["head"]["kernel"])
  with pytest.raises(UserError, match=r"^step: checkpoint 24 in .* is damaged"):
    checkpoints.restore_variables(workdir, 24)
  assert snapshot(workdir) == before  # readers never move checkpoints


def test_rotation_never_deletes_the_newest_verified_checkpoint(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  item = {"params": {"w": jnp.arange(4.0)}}
  train = {"step": jnp.asarray(0), "opt_state": {}}
  ckpt = checkpoints.Checkpointer(workdir, keep=1, async_save=False)
  ckpt.save(1, item, train)
  real = integrity.write_manifest
  monkeypatch.setattr(integrity, "write_manifest", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
  with pytest.raises(OSError):
    ckpt.save(2, item, train)  # committed by orbax, but no manifest: it does not count
  assert ckpt.all_steps() == [1, 2]
  monkeypatch.setattr(integrity, "write_manifest", real)
  ckpt.save(3, item, train)
  ckpt.close()
  assert ckpt.all_steps() == [3]
  # Asynchronous saves get their manifests after the commit, and the same rotation.
  ckpt = checkpoints.Checkpointer(workdir, keep=2, async_save=True)
  for step in (4, 5, 6):
    ckpt.save(step, item, train)
  ckpt.close()
  assert ckpt.all_steps() == [5, 6]
  assert all(integrity.damage(os.path.join(ckpt.directory, str(s))) is None for s in (5, 6))


def test_a_second_run_while_the_first_trains_is_refused_and_changes_nothing(trained):
  second = trained[2]
  assert second["error"] is not None, "the second run was not refused"
  assert second["error"].startswith("workdir: ") and "in use by another training run" in second["error"]
  assert f"pid {os.getpid()}" in second["error"]
  assert f'"pid": {os.getpid()}' in second["lock"]
  assert second["after"] == second["before"]


# ----------------------------------------------------------------------------------------------
# Disk full
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_filesystem(tmp_path):
  mount = tmp_path / "tiny"
  mount.mkdir()
  if os.geteuid() != 0:
    pytest.skip("the disk-full test mounts a 16 MiB tmpfs, which needs root")
  proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if proc.returncode:
    pytest.skip(f"cannot mount a tmpfs here (mount said: {proc.stderr.strip()})")
  try:
    yield str(mount)
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_stops_with_one_error_line_and_resumes_bit_identical(trained, tiny_filesystem,
                                                                       monkeypatch, capsys):
  workdir = os.path.join(tiny_filesystem, "run")
  ballast = os.path.join(tiny_filesystem, "ballast")
  original_save = checkpoints.Checkpointer.save

  def save_then_fill_the_disk(self, step, *args, **kwargs):
    out = original_save(self, step, *args, **kwargs)
    if step == 8:  # fill the disk, leaving less than a checkpoint needs
      with open(ballast, "wb", buffering=0) as f:
        try:
          while True:
            f.write(b"\0" * 65536)
        except OSError:
          pass
      os.truncate(ballast, os.path.getsize(ballast) - 48 * 1024)
    return out

  monkeypatch.setattr(checkpoints.Checkpointer, "save", save_then_fill_the_disk)
  started = time.time()
  with pytest.raises(loop.WorkdirFull) as err:
    loop.train_and_evaluate(tiny_config(), workdir)
  assert time.time() - started < 120
  message = str(err.value)
  assert "\n" not in message and "no space left" in message and "run the same command again" in message
  status = run_logging.read_status(workdir)
  assert status["status"] == "failed" and "no space left" in status["reason"]
  steps = checkpoints.all_steps(workdir)
  assert steps and steps[0] == 8
  for step in steps:
    assert integrity.damage(os.path.join(checkpoints.checkpoint_dir(workdir), str(step))) is None
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  # After freeing space the same command resumes, bit-identical to the uninterrupted run.
  monkeypatch.setattr(checkpoints.Checkpointer, "save", original_save)
  os.remove(ballast)
  summary = loop.train_and_evaluate(tiny_config(), workdir)
  assert summary["status"] == "completed" and summary["step"] == 24
  resumed, _ = params_of(workdir)
  jax.tree.map(np.testing.assert_array_equal, resumed, trained[1])


def test_out_of_space_is_told_from_other_errors():
  from vitnorm.training import disk_full
  wrapped = ValueError("RESOURCE_EXHAUSTED: Failed to write 524 bytes to file 18: No space left on device")
  assert disk_full.out_of_space(wrapped) and disk_full.out_of_space(OSError(28, "full"))
  try:
    try:
      raise OSError(122, "Disk quota exceeded")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as outer:
    assert disk_full.out_of_space(outer)
  assert not disk_full.out_of_space(ValueError("shape mismatch")) and not disk_full.out_of_space(OSError(13, "x"))


def test_hashing_benchmark_runs_in_tiny_mode(monkeypatch, capsys):
  from experiments import checkpoint_hashing
  monkeypatch.setattr("sys.argv", ["checkpoint_hashing", "--tiny", "--repeats=1"])
  checkpoint_hashing.main()
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("model tiny: ") and "1 saves each way" in out[0]
  assert out[1].startswith("save without hashing (sizes only): ") and " ratio " in out[1]
  assert out[2].startswith("verify at resume (integrity.damage): ")


def test_checkpoints_that_predate_manifests_are_adopted_with_a_warning(trained, tmp_path, capsys):
  workdir = copy_run(trained, tmp_path)
  directory = checkpoints.checkpoint_dir(workdir)
  for step in (8, 16, 24):
    os.remove(os.path.join(directory, str(step), integrity.MANIFEST_FILE))
  variables, step = params_of(workdir)  # evaluation reads them unverified
  assert step == 24 and "predate integrity manifests; reading them unverified" in capsys.readouterr().err
  warnings = []
  ckpt = checkpoints.Checkpointer(workdir, async_save=False, warn=warnings.append)
  assert ckpt.restorable_step() == 24
  ckpt.close()
  assert len(warnings) == 1 and "recorded manifests of steps 8, 16, 24 as they are" in warnings[0]
  assert all(integrity.damage(os.path.join(directory, str(s))) is None for s in (8, 16, 24))
