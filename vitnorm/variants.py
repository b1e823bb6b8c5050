"""The paper's model variants by name: which norm goes where (model.norm, model.ffn_norm, model.qk_norm).

Config files take `:variant=NAME` (configs/common.py resolves it with `norms_of`), and the trainer's
start header names the variant a resolved model config is (`name_of`). A config with a norm mix not
in the table is a 'custom' variant. Imports nothing, so configs and the CLIs can use it for free.
"""
from typing import Mapping

# name -> the model fields it sets; fields not named keep their "off" value (ffn_norm / qk_norm none).
# dyt, prepbn and bn_qknorm need the norms of the same name in vitnorm.model.norms (DyT, PrePBN,
# QK-norm); the model validation refuses them in a version without those norms.
VARIANTS = {
    "ln": dict(norm="layer"),  # the standard ViT: LayerNorm before attention, before the FFN, final
    "bn": dict(norm="batch"),  # every LayerNorm replaced by BatchNorm (unstable in the paper)
    "bn_ffnbn": dict(norm="batch", ffn_norm="batch"),  # BN + a BN inside each FFN: the paper's model
    "ln_ffnbn": dict(norm="layer", ffn_norm="batch"),  # LN + the FFN BN
    "rms": dict(norm="rms"),  # RMSNorm everywhere
    "none": dict(norm="none"),  # no norm at all (the inference-speed floor)
    "dyt": dict(norm="dyt"),  # Dynamic Tanh in place of every norm
    "prepbn": dict(norm="prepbn"),  # progressive re-parameterized BN
    "bn_qknorm": dict(norm="batch", qk_norm="layer"),  # BN with LayerNorm on queries and keys
}
OFF = dict(ffn_norm="none", qk_norm="none")  # the value of a field a variant does not name


def norms_of(name: str) -> dict:
  """'bn_ffnbn' -> {'norm': 'batch', 'ffn_norm': 'batch', 'qk_norm': 'none'}; ValueError if unknown."""
  key = str(name).strip().lower()
  if key not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
  return dict(OFF, **VARIANTS[key])


def name_of(model: Mapping) -> str:
  """The table name of a model config's norm choice (canonical norm names), else 'custom'."""
  get = lambda key: str(model.get(key) or "none") if hasattr(model, "get") else "none"  # noqa: E731
  have = {key: get(key) for key in ("norm", "ffn_norm", "qk_norm")}
  for name in VARIANTS:
    if norms_of(name) == have:
      return name
  return "custom"


def describe(model: Mapping) -> str:
  """'bn_ffnbn (norm=batch, ffn_norm=batch pre_act)' for the start header."""
  parts = [f"norm={model.get('norm')}", f"ffn_norm={model.get('ffn_norm')}"]
  if str(model.get("ffn_norm") or "none") != "none":
    parts[-1] += f" {model.get('ffn_norm_position', 'pre_act')}"
  if str(model.get("qk_norm") or "none") != "none":
    parts.append(f"qk_norm={model.get('qk_norm')}")
  return f"{name_of(model)} ({', '.join(parts)})"
