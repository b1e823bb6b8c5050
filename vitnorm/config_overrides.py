"""Command-line config overrides into one-line errors: `--config.FIELD=None`, unknown fields, bad values.

absl / ml_collections report a mistyped override, a bad value or a broken config file as a
traceback or a multi-line message; these helpers turn each into the one line
'<field>: <what is wrong; the fix>' that vitnorm.train prints, and apply `--config.FIELD=None`
(which absl cannot parse) to the fields whose default may be None.
"""
import re

from vitnorm.errors import UserError, one_line

# Fields that may be None although their default is a value (the others: placeholders in configs/common.py).
NULLABLE_FIELDS = ("optim.lr_scaling_batch",)
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-help")
NONE_WORDS = ("none", "null")  # --config.FIELD=None / none / null unsets a field
_OVERRIDE = re.compile(r"^--config\.([\w.]+)=(.*)$")


def none_overrides(argv):
  """(argv without the --config.FIELD=None overrides, [FIELD, ...]): absl cannot parse None."""
  rest, fields = [], []
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match and match.group(2).strip().lower() in NONE_WORDS:
      fields.append(match.group(1))
    else:
      rest.append(arg)
  return rest, fields


def apply_none(config, field):
  """Sets a field to None where its default may be None; a str field takes the text 'none'."""
  from ml_collections import config_dict  # pylint: disable=g-import-not-at-top
  *path, key = field.split(".")
  parent = config
  for part in path:
    if not isinstance(parent, config_dict.ConfigDict) or part not in parent:
      raise UserError(f"config.{field}: no such config field; fix the name (fields and their "
                      "comments: configs/common.py)")
    parent = parent[part]
  if not isinstance(parent, config_dict.ConfigDict) or key not in parent:
    raise UserError(f"config.{field}: no such config field; fix the name (fields and their comments: "
                    "configs/common.py)")
  value = parent[key]
  nullable = (isinstance(parent._fields.get(key), config_dict.FieldReference)  # pylint: disable=protected-access
              or value is None or field in NULLABLE_FIELDS)
  if nullable:
    with parent.unlocked():
      parent[key] = None
  elif isinstance(value, str):
    parent[key] = "none"
  else:
    raise UserError(f"config.{field}: cannot be None (it needs a value of type {type(value).__name__}); give a value "
                    "(fields that may be None say so in configs/common.py)")


def config_file_argument(argv) -> str:
  """FILE of `--config FILE[:ARGS]` or `--config=FILE[:ARGS]` in argv ('the config file' if absent)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return "the config file"


def syntax_error_line(e: SyntaxError) -> str:
  return (f"--config: {e.filename} line {e.lineno}: {e.msg}; fix the syntax error in the config "
          "file (python -m py_compile FILE shows it)")


def last_error_line(message: str) -> str:
  """The useful line of a config_flags error (which may embed a whole traceback)."""
  lines = [l.strip() for l in message.splitlines() if l.strip()]
  if "Traceback (most recent call last)" in message and lines:
    last = lines[-1]
    return last.split(": ", 1)[1] if re.match(r"^\w+(Error|Exception): ", last) else last
  if any("No such file" in l for l in lines):  # config file missing: say which and why
    return next(l for l in lines if "No such file" in l)
  return " ".join(message.split())


def unknown_field(err, argv) -> str:
  """'config.model.nrom: no such config field; ...' for an override naming a missing field."""
  raw = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
  text = one_line(str(raw))
  key = text.split(" Did you mean")[0].strip("\"' ")
  override = next((a for a in argv if a.startswith("--config.") and
                   re.search(rf"[.]{re.escape(key)}$", a.split("=")[0])), None)
  field = override.split("=")[0][2:] if override else key
  suggestion = re.search(r'Did you mean "([\w.]+)"', text)
  if suggestion:
    prefix = field[:-len(key)] if field.endswith(key) else ""
    hint = f"did you mean {prefix}{suggestion.group(1).split('.')[-1]}? "
  else:
    hint = "fix the name "
  return f"{field}: no such config field; {hint}(fields and their comments: configs/common.py)"


def bad_value(message: str) -> str:
  """'config.data.cache: 'maybe' is not a boolean; use true or false' from absl's flag error."""
  match = re.match(r"^flag --(config\.[\w.]+)=(.*?): (.*)$", message)
  if not match:
    return one_line(message)
  field, value, reason = match.groups()
  if "boolean" in reason.lower():
    return f"{field}: {value!r} is not a boolean; use true or false"
  if "float" in reason:
    return f"{field}: {value!r} is not a number; give a float (or None where the field may be None)"
  if "int" in reason:
    return f"{field}: {value!r} is not an integer; give an int (or None where the field may be None)"
  return f"{field}: {value!r}: {one_line(reason)}"
