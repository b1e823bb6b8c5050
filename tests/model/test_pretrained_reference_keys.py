"""The key names of real reference checkpoints, written out literally (not derived from the loader's
own rename table), load into the LayerNorm ViT.

Layout: google-research/vision_transformer ViT-Ti/16 at 224 px with a 1,000-class head (AugReg
`Ti_16-i21k-300ep-...--imagenet2012-...npz` files use the pre-Linen numbering; current Linen
checkpoints the _0 / LayerNorm_1 one; see /work/shared/PAPER.md). Two of the twelve blocks keep the
test small; the values are random, one distinct array per key, so any mix-up of keys shows.
"""
import jax
import numpy as np
import pytest

from vitnorm.model import pretrained, vit

HIDDEN, HEADS, HEAD_DIM, MLP, CLASSES = 192, 3, 64, 768, 1000

COMMON = {
    "cls": (1, 1, HIDDEN),
    "embedding/kernel": (16, 16, 3, HIDDEN),
    "embedding/bias": (HIDDEN,),
    "Transformer/posembed_input/pos_embedding": (1, 197, HIDDEN),
    "Transformer/encoder_norm/scale": (HIDDEN,),
    "Transformer/encoder_norm/bias": (HIDDEN,),
    "head/kernel": (HIDDEN, CLASSES),
    "head/bias": (CLASSES,),
}

# (pre-Linen key inside Transformer/encoderblock_i, the Linen key it is, shape).
BLOCK = [
    ("LayerNorm_0/scale", "LayerNorm_0/scale", (HIDDEN,)),
    ("LayerNorm_0/bias", "LayerNorm_0/bias", (HIDDEN,)),
    ("MultiHeadDotProductAttention_1/query/kernel", "MultiHeadDotProductAttention_0/query/kernel", (HIDDEN, HEADS, HEAD_DIM)),
    ("MultiHeadDotProductAttention_1/query/bias", "MultiHeadDotProductAttention_0/query/bias", (HEADS, HEAD_DIM)),
    ("MultiHeadDotProductAttention_1/key/kernel", "MultiHeadDotProductAttention_0/key/kernel", (HIDDEN, HEADS, HEAD_DIM)),
    ("MultiHeadDotProductAttention_1/key/bias", "MultiHeadDotProductAttention_0/key/bias", (HEADS, HEAD_DIM)),
    ("MultiHeadDotProductAttention_1/value/kernel", "MultiHeadDotProductAttention_0/value/kernel", (HIDDEN, HEADS, HEAD_DIM)),
    ("MultiHeadDotProductAttention_1/value/bias", "MultiHeadDotProductAttention_0/value/bias", (HEADS, HEAD_DIM)),
    ("MultiHeadDotProductAttention_1/out/kernel", "MultiHeadDotProductAttention_0/out/kernel", (HEADS, HEAD_DIM, HIDDEN)),
    ("MultiHeadDotProductAttention_1/out/bias", "MultiHeadDotProductAttention_0/out/bias", (HIDDEN,)),
    ("LayerNorm_2/scale", "LayerNorm_1/scale", (HIDDEN,)),
    ("LayerNorm_2/bias", "LayerNorm_1/bias", (HIDDEN,)),
    ("MlpBlock_3/Dense_0/kernel", "MlpBlock_0/Dense_0/kernel", (HIDDEN, MLP)),
    ("MlpBlock_3/Dense_0/bias", "MlpBlock_0/Dense_0/bias", (MLP,)),
    ("MlpBlock_3/Dense_1/kernel", "MlpBlock_0/Dense_1/kernel", (MLP, HIDDEN)),
    ("MlpBlock_3/Dense_1/bias", "MlpBlock_0/Dense_1/bias", (HIDDEN,)),
]
NUM_BLOCKS = 2


def reference_arrays(numbering):
  """{stored key: array} of a checkpoint in that numbering, and {Linen key: the same array}."""
  rng = np.random.RandomState(0)
  stored, linen = {}, {}
  for key, shape in COMMON.items():
    stored[key] = linen[key] = rng.randn(*shape).astype(np.float32)
  for i in range(NUM_BLOCKS):
    for pre_linen_key, linen_key, shape in BLOCK:
      value = rng.randn(*shape).astype(np.float32)
      prefix = f"Transformer/encoderblock_{i}/"
      stored[prefix + (pre_linen_key if numbering == "pre_linen" else linen_key)] = value
      linen[prefix + linen_key] = value
  return stored, linen


def ti16_model():
  return vit.build_model(dict(variant="Ti/16", num_layers=NUM_BLOCKS, num_classes=CLASSES, image_size=224))


def test_the_models_parameter_paths_are_the_linen_reference_names():
  shapes = jax.eval_shape(lambda: ti16_model().init(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32),
                                                    train=False))["params"]
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(v.shape)
          for p, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
  _, linen = reference_arrays("linen")
  assert flat == {k: v.shape for k, v in linen.items()}


@pytest.mark.parametrize("numbering", ["pre_linen", "linen"])
def test_reference_key_names_load_each_array_into_its_place(tmp_path, numbering):
  stored, linen = reference_arrays(numbering)
  if numbering == "pre_linen":
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel" in stored
    assert not any("MlpBlock_0" in k or "LayerNorm_1" in k for k in stored)
  path = str(tmp_path / "Ti_16.npz")
  np.savez(path, **stored)
  loaded = pretrained.load_npz(path)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v
          for p, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
  assert set(flat) == set(linen)
  for key, value in linen.items():
    np.testing.assert_array_equal(flat[key], value, err_msg=key)
  # And they fit the model as they are (same classes, same image size: nothing is replaced).
  shapes = jax.eval_shape(lambda: ti16_model().init(jax.random.key(0), np.zeros((1, 224, 224, 3), np.float32),
                                                    train=False))["params"]
  init = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  adapted = pretrained.adapt_to_model(loaded, init, num_cls_tokens=1)
  block = adapted["Transformer"]["encoderblock_1"]
  np.testing.assert_array_equal(block["MultiHeadDotProductAttention_0"]["out"]["kernel"],
                                linen["Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out/kernel"])
  np.testing.assert_array_equal(block["LayerNorm_1"]["scale"], linen["Transformer/encoderblock_1/LayerNorm_1/scale"])
  np.testing.assert_array_equal(adapted["head"]["kernel"], linen["head/kernel"])
