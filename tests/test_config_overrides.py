"""vitnorm.config_overrides: --config.FIELD=None, and one-line messages for unknown fields, bad
values and config files that do not parse."""
import ml_collections
import pytest

from vitnorm import config_overrides as co
from vitnorm.errors import UserError


def test_none_overrides_are_taken_out_of_argv():
  argv = ["prog", "--config=c.py", "--config.optim.grad_clip_norm=None", "--config.a=none ",
          "--config.b=3", "--workdir=none"]
  rest, fields = co.none_overrides(argv)
  assert rest == ["prog", "--config=c.py", "--config.b=3", "--workdir=none"]
  assert fields == ["optim.grad_clip_norm", "a"]


def test_apply_none_unsets_nullable_fields_and_refuses_required_ones():
  c = ml_collections.ConfigDict({"init_from": None, "batch_size": 64, "model": {"norm": "layer"},
                                 "optim": {"lr_scaling_batch": 512}})
  c.lock()
  co.apply_none(c, "init_from")
  co.apply_none(c, "optim.lr_scaling_batch")  # listed in NULLABLE_FIELDS although it defaults to 512
  co.apply_none(c, "model.norm")  # a text field takes the word 'none'
  assert (c.init_from, c.optim.lr_scaling_batch, c.model.norm) == (None, None, "none")
  with pytest.raises(UserError, match=r"^config.batch_size: cannot be None"):
    co.apply_none(c, "batch_size")
  with pytest.raises(UserError, match=r"^config.model.nrom: no such config field"):
    co.apply_none(c, "model.nrom")


def test_unknown_field_names_the_override_and_suggests_the_near_name():
  err = KeyError('\'num_step\'\nDid you mean "num_steps" instead of "num_step"?')
  line = co.unknown_field(err, ["prog", "--config.num_step=20"])
  assert line == ("config.num_step: no such config field; did you mean config.num_steps? (fields and their "
                  "comments: configs/common.py)")
  assert "\n" not in line and "\\" not in line


def test_bad_values_and_syntax_errors_are_one_plain_line():
  assert co.bad_value("flag --config.data.cache=maybe: Non-boolean argument to boolean flag") == (
      "config.data.cache: 'maybe' is not a boolean; use true or false")
  assert co.bad_value("flag --config.optim.base_lr=fast: could not convert string to float: 'fast'") == (
      "config.optim.base_lr: 'fast' is not a number; give a float (or None where the field may be None)")
  err = SyntaxError("invalid syntax", ("configs/x.py", 7, 3, "c.a = = 1\n"))
  assert co.syntax_error_line(err).startswith("--config: configs/x.py line 7: invalid syntax; fix")
