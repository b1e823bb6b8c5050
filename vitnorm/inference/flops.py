"""Analytic FLOP count of a ViT forward pass, to cross-check XLA's cost analysis.

`compiled.cost_analysis()['flops']` is what throughput.py reports, but on GPU it has missed the
FLOPs of cuBLAS custom calls (jax issues #22249, #16008), which would make every "fraction of the
matmul peak" and MFU figure wrong. This count needs no compiler: the matrix products of the model,
2 FLOPs per multiply-add, from its sizes alone:

  patch embedding   2 * N * (P*P*C) * D          N = (image_size / P)^2 patches
  per block         2 * T * D * 3D   (q, k, v)   T = N + 1 with a CLS token ('token'), else N
                    2 * T * T * D * 2 (q k^T and attention @ v)
                    2 * T * D * D    (attention output projection)
                    2 * T * D * M * 2 (the two FFN Dense layers)
  head              2 * D * R + 2 * R * K with representation_size R, else 2 * D * K

Norms, softmax, GELU, biases and residual adds are left out: at ViT-S/16 and 224 px they add
about 1% (cost analysis on CPU: 9.26 GFLOP per image, this count: 9.20), and a folded BN model
has the same count as the no-norm one.
"""
from typing import Mapping

from vitnorm.model import vit


def vit_forward_flops(model_cfg: Mapping) -> float:
  """Matmul FLOPs of one image's forward pass through the ViT of `model_cfg` (a model config)."""
  c = vit.resolve_model_config(model_cfg)
  p, d, m, k = c["patch_size"], c["hidden_size"], c["mlp_dim"], c["num_classes"]
  n = (c["image_size"] // p) ** 2
  t = n + (1 if c["classifier"] == "token" else 0)
  embed = 2.0 * n * p * p * c["num_channels"] * d
  block = 2.0 * t * d * 3 * d + 2.0 * 2 * t * t * d + 2.0 * t * d * d + 2.0 * 2 * t * d * m
  r = c.get("representation_size")
  head = 2.0 * d * r + 2.0 * r * k if r else 2.0 * d * k
  return embed + c["num_layers"] * block + head
