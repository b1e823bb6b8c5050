"""configs/deit.py and configs/cifar.py at their real sizes, resolved and shaped without compiling.

prepare() resolves each config (ImageNet / CIFAR through tfds.testing.mock_data: no files, the
datasets' real class counts and image shapes), then `jax.eval_shape` of the initial train state
gives its shapes: the parameter counts equal the published ones (timm's deit_*_patch16_224; the
CIFAR ViT-Ti/4 counted layer by layer below), and the optimizer's moments and the EMA have the
parameters' structure. A listener on JAX's backend-compile event checks that nothing compiled.
"""
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar, deit
from vitnorm.training import plan as plan_lib, state as state_lib

# Published parameter counts of the DeiT models (timm deit_{tiny,small,base}_patch16_224: LayerNorm,
# token classifier, no pre_logits, 1000 classes, 224 px).
DEIT_PARAMS = {"Ti/16": 5_717_416, "S/16": 22_050_664, "B/16": 86_567_656}
DEIT_SHAPES = {"Ti/16": (192, 12, 768), "S/16": (384, 12, 1536), "B/16": (768, 12, 3072)}  # width, depth, mlp

# configs/cifar.py's ViT-Ti/4 at 32 px, 10 classes, LayerNorm: per block 2 LNs (2 x 384), q/k/v/out
# (4 x (192 x 192 + 192)) and the MLP (192 x 768 + 768 + 768 x 192 + 192) = 444,864; x 12 blocks
# = 5,338,368; patch embedding 4 x 4 x 3 x 192 + 192 = 9,408; CLS 192; position embedding
# (64 + 1) x 192 = 12,480; final LN 384; head 192 x 10 + 10 = 1,930.
CIFAR_TI4_PARAMS = 5_362_762


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture
def no_compilation():
  """Yields a list that collects every backend compilation while the test runs."""
  compiled = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if "backend_compile" in event:
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiled
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _state_shapes(config):
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    plan = plan_lib.prepare(config)
  # The key is made inside the traced function: made outside, it would be computed (compiled).
  state = jax.eval_shape(lambda: state_lib.create_train_state(plan, jax.random.key(0)))
  return plan, state


def _subtrees_shaped_like(tree, like):
  """Every subtree of `tree` (inside tuples, lists, NamedTuples, dicts) with `like`'s structure and
  leaf shapes."""
  if jax.tree.structure(tree) == jax.tree.structure(like) and all(
      a.shape == b.shape for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(like))):
    return [tree]
  if isinstance(tree, dict):
    children = tree.values()
  elif isinstance(tree, (tuple, list)):
    children = tree
  else:
    return []
  return [found for child in children for found in _subtrees_shaped_like(child, like)]


def _check_optimizer_and_ema(state):
  params = state.params
  # AdamW: a first and a second moment shaped like the parameters (and nothing else of that size).
  moments = _subtrees_shaped_like(state.opt_state, params)
  assert len(moments) == 2
  assert _count(state.opt_state) == 2 * _count(params) + sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)
  # The EMA: the parameters' structure, shapes and dtypes; its BN statistics the live ones'.
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(params)
  jax.tree.map(lambda e, p: (e.shape, e.dtype) == (p.shape, p.dtype) or pytest.fail(f"{e} vs {p}"),
               state.ema_params, params)
  assert jax.tree.structure(state.ema_batch_stats) == jax.tree.structure(state.batch_stats)


@pytest.mark.parametrize("size", ["Ti/16", "S/16", "B/16"])
def test_deit_sizes_have_the_published_parameter_counts(size, no_compilation):
  plan, state = _state_shapes(deit.get_config(f"size={size}"))
  width, depth, mlp = DEIT_SHAPES[size]
  assert (plan.model.hidden_size, plan.model.num_layers, plan.model.mlp_dim) == (width, depth, mlp)
  assert (plan.num_classes, plan.model.image_size, plan.config.batch_size) == (1000, 224, 1024)
  assert _count(state.params) == DEIT_PARAMS[size]
  assert state.params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, width)
  assert state.batch_stats == {}  # the LayerNorm ViT keeps no statistics
  assert plan.optim.ema_decay == 0.99996
  _check_optimizer_and_ema(state)
  assert no_compilation == []


def test_deit_s_bn_ffnbn_adds_the_ffn_batchnorms_and_their_statistics(no_compilation):
  plan, state = _state_shapes(deit.get_config("size=S/16,variant=bn_ffnbn"))
  assert (plan.model.norm, plan.model.ffn_norm) == ("batch", "batch")
  # Each BN has the scale and bias of the LN it replaces; the FFN-BN adds 2 x 1536 per block.
  assert _count(state.params) == DEIT_PARAMS["S/16"] + 12 * 2 * 1536
  # Running mean and variance for every BN: 2 (pre-attention, pre-FFN) x 384 + 1536 per block, + final.
  assert _count(state.batch_stats) == 2 * (12 * (2 * 384 + 1536) + 384)
  _check_optimizer_and_ema(state)
  assert no_compilation == []


@pytest.mark.parametrize("arg, num_classes, extra_head", [
    ("", 10, 0), ("dataset=cifar100,variant=bn_ffnbn", 100, 90 * 193)])
def test_cifar_ti4_has_its_parameter_count(arg, num_classes, extra_head, no_compilation):
  plan, state = _state_shapes(cifar.get_config(arg or None))
  assert (plan.model.hidden_size, plan.model.num_layers, plan.model.patch_size) == (192, 12, 4)
  assert (plan.num_classes, plan.model.image_size, plan.config.batch_size) == (num_classes, 32, 512)
  ffn_bn = 12 * 2 * 768 if plan.model.ffn_norm == "batch" else 0
  assert _count(state.params) == CIFAR_TI4_PARAMS + extra_head + ffn_bn
  assert state.params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 65, 192)
  assert state.opt_state is not None and state.ema_params is None  # cifar.py keeps no EMA
  assert _subtrees_shaped_like(state.opt_state, state.params) and len(
      _subtrees_shaped_like(state.opt_state, state.params)) == 2
  assert no_compilation == []
