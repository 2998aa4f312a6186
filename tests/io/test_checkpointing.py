"""io/checkpointing.py: checkpoints restore bit-identically, across device counts and layer
layouts; an unreadable newest one falls back to the one before."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mae_jax import errors
from mae_jax.io import checkpointing
from mae_jax.train import pretrain

from conftest import CHECKPOINT_DAMAGE as DAMAGE
from conftest import run_losses, tiny_config

TESTS = pathlib.Path(__file__).resolve().parents[1]


def test_checkpoint_restores_bit_identically(cifar_folder, tmp_path):
  c = tiny_config(cifar_folder, max_steps=3, log_every_steps=1, figure_every_steps=1000)
  state = pretrain.run(c, str(tmp_path))
  mesh = pretrain.Mesh()
  job = pretrain.build(c)
  init = lambda: pretrain.create_train_state(job.model, job.tx, c.seed)
  abstract, _ = mesh.abstract_state(init, fsdp=False)
  ckpt = checkpointing.Checkpointer(str(tmp_path), 1, 3)
  from mae_jax.data import pipeline
  it = iter(pipeline.make_loader(c.dataset, job.train_source, train=True, global_batch_size=64, seed=0))
  restored = ckpt.restore(3, abstract, it)
  ckpt.close()
  assert int(restored.step) == 3
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _pretrain_on(devices: int, folder: str, *runs):
  """In one fresh interpreter with `devices` CPU devices, for each (workdir, steps, fsdp[,
  copy_from]) of `runs` in order: pretrain.run of the tiny preset to `steps` in `workdir`, which
  starts as a copy of `copy_from` where that is given."""
  code = ("import sys, json, shutil; sys.path.insert(0, sys.argv[1])\n"
          "from conftest import tiny_config\nfrom mae_jax.train import pretrain\n"
          "for workdir, steps, fsdp, *copy_from in json.loads(sys.argv[3]):\n"
          "  if copy_from:\n    shutil.copytree(copy_from[0], workdir)\n"
          "  c = tiny_config(sys.argv[2], max_steps=steps, log_every_steps=1,\n"
          "                  checkpoint_every_steps=4, figure_every_steps=1000)\n"
          "  c.sharding.fsdp = fsdp\n  pretrain.run(c, workdir)\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  runs = json.dumps([[str(r[0]), *r[1:3], *map(str, r[3:])] for r in runs])
  out = subprocess.run([sys.executable, "-c", code, str(TESTS), folder, runs],
                       capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]


def test_an_fsdp_checkpoint_restores_on_other_device_counts(cifar_folder, tmp_path):
  """Saved sharded over 8 devices, resumed on 1 (and saved on 1, resumed sharded over 4): the
  later losses are the uninterrupted 8-device run's; resumed on 8 they are bit-identical."""
  full, eight, again, one = (tmp_path / name for name in ("full", "eight", "eight_then_eight", "one"))
  _pretrain_on(8, cifar_folder, (full, 8, True), (eight, 4, True), (again, 8, True, eight))
  _pretrain_on(1, cifar_folder, (eight, 8, False), (one, 4, False))
  _pretrain_on(4, cifar_folder, (one, 8, True))
  full_losses = run_losses(full)
  assert sorted(full_losses) == list(range(1, 9))
  for resumed in (eight, one):
    losses = run_losses(resumed)
    assert sorted(losses) == list(range(1, 9))
    np.testing.assert_allclose([losses[s] for s in range(5, 9)], [full_losses[s] for s in range(5, 9)],
                               rtol=2e-5)
  assert run_losses(again) == full_losses


def _four_step_checkpoints(cifar_folder, steps):
  return tiny_config(cifar_folder, max_steps=steps, log_every_steps=1, checkpoint_every_steps=4,
                     figure_every_steps=1000)


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(cifar_folder, tmp_path, capsys, damage):
  pretrain.run(_four_step_checkpoints(cifar_folder, 8), str(tmp_path))  # checkpoints 4 and 8
  losses = run_losses(tmp_path)
  DAMAGE[damage](tmp_path / "checkpoints" / "8")
  capsys.readouterr()
  pretrain.run(_four_step_checkpoints(cifar_folder, 8), str(tmp_path))
  out = capsys.readouterr().out
  assert f"checkpoint {tmp_path}/checkpoints/8 is unreadable (" in out
  assert "restored step 4" in out and f"resumed from {tmp_path}/checkpoints/4" in out
  # Steps 5..8 ran again from step 4's state and data position: the same losses, each step once.
  assert run_losses(tmp_path) == losses
  assert len(open(tmp_path / "metrics.jsonl").readlines()) == 8
  # The damaged checkpoint is kept aside, out of the way of the new step 8.
  assert [d.split("-")[0] for d in os.listdir(tmp_path / "checkpoints_unreadable")] == ["8"]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]


def test_no_readable_checkpoint_is_an_error_naming_each(cifar_folder, tmp_path):
  pretrain.run(_four_step_checkpoints(cifar_folder, 8), str(tmp_path))
  for step in ("4", "8"):
    DAMAGE["truncated array file"](tmp_path / "checkpoints" / step)
  with pytest.raises(errors.CheckpointUnreadableError, match=r"can be read \(step 8: .*; step 4: "):
    pretrain.run(_four_step_checkpoints(cifar_folder, 8), str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]  # nothing moved or removed
  assert not os.path.exists(tmp_path / "checkpoints_unreadable")


@pytest.mark.parametrize("first,then", [(False, True), (True, False)], ids=["unrolled_to_scanned", "scanned_to_unrolled"])
def test_a_checkpoint_resumes_in_the_other_layer_layout(cifar_folder, tmp_path, first, then):
  make = lambda steps, scan: tiny_config(cifar_folder, max_steps=steps, log_every_steps=1,
                                         checkpoint_every_steps=4, figure_every_steps=1000,
                                         **{"model.scan_layers": scan})
  pretrain.run(make(8, first), str(tmp_path / "full"))
  pretrain.run(make(4, first), str(tmp_path / "split"))
  resumed = pretrain.run(make(8, then), str(tmp_path / "split"))
  from mae_jax.models.layer_stack import is_scanned
  assert is_scanned(resumed.params) == then
  a, b = run_losses(tmp_path / "full"), run_losses(tmp_path / "split")
  assert sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[s] for s in range(5, 9)], [a[s] for s in range(5, 9)], rtol=2e-5)


def test_a_checkpoint_is_on_the_disk_before_it_is_reported_and_before_older_ones_go(cifar_folder, tmp_path,
                                                                                   monkeypatch):
  """What a power cut could take is what is not yet fsynced: the order of the flushes, the reports
  and the deletions, recorded from a real run (keep 2, a save every 2 steps), shows that every
  file and folder of a step, and the rename that put it in place, reach the disk before the step
  is reported saved, and that a step is deleted only once two newer ones are on the disk."""
  import orbax.checkpoint as ocp

  from mae_jax.runtime import durable
  events = []
  real_file, real_dir, real_log = durable.fsync_file, durable.fsync_dir, checkpointing.metrics_lib.log
  real_delete = ocp.CheckpointManager.delete
  root = str(tmp_path / "checkpoints")

  def log(message):
    if message.startswith("checkpoint ") and message.endswith(f"saved in {root}"):
      step = int(message.split()[1])
      files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, str(step))) for f in fs]
      events.append(("saved", step, files))
    real_log(message)

  monkeypatch.setattr(durable, "fsync_file", lambda p: (events.append(("fsync", p)), real_file(p)))
  monkeypatch.setattr(durable, "fsync_dir", lambda p: (events.append(("fsync_dir", p)), real_dir(p)))
  monkeypatch.setattr(checkpointing.metrics_lib, "log", log)
  monkeypatch.setattr(ocp.CheckpointManager, "delete",
                      lambda self, step: (events.append(("delete", step)), real_delete(self, step)))
  c = tiny_config(cifar_folder, max_steps=8, log_every_steps=1, checkpoint_every_steps=2,
                  keep_checkpoints=2, figure_every_steps=1000)
  pretrain.run(c, str(tmp_path))

  saved = [e for e in events if e[0] == "saved"]
  assert [e[1] for e in saved] == [2, 4, 6, 8]
  for step, files in ((e[1], e[2]) for e in saved):
    at = events.index(next(e for e in saved if e[1] == step))
    synced = {e[1] for e in events[:at] if e[0] == "fsync"}
    assert files and set(files) <= synced, step  # every file of the step on the disk
    folder = os.path.join(root, str(step))
    last_file = max(i for i, e in enumerate(events[:at]) if e[0] == "fsync" and e[1].startswith(folder + "/"))
    assert ("fsync_dir", root) in events[last_file:at], step  # and its rename into checkpoints/
  deletes = [(i, e[1]) for i, e in enumerate(events) if e[0] == "delete"]
  assert [d for _, d in deletes] == [2, 4]
  for i, step in deletes:
    newer_on_disk = [e[1] for e in events[:i] if e[0] == "saved" and e[1] > step]
    assert len(newer_on_disk) >= 2, (step, newer_on_disk)
  assert sorted(int(s) for s in os.listdir(root)) == [6, 8]


def test_the_folders_of_unfinished_saves_are_removed_when_a_run_starts(tmp_path, capsys):
  root = tmp_path / "checkpoints"
  (root / "12.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
  (root / "12.orbax-checkpoint-tmp" / "state" / "part").write_bytes(b"cut short")
  ckpt = checkpointing.Checkpointer(str(tmp_path), every_steps=10, keep=3)
  ckpt.close()
  assert os.listdir(root) == []
  assert "removed 1 unfinished checkpoint folder(s)" in capsys.readouterr().out


def test_retention_keeps_the_newest_and_the_kept_multiples():
  ckpt = checkpointing.Checkpointer.__new__(checkpointing.Checkpointer)
  ckpt.keep, ckpt.keep_period = 2, 10
  assert ckpt.expired([5, 10, 15, 20, 25, 30], newest=30) == [5, 15]
  assert ckpt.expired([5, 10, 15, 20, 25], newest=20) == [5]  # 25 is not yet on the disk
  ckpt.keep_period = 0
  assert ckpt.expired([1, 2, 3], newest=3) == [1]
