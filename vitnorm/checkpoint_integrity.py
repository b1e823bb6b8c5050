"""Integrity manifests of checkpoints: the size and SHA-256 of every file, written after the save.

Orbax makes a step appear atomically (a temporary directory renamed when complete, or a
commit_success file on object stores), but it records no checksum: a truncated, emptied, deleted
or bit-flipped file of a committed checkpoint is only noticed, if at all, as a tensorstore
traceback. Once orbax has committed step S, `write_manifest` lists every file of
`checkpoints/S/` with its size and SHA-256 in `checkpoints/S/vitnorm_manifest.json` (written
to a temporary name, then renamed). `damage` re-reads a step and says what is wrong with it,
or None when every file matches; a step without a manifest never verifies (its save did not
finish, or it predates manifests). `move_aside` renames a damaged step to `S.corrupt`, which
orbax does not list as a step, so nothing is ever deleted for being damaged. `verified_step` is
the readers' choice of step (evaluation); a workdir whose steps all predate manifests is read
unverified, with a warning (`predates_manifests`). All file access
goes through etils.epath, so bucket workdirs (gs://...) work like local ones.
"""
import hashlib
import json
import sys
import time
from typing import Optional

from etils import epath

from vitnorm.errors import UserError

MANIFEST_FILE = "vitnorm_manifest.json"
MANIFEST_VERSION = 1
HASH = "sha256"
_CHUNK = 8 << 20  # bytes read at a time while hashing


def _without_scheme(path) -> str:
  """'gs://b/run/x' -> 'b/run/x' (fsspec's walk yields bucket paths without their scheme)."""
  text = str(path)
  return text.split("://", 1)[1] if "://" in text else text


def _files(step_dir: epath.Path) -> dict:
  """{relative posix path: path} of every regular file under step_dir, manifest excluded."""
  out = {}
  base = _without_scheme(step_dir).rstrip("/")
  for root, _, names in step_dir.walk():
    for name in names:
      rel = (_without_scheme(root).rstrip("/") + "/" + name)[len(base):].lstrip("/")
      if rel != MANIFEST_FILE and not rel.startswith(MANIFEST_FILE + "."):
        out[rel] = step_dir / rel
  return out


def file_digest(path: epath.Path) -> tuple:
  """(size in bytes, hex SHA-256) of one file."""
  digest, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
      size += len(chunk)
  return size, digest.hexdigest()


def write_manifest(step_dir, *, hashing: bool = True) -> epath.Path:
  """Writes step_dir/vitnorm_manifest.json for a committed step; returns its path.

  hashing False records sizes only (used only to measure what hashing costs).
  """
  step_dir = epath.Path(step_dir)
  files = {}
  for rel, path in sorted(_files(step_dir).items()):
    if hashing:
      size, digest = file_digest(path)
      files[rel] = {"size": size, HASH: digest}
    else:
      files[rel] = {"size": path.stat().length}
  manifest = {"version": MANIFEST_VERSION, "hash": HASH if hashing else None,
              "written_at": time.time(), "files": files}
  target = step_dir / MANIFEST_FILE
  tmp = step_dir / f"{MANIFEST_FILE}.tmp"
  tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
  tmp.replace(target)
  return target


def has_manifest(step_dir) -> bool:
  return (epath.Path(step_dir) / MANIFEST_FILE).exists()


def damage(step_dir) -> Optional[str]:
  """None if every file of step_dir matches its manifest, else a short description of the damage."""
  step_dir = epath.Path(step_dir)
  if not step_dir.is_dir():
    return "the step directory is missing"
  path = step_dir / MANIFEST_FILE
  if not path.exists():
    return (f"it has no integrity manifest ({MANIFEST_FILE}): its save never finished, or it was "
            "written before manifests existed")
  try:
    manifest = json.loads(path.read_text())
    expected = manifest["files"]
    algorithm = manifest.get("hash")
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its manifest {MANIFEST_FILE} is unreadable ({type(e).__name__})"
  found = _files(step_dir)
  missing = sorted(set(expected) - set(found))
  if missing:
    return f"{len(missing)} file(s) missing, first {missing[0]}"
  if not expected:
    return "its manifest lists no files"
  for rel in sorted(expected):
    want = expected[rel]
    size = found[rel].stat().length
    if size != want["size"]:
      return f"{rel} has {size} bytes, the manifest says {want['size']}"
  if algorithm != HASH:
    return f"its manifest records no {HASH} hashes"
  for rel in sorted(expected):
    if file_digest(found[rel])[1] != expected[rel][HASH]:
      return f"{rel} does not match its {HASH} (flipped or overwritten bytes)"
  return None


def move_aside(step_dir) -> epath.Path:
  """Renames step_dir to '<step>.corrupt' (or '.corrupt-2', ...) next to it; returns the new path."""
  step_dir = epath.Path(step_dir)
  for n in range(1, 1000):
    target = step_dir.parent / (f"{step_dir.name}.corrupt" + ("" if n == 1 else f"-{n}"))
    if not target.exists():
      return step_dir.rename(target)
  raise OSError(f"too many {step_dir.name}.corrupt* directories in {step_dir.parent}")


def predates_manifests(directory, steps) -> bool:
  """True for a workdir written before manifests existed: no step has one, none was moved aside."""
  directory = epath.Path(directory)
  return (not any(has_manifest(directory / str(s)) for s in steps) and
          not any(directory.glob("*.corrupt*")))


def verified_step(directory, steps: list, step: Optional[int] = None) -> int:
  """`step` if it verifies (UserError if not); step None: the newest step that verifies, with a
  warning line for each newer damaged one (left in place: readers never move checkpoints).
  Checkpoints that predate manifests are read unverified, with a warning."""
  directory = epath.Path(directory)
  if predates_manifests(directory, steps):
    print(f"warning: the checkpoints in {directory} predate integrity manifests; reading them "
          "unverified", file=sys.stderr, flush=True)
    return steps[-1] if step is None else step
  damaged = []
  for candidate in ([step] if step is not None else reversed(steps)):
    why = damage(directory / str(candidate))
    if why is None:
      for bad, reason in damaged:
        print(f"warning: checkpoint {bad} in {directory} is damaged ({reason}); using step {candidate}",
              file=sys.stderr, flush=True)
      return candidate
    damaged.append((candidate, why))
  if step is not None:
    raise UserError(f"step: checkpoint {step} in {directory} is damaged ({damaged[0][1]}); pass another "
                    f"--step (available: {', '.join(map(str, steps))})")
  raise UserError(f"workdir: none of the {len(steps)} checkpoints in {directory} verifies ("
                  + "; ".join(f"{s}: {w}" for s, w in damaged) + "); restore them from a copy")
