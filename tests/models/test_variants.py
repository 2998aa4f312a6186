"""The studies' variants: mask tokens in the encoder, Laplacian and uniformity losses, curriculum masking."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import curriculum_losses, extra_losses
from mae_jax.models import masking
from mae_jax.train import pretrain
from mae_jax.models import mae
from configs import cifar10_vit_t
from conftest import tiny_config


def _forward_flops(m, length):
  imgs, noise = jnp.zeros((8, 32, 32, 3)), jnp.zeros((8, length))
  params = m.init(jax.random.PRNGKey(0), imgs, noise)
  cost = jax.jit(m.apply).lower(params, imgs, noise).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def test_mask_tokens_in_encoder_shapes_and_flops():
  cfg = cifar10_vit_t.get_config().model
  default = mae.mae_from_config(cfg, 32)
  with_tokens = default.clone(mask_token_in_encoder=True)
  imgs = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  noise = jax.random.uniform(jax.random.PRNGKey(1), (2, 256))
  p = with_tokens.init(jax.random.PRNGKey(2), imgs, noise)["params"]
  assert "mask_token" in p["encoder"] and "mask_token" not in p["decoder"]
  loss, pred, mask = with_tokens.apply({"params": p}, imgs, noise)
  latent, _, _ = with_tokens.apply({"params": p}, imgs, noise, 0.75,
                                   method=lambda mod, *a: mod.encoder(*a))
  assert latent.shape == (2, 257, 192)  # every position goes through the encoder
  assert pred.shape == (2, 256, 12) and mask.shape == (2, 256) and np.isfinite(float(loss))
  # ViT-T/2 on 32 px: hand count 4.45 vs 1.84 GFLOP per image forward -> 2.42x (the CIFAR-10 ViT-T/2 ablation study: 2.4x).
  ratio = _forward_flops(with_tokens, 256) / _forward_flops(default, 256)
  assert 2.2 < ratio < 2.7, ratio


def test_masked_laplacian_loss_by_hand():
  pred = np.zeros((1, 5, 5, 1), np.float32)
  pred[0, 2, 2, 0] = 1.0  # Laplacian: -4 at the centre, +1 on its four neighbours
  target = np.zeros_like(pred)
  everywhere = np.ones_like(pred)
  assert float(curriculum_losses.masked_laplacian_loss(pred, target, everywhere)) == pytest.approx(8 / 25)
  centre_only = np.zeros_like(pred)
  centre_only[0, 2, 2, 0] = 1.0
  assert float(curriculum_losses.masked_laplacian_loss(pred, target, centre_only)) == pytest.approx(4.0)


def test_uniformity_loss_by_hand():
  z = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)  # normalised: orthogonal, |zi - zj|^2 = 2
  assert float(curriculum_losses.uniformity_loss(z)) == pytest.approx(-4.0, abs=1e-5)
  z3 = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
  want = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
  assert float(curriculum_losses.uniformity_loss(z3)) == pytest.approx(want, abs=1e-5)


def test_extra_losses_add_to_the_mse():
  m = mae.MAE(image_size=(16, 16), patch_size=4, encoder_width=32, encoder_depth=1, encoder_heads=2,
              decoder_width=16, decoder_depth=1, decoder_heads=2)
  weighted = m.clone(extra_losses=(extra_losses.LaplacianLoss(0.05), extra_losses.UniformityLoss(0.01)))
  imgs = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  noise = jax.random.uniform(jax.random.PRNGKey(1), (4, 16))
  p = m.init(jax.random.PRNGKey(2), imgs, noise)
  base = float(m.apply(p, imgs, noise)[0])
  (total, _, _), sown = weighted.apply(p, imgs, noise, mutable=["losses"])
  parts = {k: float(v[0]) for k, v in sown["losses"].items()}
  assert parts["mse"] == pytest.approx(base, rel=1e-6)
  assert float(total) == pytest.approx(base + 0.05 * parts["laplacian"] + 0.01 * parts["uniformity"], rel=1e-5)


def test_curriculum_schedule_values():
  r = lambda step, shape="linear", bucket=0.05: masking.curriculum_ratio(step, 100, 0.5, 0.75, 5, shape, bucket)
  assert r(0) == 0.5 and r(200) == 0.6 and r(500) == 0.75 and r(10_000) == 0.75
  assert r(250, bucket=0) == pytest.approx(0.625)
  assert r(125, "cosine", 0) == pytest.approx(0.5 + 0.25 * (1 - math.cos(math.pi / 4)) / 2)
  assert r(125, "cosine") == 0.55
  assert len({r(s) for s in range(600)}) == 6  # 0.5, 0.55, ..., 0.75: six compilations


def test_curriculum_run_ramps_the_ratio(cifar_folder, tmp_path):
  c = tiny_config(cifar_folder, max_steps=12, log_every_steps=1, figure_every_steps=1000)
  # Ramped over 10 steps in buckets of 0.125: three ratios, so three compilations of the step.
  c.model.update(curriculum_start_ratio=0.5, curriculum_epochs=10 * 64 / 50000, curriculum_bucket=0.125)
  pretrain.run(c, str(tmp_path))
  ratios = [json.loads(l)["mask_ratio"] for l in open(tmp_path / "metrics.jsonl")]
  assert ratios[0] == 0.5 and ratios[-1] == 0.75
  assert all(a <= b for a, b in zip(ratios, ratios[1:]))
  assert set(np.round(ratios, 6)) == {0.5, 0.625, 0.75}


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
