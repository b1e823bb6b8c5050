"""Config files: each loads with its defaults and its :args, validates against the model and data
modules, starts with its run command, and every field is commented."""
import glob
import os
import re

import pytest

from configs import cifar, common, deit, quickstart
from vitnorm import data, variants
from vitnorm.model import vit
from vitnorm.training import optim

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                      if os.path.basename(p) not in ("__init__.py",))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_each_file_starts_with_its_command(path):
  with open(path, encoding="utf-8") as f:
    first = f.readline()
  assert first.startswith("# ") and "python -m vitnorm.train --config configs/" in first, first


def test_every_field_in_common_is_commented():
  with open(os.path.join(CONFIG_DIR, "common.py"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  assignments = [(i, l) for i, l in enumerate(lines) if re.match(r"\s+[cmdo](\.\w+)+ = ", l)
                 and not re.match(r"\s+c\.(model|data|optim|distributed|debug) = ", l)]
  assert len(assignments) > 60
  for i, line in assignments:
    commented = "#" in line or lines[i - 1].strip().startswith("#")
    assert commented, f"configs/common.py:{i + 1} has no comment: {line.strip()}"


@pytest.mark.parametrize("module, arg", [
    (quickstart, None), (quickstart, "norm=ln,ffn_norm=none,epochs=5,batch=64"), (quickstart, "feed=numpy"),
    (deit, None), (deit, "variant=Ti/16,norm=bn,ffn_norm=bn,bn_group=128"),
    (deit, "variant=B/16,norm=bn,ffn_norm=bn,ffn_norm_position=post_act"),
    (cifar, None), (cifar, "dataset=cifar100,norm=bn,ffn_norm=bn"),
])
def test_configs_validate(module, arg):
  c = module.get_config(arg)
  vit.resolve_model_config(c.model)
  data.resolve_data_config(c.data)  # every data field is known to the data package
  optim.validate(c.optim)
  assert c.model.image_size == c.data.image_size
  assert set(c.data.keys()) == set(data.config.DEFAULTS)


def test_args_select_variant_norms_and_dataset():
  c = deit.get_config("variant=Ti/16,norm=bn,ffn_norm=bn")
  assert (c.model.variant, c.model.norm, c.model.ffn_norm) == ("Ti/16", "batch", "batch")
  assert vit.resolve_model_config(c.model)["hidden_size"] == 192
  assert c.model.bn_group_size is None
  assert deit.get_config("bn_group=128").model.bn_group_size == 128
  q = quickstart.get_config("norm=layer,ffn_norm=rms,epochs=3")
  assert (q.model.norm, q.model.ffn_norm, q.num_epochs) == ("layer", "rms", 3.0)
  assert cifar.get_config("dataset=cifar100").model.num_classes == 100
  # The quickstart's feed: the digits from memory by default, the same digits through tfds with feed=tfds.
  assert quickstart.get_config().data.name == "numpy:mnist5k"
  assert quickstart.get_config() == quickstart.get_config("feed=numpy")
  fed = quickstart.get_config("feed=tfds")
  assert fed.data.name == "mnist5k" and fed.model == quickstart.get_config().model
  assert data.dataset_info(quickstart.get_config().data) == data.DatasetInfo("numpy:mnist5k", 10, (28, 28, 1), 4000, 1000)


def test_deit_recipe_values():
  c = deit.get_config()
  assert c.optim.base_lr == 5e-4 and c.optim.lr_scaling_batch == 512
  assert optim.peak_learning_rate(c.optim, c.batch_size) == pytest.approx(1e-3)
  assert (c.optim.weight_decay, c.num_epochs, c.optim.warmup_epochs) == (0.05, 300.0, 5.0)
  d = c.data
  assert (d.label_smoothing, d.mixup_alpha, d.cutmix_alpha, d.random_erasing_prob) == (0.1, 0.8, 1.0, 0.25)
  assert (d.randaugment_layers, d.randaugment_magnitude, d.randaugment_magnitude_std) == (2, 9.0, 0.5)
  assert c.model.drop_path_rate == 0.1 and d.eval_split == "validation"


def test_placeholders_stay_overridable():
  c = quickstart.get_config()
  c.num_steps = 500  # placeholder(int): None by default, settable from the command line
  c.model.bn_group_size = 32
  c.optim.grad_clip_norm = 2.0
  with pytest.raises(TypeError):
    c.num_steps = "many"


@pytest.mark.parametrize("arg, message", [("norm=bogus", "unknown norm"), ("colour=red", "is unknown"),
                                          ("epochs=ten", "not a valid float"), ("norm", "not key=value"),
                                          ("feed=tf", "feed='tf': choose numpy or tfds")])
def test_bad_args_name_the_key(arg, message):
  with pytest.raises(ValueError, match=message):
    quickstart.get_config(arg)


def test_norm_aliases():
  assert common.norm_name("BN") == "batch" and common.norm_name("ln") == "layer"
  assert common.norm_name("rms") == "rms" and common.norm_name("none") == "none"


@pytest.mark.parametrize("name, norms", [
    ("ln", ("layer", "none")), ("bn", ("batch", "none")), ("bn_ffnbn", ("batch", "batch")),
    ("ln_ffnbn", ("layer", "batch")), ("rms", ("rms", "none")), ("none", ("none", "none")),
])
def test_variant_names_select_the_papers_models_in_every_config(name, norms):
  for module in (quickstart, deit, cifar):
    c = module.get_config(f"variant={name}")
    assert (c.model.norm, c.model.ffn_norm) == norms, module.__name__
    assert variants.name_of(c.model) == name
    vit.resolve_model_config(c.model)


def test_a_bare_norm_means_that_norm_everywhere_and_no_ffn_norm():
  for module in (quickstart, deit, cifar):
    for arg, norms in (("norm=ln", ("layer", "none")), ("norm=bn", ("batch", "none")),
                       ("norm=ln,ffn_norm=bn", ("layer", "batch")), ("norm=rms,ffn_norm=rms", ("rms", "rms"))):
      c = module.get_config(arg)
      assert (c.model.norm, c.model.ffn_norm) == norms, (module.__name__, arg)
  # Defaults: the quickstart is the paper's model, deit and cifar the LN ViT.
  assert variants.name_of(quickstart.get_config().model) == "bn_ffnbn"
  assert variants.name_of(deit.get_config().model) == variants.name_of(cifar.get_config().model) == "ln"
  assert variants.name_of(quickstart.get_config("ffn_norm=none").model) == "bn"
  assert variants.name_of(quickstart.get_config("norm=rms,ffn_norm=bn").model) == "custom"


def test_size_is_its_own_argument_and_variant_with_a_slash_still_means_the_size():
  assert deit.get_config("size=B/16,variant=bn_ffnbn").model.to_dict()["variant"] == "B/16"
  c = deit.get_config("variant=Ti/16,norm=bn,ffn_norm=bn")  # the older spelling
  assert (c.model.variant, c.model.norm, c.model.ffn_norm) == ("Ti/16", "batch", "batch")
  assert cifar.get_config("size=S/4").model.variant == "S/4"
  with pytest.raises(ValueError, match="is a size and size= is given too"):
    deit.get_config("size=S/16,variant=B/16")


@pytest.mark.parametrize("arg, message", [
    ("variant=ln,norm=bn", "give either variant= .* or norm="), ("variant=lnn", "unknown variant 'lnn'"),
    ("variant=bn_ffnbn,ffn_norm=none", "give either variant="),
])
def test_bad_variant_args_are_one_line_errors(arg, message):
  with pytest.raises(ValueError, match=message) as err:
    quickstart.get_config(arg)
  assert "\n" not in str(err.value)


def test_the_variant_table_covers_the_new_norms_too():
  assert variants.norms_of("dyt") == {"norm": "dyt", "ffn_norm": "none", "qk_norm": "none"}
  assert variants.norms_of("prepbn")["norm"] == "prepbn"
  assert variants.norms_of("bn_qknorm") == {"norm": "batch", "ffn_norm": "none", "qk_norm": "layer"}
