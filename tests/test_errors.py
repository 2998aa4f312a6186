"""errors.py: storage faults recognised however a library reports them, and their one line."""

import errno

from mae_jax import errors


def test_storage_faults_are_recognised_through_wrappers_and_messages(tmp_path):
  assert errors.storage_cause(OSError(errno.ENOSPC, "No space left on device", "/w/x")) == \
      "No space left on device: /w/x"
  try:
    try:
      raise OSError(errno.EROFS, "Read-only file system", "/w/checkpoints/5")
    except OSError as inner:
      raise RuntimeError("save failed") from inner
  except RuntimeError as wrapped:
    assert errors.storage_cause(wrapped) == "Read-only file system: /w/checkpoints/5"
  # tensorstore under orbax keeps only the words and the path, in a ValueError.
  message = ('RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file "/w/c/10.tmp/d/": '
             "Failed to write 303970 bytes to file 29: No space left on device [os_error_code='28']")
  assert errors.storage_cause(ValueError(message)) == "No space left on device: /w/c/10.tmp/d/"
  assert errors.storage_cause(ValueError("a bug")) is None
  assert errors.storage_cause(OSError(errno.ENOENT, "No such file")) is None
  # A writer that kept no errno: a full disk only if the file system is full, which tmp_path is not.
  assert errors.storage_cause(RuntimeError("unexpected pos"), written=str(tmp_path / "x.pth")) is None


def test_the_line_names_the_checkpoint_to_resume_from():
  line = errors.storage_fault_message("No space left on device", 20, "/w/checkpoints")
  assert line == ("storage fault (No space left on device); the run stopped and the last saved checkpoint "
                  "is step 20 in /w/checkpoints. Free space or repair the file system, then run the same "
                  "command to resume")
  assert "no checkpoint was saved" in errors.storage_fault_message("x", None, "/w/checkpoints")
  assert "checkpoint" not in errors.storage_fault_message("x")  # a command that does not checkpoint
  assert (errors.StorageError.exit_code, errors.LoaderError.exit_code) == (74, 75)
