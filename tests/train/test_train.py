"""Training behaviour: the loss falls on real images, resume is exact, devices and processes agree."""

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from mae_jax import errors
from mae_jax.io import checkpointing
from mae_jax.train import pretrain
from conftest import CHECKPOINT_DAMAGE as DAMAGE
from conftest import tiny_config

TESTS = pathlib.Path(__file__).resolve().parents[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows}


def test_tiny_mae_learns_on_cifar10(cifar_folder, tmp_path):
  c = tiny_config(cifar_folder, max_steps=300, log_every_steps=10, figure_every_steps=1000,
                  checkpoint_every_steps=1000)
  c.warmup_epochs = 0
  pretrain.run(c, str(tmp_path))
  losses = _losses(tmp_path)
  first, last = losses[10], np.mean([losses[s] for s in (280, 290, 300)])
  # The masked-patch MSE (pixels normalised with mean = std = 0.5) starts near 1 at init.
  assert first > 0.6, losses
  assert last < 0.5 * first, losses
  assert os.path.exists(tmp_path / "figures" / "reconstruction_00000300.png")


def test_resume_gives_the_same_losses_step_for_step(cifar_folder, tmp_path):
  # Each step accumulates 2 micro-batches of 32 (the loop, the feed and the checkpoints with K > 1).
  make = lambda steps: tiny_config(cifar_folder, max_steps=steps, log_every_steps=1,
                                   checkpoint_every_steps=4, figure_every_steps=1000,
                                   grad_accum_steps=2)
  full = pretrain.run(make(12), str(tmp_path / "full"))
  pretrain.run(make(6), str(tmp_path / "split"))  # stops at 6: a checkpoint is saved at the end
  assert checkpointing.Checkpointer(str(tmp_path / "split"), 4, 3).latest_step() == 6
  resumed = pretrain.run(make(12), str(tmp_path / "split"))
  a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]  # bit-identical
  for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_crops_resampled_on_device_train_as_those_resampled_on_the_host(cifar_folder, tmp_path):
  """dataset.resize_on='device' (the default on GPU/TPU): the loader sends canvases and crops, the
  step resamples them; with accumulation, the losses are the host run's (up to the resample's
  rounding of a few pixels), and resume stays exact."""
  def run(where, steps, workdir):
    c = tiny_config(cifar_folder, max_steps=steps, log_every_steps=1, checkpoint_every_steps=2,
                    figure_every_steps=1000, grad_accum_steps=2)
    c.dataset.resize_on = where
    pretrain.run(c, str(tmp_path / workdir))
    return _losses(tmp_path / workdir)
  host, device = run("host", 4, "host"), run("device", 4, "device")
  np.testing.assert_allclose([device[s] for s in range(1, 5)], [host[s] for s in range(1, 5)], rtol=2e-3)
  run("device", 2, "split")
  assert run("device", 4, "split") == device


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


def _run_script(cifar_folder, env_extra=None, args=()):
  return _run_script_cached(cifar_folder, tuple(sorted((env_extra or {}).items())), tuple(args))


@functools.lru_cache(maxsize=None)  # several tests compare against the same one-device run
def _run_script_cached(cifar_folder, env_extra, args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **dict(env_extra)}
  out = subprocess.run([sys.executable, str(TESTS / "helpers" / "train_steps.py"), "--folder", cifar_folder,
                        *args], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_devices_match_one_device(cifar_folder):
  one = _run_script(cifar_folder)
  eight = _run_script(cifar_folder, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert one["devices"] == 1 and eight["devices"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
  assert one["losses"][-1] != one["losses"][0]  # the steps did train
  assert eight["eval_labels"] == one["eval_labels"]
  np.testing.assert_allclose(eight["eval_feature_sum"], one["eval_feature_sum"], rtol=1e-4)


def test_fsdp_on_eight_devices_matches_one_device_and_splits_the_state(cifar_folder):
  from mae_jax.runtime import parallel
  one = _run_script(cifar_folder)
  fsdp = _run_script(cifar_folder, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                     ["--fsdp"])
  np.testing.assert_allclose(fsdp["losses"], one["losses"], rtol=2e-5)
  split = 0
  for name, (shape, local) in fsdp["shards"].items():
    spec = parallel.fsdp_spec(tuple(shape), 8)
    expected = [n // 8 if axis == "data" else n for n, axis in zip(shape, tuple(spec) + (None,) * 8)]
    assert local == expected, (name, shape, local)
    split += local != shape
  # The tiny model's MLP kernels (16,384 elements) are split; smaller tensors are not.
  assert split == 4 and fsdp["shards"]["['encoder']['block0']['fc1']['kernel']"] == [[64, 256], [64, 32]]
  assert fsdp["shards"]["['encoder']['block0']['fc1']['bias']"] == [[256], [256]]
  np.testing.assert_allclose(fsdp["eval_feature_sum"], one["eval_feature_sum"], rtol=1e-4)


def test_accumulation_on_eight_devices_matches_one_device(cifar_folder):
  """2 micro-batches per step, accumulated per device and reduced once, with the state sharded
  over 8 devices: the losses of one device."""
  one = _run_script(cifar_folder, args=["--accum", "2"])
  eight = _run_script(cifar_folder, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                      ["--accum", "2", "--fsdp"])
  assert eight["devices"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
  assert one["losses"][-1] != one["losses"][0]


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
  full_losses = _losses(full)
  assert sorted(full_losses) == list(range(1, 9))
  for resumed in (eight, one):
    losses = _losses(resumed)
    assert sorted(losses) == list(range(1, 9))
    np.testing.assert_allclose([losses[s] for s in range(5, 9)], [full_losses[s] for s in range(5, 9)],
                               rtol=2e-5)
  assert _losses(again) == full_losses


def test_fsdp_splits_the_largest_divisible_dimension_of_large_tensors():
  from mae_jax.runtime.parallel import P, fsdp_spec
  assert fsdp_spec((768, 3072), 8) == P(None, "data")
  assert fsdp_spec((3072, 768), 8) == P("data", None)
  assert fsdp_spec((1000, 768), 16) == P(None, "data")   # 1000 is not divisible by 16
  assert fsdp_spec((1, 197, 768), 8) == P(None, None, "data")
  assert fsdp_spec((768,), 8) == P()                      # small: replicated
  assert fsdp_spec((999, 999), 8) == P()                  # nothing divides
  assert fsdp_spec((768, 3072), 1) == P()
  # Scanned layers: the layer axis is never split, and the size floor is one layer's.
  assert fsdp_spec((12, 768, 3072), 8, stacked=True) == P(None, None, "data")
  assert fsdp_spec((32, 1280), 8, stacked=True) == P(None)   # a layer norm per layer: replicated
  assert fsdp_spec((32, 1280), 8) == P(None, "data")         # what the stack alone would get
  assert fsdp_spec((48, 8, 100), 8) == P("data", None, None)  # only the 48 divides...
  assert fsdp_spec((48, 8, 100), 8, stacked=True) == P(None)   # ...but it counts layers


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(cifar_folder):
  """Each process feeds its own rows of the 2 micro-batches of every step."""
  one = _run_script(cifar_folder, args=["--accum", "2"])
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, str(TESTS / "helpers" / "train_steps.py"), "--folder",
                             cifar_folder, "--num_processes", "2", "--process_id", str(i),
                             "--port", str(port), "--accum", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  two = json.loads(outs[0][0].strip().splitlines()[-1])
  assert two["processes"] == 2 and two["devices"] == 2
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-5)
  # Evaluation sees every image once, though the two shards differ in size.
  assert len(one["eval_labels"]) == 9 and two["eval_labels"] == one["eval_labels"]
  np.testing.assert_allclose(two["eval_feature_sum"], one["eval_feature_sum"], rtol=1e-4)


@pytest.mark.parametrize("per_device", [True, False])
def test_accumulation_inside_the_step_is_one_update_on_the_mean_gradient(per_device):
  """K micro-batches in one step: the parameters equal one update on the mean of the K
  micro-batches' gradients, computed here by hand, each micro-batch masked with the noise of
  fold_in(rng, k) (the key a run without accumulation would give it). Plain SGD, whose update is
  linear in the gradient: AdamW's first update is lr * sign(g) wherever |g| >> eps, and would hide
  a wrong gradient."""
  from mae_jax.data import pipeline
  from mae_jax.models import masking
  from mae_jax.models.mae import mae_from_config
  from mae_jax.runtime.parallel import Mesh
  c = tiny_config("unused")
  k, m = 4, 8
  model = mae_from_config(c.model, 32)
  tx = optax.sgd(0.5)
  state = pretrain.create_train_state(model, tx, 0)
  images = np.random.default_rng(0).integers(0, 256, (k, m, 32, 32, 3), dtype=np.uint8)
  spec = pretrain.StepSpec(model, tx, micro_batches=k, mesh=Mesh() if per_device else None,
                           per_device_accumulation=per_device)
  step = jax.jit(functools.partial(pretrain.pretrain_step, spec=spec))
  new, metrics = step(state, {"image": images})

  @jax.jit
  def loss_and_grads(params, micro_images, i):
    def loss(params):
      noise = masking.random_noise(jax.random.fold_in(state.rng, i), m, model.num_patches)
      return model.apply({"params": params}, pipeline.normalize(micro_images, (0.5,) * 3, (0.5,) * 3),
                         noise)[0]
    return jax.value_and_grad(loss)(params)
  losses, grads = zip(*[loss_and_grads(state.params, images[i], i) for i in range(k)])
  mean_grads = jax.tree.map(lambda *g: sum(g) / k, *grads)
  updates, _ = tx.update(mean_grads, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  assert int(new.step) == 1
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(mean_grads)), rtol=1e-5)
  for path, x in jax.tree_util.tree_leaves_with_path(new.params):
    y = functools.reduce(lambda t, p: t[p.key], path, expected)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # The micro-batches did not all give the same gradient (else the mean would prove nothing).
  assert not np.allclose(grads[0]["decoder"]["pred"]["kernel"], grads[1]["decoder"]["pred"]["kernel"])


def _four_step_checkpoints(cifar_folder, steps):
  return tiny_config(cifar_folder, max_steps=steps, log_every_steps=1, checkpoint_every_steps=4,
                     figure_every_steps=1000)


@pytest.mark.parametrize("damage", DAMAGE)
def test_an_unreadable_newest_checkpoint_falls_back_to_the_one_before(cifar_folder, tmp_path, capsys, damage):
  pretrain.run(_four_step_checkpoints(cifar_folder, 8), str(tmp_path))  # checkpoints 4 and 8
  losses = _losses(tmp_path)
  DAMAGE[damage](tmp_path / "checkpoints" / "8")
  capsys.readouterr()
  pretrain.run(_four_step_checkpoints(cifar_folder, 8), str(tmp_path))
  out = capsys.readouterr().out
  assert f"checkpoint {tmp_path}/checkpoints/8 is unreadable (" in out
  assert "restored step 4" in out and f"resumed from {tmp_path}/checkpoints/4" in out
  # Steps 5..8 ran again from step 4's state and data position: the same losses, each step once.
  assert _losses(tmp_path) == losses
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


def test_pretrained_weights_come_from_the_newest_readable_checkpoint(cifar_folder, tmp_path, capsys):
  """What probe, fine-tune and evaluate read with --pretrained: an unreadable newest checkpoint
  is reported and the one before it used; the other run's folder is left as it is."""
  c = _four_step_checkpoints(cifar_folder, 8)
  pretrain.run(c, str(tmp_path))
  expected, _, _ = checkpointing.restore_params(str(tmp_path))
  pretrain.run(_four_step_checkpoints(cifar_folder, 12), str(tmp_path))  # checkpoints 8, 12
  DAMAGE["truncated array file"](tmp_path / "checkpoints" / "12")
  params, saved, step = checkpointing.restore_params(str(tmp_path))
  assert step == 8 and saved["model"]["encoder_width"] == 64
  assert "checkpoints/12 is unreadable" in capsys.readouterr().out
  for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(params)):
    np.testing.assert_array_equal(x, y)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "4", "8"]


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
  a, b = _losses(tmp_path / "full"), _losses(tmp_path / "split")
  assert sorted(b) == list(range(1, 9))
  np.testing.assert_allclose([b[s] for s in range(5, 9)], [a[s] for s in range(5, 9)], rtol=2e-5)


def _exploding(cifar_folder, **overrides):
  """The tiny preset with a learning rate that overflows float32 by the third step (the warmup's
  first step has lr 0, its second lr ~1e33)."""
  c = tiny_config(cifar_folder, log_every_steps=1, checkpoint_every_steps=2, figure_every_steps=1000,
                  **overrides)
  c.optimizer.base_lr, c.warmup_epochs = 1e36, 1
  return c


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(cifar_folder, tmp_path):
  with pytest.raises(errors.NonFiniteError) as e:
    pretrain.run(_exploding(cifar_folder, max_steps=12), str(tmp_path))
  bad = int(str(e.value).split(":")[0].removeprefix("step "))
  ckpt = checkpointing.Checkpointer(str(tmp_path), 2, 3)
  newest = ckpt.latest_step()
  ckpt.close()
  assert 2 <= newest < bad <= 12, str(e.value)
  assert f"the last good checkpoint is step {newest}" in str(e.value)
  params, _, _ = checkpointing.restore_params(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_skip_nonfinite_skips_and_counts_the_updates(cifar_folder, tmp_path):
  state = pretrain.run(_exploding(cifar_folder, max_steps=6, skip_nonfinite=True), str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert int(state.step) == 6
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == 6 and rows[-1]["skipped_nonfinite"] >= 1


def test_the_device_feed_checkpoints_the_next_batch_the_step_takes():
  from mae_jax.train import loop

  class Loader:  # a loader iterator whose position is the next value it yields
    def __init__(self):
      self.position = 0

    def __next__(self):
      self.position += 1
      return self.position - 1

    def get_state(self):
      return self.position

    def set_state(self, position):
      self.position = position

  feed = loop.DeviceFeed(Loader(), put=lambda x: x * 10, depth=2)
  assert next(feed) == 0
  feed.fill()
  assert feed.loader_iter.position == 3  # batches 1 and 2 already on their way to the devices
  assert feed.get_state() == 1           # a checkpoint resumes at batch 1, the next one taken
  assert [next(feed), next(feed)] == [10, 20]
  feed.set_state(1)
  assert next(feed) == 10 and feed.get_state() == 2
  # Grouped: a step's batch is 3 consecutive loader batches joined, and the checkpoint position
  # is that of the first of the next group.
  class Rows(Loader):
    def __next__(self):
      return {"image": np.array([super().__next__()])}
  grouped = loop.DeviceFeed(Rows(), put=lambda b: b["image"].tolist(), depth=2, group=3)
  assert next(grouped) == [0, 1, 2]
  grouped.fill()
  assert grouped.loader_iter.position == 9 and grouped.get_state() == 3
  assert next(grouped) == [3, 4, 5]
