"""mae_jax's pretraining against the official loop (benchmarks/train_vs_official.py), over many
steps: the training step, AdamW, its decay groups and the per-iteration lr schedule together, and
the initialisation as a whole, each side's own."""

import pathlib

import jax
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
torch = pytest.importorskip("torch")
from mae_jax.io import convert
from mae_jax.models.mae import mae_from_config
from mae_jax.train import pretrain

from benchmarks import official_diagnostics, train_vs_official


def test_thirty_steps_match_the_official_loop_from_the_same_weights_and_batches(cifar_folder):
  """Warmup (10 steps) and cosine (20) on the official pipeline's batches: each step's loss within
  float32 rounding, and the weights together at the end."""
  r = train_vs_official.recipe("small", batch=32, epochs=3, warmup_epochs=1, workers=0)
  theirs, ours, drift = official_diagnostics.run_parity(cifar_folder, r, steps=30, steps_per_epoch=10)
  assert len(ours) == 30
  assert theirs[-1] < theirs[0] - 0.2  # it learned: a schedule or optimizer mistake would show
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)
  assert max(drift.values()) < 1e-2, sorted(drift.items(), key=lambda kv: -kv[1])[:3]
  assert np.median(list(drift.values())) < 1e-4


def test_every_tensor_is_initialised_with_the_official_distribution():
  """Per tensor, pooled over 8 seeds: mae_jax's init and the official init (OfficialMAE,
  converted to mae_jax's names) have the same spread (within sampling error) and bounds."""
  r = train_vs_official.recipe("small")
  model = mae_from_config(official_diagnostics._mae_jax_config("", r).model, r["image_size"])
  ours, theirs = {}, {}
  for seed in range(8):
    params = pretrain.init_params(model, jax.random.split(jax.random.PRNGKey(seed))[0])
    torch.manual_seed(seed)
    sd = {k: v.detach().numpy() for k, v in train_vs_official.official_model(r).state_dict().items()}
    for side, tree in ((ours, params), (theirs, convert.official_to_params(sd))):
      for name, a in official_diagnostics._param_rows(jax.device_get(tree)).items():
        side.setdefault(name, []).append(a.ravel())
  assert ours.keys() == theirs.keys()
  for name in ours:
    a, b = np.concatenate(ours[name]), np.concatenate(theirs[name])
    if b.std() == 0:  # ones and zeros: biases and norms
      np.testing.assert_array_equal(a, b, err_msg=name)
      continue
    assert abs(a.std() / b.std() - 1) < 4 / np.sqrt(len(a)) + 0.01, (name, a.std(), b.std())
    assert abs(a.mean() - b.mean()) < 5 * b.std() / np.sqrt(len(a)), (name, a.mean(), b.mean())
    if "token" not in name:  # uniform: the same bound
      np.testing.assert_allclose(np.abs(a).max(), np.abs(b).max(), rtol=0.02, err_msg=name)
