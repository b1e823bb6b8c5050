"""prepare() resolves a config once into a frozen, typed Plan; equal models give equal specs; the
layers import downward only."""
import ast
import dataclasses
import pathlib

import pytest

from configs import common
from vitnorm.model import vit
from vitnorm.training import plan as plan_lib

REPO = pathlib.Path(__file__).resolve().parents[2]


def _plan(**model):
  c = common.base_config()
  c.model = common.model_config(variant=None, num_classes=10, image_size=8, num_channels=1)
  c.model.update(dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4, **model))
  return plan_lib.Plan(config=plan_lib.canonical_config(c), num_steps=20, warmup_steps=2,
                       steps_per_epoch=10.0, eval_batch_size=8, num_classes=10,
                       num_train_examples=80, num_eval_examples=8)


def test_the_plan_and_its_specs_are_frozen():
  plan = _plan()
  for obj, field in ((plan, "num_steps"), (plan, "model"), (plan.model, "norm"),
                     (plan.optim, "peak_lr")):
    with pytest.raises(dataclasses.FrozenInstanceError):
      setattr(obj, field, None)


def test_configs_that_describe_the_same_model_give_equal_specs():
  a = vit.model_spec(dict(variant="Ti/16", num_classes=10, image_size=32, norm="bn", ffn_norm="bn"))
  b = vit.model_spec(dict(hidden_size=192, num_layers=12, mlp_dim=768, num_heads=3, patch_size=16,
                          num_classes=10, image_size=32, norm="batch", ffn_norm="batch",
                          bn_momentum=0.9, dtype="float32"))
  assert a == b and hash(a) == hash(b)
  assert vit.model_spec(dict(variant="Ti/16", num_classes=10, image_size=32, norm="ln")) != a
  # The plan resolves its config's model once, to the same spec.
  plan = _plan(norm="bn", ffn_norm="bn")
  assert plan.model == _plan(norm="batch", ffn_norm="batch").model
  assert plan.model.norm == "batch" and plan.model.input_shape(4) == (4, 8, 8, 1)
  assert plan.optim.num_steps == 20 and plan.optim.warmup_steps == 2


def test_build_model_takes_the_spec():
  spec = _plan(norm="bn").model
  model = vit.build_model(spec)
  assert (model.norm, model.hidden_size, model.num_layers) == ("batch", 32, 2)


def _imports(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names)


@pytest.mark.parametrize("package, forbidden", [
    ("vitnorm/model", ("vitnorm.training", "vitnorm.inference", "vitnorm.data")),
    ("vitnorm/data", ("vitnorm.training", "vitnorm.inference", "vitnorm.model")),
    ("vitnorm/inference", ("vitnorm.training",)),
])
def test_layers_import_downward_only(package, forbidden):
  offenders = [(p.name, m) for p in sorted((REPO / package).glob("*.py")) for m in _imports(p)
               if m.startswith(forbidden)]
  assert offenders == []


def test_start_header_precision_line_comes_from_the_spec():
  from vitnorm.training import header  # pylint: disable=g-import-not-at-top
  assert header._precision_line(_plan()) == []  # float32 with the default knobs: no line
  line, = header._precision_line(_plan(dtype="float16", attention_logits="compute",
                                       attention_scale="product"))
  assert line.startswith("precision  float16 matmuls, attention logits in compute, 1/sqrt(d) on the "
                         "product; loss scale 65536, x2 after 2,000 good steps")
