"""Vision Transformer (flax.linen) with a swappable normalization.

The parameter tree follows google-research/vision_transformer, so reference and AugReg
checkpoints load into the LayerNorm variant (see vitnorm.model.pretrained):

  embedding                       Conv, patch x patch
  cls                             (1, 1, hidden), classifier='token' only
  Transformer/posembed_input/pos_embedding
  Transformer/encoderblock_{i}/
      {norm}_0                    pre-attention norm  (LayerNorm_0 / BatchNorm_0 / RMSNorm_0 /
                                  DyT_0 / PRepBN_0)
      MultiHeadDotProductAttention_0/{query,key,value,out}, [query_norm, key_norm] (qk_norm)
      {norm}_1                    pre-FFN norm
      MlpBlock_0/Dense_0, [{ffn_norm}_0], Dense_1
  Transformer/encoder_norm        final norm
  pre_logits                      optional (representation_size)
  head                            zero-initialised

QK-norm (model.qk_norm = none | layer | rms; ViT-22B): queries and keys are normalized per head
over head_dim (params of shape (head_dim,), shared by the heads) before the scaled dot product.
Everything else keeps its names, so reference checkpoints still load (the q/k norms start fresh).

PRepBN and the optimizer step: PRepBN's lam (vitnorm.model.norms.prepbn_lam) is a pure function
of the step. The step reaches the model in one of two ways: the call argument
`model.apply(..., step=s)` (the train step passes `state.step`, traced, so jit == pmap and resume
is bit-exact), or, for evaluation and folding, the static field `ViT.step` (`at_step(model, s)`
sets it). Both None means "training finished": lam = 0, only RepBN runs (the folded form). The
trainer's periodic evaluation at step s uses `at_step(model, s)`, so it sees lam(s).

Diagnostics: when the `diagnostics` collection is mutable, each block sows the RMS of the
residual stream after it, the RMS of its FFN hidden activations, RMS and max |x| of Dense_0's
output (before any FFN norm) and of the FFN branch output (Dense_1's), its maximum attention
logit, its largest unscaled |q.k| and the largest |x| at its matmul outputs (see layers.py); the
model sows max |x| of the patch embedding and of the head's logits and the head's log-partition
(logsumexp of the logits: mean and max over the batch).

Precision: `dtype` is the compute dtype of every matmul (float32, bfloat16 or float16; the
parameters stay float32); vitnorm.model.precision says where each dtype lives, and the two
attention knobs (`attention_logits`, `attention_scale`).
"""
import dataclasses
import functools
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitnorm.model import norms, precision
from vitnorm.model.layers import Encoder
from vitnorm.errors import ConfigError

# name -> (hidden_size, num_layers, mlp_dim, num_heads); the patch size follows the slash.
# DeiT-Ti/S/B have the dimensions of ViT-Ti/S/B; their names are accepted as aliases.
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "deit_ti": (192, 12, 768, 3),
    "deit_s": (384, 12, 1536, 6),
    "deit_b": (768, 12, 3072, 12),
}
CLASSIFIERS = ("token", "gap")
FFN_NORM_POSITIONS = ("pre_act", "post_act")
DTYPES = precision.DTYPES  # compute dtypes; where each lives: vitnorm.model.precision


class ViT(nn.Module):
  """Vision Transformer; `__call__(images, train=...)` returns float32 logits.

  images: (batch, height, width, channels), height and width divisible by patch_size.
  """

  num_classes: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = "token"
  norm: str = "layer"
  ffn_norm: str = "none"
  ffn_norm_position: str = "pre_act"
  norm_options: norms.NormOptions = norms.NormOptions()
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  representation_size: Optional[int] = None
  head_bias_init: float = 0.0
  dtype: Any = jnp.float32
  qk_norm: str = "none"
  # Where the attention logits are computed ('float32' | 'compute') and the 1/sqrt(head_dim) scale
  # applied ('query' | 'product'); see vitnorm.model.precision.
  attention_logits: str = "float32"
  attention_scale: str = "query"
  # Optimizer step the model is evaluated at (PRepBN's lam; see the module docstring and
  # `at_step`); None: training finished (lam = 0). The call argument `step` overrides it.
  step: Optional[int] = None

  @property
  def num_cls_tokens(self) -> int:
    return 1 if self.classifier == "token" else 0

  @property
  def uses_prepbn(self) -> bool:
    return "prepbn" in (self.norm, self.ffn_norm)

  def lam(self, step=None):
    """PRepBN's LN weight at `step` (or self.step); 0.0 when both are None or there is no PRepBN."""
    step = self.step if step is None else step
    if not self.uses_prepbn or step is None:
      return 0.0
    o = self.norm_options
    return norms.prepbn_lam(step, o.prepbn_warmup_steps, o.prepbn_decay_steps)

  @nn.compact
  def __call__(self, images, *, train: bool, step=None):
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="embedding")(images)
    self.sow("diagnostics", "embedding_max_abs", jnp.max(jnp.abs(x)).astype(jnp.float32))
    x = x.astype(precision.policy(self.dtype).residual)  # float16: float32 stream, as autocast
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (b, 1, 1)), x], axis=1)
    x = Encoder(
        self.num_layers, self.num_heads, self.mlp_dim, self.norm, self.ffn_norm,
        self.ffn_norm_position, self.norm_options, self.num_cls_tokens, self.dropout_rate,
        self.attention_dropout_rate, self.drop_path_rate, self.dtype, self.qk_norm,
        attention_logits=self.attention_logits, attention_scale=self.attention_scale,
        name="Transformer")(x, train=train, lam=self.lam(step))
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(x))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                      bias_init=nn.initializers.constant(self.head_bias_init), name="head")(x)
    self.sow("diagnostics", "head_max_abs", jnp.max(jnp.abs(logits)).astype(jnp.float32))
    log_partition = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    self.sow("diagnostics", "head_log_partition_mean", jnp.mean(log_partition))
    self.sow("diagnostics", "head_log_partition_max", jnp.max(log_partition))
    return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Building a ViT from a config (with validation that names the bad field)
# ----------------------------------------------------------------------------------------------


def parse_variant(variant: str):
  """'S/16' -> dict(hidden_size=384, num_layers=12, mlp_dim=1536, num_heads=6, patch_size=16)."""
  m = re.fullmatch(r"([A-Za-z_]+)/(\d+)", variant or "")
  if not m or m.group(1) not in VARIANTS:
    raise ConfigError("model.variant", f"{variant!r} is not a preset; use NAME/PATCH with NAME in "
                      f"{', '.join(VARIANTS)} (e.g. 'S/16'), or set the sizes explicitly")
  hidden, layers, mlp, heads = VARIANTS[m.group(1)]
  return dict(hidden_size=hidden, num_layers=layers, mlp_dim=mlp, num_heads=heads,
              patch_size=int(m.group(2)))


def _get(cfg, key, default=None):
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def resolve_model_config(cfg: Mapping) -> dict:
  """Validates a model config (ConfigDict or dict) and returns the ViT's keyword arguments.

  Sizes come from `variant` (e.g. 'S/16') unless given explicitly. Every problem raises a
  ConfigError naming the field.
  """
  sizes = parse_variant(cfg["variant"]) if _get(cfg, "variant") else {}
  for key in ("hidden_size", "num_layers", "mlp_dim", "num_heads", "patch_size"):
    if _get(cfg, key) is not None:
      sizes[key] = int(cfg[key])
    if key not in sizes:
      raise ConfigError(f"model.{key}", "is not set; set it or choose a model.variant like 'S/16'")
  out = dict(sizes)
  for key in ("hidden_size", "num_layers", "mlp_dim", "num_heads", "patch_size", "num_classes",
              "image_size", "num_channels"):
    value = out.get(key, _get(cfg, key, 3 if key == "num_channels" else None))
    if value is None:
      raise ConfigError(f"model.{key}", "is not set")
    if int(value) != value or value <= 0:
      raise ConfigError(f"model.{key}", f"must be a positive integer, got {value!r}")
    out[key] = int(value)
  if out["hidden_size"] % out["num_heads"]:
    raise ConfigError("model.num_heads", f"hidden_size {out['hidden_size']} is not divisible by "
                      f"num_heads {out['num_heads']}; pick a divisor of the width")
  if out["image_size"] % out["patch_size"]:
    raise ConfigError("model.patch_size", f"patch size {out['patch_size']} does not divide image "
                      f"size {out['image_size']}; pick a divisor or change model.image_size")

  def choice(key, allowed, default, canonical=lambda v: v):
    value = canonical(_get(cfg, key, default))
    if value not in allowed:
      raise ConfigError(f"model.{key}", f"unknown value {value!r}; choose one of {', '.join(allowed)}")
    return value

  out["classifier"] = choice("classifier", CLASSIFIERS, "token")
  out["norm"] = choice("norm", norms.NORM_KINDS, "layer", norms.canonical_kind)
  out["ffn_norm"] = choice("ffn_norm", norms.NORM_KINDS, "none", norms.canonical_kind)
  out["ffn_norm_position"] = choice("ffn_norm_position", FFN_NORM_POSITIONS, "pre_act")
  out["qk_norm"] = choice("qk_norm", norms.QK_NORM_KINDS, "none", norms.canonical_kind)
  out["dtype"] = DTYPES[choice("dtype", tuple(DTYPES), "float32")]
  out["attention_logits"] = choice("attention_logits", precision.ATTENTION_LOGITS, "float32")
  out["attention_scale"] = choice("attention_scale", precision.ATTENTION_SCALE, "query")
  for key in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
    value = float(_get(cfg, key, 0.0))
    if not 0.0 <= value < 1.0:
      raise ConfigError(f"model.{key}", f"must be in [0, 1), got {value}")
    out[key] = value
  momentum = float(_get(cfg, "bn_momentum", 0.9))
  if not 0.0 <= momentum < 1.0:
    raise ConfigError("model.bn_momentum", f"must be in [0, 1), got {momentum} (it is the decay "
                      "of the running averages, Flax convention: 0.9 = PyTorch momentum 0.1)")
  for key, default in (("bn_epsilon", 1e-5), ("ln_epsilon", 1e-6)):
    if float(_get(cfg, key, default)) <= 0:
      raise ConfigError(f"model.{key}", "must be positive")
  group = _get(cfg, "bn_group_size")
  if group is not None and (int(group) != group or group <= 0):
    raise ConfigError("model.bn_group_size", f"must be a positive integer or unset, got {group!r}")
  alpha = float(_get(cfg, "dyt_alpha_init", 0.5))
  if not (alpha > 0 and alpha < float("inf")):
    raise ConfigError("model.dyt_alpha_init", f"must be a positive number, got {alpha!r} (the DyT "
                      "paper uses 0.5 for ViTs)")
  warmup, decay = _prepbn_steps(cfg)
  out["norm_options"] = norms.NormOptions(
      ln_epsilon=float(_get(cfg, "ln_epsilon", 1e-6)),
      bn_momentum=momentum,
      bn_epsilon=float(_get(cfg, "bn_epsilon", 1e-5)),
      bn_include_cls=bool(_get(cfg, "bn_include_cls", True)),
      bn_group_size=None if group is None else int(group),
      dyt_alpha_init=alpha, prepbn_warmup_steps=warmup, prepbn_decay_steps=decay)
  rep = _get(cfg, "representation_size")
  if rep is not None and (int(rep) != rep or rep <= 0):
    raise ConfigError("model.representation_size", f"must be a positive integer or unset, got {rep!r}")
  out["representation_size"] = None if rep is None else int(rep)
  out["head_bias_init"] = float(_get(cfg, "head_bias_init", 0.0))
  return out


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model config resolved once: sizes taken from the preset, norm names canonical, defaults
  filled in, every field validated. `build_model` builds it and checkpoint compatibility compares
  it; two configs that describe the same ViT (e.g. variant 'Ti/16' and the same sizes given
  explicitly, norm 'bn' and 'batch') give equal specs. Made by `model_spec(config.model)`."""

  num_classes: int
  image_size: int
  num_channels: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str  # token | gap
  norm: str  # pre-attention, pre-FFN and final norm (canonical kind, norms.NORM_KINDS)
  ffn_norm: str  # the norm between the FFN's Dense layers, or none
  ffn_norm_position: str  # pre_act | post_act
  qk_norm: str  # none | layer | rms
  dtype: Any  # compute dtype (jnp.float32 / jnp.bfloat16 / jnp.float16); parameters stay float32
  attention_logits: str  # float32 | compute (vitnorm.model.precision)
  attention_scale: str  # query | product
  dropout_rate: float
  attention_dropout_rate: float
  drop_path_rate: float
  norm_options: norms.NormOptions
  representation_size: Optional[int]
  head_bias_init: float

  @property
  def uses_batch_stats(self) -> bool:
    """Whether the model keeps BatchNorm running statistics (a batch_stats collection)."""
    return any(norms.uses_batch_stats(k) for k in (self.norm, self.ffn_norm))

  def input_shape(self, batch_size: int = 1):
    """(batch, image_size, image_size, num_channels)."""
    return (batch_size, self.image_size, self.image_size, self.num_channels)

  def as_dict(self) -> dict:
    """The fields as a (shallow) dict, norm_options kept as the NormOptions it is."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def model_spec(cfg) -> ModelSpec:
  """The ModelSpec of a model config (ConfigDict or dict); a ModelSpec is returned as it is."""
  if isinstance(cfg, ModelSpec):
    return cfg
  return ModelSpec(**resolve_model_config(cfg))


def _prepbn_steps(cfg: Mapping):
  """(warmup_steps, decay_steps) of model.prepbn (decay None: unresolved, the trainer sets num_steps)."""
  section = _get(cfg, "prepbn", {})
  values = {}
  for key, default in (("warmup_steps", 0), ("decay_steps", None)):
    value = _get(section, key, default)
    if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
      raise ConfigError(f"model.prepbn.{key}", f"must be a non-negative integer step, got {value!r}")
    values[key] = None if value is None else int(value)
  warmup, decay = values["warmup_steps"], values["decay_steps"]
  if decay is not None and decay < warmup:
    raise ConfigError("model.prepbn.decay_steps", f"{decay} is before warmup_steps {warmup}; lam "
                      "decays from 1 at warmup_steps to 0 at decay_steps, so use decay_steps >= "
                      "warmup_steps")
  return warmup, decay


def at_step(model: "ViT", step: Optional[int]) -> "ViT":
  """The model as evaluated at optimizer step `step` (PRepBN's lam(step)); others are returned as is.

  Steps with the same lam give equal models (all warm-up steps -> step 0, all steps from
  decay_steps on -> None), so evaluation compiles once per distinct lam.
  """
  if not model.uses_prepbn or step is None:
    return model
  o, step = model.norm_options, int(step)
  if o.prepbn_decay_steps is None:
    raise ConfigError("model.prepbn.decay_steps", "is unset; set it (the trainer sets it to num_steps)")
  if step >= o.prepbn_decay_steps:
    return model.clone(step=None)
  return model.clone(step=0 if step < o.prepbn_warmup_steps else step)


def build_model(spec, *, bn_axis_name: Optional[str] = None) -> ViT:
  """Builds the ViT of a ModelSpec (or of a model config, resolved here); under pmap pass the
  axis name for BN sync."""
  kwargs = model_spec(spec).as_dict()
  for key in ("image_size", "num_channels"):
    kwargs.pop(key)
  kwargs["norm_options"] = dataclasses.replace(kwargs["norm_options"], bn_axis_name=bn_axis_name)
  return ViT(**kwargs)


def input_shape(spec, batch_size: int = 1):
  """(batch, image_size, image_size, num_channels) of a ModelSpec or model config."""
  return model_spec(spec).input_shape(batch_size)


def variable_shapes(model: ViT, shape):
  """The {'params', ['batch_stats']} tree of `init_variables` as ShapeDtypeStructs (no compute).

  Traced once per model and input shape in a process (the trainer's header, every checkpoint
  restore and the comparison tools ask again); each call returns a new tree."""
  return jax.tree.map(lambda x: x, _traced_variable_shapes(model, tuple(shape)))


@functools.lru_cache(maxsize=64)  # linen modules are frozen dataclasses: equal configs, one entry
def _traced_variable_shapes(model: ViT, shape: tuple):
  return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))


def init_variables(model: ViT, rng, shape):
  """Initial {'params': ..., ['batch_stats': ...]} for images of `shape` (f32).

  `model.init` makes every collection mutable, so the sown `diagnostics` are dropped here.
  """
  init = lambda r: model.init(r, jnp.zeros(shape, jnp.float32), train=False)  # noqa: E731
  variables = jax.jit(init)(rng)
  return {k: v for k, v in variables.items() if k != "diagnostics"}
