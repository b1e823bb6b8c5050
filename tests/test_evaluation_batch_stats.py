"""BN's train/eval mismatch diagnostic: evaluation with each batch's own statistics
(evaluate_classifier(batch_statistics=True)) against the running averages."""
import numpy as np
import optax
import pytest

from test_evaluation import model_and_variables, padded_batches  # noqa: F401  (fixture)
from vitnorm import parallel
from vitnorm import evaluation


def _expected(model, variables, batches):
  """Loss and top-1 over the full batches, BN normalizing with each batch's statistics."""
  losses, correct, count = [], 0, 0
  for b in batches:
    logits, _ = model.apply(variables, b["image"] * 3.0 + 1.0, train=True, mutable=["batch_stats"])
    losses.append(np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, b["label"])))
    correct += int(np.sum(np.argmax(logits, -1) == b["label"]))
    count += len(b["label"])
  return float(np.mean(np.concatenate(losses))), correct / count, count


@pytest.mark.parametrize("sharded", [False, True])
def test_batch_statistics_evaluation_uses_each_full_batch_and_drops_the_padded_last_one(
    model_and_variables, sharded):  # noqa: F811
  model, variables = model_and_variables
  _, _, batches = padded_batches(num_examples=40, batch=16)  # 16, 16 and 8 real + 8 padding (NaN)
  # Inputs far from the running averages (mean 0, variance 1): the two evaluations must differ.
  shifted = [dict(b, image=b["image"] * 3.0 + 1.0) for b in batches]
  mesh = parallel.data_mesh() if sharded else None
  result = evaluation.evaluate_classifier(model, variables, shifted, mesh=mesh, batch_statistics=True)
  loss, top1, count = _expected(model, variables, batches[:2])
  assert result["num_examples"] == count == 32
  assert result["loss"] == pytest.approx(loss, rel=1e-5)
  assert result["top1"] == pytest.approx(top1, abs=1.5 / count)  # a near tie may flip across layouts
  running = evaluation.evaluate_classifier(model, variables, shifted, mesh=mesh)
  assert running["num_examples"] == 40
  assert abs(running["loss"] - result["loss"]) > 1e-3 * abs(result["loss"])
