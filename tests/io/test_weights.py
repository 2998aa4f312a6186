"""io/weights.py: pretrained weights for the jobs."""

import os

import jax
import numpy as np

from mae_jax.io import checkpointing
from mae_jax.train import pretrain

from conftest import CHECKPOINT_DAMAGE as DAMAGE
from conftest import tiny_config


def _four_step_checkpoints(cifar_folder, steps):
  return tiny_config(cifar_folder, max_steps=steps, log_every_steps=1, checkpoint_every_steps=4,
                     figure_every_steps=1000)


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
