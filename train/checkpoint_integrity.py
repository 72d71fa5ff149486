"""Checksums for committed checkpoint steps, and the checks a restore runs.

Orbax itself does not notice a flipped byte in an array file: it restores it
(possibly as NaN). So, once a step is committed, moelab writes a sha256
manifest of every file in the step directory into that same directory,

    checkpoints/<step>/moelab.sha256.json   {"format": 1, "step": <step>,
                                             "files": {relpath: {"size", "sha256"}}}

and a restore verifies it first. Living inside the step directory, it is
deleted with the step by Orbax's `max_to_keep` cleanup, and Orbax's listing
(integer-named directories) never sees it.

A step without a manifest (written before moelab had manifests, or by a run
killed between Orbax's commit and the manifest write) is "unsealed": it is
accepted, with a warning, only if it restores and every value is finite.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import types

import jax
import jax.numpy as jnp

MANIFEST = "moelab.sha256.json"
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Problem:
  """Why one step cannot be used: the step, the file at fault and what is wrong."""

  step: int
  file: str
  reason: str

  def __str__(self) -> str:
    return f"step {self.step}: {self.file}: {self.reason}"


def _files(step_dir: str) -> list[str]:
  out = []
  for root, dirs, names in os.walk(step_dir):
    dirs.sort()
    for n in sorted(names):
      if n == MANIFEST or n.startswith(f".{MANIFEST}"):
        continue
      out.append(os.path.relpath(os.path.join(root, n), step_dir).replace(os.sep, "/"))
  return out


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: str, step: int) -> str:
  """Hashes every file of a committed step into `step_dir/MANIFEST` (atomic
  rename), so later corruption of any of them is detected."""
  files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                 "sha256": _sha256(os.path.join(step_dir, rel))}
           for rel in _files(step_dir)}
  path = os.path.join(step_dir, MANIFEST)
  tmp = os.path.join(step_dir, f".{MANIFEST}.tmp")
  with open(tmp, "w") as f:
    json.dump({"format": _FORMAT, "step": step, "files": files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def has_manifest(step_dir: str) -> bool:
  return os.path.exists(os.path.join(step_dir, MANIFEST))


def verify(step_dir: str, step: int) -> Problem | None:
  """The first file of the step that is missing, resized or changed, or None.

  A step without a manifest returns None here (see `has_manifest`).
  """
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = manifest["files"]
    if manifest.get("format") != _FORMAT or not isinstance(files, dict):
      raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
  except (OSError, ValueError, KeyError, TypeError) as e:
    return Problem(step, MANIFEST, f"unreadable manifest ({e})")
  bad = []
  for rel, want in sorted(files.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      bad.append((rel, "missing"))
    elif os.path.getsize(full) != want["size"]:
      bad.append((rel, f"size {os.path.getsize(full)} bytes, {want['size']} when saved"))
    elif _sha256(full) != want["sha256"]:
      bad.append((rel, "sha256 differs from the one recorded when it was saved"))
  if not bad:
    return None
  rel, reason = bad[0]
  more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
  return Problem(step, rel, reason + more)


@jax.jit
def _finite(leaves):
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def first_nonfinite(tree) -> str | None:
  """Path of the first floating-point leaf holding a NaN or Inf, or None.

  One fused on-device reduction and one host transfer of a few booleans.
  """
  pairs = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not pairs:
    return None
  ok = jax.device_get(_finite([x for _, x in pairs]))
  for (p, _), good in zip(pairs, ok):
    if not good:
      return jax.tree_util.keystr(p)
  return None


def _from_closed_loop(tb: types.TracebackType | None) -> bool:
  while tb is not None:
    code = tb.tb_frame.f_code
    if code.co_name == "call_soon_threadsafe" and code.co_filename == asyncio.base_events.__file__:
      return True
    tb = tb.tb_next
  return False


class _AbandonedReads(logging.Filter):
  """Drops asyncio's reports of a never-retrieved TensorStore read (see below)."""

  def filter(self, record):
    exc = record.exc_info[1] if record.exc_info else None
    return not (str(record.msg).startswith("Task exception was never retrieved")
                and exc is not None and "tensorstore_spec" in str(exc))


def quiet_abandoned_loops() -> None:
  """Drops the "Event loop is closed" reports of a failed Orbax restore.

  Orbax runs a restore as `asyncio.gather` of one TensorStore read per array
  in a private event loop and closes that loop as soon as one read fails.
  The other reads still finish on TensorStore threads and try to wake the
  closed loop; each attempt is reported through `sys.unraisablehook` (a
  traceback per array). They carry nothing: the real error has already been
  raised. This hook drops exactly those (RuntimeError raised in asyncio's
  `call_soon_threadsafe`) and passes every other report on. The reads that fail
  too are garbage-collected later as "Task exception was never retrieved" (asyncio's
  logger, when a loaded machine lets them finish after the restore returned): a
  filter drops those whose exception is a TensorStore error. Idempotent.
  """
  asyncio_log = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReads) for f in asyncio_log.filters):
    asyncio_log.addFilter(_AbandonedReads())
  prev = sys.unraisablehook
  if getattr(prev, "_moelab_quiet_loops", False):
    return

  def hook(u):
    if (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        and _from_closed_loop(u.exc_traceback)):
      return
    prev(u)

  hook._moelab_quiet_loops = True
  sys.unraisablehook = hook


class _MissingStepMetadata(logging.Filter):
  def filter(self, record):
    return not ("orbax" in record.pathname
                and str(record.msg).startswith("Metadata file does not exist"))


@contextlib.contextmanager
def quiet_missing_metadata():
  """Drops Orbax's "Metadata file does not exist" warnings while steps are listed
  and restored: a step missing its `_CHECKPOINT_METADATA` is reported once, by
  the verification, instead of once per Orbax look-up."""
  f = _MissingStepMetadata()
  logger = logging.getLogger("absl")
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)
