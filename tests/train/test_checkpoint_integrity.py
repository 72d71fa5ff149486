"""Checkpoint verification: corrupt, incomplete or non-finite steps are passed
over with one warning (bitwise the previous step is restored), or refused with
one error when no step is intact; never NaN parameters."""

import fnmatch
import glob
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from train import checkpoint, trainer
from train import checkpoint_integrity as integrity

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every kind of file Orbax writes into a step directory (checked to be complete
# below), each one deleted in a case of its own.
FILE_KINDS = [
    "_CHECKPOINT_METADATA", "commit_success.txt", "default/commit_success.txt",
    "default/_METADATA", "default/_sharding", "default/manifest.ocdbt",
    "default/array_metadatas/process_0", "default/d/*",
    "default/ocdbt.process_0/manifest.ocdbt", "default/ocdbt.process_0/d/*",
]


def step_files(step_dir) -> list[str]:
  return sorted(os.path.relpath(p, step_dir)
                for p in glob.glob(f"{step_dir}/**/*", recursive=True) if os.path.isfile(p))


def largest_array_file(step_dir) -> str:
  return max(glob.glob(f"{step_dir}/default/ocdbt.process_0/d/*"), key=os.path.getsize)


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def warnings_of(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def step4_params(trained):
  return jax.device_get(checkpoint.restore_params(str(trained[1]), step=4)[1])


def test_every_file_orbax_writes_has_a_corruption_case(trained):
  files = step_files(trained[1] / "checkpoints" / "6")
  assert integrity.MANIFEST in files
  uncovered = [f for f in files if f != integrity.MANIFEST
               and not any(fnmatch.fnmatch(f, k) for k in FILE_KINDS)]
  assert not uncovered, f"new Orbax file kind(s) without a corruption case: {uncovered}"
  assert all(any(fnmatch.fnmatch(f, k) for f in files) for k in FILE_KINDS)


@pytest.mark.parametrize("damage", ["flip", "truncate"] + [f"delete {k}" for k in FILE_KINDS])
def test_damaged_latest_step_falls_back_to_the_previous_one(copy_run, step4_params, damage,
                                                            caplog):
  _, work, _ = copy_run
  step6 = work / "checkpoints" / "6"
  if damage == "flip":
    bad = largest_array_file(step6)
    data = bytearray(open(bad, "rb").read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    open(bad, "wb").write(data)
  elif damage == "truncate":
    bad = largest_array_file(step6)
    os.truncate(bad, os.path.getsize(bad) // 2)
  else:
    bad = sorted(glob.glob(str(step6 / damage.split(" ", 1)[1])))[0]
    os.remove(bad)
  caplog.set_level(logging.WARNING)
  _, params = checkpoint.restore_params(str(work))
  assert_trees_equal(params, step4_params)
  (msg,) = warnings_of(caplog)
  assert "restored step 4" in msg and "step 6" in msg
  assert os.path.relpath(bad, step6) in msg


def test_no_intact_step_is_one_clear_error(copy_run):
  _, work, _ = copy_run
  for step_dir in glob.glob(str(work / "checkpoints" / "*")):
    os.remove(largest_array_file(step_dir))
  with pytest.raises(checkpoint.CheckpointError, match="no intact checkpoint") as e:
    checkpoint.restore_params(str(work))
  for s in (1, 2, 4, 6):
    assert f"step {s}: default/ocdbt.process_0/d/" in str(e.value)
  assert str(e.value).count("missing") == 4


def test_non_finite_values_are_never_restored(copy_run, caplog):
  """A step whose checksums match but that holds NaN (as an older moelab could
  save) is passed over; and Checkpoints.save refuses to write one."""
  _, work, final = copy_run
  ckpt_dir = work / "checkpoints"
  mngr = ocp.CheckpointManager(str(ckpt_dir))
  abstract = mngr.restore(6, args=ocp.args.StandardRestore())
  bad = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x,
                     abstract)
  mngr.save(8, args=ocp.args.StandardSave(bad))
  mngr.wait_until_finished()
  mngr.close()
  integrity.write_manifest(str(ckpt_dir / "8"), 8)
  caplog.set_level(logging.WARNING)
  _, restored = checkpoint.restore_params(str(work))
  assert_trees_equal(restored, final)
  (msg,) = warnings_of(caplog)
  assert "step 8" in msg and "NaN or Inf" in msg and "restored step 6" in msg

  ckpts = checkpoint.Checkpoints(str(work), every=1, keep=10)
  with pytest.raises(checkpoint.NonFiniteStateError, match="step 9"):
    ckpts.save(9, bad)
  ckpts.close()
  assert not os.path.exists(ckpt_dir / "9")


def test_step_without_manifest_is_used_with_a_warning(copy_run, caplog):
  _, work, final = copy_run
  os.remove(work / "checkpoints" / "6" / integrity.MANIFEST)
  caplog.set_level(logging.WARNING)
  _, params = checkpoint.restore_params(str(work))
  assert_trees_equal(params, final)
  (msg,) = warnings_of(caplog)
  assert "step 6 has no checksum manifest" in msg


def test_unreadable_step_without_manifest_falls_back_without_event_loop_noise(copy_run):
  """Orbax itself fails on this step: one warning, no 'Event loop is closed' spam."""
  _, work, _ = copy_run
  os.remove(work / "checkpoints" / "6" / integrity.MANIFEST)
  os.remove(work / "checkpoints" / "6" / "default" / "manifest.ocdbt")
  code = ("import time; from train import checkpoint; "
          f"checkpoint.restore_params({str(work)!r}); time.sleep(0.5); print('restored')")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "restored" in out.stdout
  assert "Event loop is closed" not in out.stderr and "Traceback" not in out.stderr
  warned = [l for l in out.stderr.splitlines() if l.startswith("WARNING")]
  assert len(warned) == 1 and "Orbax cannot restore it" in warned[0], out.stderr[-3000:]


def test_training_resumes_past_a_corrupt_step_and_quarantines_it(copy_run, caplog):
  config, work, final = copy_run
  bad = largest_array_file(work / "checkpoints" / "6")
  with open(bad, "r+b") as f:
    f.seek(100)
    f.write(b"\0" * 64)
  caplog.set_level(logging.WARNING)
  summary = trainer.train_and_evaluate(config, str(work), progress=False)
  assert summary["start_step"] == 4 and summary["final_step"] == 6
  assert_trees_equal(jax.device_get(summary["state"].params), final)
  moved = work / checkpoint.QUARANTINE / "6"
  assert moved.is_dir() and any("moved step 6" in m for m in warnings_of(caplog))
  assert integrity.verify(str(work / "checkpoints" / "6"), 6) is None  # saved again, sealed
  assert integrity.verify(str(moved), 6) is not None  # the damaged copy is kept as it was


def test_a_committed_step_is_sealed_without_waiting_for_the_next_save(copy_run):
  """poll() (once per training step) seals a step as soon as Orbax committed
  it, so a run killed before its next save leaves a verifiable step."""
  _, work, _ = copy_run
  ckpts = checkpoint.Checkpoints(str(work), every=1, keep=10)
  state = ckpts.mngr.restore(6, args=ocp.args.StandardRestore())
  assert ckpts.save(7, state)
  ckpts.mngr.wait_until_finished()  # Orbax's commit, not ours
  step7 = str(work / "checkpoints" / "7")
  assert not integrity.has_manifest(step7)
  ckpts.poll()
  ckpts._sealer.join()  # the background hashing, done
  assert integrity.has_manifest(step7) and integrity.verify(step7, 7) is None
  ckpts.close()
