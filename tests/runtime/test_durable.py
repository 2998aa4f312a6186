"""runtime/durable.py: files written under a temporary name, flushed, renamed into place, the
rename flushed; a failed write leaves nothing under the final name; leftovers of killed writers
are removed by the next write."""

import os
import subprocess

import pytest

from mae_jax.runtime import durable, paths


def _record_syncs(monkeypatch):
  """Records, in order, every fsync and rename durable.py makes."""
  events = []
  real_fsync_file, real_fsync_dir = durable.fsync_file, durable.fsync_dir
  real_replace, real_rename = os.replace, os.rename
  monkeypatch.setattr(durable, "fsync_file", lambda p: (events.append(("fsync", p)), real_fsync_file(p)))
  monkeypatch.setattr(durable, "fsync_dir", lambda p: (events.append(("fsync_dir", p)), real_fsync_dir(p)))
  monkeypatch.setattr(durable.os, "replace", lambda a, b: (events.append(("rename", a, b)), real_replace(a, b)))
  monkeypatch.setattr(durable.os, "rename", lambda a, b: (events.append(("rename", a, b)), real_rename(a, b)))
  return events


def test_a_file_is_flushed_then_renamed_then_the_rename_flushed(tmp_path, monkeypatch):
  events = _record_syncs(monkeypatch)
  final = tmp_path / "results.json"
  durable.write_json(str(final), {"top1": 42.0})
  tmp = durable.partial_name(str(final))
  assert events == [("fsync", tmp), ("rename", tmp, str(final)), ("fsync_dir", str(tmp_path))]
  assert final.read_text() == '{\n  "top1": 42.0\n}'
  assert os.listdir(tmp_path) == ["results.json"]


def test_a_folder_is_flushed_file_by_file_before_its_rename(tmp_path, monkeypatch):
  events = _record_syncs(monkeypatch)
  final = tmp_path / "export"
  with durable.replacing(str(final)) as tmp:
    os.makedirs(os.path.join(tmp, "sub"))
    for name in ("sub/a.bin", "b.json"):
      with open(os.path.join(tmp, name), "w") as f:
        f.write(name)
  rename = events.index(("rename", tmp, str(final)))
  synced = {e[1] for e in events[:rename]}
  assert {os.path.join(tmp, "sub/a.bin"), os.path.join(tmp, "b.json"), os.path.join(tmp, "sub"), tmp} <= synced
  assert events[rename + 1:] == [("fsync_dir", str(tmp_path))]
  assert (final / "sub" / "a.bin").read_text() == "sub/a.bin"


def test_a_failed_or_interrupted_write_leaves_the_final_name_as_it_was(tmp_path):
  final = tmp_path / "export.pth"
  for error in (OSError(28, "No space left on device"), KeyboardInterrupt()):
    with pytest.raises(type(error)):
      with durable.replacing(str(final)) as tmp, open(tmp, "wb") as f:
        f.write(b"half of it")
        raise error
    assert os.listdir(tmp_path) == []  # no file under the name, no temporary copy
  final.write_bytes(b"the previous version")
  with pytest.raises(KeyboardInterrupt):
    with durable.replacing(str(final)) as tmp, open(tmp, "wb") as f:
      f.write(b"half")
      raise KeyboardInterrupt
  assert final.read_bytes() == b"the previous version" and os.listdir(tmp_path) == ["export.pth"]


def test_a_folder_never_replaces_one_with_content(tmp_path):
  final = tmp_path / "hf"
  final.mkdir()
  (final / "config.json").write_text("{}")
  with pytest.raises(FileExistsError):
    with durable.replacing(str(final)) as tmp:
      os.makedirs(tmp)
  assert os.listdir(final) == ["config.json"] and os.listdir(tmp_path) == ["hf"]
  empty = tmp_path / "new"
  empty.mkdir()  # made by the user beforehand: replaced
  with durable.replacing(str(empty)) as tmp:
    os.makedirs(tmp)
    (open(os.path.join(tmp, "x"), "w")).close()
  assert os.listdir(empty) == ["x"]


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path):
  dead = subprocess.Popen(["true"])
  dead.wait()
  final = tmp_path / "export.pth"
  stale = tmp_path / f".export.pth{durable.PARTIAL}{dead.pid}"
  live = tmp_path / f".export.pth{durable.PARTIAL}1"  # pid 1 is alive
  stale.write_bytes(b"cut short")
  live.write_bytes(b"being written")
  durable.write_bytes(str(final), b"whole")
  assert sorted(os.listdir(tmp_path)) == sorted(["export.pth", live.name])
  assert final.read_bytes() == b"whole"


def test_paths_on_buckets_are_remote():  # durable writes upload them whole instead of fsyncing
  assert not paths.is_remote("/tmp/x") and not paths.is_remote("runs/a")
  assert paths.is_remote("gs://bucket/run")


def test_a_storage_fault_is_told_by_writing_a_probe(tmp_path):
  assert durable.storage_fault(str(tmp_path)) is None and os.listdir(tmp_path) == []
  read_only = tmp_path / "ro"
  read_only.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)]).returncode:
    pytest.skip("cannot mount a tmpfs here")
  try:
    assert durable.storage_fault(str(read_only)).errno == 30  # EROFS
  finally:
    subprocess.run(["umount", str(read_only)])
