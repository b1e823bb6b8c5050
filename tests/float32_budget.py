"""Float32 error budgets: for two training trajectories that differ only in reduction order (jit
vs pmap, 2 processes x 2 devices vs 1 x 4, a resume on another layout), and for one function
computed by two programs (assert_equal_up_to_rounding, at the end).

Summing in another order changes a float32 sum in its last bits (relative ~1e-7 per addition),
and Adam amplifies some of that: an update is m / (sqrt(v) + eps), so for an element whose
gradient is near zero the *direction* of its update can change, by up to one learning rate per
step, whatever the gradient's size. Which elements those are, and by how much they move, depends
on the CPU (its vector width changes the reduction order): a bound on the largest element is a
bound tuned to one machine (2% of the largest movement passed on an AMD EPYC and failed on an
Intel Xeon, 0.022 of it). The budget is therefore on the whole tree: the L2 norm of the
difference, relative to the L2 norm of how far the reference moved from where it started. A few
near-zero elements cannot exhaust it; a real error (a missed step, unsynced BN statistics, a
wrong learning rate, restoring the wrong checkpoint) moves the whole tree by a sizeable fraction
of its movement and does.
"""
import jax
import numpy as np

# ||a - b|| / ||reference - initial|| for parameters and BN running statistics after a few steps.
RELATIVE_L2 = 1e-2


def _norm(tree):
  return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree))))


def relative_l2_difference(got, reference, initial):
  """||got - reference||_2 / ||reference - initial||_2 over every leaf of the trees (same structures)."""
  assert jax.tree.structure(got) == jax.tree.structure(reference) == jax.tree.structure(initial)
  diff = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), got, reference)
  moved = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), reference, initial)
  movement = _norm(moved)
  assert movement > 0, "the reference did not move from its initial values: nothing to compare"
  return _norm(diff) / movement


def assert_same_trajectory(got, reference, initial, what, budget=RELATIVE_L2):
  """got follows reference (which started at initial) within the float32 budget (module docstring)."""
  ratio = relative_l2_difference(got, reference, initial)
  print(f"float32 budget: {what}: ||got - reference|| / ||movement|| = {ratio:.3g} (budget {budget:g})")
  assert ratio < budget, f"{what}: ||got - reference|| / ||movement|| = {ratio:.3g} >= {budget:g}"


# A few float32 roundings of the array's own scale: the same function computed by two programs that
# XLA fused or reduced differently (float32's machine epsilon is 2**-23, about 1.2e-7).
EPS32 = float(np.finfo(np.float32).eps)


def assert_equal_up_to_rounding(actual, desired, ulps=16, err_msg=""):
  """|actual - desired| <= ulps * eps32 * max|desired|, elementwise: an absolute budget set by the
  array's scale (a per-element relative tolerance fails on the near-zero elements of an array whose
  other elements are large, and an absolute one is tuned to one array)."""
  desired = np.asarray(desired)
  scale = float(np.max(np.abs(desired)))
  np.testing.assert_allclose(actual, desired, rtol=0, atol=ulps * EPS32 * max(scale, 1e-30), err_msg=err_msg)
