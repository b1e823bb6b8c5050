"""Masked top-1 / loss over padded eval batches: exact counts, padding ignored (even NaN),
the same result sharded over 8 devices as on one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitnorm import parallel
from vitnorm.model import vit
from vitnorm import evaluation
from vitnorm.errors import UserError

MODEL_CFG = dict(variant=None, hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2, patch_size=4,
                 num_classes=5, image_size=8, num_channels=1, norm="batch", ffn_norm="batch")


@pytest.fixture(scope="module")
def model_and_variables():
  model = vit.build_model(MODEL_CFG)
  v = vit.init_variables(model, jax.random.PRNGKey(0), vit.input_shape(MODEL_CFG, 1))
  # A non-zero head, so predictions differ between examples.
  params = jax.tree.map(lambda x: x, v["params"])
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
  return model, {"params": params, "batch_stats": v["batch_stats"]}


def padded_batches(num_examples=37, batch=16, seed=0):
  rng = np.random.RandomState(seed)
  images = rng.randn(num_examples, 8, 8, 1).astype(np.float32)
  labels = rng.randint(0, 5, num_examples).astype(np.int32)
  batches = []
  for start in range(0, num_examples, batch):
    img, lab = images[start:start + batch], labels[start:start + batch]
    pad = batch - len(img)
    mask = np.r_[np.ones(len(img)), np.zeros(pad)].astype(np.float32)
    # Padding holds NaN images and out-of-range labels: they must count for nothing.
    img = np.concatenate([img, np.full((pad, 8, 8, 1), np.nan, np.float32)])
    lab = np.concatenate([lab, np.full((pad,), 99, np.int32)])
    batches.append(dict(image=img, label=lab, mask=mask))
  return images, labels, batches


def reference(model, variables, images, labels):
  logits = np.asarray(model.apply(variables, jnp.asarray(images), train=False), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return np.mean(logits.argmax(-1) == labels), -np.mean(logp[np.arange(len(labels)), labels])


def test_masked_top1_and_loss_exact(model_and_variables):
  model, variables = model_and_variables
  images, labels, batches = padded_batches()
  top1, loss = reference(model, variables, images, labels)
  assert 0 < top1 < 1
  single = evaluation.evaluate_classifier(model, variables, batches)
  assert single["num_examples"] == 37
  assert single["top1"] == pytest.approx(top1, abs=1e-12)
  assert single["loss"] == pytest.approx(loss, rel=1e-5)
  sharded = evaluation.evaluate_classifier(model, variables, batches, mesh=parallel.data_mesh())
  assert sharded["num_examples"] == 37 and sharded["top1"] == single["top1"]
  assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_missing_mask_means_all_real_and_empty_input(model_and_variables):
  model, variables = model_and_variables
  images, labels, _ = padded_batches(num_examples=16)
  r = evaluation.evaluate_classifier(model, variables, [dict(image=images, label=labels)])
  assert r["num_examples"] == 16 and r["top1"] == pytest.approx(reference(model, variables, images, labels)[0])
  empty = evaluation.evaluate_classifier(model, variables, [])
  assert empty["num_examples"] == 0 and np.isnan(empty["top1"])


def test_bad_batches_are_user_errors(model_and_variables):
  model, variables = model_and_variables
  images, labels, _ = padded_batches(num_examples=12)
  with pytest.raises(UserError, match="integer class labels"):
    evaluation.evaluate_classifier(model, variables, [dict(image=images, label=np.eye(5)[labels])])
  with pytest.raises(UserError, match="does not split over 8 local devices"):
    evaluation.evaluate_classifier(model, variables, [dict(image=images, label=labels)],
                                   mesh=parallel.data_mesh())
