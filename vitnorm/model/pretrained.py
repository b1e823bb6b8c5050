"""Loading reference ViT / AugReg checkpoints (.npz) into the LayerNorm ViT.

The checkpoints of google-research/vision_transformer store a flat dict of arrays whose keys are
'/'-joined parameter paths. Two numberings exist:

  Linen (current):    encoderblock_i/LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0
  pre-Linen (AugReg): encoderblock_i/LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3

`load_npz` reads either into the Linen layout that `vitnorm.model.vit.ViT(norm='layer')` uses;
`adapt_to_model` fits it to a model: the position embeddings are resized when the image size
differs (bilinear on the patch grid, as the reference fine-tuning code does), and the head is
replaced by the model's fresh head when the number of classes differs. A model with
model.qk_norm set keeps its freshly initialised query_norm / key_norm (reference checkpoints have
none; everything else of the LN layout loads unchanged). Anything else that does not
match (another width or depth, a BN model) is a UserError listing the offending paths.
"""
import io
import re
from typing import Mapping

import flax
from etils import epath
import jax
import numpy as np

from vitnorm.errors import UserError

# Pre-Linen module names inside an encoder block -> Linen names.
_PRE_LINEN_RENAMES = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}


def _to_linen_key(key: str) -> str:
  parts = key.split("/")
  if len(parts) > 2 and re.fullmatch(r"encoderblock_\d+", parts[1]):
    parts[2] = _PRE_LINEN_RENAMES.get(parts[2], parts[2])
  return "/".join(parts)


def load_npz(path: str) -> dict:
  """Reads a reference .npz checkpoint into a nested params dict in the Linen layout."""
  try:
    with epath.Path(path).open("rb") as f:  # a local path or a URL (gs://...)
      flat = dict(np.load(io.BytesIO(f.read()), allow_pickle=False))
  except FileNotFoundError:
    raise UserError(f"pretrained checkpoint {path!r} does not exist; give the path of a reference "
                    "ViT / AugReg .npz file") from None
  except (ValueError, OSError) as e:
    raise UserError(f"pretrained checkpoint {path!r} is not a readable .npz file ({e})") from None
  keys = [_to_linen_key(k) for k in flat]
  if len(set(keys)) != len(keys):
    raise UserError(f"pretrained checkpoint {path!r} mixes Linen and pre-Linen parameter names")
  return flax.traverse_util.unflatten_dict({k: v for k, v in zip(keys, flat.values())}, sep="/")


def save_npz(path: str, params: Mapping) -> None:
  """Writes params as a reference-style .npz (flat '/'-joined keys)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(v) for k, v in flat.items()})
  epath.Path(path).write_bytes(buffer.getvalue())


def resize_position_embeddings(posemb: np.ndarray, num_tokens: int, num_cls_tokens: int) -> np.ndarray:
  """Resizes (1, cls + g*g, d) position embeddings to (1, num_tokens, d) on the patch grid."""
  import scipy.ndimage  # scipy comes with scikit-learn; imported only when resizing.

  cls, grid = posemb[:, :num_cls_tokens], posemb[0, num_cls_tokens:]
  old, new = int(np.sqrt(len(grid))), int(np.sqrt(num_tokens - num_cls_tokens))
  if old * old != len(grid) or new * new != num_tokens - num_cls_tokens:
    raise UserError(f"cannot resize position embeddings of {posemb.shape[1]} tokens to {num_tokens}: "
                    "the patch grids are not square")
  grid = grid.reshape(old, old, -1)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return np.concatenate([cls, grid.reshape(1, new * new, -1)], axis=1).astype(posemb.dtype)


# Parameters a reference checkpoint never has; the model's initial values are kept (QK-norm).
_NEW_PARAM = re.compile(r"/MultiHeadDotProductAttention_0/(query|key)_norm/")


def adapt_to_model(loaded: Mapping, init_params: Mapping, *, num_cls_tokens: int) -> dict:
  """Fits loaded reference params to a model whose freshly initialised params are `init_params`.

  Returns params with exactly the structure and shapes of `init_params`. The head (and
  pre_logits, if the model has none) is taken from `init_params` when its shape differs.
  """
  src = flax.traverse_util.flatten_dict(jax.device_get(loaded), sep="/")
  dst = flax.traverse_util.flatten_dict(jax.device_get(init_params), sep="/")
  src = {k: v for k, v in src.items() if not (k.startswith("pre_logits/") and k not in dst)}
  missing = sorted(k for k in dst if k not in src and not k.startswith("head/")
                   and not _NEW_PARAM.search(k))
  unexpected = sorted(k for k in src if k not in dst)
  if missing or unexpected:
    hint = ("; the checkpoint is a LayerNorm ViT: set model.norm='layer', ffn_norm='none' and the "
            "checkpoint's variant" if any("BatchNorm" in k or "RMSNorm" in k for k in missing) else
            "; check model.variant / sizes against the checkpoint")
    raise UserError(f"pretrained checkpoint does not match the model: missing {missing[:4]}"
                    f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                    f"{'...' if len(unexpected) > 4 else ''}{hint}")
  out = {}
  for key, init in dst.items():
    value = src.get(key)
    if value is None or (key.startswith("head/") and value.shape != init.shape):
      out[key] = np.asarray(init)  # a new head for a new number of classes
    elif key.endswith("posembed_input/pos_embedding") and value.shape != init.shape:
      out[key] = resize_position_embeddings(np.asarray(value), init.shape[1], num_cls_tokens)
    elif value.shape != init.shape:
      raise UserError(f"pretrained parameter {key} has shape {value.shape} but the model needs "
                      f"{init.shape}; check model.variant / sizes against the checkpoint")
    else:
      out[key] = np.asarray(value, dtype=init.dtype)
  return flax.traverse_util.unflatten_dict(out, sep="/")
