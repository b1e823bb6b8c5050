"""vitnorm: normalization ablations for Vision Transformers in JAX/Flax.

Modules (dependencies point downwards only):
  norms        the normalization choice (layer / batch / rms / none), asked by name
  vit          the ViT (reference vision_transformer parameter layout), presets, build_model
  fold         BatchNorm folding into neighbouring Dense layers (inference)
  pretrained   loading reference ViT / AugReg .npz checkpoints
  data         tfds input pipelines and offline datasets (mnist5k, digits)
  train        the trainer (python -m vitnorm.train)
  evaluate     accuracy + throughput of a trained run (python -m vitnorm.evaluate)
  benchmark    the paper's inference-speed comparison (python -m vitnorm.benchmark)
"""

__version__ = "0.1.0"
