"""Checkpoints and the run config: save / restore round trip, keep-last-k, no overwrite,
restore_variables for other tools, and clear errors for missing or mismatching runs."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from vitnorm.model import vit
from vitnorm import checkpoints
from vitnorm.errors import UserError


def run_config(norm="batch", hidden=16):
  c = ml_collections.ConfigDict()
  c.model = common.model_config(variant=None, norm=norm, ffn_norm=norm, num_classes=3, image_size=8,
                                num_channels=1)
  c.model.update(dict(hidden_size=hidden, num_layers=1, mlp_dim=32, num_heads=2, patch_size=4))
  return c


@functools.lru_cache(maxsize=None)
def _initial_variables(norm, hidden):
  cfg = run_config(norm, hidden)
  model = vit.build_model(cfg.model)
  v = vit.init_variables(model, jax.random.PRNGKey(0), vit.input_shape(cfg.model, 1))
  return {k: v[k] for k in ("params", "batch_stats") if v.get(k)}


def variables_for(cfg, seed=0):
  """Distinct values per seed without compiling an init per call."""
  return jax.tree.map(lambda x: x + 0.01 * seed, _initial_variables(cfg.model.norm, cfg.model.hidden_size))


def write_run(workdir, cfg, steps=(1,), ema=False):
  checkpoints.write_run_config(workdir, cfg)
  ckpt = checkpoints.Checkpointer(workdir, keep=2, async_save=False)
  saved = {}
  for step in steps:
    item = variables_for(cfg, seed=step)
    if ema:
      item["ema_params"] = jax.tree.map(lambda x: x + 1.0, item["params"])
    ckpt.save(step, item, {"step": jnp.asarray(step), "opt_state": {"mu": item["params"]}})
    saved[step] = item
  ckpt.close()
  return saved


def test_roundtrip_keep_last_and_restore_variables(tmp_path):
  workdir = str(tmp_path)
  saved = write_run(workdir, run_config(), steps=(2, 4, 6), ema=True)
  assert checkpoints.all_steps(workdir) == [4, 6]  # keep=2
  assert checkpoints.latest_step(workdir) == 6
  assert checkpoints.checkpoint_dir(workdir) == os.path.join(workdir, "checkpoints")
  variables, step = checkpoints.restore_variables(workdir)
  assert step == 6 and set(variables) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, variables, {k: saved[6][k] for k in ("params", "batch_stats")})
  ema, _ = checkpoints.restore_variables(workdir, 4, use_ema=True)
  jax.tree.map(np.testing.assert_array_equal, ema["params"], saved[4]["ema_params"])
  jax.tree.map(np.testing.assert_array_equal, ema["batch_stats"], saved[4]["batch_stats"])


def test_trainer_restore_of_both_items(tmp_path):
  workdir = str(tmp_path)
  cfg = run_config()
  saved = write_run(workdir, cfg, steps=(3,))
  ckpt = checkpoints.Checkpointer(workdir, async_save=False)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), saved[3])
  model_item, train_item = ckpt.restore(3, target, {"step": jax.ShapeDtypeStruct((), jnp.int32),
                                                    "opt_state": {"mu": target["params"]}})
  ckpt.close()
  assert int(train_item["step"]) == 3
  jax.tree.map(np.testing.assert_array_equal, model_item, saved[3])
  jax.tree.map(np.testing.assert_array_equal, train_item["opt_state"]["mu"], saved[3]["params"])


def test_existing_step_is_never_overwritten(tmp_path):
  workdir = str(tmp_path)
  cfg = run_config()
  saved = write_run(workdir, cfg, steps=(5,))
  ckpt = checkpoints.Checkpointer(workdir, async_save=False)
  nan_item = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), saved[5])
  assert ckpt.save(5, nan_item, {"step": jnp.asarray(5), "opt_state": {}}) is False
  ckpt.close()
  variables, _ = checkpoints.restore_variables(workdir)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables))


def test_layernorm_run_has_no_batch_stats(tmp_path):
  write_run(str(tmp_path), run_config(norm="layer"), steps=(1,))
  variables, _ = checkpoints.restore_variables(str(tmp_path))
  assert set(variables) == {"params"}


def test_clear_errors(tmp_path):
  with pytest.raises(UserError, match="not a vitnorm training workdir"):
    checkpoints.load_run_config(str(tmp_path))
  checkpoints.write_run_config(str(tmp_path), run_config())
  with pytest.raises(UserError, match="no checkpoint in"):
    checkpoints.restore_variables(str(tmp_path))
  write_run(str(tmp_path), run_config(), steps=(1,))
  with pytest.raises(UserError, match="no checkpoint for step 7.*available steps: 1"):
    checkpoints.restore_variables(str(tmp_path), 7)
  with pytest.raises(UserError, match="kept no EMA"):
    checkpoints.restore_variables(str(tmp_path), use_ema=True)
  # The config now describes another model than the checkpoint holds.
  checkpoints.write_run_config(str(tmp_path), run_config(hidden=32))
  with pytest.raises(UserError, match="does not match the model of its config.json"):
    checkpoints.restore_variables(str(tmp_path))


def test_run_config_roundtrip(tmp_path):
  cfg = run_config()
  path = checkpoints.write_run_config(str(tmp_path), cfg)
  with open(path) as f:
    assert json.load(f)["model"]["norm"] == "batch"
  loaded = checkpoints.load_run_config(str(tmp_path))
  assert loaded.model.hidden_size == 16 and loaded.model.bn_group_size is None


def test_model_config_differences():
  a, b = run_config().model, run_config().model
  assert checkpoints.model_config_differences(a, b) == []
  b.dropout_rate = 0.1  # may change on resume
  assert checkpoints.model_config_differences(a, b) == []
  b.norm = "layer"
  b.bn_momentum = 0.99
  diffs = checkpoints.model_config_differences(a, b)
  assert "model.norm: 'batch' -> 'layer'" in diffs
  assert "model.bn_momentum: 0.9 -> 0.99" in diffs
  # A preset and the same sizes given explicitly are the same model.
  c = run_config().model
  c.update(dict(variant="Ti/16", hidden_size=None, num_layers=None, mlp_dim=None, num_heads=None,
                patch_size=None, image_size=32))
  d = ml_collections.ConfigDict(c.to_dict())
  d.update(dict(variant=None, hidden_size=192, num_layers=12, mlp_dim=768, num_heads=3, patch_size=16))
  assert checkpoints.model_config_differences(c, d) == []


def test_one_process_saves_replicated_arrays_without_slicing_them_per_replica(tmp_path):
  """Orbax's replica-parallel save would cut every array replicated on the 8 devices into 8
  parts, each an eagerly compiled slice; one process writes every array from one replica: no
  compilation per array, and the round trip is exact."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = [(24, 40), (40,), (12, 5, 8), (7, 16), (16, 3)]  # shapes no other test saves
  tree = {f"w{i}": jax.device_put(jnp.arange(np.prod(s), dtype=jnp.float32).reshape(s), replicated)
          for i, s in enumerate(shapes)}
  compiles = []
  listener = lambda name, _, **kw: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    assert ckpt.save(1, {"params": tree}, {"step": jnp.int32(1)})
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(compiles) <= 1, compiles  # one small program at most, not one per array and device
  restored = ckpt.restore(1, {"params": tree}, {"step": jnp.int32(0)})
  jax.tree.map(np.testing.assert_array_equal, restored[0]["params"], tree)
  ckpt.close()
