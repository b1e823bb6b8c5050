"""User paths (workdirs, init_from, evaluation and benchmark outputs) as URLs, through etils.epath.

A path is either local (made absolute, as before) or a URL such as `gs://bucket/run`, which epath
(orbax's own path type) hands to the bucket's filesystem: tf.io.gfile when TensorFlow is installed,
fsspec (gcsfs for gs://) with EPATH_USE_TF=false. Orbax writes the checkpoint arrays itself, through
tensorstore. Buckets differ from local disks in three ways that matter here: a directory exists
only as the prefix of an object, there is no atomic rename, and an object cannot be appended to.
So `write_text_atomic` is tmp + os.replace on a local disk and one object upload on a bucket
(readers see the old or the new object, never half of one), and appending is a whole-object
rewrite (vitnorm.workdir.RunLogger). Strings stay the currency: every function takes str or
PathLike and `resolve` returns a str (`gs://...` or an absolute local path).
"""
import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(path: PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), False for local ones."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
  """A URL as it is (never `<cwd>/gs:/...`), a local path made absolute."""
  path = os.fspath(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def as_path(path: PathLike) -> epath.Path:
  return epath.Path(resolve(path))


def join(path: PathLike, *parts: str) -> str:
  """Like os.path.join, for URLs too; a relative local path stays relative."""
  path = os.fspath(path)
  return "/".join([path.rstrip("/"), *parts]) if is_url(path) else os.path.join(path, *parts)


def exists(path: PathLike) -> bool:
  """A file, a directory, or (on a bucket) a prefix with at least one object under it."""
  return os.path.exists(path) if not is_url(path) else as_path(path).exists()


def is_file(path: PathLike) -> bool:
  return os.path.isfile(path) if not is_url(path) else as_path(path).is_file()


def is_dir(path: PathLike) -> bool:
  """A local directory, or a bucket prefix that holds at least one object."""
  return os.path.isdir(path) if not is_url(path) else as_path(path).is_dir()


def makedirs(path: PathLike):
  """Creates a local directory (and parents); nothing to do on a bucket (prefixes need no creation)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def read_text(path: PathLike) -> str:
  return as_path(path).read_text(encoding="utf-8")


def write_text_atomic(path: PathLike, text: str):
  """Readers see the old or the new content, never part of it: tmp + os.replace on a local disk
  (the rename is atomic there), one object upload on a bucket (object writes are atomic there)."""
  if is_url(path):
    as_path(path).write_text(text, encoding="utf-8")
    return
  path = os.fspath(path)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
