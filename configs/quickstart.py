# python -m vitnorm.train --config configs/quickstart.py --workdir /tmp/vitnorm/quickstart
# Variants: configs/quickstart.py:variant=ln  (the LayerNorm ViT), :variant=bn (BN without the FFN BN), ...
"""A small ViT on the offline `mnist5k` digits (4,000 train / 1,000 test, 28x28 grey): trains on a
2-core CPU in a few minutes to >= 97% test accuracy. The default is the paper's model: BatchNorm
in place of every LayerNorm plus a BatchNorm inside each FFN.

Measured on the quiet 2-core development machine, default arguments (the in-memory feed):
97.3% test top-1 after 6,250 steps (100 epochs, batch 64) in 3m09s wall
(experiments/results/speed_cpu/quickstart_default_feed_run.txt). Through tf.data (feed=tfds,
the earlier default, on a machine shared with other jobs): 98.1% in 3m44s.

Arguments (`:key=value,...`):
  variant   the paper's model by name (vitnorm/variants.py): bn_ffnbn (default), bn, ln, ln_ffnbn,
            rms, none, dyt, prepbn, bn_qknorm
  norm      a custom mix instead: this norm everywhere (ln, bn, rms, none, dyt, prepbn) and no FFN norm ...
  ffn_norm  ... plus this norm inside the FFN (bn, ln, rms, dyt, prepbn); alone: added to the default's norm
  epochs    training length in epochs (num_steps follows; --config.num_steps=N overrides)
  batch     global batch size
  feed      numpy (default: the mnist5k images and split from memory, `data.name=numpy:mnist5k`,
            random shifts on the host in NumPy: no TensorFlow at run time and no tf.data threads
            competing with the train step for the two cores, so the loop runs at the bare step's
            speed, experiments/results/speed_cpu/loop_quickstart*.txt) or tfds (the same digits
            through the tfds 'mnist5k' builder and tf.data: split slices, the tf.data augmentations)
"""
from configs import common

ARGS = dict(variant=None, norm=None, ffn_norm=None, epochs=100.0, batch=64, feed="numpy")  # None: not given
FEEDS = {"tfds": "mnist5k", "numpy": "numpy:mnist5k"}
DEFAULT_VARIANT = "bn_ffnbn"


def get_config(arg=None):
  args = common.parse_args(arg, ARGS)
  c = common.base_config()
  c.seed = 0
  c.batch_size = args["batch"]
  c.num_epochs = args["epochs"]
  c.log_every = 50
  c.eval_every = 1250  # 20 epochs
  c.checkpoint_every = 1250
  c.diagnostics_every = 250
  c.keep_checkpoints = 2

  c.model = common.model_config(variant=None, num_classes=10, image_size=28, num_channels=1)
  common.apply_variant(c.model, common.variant_norms(args, DEFAULT_VARIANT))
  c.model.hidden_size = 64
  c.model.num_layers = 4
  c.model.mlp_dim = 128
  c.model.num_heads = 4
  c.model.patch_size = 7  # 4 x 4 = 16 patches + CLS: ~3x cheaper than 4x4 patches, learns faster per step

  if args["feed"] not in FEEDS:
    raise ValueError(f"config argument feed={args['feed']!r}: choose numpy or tfds")
  c.data = common.data_config(name=FEEDS[args["feed"]], image_size=28)
  c.data.channels = 1
  c.data.cache = True  # 4,000 images: decode once, exact per-epoch permutations
  c.data.inception_crop = False
  c.data.hflip = False  # digits are not mirror-symmetric
  c.data.random_shift_pad = 2  # small random shifts instead
  c.data.normalize_mean = (0.1307,)  # MNIST pixel statistics
  c.data.normalize_std = (0.3081,)
  c.data.eval_crop_fraction = 1.0  # eval images are already 28x28
  c.data.label_smoothing = 0.0

  c.optim.base_lr = 2e-3
  c.optim.lr_scaling_batch = None  # base_lr is the peak lr as is
  c.optim.warmup_epochs = 2.0
  c.optim.min_lr = 1e-5
  c.optim.weight_decay = 0.05
  c.optim.grad_clip_norm = 1.0
  return c
