# python -m vitnorm.train --config configs/quickstart.py --workdir /tmp/vitnorm/quickstart
# (shared defaults for every config in configs/; not a config file itself)
"""Shared config defaults (one place) and the `:key=value,...` argument parser of config files.

Every field is commented here. Fields whose default is None are `placeholder`s so they stay
overridable from the command line (`--config.num_steps=500`, `--config.model.bn_group_size=64`).
"""
from typing import Any, Mapping, Optional

import ml_collections
from ml_collections.config_dict import placeholder

from vitnorm import variants
from vitnorm.model import norms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def norm_name(value: str, field: str = "norm") -> str:
  """'bn' -> 'batch', 'ln' -> 'layer', ...; ValueError naming the field for anything else."""
  kind = norms.canonical_kind(value)
  if kind not in norms.NORM_KINDS:
    raise ValueError(f"config argument {field}={value!r}: unknown norm; choose one of "
                     f"{', '.join(norms.NORM_KINDS)} (or ln, bn)")
  return kind


def parse_args(arg: Optional[str], defaults: Mapping[str, Any]) -> dict:
  """'key=value,key=value' -> dict over `defaults`, each value converted to its default's type.

  Unknown keys and unconvertible values raise ValueError naming the key and the valid keys.
  Booleans accept true/false/1/0/yes/no; a default of None takes the value as a string.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value; valid keys: {', '.join(defaults)}")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; valid keys: {', '.join(defaults)}")
    default = defaults[key]
    try:
      if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1", "yes")
      elif isinstance(default, int):
        out[key] = int(value)
      elif isinstance(default, float):
        out[key] = float(value)
      else:
        out[key] = value
    except ValueError:
      raise ValueError(f"config argument {key}={value!r} is not a valid {type(default).__name__}") from None
  return out


def variant_norms(args: Mapping[str, Any], default_variant: str) -> dict:
  """The norms a config file's `variant=` / `norm=` / `ffn_norm=` arguments select (None = not given).

  variant=NAME picks a row of vitnorm.variants.VARIANTS (ln, bn, bn_ffnbn, ln_ffnbn, rms, none, ...);
  a bare norm=X means X everywhere and no FFN norm; norm=X,ffn_norm=Y is a custom mix; ffn_norm=Y
  alone adds Y to the default variant's norm. variant= together with norm= / ffn_norm= is refused.
  """
  variant, norm, ffn_norm = args.get("variant"), args.get("norm"), args.get("ffn_norm")
  if variant is not None and (norm is not None or ffn_norm is not None):
    raise ValueError(f"config argument variant={variant} together with norm=/ffn_norm=: give either "
                     "variant= (a named model) or norm=[,ffn_norm=] (a custom mix)")
  if variant is not None or norm is None:
    try:
      out = variants.norms_of(variant if variant is not None else default_variant)
    except ValueError as e:
      raise ValueError(f"config argument variant={variant}: {e}") from None
    if variant is None and ffn_norm is not None:
      out["ffn_norm"] = ffn_norm
  else:
    out = dict(variants.OFF, norm=norm, ffn_norm=ffn_norm if ffn_norm is not None else "none")
  return out


def split_size(args: Mapping[str, Any], default_size: str) -> tuple:
  """(args, size preset) for configs with both size= and variant=: variant=S/16 (a size, the old
  spelling; no variant name has a '/') still selects the size."""
  args = dict(args)
  if args.get("variant") is not None and "/" in str(args["variant"]):
    if args.get("size") is not None:
      raise ValueError(f"config argument variant={args['variant']} is a size and size= is given too; "
                       "use size= for the size and variant= for the norms (ln, bn, bn_ffnbn, ...)")
    args["size"], args["variant"] = args["variant"], None
  return args, args.get("size") or default_size


def apply_variant(model: ml_collections.ConfigDict, selected: Mapping[str, str]) -> None:
  """Sets model.norm / ffn_norm (validated names) and qk_norm (only where the model has it)."""
  model.norm = norm_name(selected["norm"])
  model.ffn_norm = norm_name(selected["ffn_norm"], "ffn_norm")
  qk = selected.get("qk_norm", "none")
  if "qk_norm" in model:
    model.qk_norm = norms.canonical_kind(qk)
  elif qk != "none":
    raise ValueError(f"config argument variant: qk_norm={qk} needs a model.qk_norm field, which this "
                     "version of vitnorm lacks")


def model_config(*, variant: Optional[str] = "S/16", norm: str = "layer", ffn_norm: str = "none",
                 num_classes: int = 1000, image_size: int = 224, num_channels: int = 3
                 ) -> ml_collections.ConfigDict:
  """config.model: the ViT (vitnorm.model.vit.resolve_model_config validates it)."""
  m = ml_collections.ConfigDict()
  # Size preset NAME/PATCH: Ti, S, B, L, H or deit_ti/deit_s/deit_b, e.g. 'S/16'. The five size
  # fields below override the preset when set; with variant None all five must be set.
  m.variant = placeholder(str) if variant is None else variant
  m.hidden_size = placeholder(int)  # Token width (None: from the variant).
  m.num_layers = placeholder(int)  # Encoder blocks (None: from the variant).
  m.mlp_dim = placeholder(int)  # FFN hidden width (None: from the variant).
  m.num_heads = placeholder(int)  # Attention heads; must divide hidden_size (None: from the variant).
  m.patch_size = placeholder(int)  # Patch side in pixels; must divide image_size (None: from the variant).
  m.num_classes = num_classes  # Classifier outputs; must match the dataset (checked at start).
  m.image_size = image_size  # Input side in pixels; must match data.image_size.
  m.num_channels = num_channels  # Input channels; must match the data pipeline's output.
  m.classifier = "token"  # 'token' (CLS token, ViT/DeiT) or 'gap' (mean of the patch tokens).
  # Block and final norm: 'layer' | 'batch' | 'rms' | 'none' | 'dyt' (Dynamic Tanh) | 'prepbn'
  # (SLAB's progressive LN -> RepBN); ln/bn accepted.
  m.norm = norm_name(norm)
  m.ffn_norm = norm_name(ffn_norm, "ffn_norm")  # Extra norm inside the FFN (the paper's fix: 'batch').
  m.qk_norm = "none"  # Per-head norm of queries and keys before the dot product: 'none' | 'layer' | 'rms'.
  m.dyt_alpha_init = 0.5  # DyT: initial value of the learnable scalar alpha in tanh(alpha * x).
  # PRepBN: y = lam * LN(x) + (1 - lam) * (BN(x) + eta * x); lam = 1 before warmup_steps, then
  # linear to 0 at decay_steps (a pure function of the optimizer step); at inference only the
  # RepBN runs and folds like BN. The BN options below apply to its BN.
  m.prepbn = ml_collections.ConfigDict()
  m.prepbn.warmup_steps = 0  # Steps with lam = 1 (LayerNorm only), SLAB's default 0.
  m.prepbn.decay_steps = placeholder(int)  # Step at which lam reaches 0; None = SLAB's 16% of the run.
  m.ffn_norm_position = "pre_act"  # FFN norm between fc1 and GELU ('pre_act') or after GELU ('post_act').
  m.dropout_rate = 0.0  # Dropout after attention / FFN outputs and on the embeddings.
  m.attention_dropout_rate = 0.0  # Dropout on the attention weights.
  m.drop_path_rate = 0.0  # Stochastic depth of the last block (linear from 0 at the first).
  m.bn_momentum = 0.9  # BN running-average decay, Flax convention (0.9 = PyTorch momentum 0.1).
  m.bn_epsilon = 1e-5  # BN epsilon.
  m.bn_include_cls = True  # Whether the CLS token takes part in the BN statistics.
  m.bn_group_size = placeholder(int)  # Ghost-batch size for BN statistics; None = the whole global batch.
  m.ln_epsilon = 1e-6  # LayerNorm / RMSNorm epsilon.
  m.representation_size = placeholder(int)  # Optional tanh pre-logits layer width (None: no layer).
  m.head_bias_init = 0.0  # Initial classifier bias.
  # Compute dtype of every matmul: 'float32', 'bfloat16' or 'float16' (parameters stay float32).
  # float16 mirrors torch.cuda.amp.autocast as DeiT trained (float32 residual stream, norms and
  # softmax; see vitnorm/model/precision.py) and turns on dynamic loss scaling (optim.loss_scale).
  m.dtype = "float32"
  # Attention logits q.k computed in 'float32' (accumulated and returned in float32) or in the
  # 'compute' dtype (a float16 matmul's output, as under autocast: above 65,504 it is inf).
  m.attention_logits = "float32"
  # Where 1/sqrt(head_dim) is applied: on 'query' before the product, or on the 'product' after
  # it (timm's 2021 Attention, DeiT's: the unscaled q.k must fit the logits' dtype).
  m.attention_scale = "query"
  return m


def data_config(*, name: str = "imagenet2012", image_size: int = 224) -> ml_collections.ConfigDict:
  """config.data: the input pipeline (vitnorm.data); crop and flip on, the heavier DeiT
  augmentations off (configs/deit.py turns them on)."""
  d = ml_collections.ConfigDict()
  d.name = name  # tfds dataset name, or the offline 'mnist5k' / 'digits'.
  d.data_dir = placeholder(str)  # tfds data dir (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
  d.train_split = "train"  # tfds split to train on (e.g. 'train[:90%]').
  d.eval_split = "test"  # tfds split for evaluation ('validation' for imagenet2012).
  d.image_size = image_size  # Side of the images the pipeline outputs.
  d.channels = placeholder(int)  # Convert to this many channels (1 or 3); None keeps the dataset's.
  d.inception_crop = True  # Random resized (Inception) crop for training; else resize + center crop.
  d.crop_scale_min = 0.08  # Smallest area fraction of the Inception crop.
  d.hflip = True  # Random horizontal flips for training (turn off for digits).
  d.randaugment_layers = 0  # RandAugment ops per image; 0 = off (DeiT: 2).
  d.randaugment_magnitude = 9.0  # RandAugment magnitude (DeiT: 9).
  d.randaugment_magnitude_std = 0.5  # Per-op noise on the magnitude (DeiT: 0.5).
  d.random_erasing_prob = 0.0  # Probability of random erasing (DeiT: 0.25).
  d.normalize_mean = IMAGENET_MEAN  # Per-channel mean subtracted, in [0, 1] pixel units.
  d.normalize_std = IMAGENET_STD  # Per-channel std divided by, in [0, 1] pixel units.
  d.mixup_alpha = 0.0  # Mixup Beta(alpha, alpha); 0 = off (DeiT: 0.8).
  d.cutmix_alpha = 0.0  # CutMix Beta(alpha, alpha); 0 = off (DeiT: 1.0).
  d.mixup_switch_prob = 0.5  # With both on: probability of CutMix instead of mixup for a batch.
  d.mixup_prob = 1.0  # Probability that a batch gets mixup / CutMix at all.
  d.label_smoothing = 0.0  # Label smoothing of the soft targets (DeiT: 0.1).
  d.eval_crop_fraction = 0.875  # Eval: resize to image_size / fraction, then center crop.
  d.shuffle_buffer = 50_000  # Shuffle buffer (examples) for datasets streamed from disk.
  d.cache = False  # Keep the decoded split in memory (small datasets).
  d.random_shift_pad = 0  # Pad by this many pixels and crop back at random (small images); 0 = off.
  d.reader = "tf_data"  # 'tf_data' or 'grain' (ArrayRecord, one global order, augmentation on device).
  d.grain_workers = 0  # reader='grain': Grain worker processes per host; 0 = threads only.
  # Flip, normalize, erasing, mixup/CutMix, smoothing on the accelerator; None: only with 'grain'.
  d.augment_on_device = placeholder(bool)
  return d


def optim_config() -> ml_collections.ConfigDict:
  """config.optim: AdamW with warm-up + cosine (vitnorm.training.optim), DeiT defaults."""
  o = ml_collections.ConfigDict()
  o.base_lr = 5e-4  # Peak learning rate for a global batch of lr_scaling_batch.
  o.lr_scaling_batch = 512  # Peak lr = base_lr * batch_size / this (DeiT); None = base_lr as is.
  o.min_lr = 1e-5  # Learning rate at the end of the cosine.
  o.warmup_steps = placeholder(int)  # Linear warm-up steps from 0; None: from warmup_epochs.
  o.warmup_epochs = 5.0  # Warm-up length in epochs, used when warmup_steps is None.
  o.b1 = 0.9  # Adam beta1.
  o.b2 = 0.999  # Adam beta2.
  o.eps = 1e-8  # Adam epsilon.
  o.weight_decay = 0.05  # Decoupled weight decay, on Dense/Conv kernels only (not norms, biases, pos-emb, cls).
  o.grad_clip_norm = placeholder(float)  # Clip gradients to this global norm; None = no clipping.
  o.ema_decay = 0.0  # EMA of weights and BN statistics per step (DeiT: 0.99996); 0 = off. As eval_ema/*.
  # Dynamic loss scaling (jmp.DynamicLossScale, torch GradScaler's rule), used only with
  # model.dtype='float16': the loss is multiplied by the scale before the backward pass and the
  # gradients divided by it; a step with a non-finite gradient is skipped (counted in
  # train/skipped_steps, not a crash) and halves the scale; `growth_interval` consecutive finite
  # steps double it. The scale and its counter are checkpointed.
  o.loss_scale = ml_collections.ConfigDict()
  o.loss_scale.init = 2.0 ** 16  # Initial scale (GradScaler: 2^16).
  o.loss_scale.growth_interval = 2000  # Finite steps after which the scale doubles (GradScaler: 2000).
  o.loss_scale.factor = 2  # Growth factor; a non-finite step divides by it (GradScaler: 2 and 0.5).
  return o


def base_config() -> ml_collections.ConfigDict:
  """The full config tree with DeiT-S/16 ImageNet defaults; config files change what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seeds initialization, dropout and the data order (same seed + config = same run).
  c.parallelism = "jit"  # 'jit': one Mesh over all devices, sharded batches; 'pmap': pmean over axis 'batch'.
  c.batch_size = 1024  # Global batch per optimizer step (all devices, all processes).
  c.accum_steps = 1  # Split each step's batch into this many micro-batches and average their gradients.
  c.num_steps = placeholder(int)  # Optimizer steps; None: from num_epochs.
  c.num_epochs = 300.0  # Training length in epochs of the train split, used when num_steps is None.
  c.eval_batch_size = placeholder(int)  # Global eval batch; None: batch_size // accum_steps.
  c.log_every = 50  # Train metrics (averaged over the interval) every this many steps.
  c.eval_every = 2000  # Eval-split evaluation every this many steps (and always at the end); 0 = end only.
  c.checkpoint_every = 1000  # Checkpoint every this many steps (and always at the end).
  c.keep_checkpoints = 3  # Keep this many most recent checkpoints.
  c.async_checkpoints = True  # Write checkpoints in the background while training continues.
  c.diagnostics_every = 500  # Per-block residual/FFN RMS, max attention logit, grad norms; 0 = off.
  c.loss_spike_factor = 10.0  # Diverged if loss > factor x running mean and above chance level; 0 = off.
  c.progress_bar = "auto"  # 'auto' (a bar on a terminal, log lines otherwise), 'on' or 'off'.
  c.num_cpu_devices = placeholder(int)  # CPU-only hosts: JAX CPU devices; None = one per core.
  # Start from a reference ViT / AugReg .npz (google-research/vision_transformer layout; needs
  # model.norm='layer', ffn_norm='none' and the checkpoint's size). Position embeddings are resized to
  # model.image_size and the head is new when num_classes differs. None: random initialization.
  c.init_from = placeholder(str)
  c.model = model_config()
  c.data = data_config()
  c.optim = optim_config()
  c.distributed = ml_collections.ConfigDict()
  # Several processes: coordinator HOST:PORT (or $JAX_COORDINATOR_ADDRESS); None = single process.
  c.distributed.coordinator_address = placeholder(str)
  c.distributed.num_processes = placeholder(int)  # Number of processes (or $JAX_NUM_PROCESSES).
  c.distributed.process_id = placeholder(int)  # This process's index (or $JAX_PROCESS_ID).
  c.distributed.auto = False  # jax.distributed.initialize() with auto-detection (TPU pods, SLURM).
  c.debug = ml_collections.ConfigDict()
  c.debug.inject_nan_at_step = placeholder(int)  # Feed NaN images at this step (tests divergence handling).
  c.debug.preempt_at_step = placeholder(int)  # Send this process SIGTERM after this step (tests preemption).
  return c
