# python -m vitnorm.train --config configs/cifar.py:dataset=cifar10,variant=bn_ffnbn --workdir /tmp/vitnorm/cifar10_bn
"""CIFAR-10 / CIFAR-100 on a single GPU: a ViT-Ti-width model with 4x4 patches on 32x32 images.

The DeiT recipe scaled to a small dataset: AdamW (lr 1e-3 at batch 512, weight decay 0.05),
200 epochs with 10 warm-up epochs, random shift (pad 4) + flip, RandAugment (2 ops, m9),
mixup 0.8 / CutMix 1.0, label smoothing 0.1, drop path 0.1. About 25M images of
ViT-Ti/4 at 65 tokens: a few hours on one modern GPU. Needs cifar10 / cifar100 prepared in
data.data_dir (`tfds build cifar10`).

Arguments (`:key=value,...`):
  dataset   cifar10 (default) or cifar100
  size      size preset with the patch size, Ti/4 (default) or S/4 (variant=Ti/4 also works)
  variant   the paper's model by name (vitnorm/variants.py): ln (default), bn, bn_ffnbn, ln_ffnbn,
            rms, none, dyt, prepbn, bn_qknorm
  norm      a custom mix instead: this norm everywhere (ln, bn, rms, none, dyt, prepbn), no FFN norm ...
  ffn_norm  ... plus this norm inside the FFN (bn, ln, rms, dyt, prepbn)
  batch     global batch size (512)
  epochs    training epochs (200)
"""
from configs import common

ARGS = dict(dataset="cifar10", size=None, variant=None, norm=None, ffn_norm=None, batch=512,
            epochs=200.0)  # None: not given

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def get_config(arg=None):
  args, size = common.split_size(common.parse_args(arg, ARGS), "Ti/4")
  if args["dataset"] not in ("cifar10", "cifar100"):
    raise ValueError(f"config argument dataset={args['dataset']!r}: choose cifar10 or cifar100")
  c = common.base_config()
  c.batch_size = args["batch"]
  c.num_epochs = args["epochs"]
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.diagnostics_every = 500

  num_classes = 10 if args["dataset"] == "cifar10" else 100
  c.model = common.model_config(variant=size, num_classes=num_classes, image_size=32)
  common.apply_variant(c.model, common.variant_norms(args, "ln"))
  c.model.drop_path_rate = 0.1

  c.data = common.data_config(name=args["dataset"], image_size=32)
  c.data.channels = 3
  c.data.cache = True  # 50,000 small images fit in memory
  c.data.inception_crop = False
  c.data.random_shift_pad = 4
  c.data.hflip = True
  c.data.randaugment_layers = 2
  c.data.randaugment_magnitude = 9.0
  c.data.mixup_alpha = 0.8
  c.data.cutmix_alpha = 1.0
  c.data.label_smoothing = 0.1
  c.data.random_erasing_prob = 0.0
  c.data.normalize_mean = CIFAR_MEAN
  c.data.normalize_std = CIFAR_STD
  c.data.eval_crop_fraction = 1.0

  c.optim.base_lr = 1e-3
  c.optim.lr_scaling_batch = 512
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 10.0
  c.optim.weight_decay = 0.05
  return c
