"""`python -m vitnorm.train --config.init_from=FILE.npz` with an AugReg-style checkpoint (in-process).

The file is what google-research/vision_transformer's AugReg releases look like: flat '/'-joined
keys with the pre-Linen module numbering (MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3), a tanh `pre_logits` layer, an ImageNet-21k head of 21,843 classes and position
embeddings for a 14 x 14 patch grid. The run (a tiny LN ViT on 8 x 8 digits with 2 x 2 patches: a
4 x 4 grid, 10 classes) trains one step at learning rate 0 (the warm-up's first value), so its
first checkpoint holds the weights it started from: every encoder and embedding array of the file,
the position embeddings resized 14 x 14 -> 4 x 4, a fresh 10-class head and no pre_logits.
"""
import flax
import jax
import numpy as np
import pytest

from test_train_cli import TINY_CONFIG
from vitnorm import checkpoints
from vitnorm.model import pretrained, vit

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections

WIDTH, PATCH, IMAGE = 32, 2, 8  # TINY_CONFIG's width; 2 x 2 patches of the 8 x 8 digits
AUGREG_CLASSES, AUGREG_GRID = 21_843, 14
PRE_LINEN = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
             "MlpBlock_0": "MlpBlock_3"}


def _augreg_npz(path):
  """Writes an AugReg-style .npz for the tiny model's encoder; returns its flat {key: array}."""
  model = vit.build_model(dict(hidden_size=WIDTH, num_layers=2, mlp_dim=64, num_heads=2, patch_size=PATCH,
                               num_classes=AUGREG_CLASSES, image_size=AUGREG_GRID * PATCH, num_channels=1,
                               representation_size=WIDTH, norm="layer"))
  params = vit.init_variables(model, jax.random.key(123), (1, AUGREG_GRID * PATCH, AUGREG_GRID * PATCH, 1))["params"]
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  rng = np.random.default_rng(0)
  arrays = {}
  for key, value in flat.items():
    parts = key.split("/")
    if len(parts) > 2 and parts[1].startswith("encoderblock_"):
      parts[2] = PRE_LINEN.get(parts[2], parts[2])
    # Noise on everything: no array equals a fresh initialisation (zero head, unit LN scales).
    arrays["/".join(parts)] = (np.asarray(value) + rng.normal(0, 0.05, value.shape)).astype(np.float32)
  assert {"pre_logits/kernel", "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel",
          "Transformer/encoderblock_0/LayerNorm_2/scale",
          "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"} <= set(arrays)
  assert arrays["head/kernel"].shape == (WIDTH, AUGREG_CLASSES)
  assert arrays["Transformer/posembed_input/pos_embedding"].shape == (1, 1 + AUGREG_GRID ** 2, WIDTH)
  np.savez(path, **arrays)
  return arrays


def test_training_starts_from_an_augreg_npz(tmp_path, run_cli):
  config = tmp_path / "tiny.py"
  config.write_text(TINY_CONFIG)
  npz = str(tmp_path / "augreg_ti.npz")
  arrays = _augreg_npz(npz)
  workdir = tmp_path / "run"
  code, out, err = run_cli("train", f"--config={config}:variant=ln", f"--workdir={workdir}",
                           "--config.data.name=numpy:digits", f"--config.model.patch_size={PATCH}",
                           f"--config.init_from={npz}", "--config.num_steps=1", "--config.optim.warmup_steps=1",
                           "--config.eval_every=0", "--config.checkpoint_every=1")
  assert code == 0, err
  assert f"weights from {npz})" in out  # the start header names the source

  variables, step = checkpoints.restore_variables(str(workdir), 1)
  assert step == 1
  got = flax.traverse_util.flatten_dict(jax.device_get(variables["params"]), sep="/")
  grid = IMAGE // PATCH
  renamed = {}
  for key, value in arrays.items():
    parts = key.split("/")
    if len(parts) > 2 and parts[1].startswith("encoderblock_"):
      parts[2] = {v: k for k, v in PRE_LINEN.items()}.get(parts[2], parts[2])
    renamed["/".join(parts)] = value
  posemb = "Transformer/posembed_input/pos_embedding"
  assert set(got) == set(renamed) - {"pre_logits/kernel", "pre_logits/bias"}  # the model has no pre_logits
  for key, value in got.items():
    if key.startswith("head/") or key == posemb:
      continue
    np.testing.assert_array_equal(value, renamed[key], err_msg=key)  # lr 0: the loaded values exactly
  # The position embeddings: CLS row as loaded, the 14 x 14 grid resized to 4 x 4 (bilinear,
  # corners on corners).
  assert got[posemb].shape == (1, 1 + grid ** 2, WIDTH)
  np.testing.assert_array_equal(got[posemb][:, :1], renamed[posemb][:, :1])
  np.testing.assert_allclose(got[posemb], pretrained.resize_position_embeddings(renamed[posemb], 1 + grid ** 2, 1),
                             rtol=0, atol=1e-6)
  source_grid = renamed[posemb][0, 1:].reshape(AUGREG_GRID, AUGREG_GRID, WIDTH)
  new_grid = got[posemb][0, 1:].reshape(grid, grid, WIDTH)
  np.testing.assert_allclose(new_grid[0, 0], source_grid[0, 0], rtol=1e-6)
  np.testing.assert_allclose(new_grid[-1, -1], source_grid[-1, -1], rtol=1e-6)
  # A fresh head for the 10 digit classes (vitnorm initialises it to zero), not a slice of the 21k one.
  assert got["head/kernel"].shape == (WIDTH, 10) and got["head/bias"].shape == (10,)
  assert not np.array_equal(got["head/kernel"], renamed["head/kernel"][:, :10])
  np.testing.assert_array_equal(got["head/kernel"], 0.0)
