"""The ViT's building blocks (flax.linen): drop path, attention (with optional QK-norm), the FFN
(with the optional norm between its Dense layers), the encoder block, position embeddings and the
encoder. Parameter names follow google-research/vision_transformer (see vitnorm.model.vit, which
assembles them and documents the whole parameter tree).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vitnorm.model import norms, precision


def _rms(x):
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def _max_abs(*xs):
  """max |x| over all arrays, as float32 (an inf in a float16 array stays inf)."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in xs]))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example (rng 'dropout')."""

  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with the reference layout: query/key/value (hidden, heads, head_dim), out.

  qk_norm 'layer' / 'rms': `query_norm` and `key_norm` normalize q and k of each head over
  head_dim (statistics per token and head) before the dot product.

  attention_logits / attention_scale: where the logits q.k are computed ('float32' or the
  'compute' dtype) and where 1/sqrt(head_dim) is applied ('query' before the product, or on the
  'product' after it, as timm's 2021 Attention did); see vitnorm.model.precision. The softmax
  always runs in float32.

  Diagnostics sown: max_attention_logit (the largest scaled logit), max_abs_qk (the largest
  unscaled |q.k|: as computed in the logits' dtype with scale 'product'; with scale 'query' the
  product is never formed and it is sqrt(head_dim) x the largest |logit|, in float32), and
  max_abs_matmul (the largest |x| over the outputs of query, key, value, q.k, weights.v and out).
  """

  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  qk_norm: str = "none"
  ln_epsilon: float = 1e-6
  attention_logits: str = "float32"
  attention_scale: str = "query"

  @nn.compact
  def __call__(self, x, *, train: bool):
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    dense = lambda name: nn.DenseGeneral(  # noqa: E731
        (self.num_heads, head_dim), dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    matmul_outputs = [q, k, v]
    if self.qk_norm != "none":
      norm_cls = nn.LayerNorm if self.qk_norm == "layer" else nn.RMSNorm
      norm_dtype = precision.policy(self.dtype).norm_output
      q = norm_cls(epsilon=self.ln_epsilon, dtype=norm_dtype, name="query_norm")(q).astype(self.dtype)
      k = norm_cls(epsilon=self.ln_epsilon, dtype=norm_dtype, name="key_norm")(k).astype(self.dtype)
    logits_dtype = precision.logits_dtype(self.attention_logits, self.dtype)
    if self.attention_scale == "query":
      q = q / jnp.sqrt(head_dim).astype(q.dtype)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype)
      max_abs_qk = jnp.max(jnp.abs(logits)).astype(jnp.float32) * jnp.sqrt(jnp.float32(head_dim))
      matmul_outputs.append(logits)
    elif self.attention_scale == "product":
      product = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype)
      max_abs_qk = jnp.max(jnp.abs(product)).astype(jnp.float32)
      matmul_outputs.append(product)
      logits = product * jnp.asarray(1.0 / head_dim ** 0.5, logits_dtype)
    else:
      raise ValueError(f"unknown attention_scale {self.attention_scale!r}; choose one of "
                       f"{', '.join(precision.ATTENTION_SCALE)}")
    self.sow("diagnostics", "max_attention_logit", jnp.max(logits).astype(jnp.float32))
    self.sow("diagnostics", "max_abs_qk", max_abs_qk)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate, broadcast_dims=())(weights, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    y = nn.DenseGeneral(hidden, axis=(-2, -1), dtype=self.dtype,
                        kernel_init=nn.initializers.xavier_uniform(), name="out")(out)
    self.sow("diagnostics", "max_abs_matmul", _max_abs(*matmul_outputs, out, y))
    return y


class MlpBlock(nn.Module):
  """Dense_0 -> [ffn norm] -> GELU -> [ffn norm] -> Dense_1, with the norm at ffn_norm_position.

  Diagnostics sown: ffn_hidden_rms (after the activation and any FFN norm), RMS and max |x| of
  Dense_0's output before any FFN norm (ffn_pre_norm_rms / _max_abs) and of Dense_1's output, the
  FFN branch (ffn_out_rms / _max_abs), and max_abs_matmul over both Dense outputs.
  """

  mlp_dim: int
  ffn_norm: str = "none"
  ffn_norm_position: str = "pre_act"
  norm_options: norms.NormOptions = norms.NormOptions()
  num_cls_tokens: int = 0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, lam=0.0):
    dense = lambda features, name: nn.Dense(  # noqa: E731
        features, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    ffn_norm = norms.make_norm(
        self.ffn_norm, name=norms.module_name(self.ffn_norm, 0), options=self.norm_options,
        dtype=precision.policy(self.dtype).norm_output, num_cls_tokens=self.num_cls_tokens, lam=lam)
    h = dense(self.mlp_dim, "Dense_0")(x)
    self.sow("diagnostics", "ffn_pre_norm_rms", _rms(h))
    self.sow("diagnostics", "ffn_pre_norm_max_abs", _max_abs(h))
    fc1 = h
    if self.ffn_norm_position == "pre_act":
      h = ffn_norm(h, train)
    h = nn.gelu(h)
    if self.ffn_norm_position == "post_act":
      h = ffn_norm(h, train)
    self.sow("diagnostics", "ffn_hidden_rms", _rms(h))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    y = dense(x.shape[-1], "Dense_1")(h)
    self.sow("diagnostics", "ffn_out_rms", _rms(y))
    self.sow("diagnostics", "ffn_out_max_abs", _max_abs(y))
    self.sow("diagnostics", "max_abs_matmul", _max_abs(fc1, y))
    return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class EncoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm_0(x)), then x + mlp(norm_1(x)), with stochastic depth."""

  num_heads: int
  mlp_dim: int
  norm: str = "layer"
  ffn_norm: str = "none"
  ffn_norm_position: str = "pre_act"
  norm_options: norms.NormOptions = norms.NormOptions()
  num_cls_tokens: int = 0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  qk_norm: str = "none"
  attention_logits: str = "float32"
  attention_scale: str = "query"

  @nn.compact
  def __call__(self, x, *, train: bool, lam=0.0):
    def norm(index):
      return norms.make_norm(self.norm, name=norms.module_name(self.norm, index),
                             options=self.norm_options, dtype=precision.policy(self.dtype).norm_output,
                             num_cls_tokens=self.num_cls_tokens, lam=lam)

    drop_path = DropPath(self.drop_path_rate)
    y = norm(0)(x, train)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, self.dtype, self.qk_norm,
        self.norm_options.ln_epsilon, attention_logits=self.attention_logits,
        attention_scale=self.attention_scale, name="MultiHeadDotProductAttention_0")(y, train=train)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    x = x + drop_path(y, deterministic=not train)
    y = norm(1)(x, train)
    y = MlpBlock(self.mlp_dim, self.ffn_norm, self.ffn_norm_position, self.norm_options,
                 self.num_cls_tokens, self.dropout_rate, self.dtype, name="MlpBlock_0")(
                     y, train=train, lam=lam)
    x = x + drop_path(y, deterministic=not train)
    self.sow("diagnostics", "residual_rms", _rms(x))
    return x


class AddPositionEmbs(nn.Module):
  """Learned position embeddings, param `pos_embedding` of shape (1, tokens, hidden)."""

  @nn.compact
  def __call__(self, x):
    pe = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1,) + x.shape[1:])
    return x + pe.astype(x.dtype)


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final norm (`encoder_norm`)."""

  num_layers: int
  num_heads: int
  mlp_dim: int
  norm: str = "layer"
  ffn_norm: str = "none"
  ffn_norm_position: str = "pre_act"
  norm_options: norms.NormOptions = norms.NormOptions()
  num_cls_tokens: int = 0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  qk_norm: str = "none"
  attention_logits: str = "float32"
  attention_scale: str = "query"

  @nn.compact
  def __call__(self, x, *, train: bool, lam=0.0):
    x = AddPositionEmbs(name="posembed_input")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i in range(self.num_layers):
      # Stochastic depth rate grows linearly from 0 (first block) to drop_path_rate (last).
      rate = self.drop_path_rate * i / max(self.num_layers - 1, 1)
      x = EncoderBlock(
          self.num_heads, self.mlp_dim, self.norm, self.ffn_norm, self.ffn_norm_position,
          self.norm_options, self.num_cls_tokens, self.dropout_rate,
          self.attention_dropout_rate, rate, self.dtype, self.qk_norm,
          attention_logits=self.attention_logits, attention_scale=self.attention_scale,
          name=f"encoderblock_{i}")(x, train=train, lam=lam)
    final_norm = norms.make_norm(self.norm, name="encoder_norm", options=self.norm_options,
                                 dtype=precision.policy(self.dtype).norm_output,
                                 num_cls_tokens=self.num_cls_tokens, lam=lam)
    return final_norm(x, train)
