# python -m vitnorm.train --config configs/deit.py:size=S/16,variant=bn_ffnbn --workdir gs://BUCKET/deit_s_bn_ffnbn \
#     --config.data.data_dir=/path/to/tensorflow_datasets
"""The paper's ImageNet recipe (DeiT, GPU/TPU): DeiT-Ti/S/B for each norm variant.

AdamW, lr 5e-4 x batch / 512, weight decay 0.05, 300 epochs with 5 warm-up epochs then cosine,
label smoothing 0.1, mixup 0.8, CutMix 1.0, RandAugment m9 (mstd 0.5, 2 ops), drop path 0.1,
random erasing 0.25, EMA of the weights (0.99996, evaluated as eval_ema/*).

Arguments (`:key=value,...`):
  size             Ti/16, S/16 (default) or B/16 (deit_ti/16, ... are aliases; variant=S/16 also works)
  variant          the paper's model by name (vitnorm/variants.py): ln (default), bn, bn_ffnbn,
                   ln_ffnbn, rms, none, dyt, prepbn, bn_qknorm
  norm             a custom mix instead: this norm everywhere (ln, bn, rms, none, dyt, prepbn), no FFN norm ...
  ffn_norm         ... plus this norm inside the FFN (bn = the paper's fix, ln, rms, dyt, prepbn)
  ffn_norm_position  pre_act (between fc1 and GELU, default) or post_act
  bn_group         BN ghost-batch size (e.g. 128 = per-GPU statistics of an 8-GPU DeiT run); 0 = global
  dataset          tfds name (imagenet2012 default; eval split 'validation')
  batch            global batch size (1024)
  epochs           training epochs (300)
"""
from configs import common

ARGS = dict(size=None, variant=None, norm=None, ffn_norm=None, ffn_norm_position="pre_act", bn_group=0,
            dataset="imagenet2012", batch=1024, epochs=300.0)

NUM_CLASSES = {"imagenet2012": 1000, "imagenette": 10, "oxford_flowers102": 102}


def get_config(arg=None):
  args, size = common.split_size(common.parse_args(arg, ARGS), "S/16")
  c = common.base_config()
  c.batch_size = args["batch"]
  c.num_epochs = args["epochs"]
  c.log_every = 100
  c.eval_every = 5000
  c.checkpoint_every = 2500
  c.diagnostics_every = 1000

  c.model = common.model_config(variant=size, num_classes=NUM_CLASSES.get(args["dataset"], 1000),
                                image_size=224)
  common.apply_variant(c.model, common.variant_norms(args, "ln"))
  c.model.ffn_norm_position = args["ffn_norm_position"]
  c.model.drop_path_rate = 0.1
  if args["bn_group"]:
    c.model.bn_group_size = args["bn_group"]

  c.data = common.data_config(name=args["dataset"], image_size=224)
  c.data.eval_split = "validation" if args["dataset"] == "imagenet2012" else "test"
  c.data.channels = 3
  c.data.inception_crop = True
  c.data.crop_scale_min = 0.08
  c.data.hflip = True
  c.data.randaugment_layers = 2
  c.data.randaugment_magnitude = 9.0
  c.data.randaugment_magnitude_std = 0.5
  c.data.random_erasing_prob = 0.25
  c.data.mixup_alpha = 0.8
  c.data.cutmix_alpha = 1.0
  c.data.mixup_switch_prob = 0.5
  c.data.mixup_prob = 1.0
  c.data.label_smoothing = 0.1
  c.data.eval_crop_fraction = 0.875

  c.optim.base_lr = 5e-4
  c.optim.lr_scaling_batch = 512
  c.optim.min_lr = 1e-5
  c.optim.warmup_epochs = 5.0
  c.optim.weight_decay = 0.05
  c.optim.ema_decay = 0.99996
  return c
