"""The sown diagnostics are the quantities they name, read off the activations themselves
(capture_intermediates), in the dtype the model computes in."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitnorm.model import vit

TINY = dict(variant=None, hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4,
            num_classes=10, image_size=8, num_channels=1)


def _run(cfg):
  model = vit.build_model(cfg)
  variables = vit.init_variables(model, jax.random.key(0), (1, 8, 8, 1))
  head = variables["params"]["head"]
  head["kernel"] = jax.random.normal(jax.random.key(7), head["kernel"].shape)
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1)) * 3.0
  logits, state = model.apply(variables, x, train=True, capture_intermediates=True,
                              mutable=["batch_stats", "intermediates", "diagnostics"])
  return logits, state["intermediates"], state["diagnostics"]


def _f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ffn_and_matmul_diagnostics_are_the_activations_they_name(dtype):
  logits, inter, diags = _run(dict(TINY, norm="batch", ffn_norm="batch", dtype=dtype))
  for i in range(2):
    block_inter = inter["Transformer"][f"encoderblock_{i}"]
    block = diags["Transformer"][f"encoderblock_{i}"]
    mlp, attention = block["MlpBlock_0"], block["MultiHeadDotProductAttention_0"]
    fc1 = _f32(block_inter["MlpBlock_0"]["Dense_0"]["__call__"][0])  # before the FFN BN
    fc2 = _f32(block_inter["MlpBlock_0"]["Dense_1"]["__call__"][0])
    assert float(mlp["ffn_pre_norm_max_abs"][0]) == pytest.approx(np.max(np.abs(fc1)), rel=1e-6)
    assert float(mlp["ffn_pre_norm_rms"][0]) == pytest.approx(np.sqrt(np.mean(fc1 ** 2)), rel=1e-4)
    assert float(mlp["ffn_out_max_abs"][0]) == pytest.approx(np.max(np.abs(fc2)), rel=1e-6)
    assert float(mlp["ffn_out_rms"][0]) == pytest.approx(np.sqrt(np.mean(fc2 ** 2)), rel=1e-4)
    # The FFN BN normalizes Dense_0's output: the pre-norm RMS is not the hidden RMS after it.
    assert float(mlp["ffn_pre_norm_rms"][0]) != pytest.approx(float(mlp["ffn_hidden_rms"][0]), rel=1e-2)
    assert float(mlp["max_abs_matmul"][0]) == pytest.approx(max(np.max(np.abs(fc1)), np.max(np.abs(fc2))))
    outs = [_f32(block_inter["MultiHeadDotProductAttention_0"][n]["__call__"][0])
            for n in ("query", "key", "value", "out")]
    assert float(attention["max_abs_matmul"][0]) >= max(np.max(np.abs(o)) for o in outs)
    # Scale on q: the unscaled product is sqrt(head_dim) x the largest |logit|.
    assert float(attention["max_abs_qk"][0]) >= float(attention["max_attention_logit"][0]) * 4 * (1 - 1e-3)
  lse = jax.nn.logsumexp(logits, axis=-1)
  assert float(diags["head_log_partition_mean"][0]) == pytest.approx(float(jnp.mean(lse)), rel=1e-5)
  assert float(diags["head_log_partition_max"][0]) == pytest.approx(float(jnp.max(lse)), rel=1e-5)
  assert float(diags["head_max_abs"][0]) == pytest.approx(float(jnp.max(jnp.abs(logits))), rel=1e-6)
  conv = _f32(inter["embedding"]["__call__"][0])
  assert float(diags["embedding_max_abs"][0]) == pytest.approx(np.max(np.abs(conv)), rel=1e-6)
