"""train/pretrain.py: a tiny MAE learns on CIFAR-10; crops resampled in the step train as those
resampled on the host; which extra losses keep per-device accumulation."""

import os

import numpy as np

from mae_jax.models import extra_losses, mae
from mae_jax.train import pretrain

from conftest import run_losses, tiny_config


def test_a_loss_coupling_the_rows_turns_off_per_device_accumulation():
  """Micro-batches are accumulated per device (one all-reduce per update) unless an extra loss
  compares a batch's rows with each other: the uniformity loss does, the Laplacian loss does not."""
  from mae_jax.runtime.parallel import Mesh
  assert not extra_losses.LaplacianLoss(0.05).couples_rows and extra_losses.UniformityLoss(0.01).couples_rows
  chosen = {}
  for name, weights in {"mse": {}, "laplacian": {"model.laplacian_weight": 0.05},
                        "uniformity": {"model.uniformity_weight": 0.01}}.items():
    c = tiny_config("unused", grad_accum_steps=2, **weights)
    model = mae.mae_from_config(c.model, c.dataset.image_size)
    assert [type(x).__name__ for x in model.extra_losses] == (
        [] if not weights else [{"laplacian": "LaplacianLoss", "uniformity": "UniformityLoss"}[name]])
    chosen[name] = pretrain.StepSpec.from_config(c, model, None, Mesh()).per_device_accumulation
  assert chosen == {"mse": True, "laplacian": True, "uniformity": False}


def test_tiny_mae_learns_on_cifar10(cifar_folder, tmp_path):
  c = tiny_config(cifar_folder, max_steps=300, log_every_steps=10, figure_every_steps=1000,
                  checkpoint_every_steps=1000)
  c.warmup_epochs = 0
  pretrain.run(c, str(tmp_path))
  losses = run_losses(tmp_path)
  first, last = losses[10], np.mean([losses[s] for s in (280, 290, 300)])
  # The masked-patch MSE (pixels normalised with mean = std = 0.5) starts near 1 at init.
  assert first > 0.6, losses
  assert last < 0.5 * first, losses
  assert os.path.exists(tmp_path / "figures" / "reconstruction_00000300.png")


def test_crops_resampled_on_device_train_as_those_resampled_on_the_host(cifar_folder, tmp_path):
  """dataset.resize_on='device' (the default on GPU/TPU): the loader sends canvases and crops, the
  step resamples them; with accumulation, the losses are the host run's (up to the resample's
  rounding of a few pixels), and resume stays exact."""
  def run(where, steps, workdir):
    c = tiny_config(cifar_folder, max_steps=steps, log_every_steps=1, checkpoint_every_steps=2,
                    figure_every_steps=1000, grad_accum_steps=2)
    c.dataset.resize_on = where
    pretrain.run(c, str(tmp_path / workdir))
    return run_losses(tmp_path / workdir)
  host, device = run("host", 4, "host"), run("device", 4, "device")
  np.testing.assert_allclose([device[s] for s in range(1, 5)], [host[s] for s in range(1, 5)], rtol=2e-3)
  run("device", 2, "split")
  assert run("device", 4, "split") == device
