"""Faults of real machines, injected into runs started as a user starts them: a disk that fills
while a checkpoint is written, a file system that turns read-only at save time, a disk that
fills while `convert` writes, a data-loader worker killed, the terminal closed (SIGHUP). Each
ends with one line and a scheduler-readable exit code, nothing reported saved is lost, no broken
file remains under a final name, and the same command afterwards resumes (or converts).

File systems are small tmpfs mounts made by the test (it needs the right to mount: root, as in
CI); without it those tests are skipped."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mae_jax import errors
from mae_jax.io import checkpointing

from conftest import REPO, run_cli, run_losses, small_folder, tiny_config, tiny_workdir

ARGS = ("--config.log_every_steps=1", "--config.checkpoint_every_steps=5", "--config.figure_every_steps=100000",
        "--config.batch_size=16", "--config.num_epochs=20")  # 80 images: 5 steps an epoch


@pytest.fixture
def mount(tmp_path):
  """mount(path, size=..., read_only=False): a tmpfs at `path`, unmounted after the test."""
  mounted = []

  def make(path, size="64m", read_only=False):
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode:
      pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip()}): the fault needs its own file system")
    mounted.append(str(path))
    return str(path)

  yield make
  for path in reversed(mounted):
    subprocess.run(["umount", "-l", path], capture_output=True)


def _fill(path):
  """Takes every free byte of the file system of `path`."""
  with open(os.path.join(path, "filler"), "wb") as f:
    try:
      while True:
        f.write(b"\0" * (1 << 16))
        f.flush()
    except OSError:
      pass


def _run_until(workdir, folder, line, *args, then):
  """Starts pretraining; once its output shows `line`, calls `then()`; returns (exit code, output)."""
  proc = run_cli(workdir, "--config.max_steps=100000", *ARGS, *args, folder=folder, wait=False)
  out, deadline, fired = [], time.time() + 300, False
  for text in proc.stdout:
    out.append(text)
    if not fired and line in text:
      then()
      fired = True
    assert time.time() < deadline, "".join(out)[-3000:]
  proc.wait(timeout=120)
  return proc.returncode, "".join(out)


def _one_error_line(output: str) -> str:
  errors_ = [line for line in output.splitlines() if line.startswith("error: ")]
  assert len(errors_) == 1 and "Traceback" not in output, output[-5000:]
  return errors_[0]


def test_a_disk_full_during_a_checkpoint_ends_in_one_line_and_the_same_command_resumes(cifar_folder, tmp_path, mount):
  folder = small_folder(cifar_folder, tmp_path / "images", per_class=40)
  disk = mount(tmp_path / "disk")
  workdir = os.path.join(disk, "run")
  code, out = _run_until(workdir, folder, "checkpoint 5 saved", then=lambda: _fill(disk))
  assert code == errors.StorageError.exit_code, out[-3000:]
  line = _one_error_line(out)
  saved = checkpointing.newest_step(workdir)  # 5, or 10 when that save beat the filler
  assert saved in (5, 10), out[-3000:]
  assert "No space left on device" in line and f"the last saved checkpoint is step {saved} in {workdir}/checkpoints" in line
  assert "run the same command to resume" in line
  os.remove(os.path.join(disk, "filler"))

  resumed = run_cli(workdir, "--config.max_steps=17", *ARGS, folder=folder)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {workdir}/checkpoints/{saved}" in resumed.stdout
  assert not any("orbax-checkpoint-tmp" in e for e in os.listdir(os.path.join(workdir, "checkpoints")))
  reference = run_cli(tmp_path / "reference", "--config.max_steps=17", *ARGS, folder=folder)
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert run_losses(workdir) == run_losses(tmp_path / "reference")  # every step, bit-identical


def test_a_file_system_turning_read_only_at_save_time_ends_at_once_in_one_line(cifar_folder, tmp_path, mount):
  folder = small_folder(cifar_folder, tmp_path / "images", per_class=40)
  workdir = tmp_path / "run"
  started = []
  # The checkpoints folder becomes a read-only file system after the first save: the next save
  # cannot create its folder (orbax used to wait 300 s for it).
  code, out = _run_until(workdir, folder, "checkpoint 5 saved", then=lambda: started.append(
      (time.time(), mount(workdir / "checkpoints", size="1m", read_only=True))))
  assert code == errors.StorageError.exit_code, out[-3000:]
  line = _one_error_line(out)
  assert time.time() - started[0][0] < 60  # no wait for a folder that cannot be made
  subprocess.run(["umount", str(workdir / "checkpoints")], check=True)
  saved = checkpointing.newest_step(str(workdir))  # 5, or 10 when that save beat the mount
  assert saved in (5, 10) and "Read-only file system" in line
  assert f"the last saved checkpoint is step {saved}" in line


def test_a_killed_loader_worker_stops_with_a_checkpoint_and_the_same_command_resumes(cifar_folder, tmp_path):
  import psutil
  folder = small_folder(cifar_folder, tmp_path / "images", per_class=40)
  workdir = tmp_path / "run"
  proc = run_cli(workdir, "--config.max_steps=100000", *ARGS, "--config.dataset.num_workers=2",
                 "--config.checkpoint_every_steps=1000", folder=folder, wait=False)
  out = []
  for text in proc.stdout:
    out.append(text)
    if text.startswith("step 3/"):
      workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "spawn_main" in " ".join(p.cmdline())]  # not multiprocessing's resource tracker
      assert len(workers) == 2
      workers[0].kill()
      break
  rest, _ = proc.communicate(timeout=180)
  output = "".join(out) + rest
  assert proc.returncode == errors.LoaderError.exit_code, output[-3000:]
  line = _one_error_line(output)
  assert "the data loader failed" in line and "run the same command to resume" in line
  saved = checkpointing.newest_step(str(workdir))
  assert saved is not None and saved >= 3 and f"checkpoint {saved} saved" in line

  total = saved + 3
  resumed = run_cli(workdir, f"--config.max_steps={total}", *ARGS, "--config.dataset.num_workers=2", folder=folder)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {workdir}/checkpoints/{saved}" in resumed.stdout
  reference = run_cli(tmp_path / "reference", f"--config.max_steps={total}", *ARGS,
                      "--config.dataset.num_workers=2", folder=folder)
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert run_losses(workdir) == run_losses(tmp_path / "reference")  # the same data order, every step once


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "mae_jax.convert", *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, timeout=300, env={**os.environ, "JAX_PLATFORMS": ""})


def test_a_disk_full_during_convert_leaves_nothing_under_the_name(tmp_path, mount):
  torch = pytest.importorskip("torch")
  src = tiny_workdir(tmp_path / "run")
  disk = mount(tmp_path / "disk", size="200k")  # the export is about 0.5 MB
  dst = os.path.join(disk, "export.pth")
  out = _convert(src, dst, "--to=official")
  assert out.returncode == errors.StorageError.exit_code, out.stderr[-3000:]
  assert "No space left on device" in out.stderr and "nothing was written under that name" in out.stderr
  _one_error_line(out.stderr)
  assert os.listdir(disk) == []  # neither the name nor a temporary copy
  subprocess.run(["mount", "-o", "remount,size=8m", disk], check=True)
  out = _convert(src, dst, "--to=official")
  assert out.returncode == 0, out.stderr[-3000:]
  assert set(torch.load(dst, weights_only=True)["model"]) >= {"cls_token", "patch_embed.proj.weight"}
  assert "Traceback" not in out.stderr  # no accelerator plugin started and failed


def test_convert_replaces_a_destination_an_interrupted_write_left_and_keeps_a_whole_one(tmp_path):
  torch = pytest.importorskip("torch")
  src = tiny_workdir(tmp_path / "run")
  dst = tmp_path / "export.pth"
  assert _convert(src, dst, "--to=official").returncode == 0
  whole = dst.read_bytes()
  out = _convert(src, dst, "--to=official")  # a readable export is never overwritten
  assert out.returncode == 2 and "reads as a complete official export" in out.stderr
  # What a kill during the write of an earlier version left: the file cut short under the name,
  # and a temporary copy of a process that is gone.
  dst.write_bytes(whole[: len(whole) // 3])
  dead = subprocess.Popen(["true"])
  dead.wait()
  (tmp_path / f".export.pth.partial-{dead.pid}").write_bytes(whole[:100])
  out = _convert(src, dst, "--to=official")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "cannot be read" in out.stdout and "replacing it" in out.stdout
  assert dst.read_bytes() == whole and sorted(os.listdir(tmp_path)) == ["export.pth", "run"]
  torch.load(dst, weights_only=True)
  # Importing into a workdir whose checkpoint is cut short replaces it the same way.
  (tmp_path / "imported").mkdir()
  shutil.copytree(src, tmp_path / "imported" / "w")
  for name, _, files in os.walk(tmp_path / "imported" / "w" / "checkpoints"):
    for f in files:
      if f != "metadata":
        open(os.path.join(name, f), "wb").close()
  m = tiny_config("unused").model
  out = _convert(dst, tmp_path / "imported" / "w", f"--encoder_heads={m.encoder_heads}",
                 f"--decoder_heads={m.decoder_heads}")
  assert out.returncode == 0, out.stderr[-3000:]
  imported, _, _ = checkpointing.restore_params(str(tmp_path / "imported" / "w"))
  original, _, _ = checkpointing.restore_params(src)
  np.testing.assert_array_equal(imported["encoder"]["cls_token"], original["encoder"]["cls_token"])


def test_sighup_saves_and_stops_as_sigterm_does(cifar_folder, tmp_path):
  folder = small_folder(cifar_folder, tmp_path / "images", per_class=40)
  workdir = tmp_path / "run"
  proc = run_cli(workdir, "--config.max_steps=100000", *ARGS, "--config.checkpoint_every_steps=1000",
                 folder=folder, wait=False)
  for text in proc.stdout:
    if text.startswith("step 3/"):
      proc.send_signal(signal.SIGHUP)
      break
  rest, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGHUP, rest[-3000:]
  assert "checkpoint saved. Run the same command to resume." in rest
  assert checkpointing.newest_step(str(workdir)) >= 3


def test_sigterm_during_an_export_leaves_nothing_under_the_name(tmp_path, monkeypatch):
  pytest.importorskip("torch")
  from mae_jax import convert as convert_cmd
  from mae_jax.io import foreign
  src = tiny_workdir(tmp_path / "run")
  real_write = foreign.write_state_dict

  def write_then_get_killed(sd, path, wrap, safetensors):
    real_write(sd, path, wrap, safetensors)  # the temporary copy is complete on the disk ...
    os.kill(os.getpid(), signal.SIGTERM)  # ... and the scheduler stops the job before the rename

  monkeypatch.setattr(foreign, "write_state_dict", write_then_get_killed)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(SystemExit) as stopped:
    convert_cmd.main([src, str(tmp_path / "export.pth"), "--to=official"])
  assert stopped.value.code == 128 + signal.SIGTERM
  assert sorted(os.listdir(tmp_path)) == ["run"]  # no export, no temporary copy
  assert signal.getsignal(signal.SIGTERM) is handler  # the command's handlers are gone with it
