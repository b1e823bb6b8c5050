"""Where each dtype lives in the ViT: the compute-dtype policy and the two attention knobs.

`model.dtype` picks the compute dtype of every matmul (Dense, the patch Conv, the two attention
einsums); parameters always stay float32. What else follows from it:

  float32   everything in float32.
  bfloat16  (unchanged from earlier versions) the residual stream and every norm's output are
            bfloat16 too; norm statistics are computed in float32.
  float16   mirrors PyTorch's `torch.cuda.amp.autocast` on CUDA, the way DeiT (and the paper's
            reproduction) trained: matmuls in float16 (largest finite value 65,504), every
            matmul input cast to float16 as autocast casts it; LayerNorm, RMSNorm (also as
            QK-norm), DyT and PRepBN compute in and return float32 (autocast runs layer_norm in
            float32; DyT / PRepBN follow PyTorch's promotion with their float32 parameters);
            BatchNorm returns its input's dtype with float32 statistics (torch batch_norm under
            autocast), so the pre-norm BNs see and return the float32 residual stream and the
            FFN BN sees and returns Dense_0's float16 output; GELU runs in float16 on Dense_0's
            output; softmax and the loss run in float32. The residual stream is float32: in
            PyTorch a float16 patch embedding plus the float32 position embedding is float32,
            and so is every residual sum after it.

The attention knobs (config.model, both validated by vit.resolve_model_config):

  attention_logits  'float32' (default): q.k is accumulated and returned in float32, whatever the
                    compute dtype. 'compute': in the compute dtype, as a float16 matmul under
                    autocast returns it (a logit above 65,504 becomes inf).
  attention_scale   'query' (default): q is multiplied by 1/sqrt(head_dim) before the product.
                    'product': the product q.k is formed first and then scaled, as timm's 2021
                    `Attention` (the one DeiT used) did: `(q @ k.transpose(-2, -1)) * scale`, so
                    the *unscaled* product must fit the logits' dtype (head_dim 64: a scaled logit
                    of 8,188 already overflows float16).
"""
import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_LOGITS = ("float32", "compute")
ATTENTION_SCALE = ("query", "product")


@dataclasses.dataclass(frozen=True)
class Precision:
  """The dtypes of one model, derived from its compute dtype (see the module docstring)."""

  compute: Any  # matmuls: Dense, Conv, the attention einsums
  residual: Any  # the residual stream (position embeddings, CLS token, every residual sum)
  # dtype every norm returns; None: float16's autocast rule (BatchNorm: its input's dtype; the
  # others: float32)
  norm_output: Optional[Any]

  @property
  def max_finite(self) -> float:
    """The largest finite value of the compute dtype (65,504 for float16)."""
    return float(jnp.finfo(self.compute).max)


def policy(compute_dtype) -> Precision:
  """The Precision of a model whose matmuls run in `compute_dtype`."""
  compute = jnp.dtype(compute_dtype)
  if compute == jnp.dtype(jnp.float16):
    return Precision(compute=jnp.float16, residual=jnp.float32, norm_output=None)
  return Precision(compute=compute.type, residual=compute.type, norm_output=compute.type)


def logits_dtype(attention_logits: str, compute_dtype):
  """The dtype attention logits are accumulated and returned in."""
  if attention_logits not in ATTENTION_LOGITS:
    raise ValueError(f"unknown attention_logits {attention_logits!r}; choose one of "
                     f"{', '.join(ATTENTION_LOGITS)}")
  return jnp.float32 if attention_logits == "float32" else compute_dtype
