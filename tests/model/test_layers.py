"""Tests for vitnorm.model.layers: the attention block with QK-norm against a hand-written attention,
and drop path (identity at eval, per-example masks scaled by 1/keep in training)."""
import jax
import jax.numpy as jnp
import numpy as np

from vitnorm.model import layers


def test_qk_norm_normalizes_each_head_over_head_dim_and_matches_a_hand_written_attention():
  hidden, heads = 16, 2
  head_dim = hidden // heads
  x = jax.random.normal(jax.random.key(0), (2, 5, hidden)) * 3 + 1
  for kind in ("layer", "rms"):
    attn = layers.MultiHeadDotProductAttention(heads, qk_norm=kind)
    variables = attn.init(jax.random.key(1), x, train=False)
    p = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(2), a.shape), variables["params"])
    assert p["query_norm"]["scale"].shape == (head_dim,)
    out, inter = attn.apply({"params": p}, x, train=False, capture_intermediates=True,
                            mutable=["intermediates", "diagnostics"])
    # The norm's own output, undone of its affine part, has zero mean (layer) and unit mean
    # square over head_dim for every (example, token, head).
    for name in ("query_norm", "key_norm"):
      y = np.asarray(inter["intermediates"][name]["__call__"][0], np.float64)
      y = (y - (np.asarray(p[name]["bias"]) if kind == "layer" else 0)) / np.asarray(p[name]["scale"])
      assert y.shape == (2, 5, heads, head_dim)
      if kind == "layer":
        np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
        np.testing.assert_allclose(y.var(-1), 1, rtol=1e-3)
      else:
        np.testing.assert_allclose(np.mean(y ** 2, -1), 1, rtol=1e-3)

    def norm(z, q):
      z = np.asarray(z, np.float64)
      if kind == "layer":
        z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-6)
        return z * np.asarray(q["scale"]) + np.asarray(q["bias"])
      return z / np.sqrt(np.mean(z ** 2, -1, keepdims=True) + 1e-6) * np.asarray(q["scale"])

    proj = lambda name: np.einsum("btc,chd->bthd", np.asarray(x, np.float64),  # noqa: E731
                                  np.asarray(p[name]["kernel"])) + np.asarray(p[name]["bias"])
    q, k, v = norm(proj("query"), p["query_norm"]), norm(proj("key"), p["key_norm"]), proj("value")
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v)
    expected = np.einsum("bqhd,hdc->bqc", o, np.asarray(p["out"]["kernel"])) + np.asarray(p["out"]["bias"])
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(inter["diagnostics"]["max_attention_logit"][0]), logits.max(), rtol=1e-5)


def test_drop_path_is_identity_at_eval_and_drops_whole_examples_in_training():
  x = jnp.ones((64, 3, 4))
  layer = layers.DropPath(rate=0.25)
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  y = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)}))
  per_example = y.reshape(64, -1)
  kept = per_example[:, 0] != 0
  # Every example is either dropped whole or kept and scaled by 1 / (1 - rate).
  np.testing.assert_array_equal(per_example[~kept], 0)
  np.testing.assert_allclose(per_example[kept], 1 / 0.75, rtol=1e-6)
  assert 0 < (~kept).sum() < 64
