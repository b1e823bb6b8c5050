"""BatchNorm folding: a trained BN-ViT in eval mode becomes the norm-free ViT with rewritten weights.

At inference a BatchNorm is a fixed per-channel affine map. With running mean m, variance v,
scale g, bias b and epsilon e:  BN(x) = x * s + t,  s = g / sqrt(v + e),  t = b - m * s.
An affine map next to a Dense layer merges into it:

  BN before a Dense  y = BN(x) W + c:   W' = diag(s) W,   c' = t W + c
  BN after a Dense   y = BN(x W + c):   W' = W diag(s),   c' = c * s + t

In the ViT (see vitnorm.model.vit for the parameter layout) that gives, per encoder block:

  BatchNorm_0 (pre-attention)       -> MultiHeadDotProductAttention_0/{query,key,value}
  BatchNorm_1 (pre-FFN)             -> MlpBlock_0/Dense_0
  MlpBlock_0/BatchNorm_0, pre_act   -> MlpBlock_0/Dense_0 (after the pre-FFN fold: they compose)
  MlpBlock_0/BatchNorm_0, post_act  -> MlpBlock_0/Dense_1
and Transformer/encoder_norm -> pre_logits (if representation_size is set) else head. For
classifier='token' the head reads the normalized CLS row; for 'gap' it reads the mean of the
normalized tokens, and the mean of an affine map is the affine map of the mean: both fold the
same. A CLS token left out of the BN statistics (bn_include_cls=False) is still normalized with
the running statistics at eval, so the fold stays exact.

The folded model is the same `ViT` class with norm='none' and ffn_norm='none': a folded BN-ViT is
literally the no-norm ViT and costs exactly the same at inference.

PRepBN (SLAB) folds the same way once its lam is 0: its RepBN(x) = BN(x) + eta * x is the affine
map with s' = s + eta, t' = t (the PRepBN_i/LayerNorm parameters are dropped). While lam > 0
(the model's `step` before model.prepbn.decay_steps, see vitnorm.model.vit.at_step) the LN
branch is still active and folding is refused, naming the step from which it becomes valid.

LayerNorm and RMSNorm normalize each token with its own statistics, which change with the input:
they are not affine maps with fixed coefficients and cannot be folded (`foldability` says so).
Neither can DyT (an elementwise tanh) nor QK-norm (per-token, per-head statistics of q and k).

Public API:
  foldability(model_or_cfg) -> (bool, reason)
  fold_batchnorm(model_or_cfg, variables) -> (folded_model, {'params': folded_params})
  batchnorm_affine(bn_params, bn_stats, epsilon) -> (s, t)   (float64 NumPy)

The fold is computed in float64 NumPy on the host, whatever JAX's default matmul precision.
"""
from typing import Mapping, Tuple

import jax.numpy as jnp
import numpy as np

from vitnorm.model import norms
from vitnorm.model import vit as vit_lib
from vitnorm.errors import UserError

_NOT_FOLDABLE_WHY = {
    "layer": "LayerNorm normalizes each token with its own mean and variance, which depend on the "
             "input: it is not a fixed affine map at inference",
    "rms": "RMSNorm divides each token by its own RMS, which depends on the input: it is not a "
           "fixed affine map at inference",
    "dyt": "DyT applies tanh elementwise: a nonlinearity, not an affine map, so it cannot merge "
           "into a Dense layer",
}


def _as_model(model_or_cfg) -> vit_lib.ViT:
  if isinstance(model_or_cfg, vit_lib.ViT):
    return model_or_cfg
  return vit_lib.build_model(model_or_cfg)


def foldability(model_or_cfg) -> Tuple[bool, str]:
  """Whether every norm of the model folds into a Dense layer at inference, and why (not).

  Foldable: norm and ffn_norm each 'batch', 'none' or 'prepbn' with lam 0 at the model's step,
  and qk_norm 'none'. The reason names the offending field.
  """
  model = _as_model(model_or_cfg)
  for field, kind in (("norm", model.norm), ("ffn_norm", model.ffn_norm)):
    if not norms.is_foldable(kind):
      return False, f"model.{field}={kind!r}: {_NOT_FOLDABLE_WHY.get(kind, 'not an affine map')}"
  if model.qk_norm != "none":
    return False, (f"model.qk_norm={model.qk_norm!r}: the query/key norms divide each token's q and "
                   "k by their own per-head statistics, which depend on the input: not a fixed "
                   "affine map at inference")
  if model.uses_prepbn:
    lam = float(model.lam())
    if lam > 0:
      field = "norm" if model.norm == "prepbn" else "ffn_norm"
      return False, (f"model.{field}='prepbn' at step {model.step}: lam = {lam:.4g} > 0, the "
                     "LayerNorm branch is still active; folding becomes valid from step "
                     f"{model.norm_options.prepbn_decay_steps} (model.prepbn.decay_steps)")
  folded = [(f, k) for f, k in (("norm", model.norm), ("ffn_norm", model.ffn_norm))
            if norms.uses_batch_stats(k)]
  if not folded:
    return True, "no norm layers: the model is already norm-free"
  if not model.uses_prepbn:
    return True, f"BatchNorm in {' and '.join('model.' + f for f, _ in folded)} folds into Dense layers"
  names = " and ".join(f"{'PRepBN' if k == 'prepbn' else 'BatchNorm'} in model.{f}" for f, k in folded)
  return True, f"{names} folds into Dense layers (PRepBN at lam 0: BN(x) + eta * x)"


def batchnorm_affine(bn_params: Mapping, bn_stats: Mapping, epsilon: float):
  """(s, t) with BN(x) = x * s + t in eval mode, as float64 NumPy arrays (see `_host64`)."""
  var, mean = _host64(bn_stats["var"]), _host64(bn_stats["mean"])
  s = _host64(bn_params["scale"]) / np.sqrt(var + epsilon)
  t = _host64(bn_params["bias"]) - mean * s
  return s, t


def _host64(x) -> np.ndarray:
  """x as a float64 NumPy array on the host.

  The whole fold is computed in float64 NumPy and rounded to the parameters' dtype once at the
  end, so it does not depend on JAX's matmul precision: on recent NVIDIA GPUs the default for
  float32 matmuls is TF32 (~1e-3 relative error per product) and on TPU bfloat16 passes, either
  of which would put the folded weights outside evaluate's float32 agreement check.
  """
  return np.asarray(x, dtype=np.float64)


def _fold_before(dense: Mapping, s, t) -> dict:
  """BN (s, t) applied to the input of a Dense/DenseGeneral whose kernel's first axis is the input."""
  kernel, bias = _host64(dense["kernel"]), _host64(dense["bias"])
  new_kernel = kernel * s.reshape((-1,) + (1,) * (kernel.ndim - 1))
  new_bias = bias + np.tensordot(t, kernel, axes=(0, 0))
  return {"kernel": _like(new_kernel, dense["kernel"]), "bias": _like(new_bias, dense["bias"])}


def _fold_after(dense: Mapping, s, t) -> dict:
  """BN (s, t) applied to the output of a Dense (kernel (in, out)): W diag(s), c * s + t."""
  kernel, bias = _host64(dense["kernel"]), _host64(dense["bias"])
  return {"kernel": _like(kernel * s[None, :], dense["kernel"]), "bias": _like(bias * s + t, dense["bias"])}


def _like(value: np.ndarray, original) -> jnp.ndarray:
  """The folded float64 value rounded once to the original parameter's dtype, as a JAX array."""
  return jnp.asarray(value.astype(jnp.dtype(original.dtype)))


def _pop(tree: dict, path: str):
  """Removes and returns tree[a][b][c] for path 'a/b/c', with a clear error if it is missing."""
  keys = path.split("/")
  node = tree
  for key in keys[:-1]:
    if key not in node:
      raise UserError(f"cannot fold: variables have no '{path}' (the checkpoint does not match the "
                      "model config; check model.norm / model.ffn_norm / model.num_layers)")
    node = node[key]
  if keys[-1] not in node:
    raise UserError(f"cannot fold: variables have no '{path}' (the checkpoint does not match the "
                    "model config; check model.norm / model.ffn_norm / model.num_layers)")
  return node.pop(keys[-1])


def _get(tree: Mapping, path: str):
  node = tree
  for key in path.split("/"):
    if key not in node:
      raise UserError(f"cannot fold: variables have no '{path}' (the checkpoint does not match the "
                      "model config)")
    node = node[key]
  return node


def _set(tree: dict, path: str, value):
  keys = path.split("/")
  node = tree
  for key in keys[:-1]:
    node = node[key]
  node[keys[-1]] = value


def _plain_dict(tree) -> dict:
  """A mutable nested dict copy (works for FrozenDict and plain dicts)."""
  if isinstance(tree, Mapping):
    return {k: _plain_dict(v) for k, v in tree.items()}
  return tree


def fold_batchnorm(model_or_cfg, variables: Mapping) -> Tuple[vit_lib.ViT, dict]:
  """Folds every BatchNorm of an eval-mode BN-ViT into its neighbouring Dense layers.

  Args:
    model_or_cfg: the `ViT` or its model config.
    variables: {'params': ..., 'batch_stats': ...} of the trained model (running statistics).
  Returns:
    (folded_model, folded_variables): the ViT with norm='none', ffn_norm='none' and the
    variables {'params': ...} for which
      folded_model.apply(folded_variables, x, train=False)
        == model.apply(variables, x, train=False)   (up to float round-off).
  Raises:
    UserError if the model has a LayerNorm/RMSNorm/DyT/QK-norm, a PRepBN whose lam is not 0 yet
    (see `foldability`), or the variables do not match the model.
  """
  model = _as_model(model_or_cfg)
  ok, reason = foldability(model)
  if not ok:
    raise UserError(f"cannot fold BatchNorm: {reason}")
  params = _plain_dict(variables["params"])
  has_bn = norms.uses_batch_stats(model.norm) or norms.uses_batch_stats(model.ffn_norm)
  if has_bn and "batch_stats" not in variables:
    raise UserError("cannot fold: the variables have no 'batch_stats' (BN running statistics); "
                    "restore the checkpoint with its batch_stats")
  stats = _plain_dict(variables.get("batch_stats", {}))
  eps = model.norm_options.bn_epsilon

  def take_bn(parent, kind, index):
    """(s, t) of the index-th norm of `kind` under `parent`, its parameters removed."""
    path = parent if index is None else f"{parent}/{norms.module_name(kind, index)}"
    if kind == "batch":
      return batchnorm_affine(_pop(params, path), _get(stats, path), eps)
    # PRepBN at lam 0: RepBN(x) = BN(x) + eta * x, so s' = s + eta, t' = t.
    prep = _pop(params, path)
    if "BatchNorm" not in prep or "eta" not in prep:
      raise UserError(f"cannot fold: variables have no '{path}/BatchNorm' or '{path}/eta' (the "
                      "checkpoint does not match the model config)")
    s, t = batchnorm_affine(prep["BatchNorm"], _get(stats, f"{path}/BatchNorm"), eps)
    return s + _host64(prep["eta"]), t

  for i in range(model.num_layers):
    block = f"Transformer/encoderblock_{i}"
    attn = f"{block}/MultiHeadDotProductAttention_0"
    mlp = f"{block}/MlpBlock_0"
    if model.norm != "none":
      s, t = take_bn(block, model.norm, 0)
      for proj in ("query", "key", "value"):
        _set(params, f"{attn}/{proj}", _fold_before(_get(params, f"{attn}/{proj}"), s, t))
      s, t = take_bn(block, model.norm, 1)
      _set(params, f"{mlp}/Dense_0", _fold_before(_get(params, f"{mlp}/Dense_0"), s, t))
    if model.ffn_norm != "none":
      s, t = take_bn(mlp, model.ffn_norm, 0)
      if model.ffn_norm_position == "pre_act":
        _set(params, f"{mlp}/Dense_0", _fold_after(_get(params, f"{mlp}/Dense_0"), s, t))
      else:
        _set(params, f"{mlp}/Dense_1", _fold_before(_get(params, f"{mlp}/Dense_1"), s, t))
  if model.norm != "none":
    s, t = take_bn("Transformer/encoder_norm", model.norm, None)
    target = "pre_logits" if model.representation_size is not None else "head"
    _set(params, target, _fold_before(_get(params, target), s, t))

  folded_model = model.clone(norm="none", ffn_norm="none", step=None)
  return folded_model, {"params": params}
