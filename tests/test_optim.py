"""Learning-rate schedule, scaling rule and weight-decay groups against hand-computed values."""

import math

import jax.numpy as jnp
import pytest

from mae_jax import optim


def test_peak_lr_scaling_rule():
  assert optim.peak_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)


def test_warmup_cosine_values():
  s = optim.warmup_cosine(peak=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  # Halfway through the cosine: min + (peak - min) * (1 + cos(pi / 2)) / 2.
  assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-6)
  assert float(s(35)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)), rel=1e-6)
  assert float(s(110)) == pytest.approx(0.1)
  assert float(s(500)) == pytest.approx(0.1)


def test_decay_mask_excludes_biases_norms_and_tokens():
  params = {"encoder": {"cls_token": jnp.zeros((1, 1, 8)), "patch_embed": {"kernel": jnp.zeros((4, 8)),
                                                                           "bias": jnp.zeros(8)},
                        "norm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}},
            "decoder": {"mask_token": jnp.zeros((1, 1, 8)), "pred": {"kernel": jnp.zeros((8, 4))}}}
  m = optim.decay_mask(params)
  assert m["encoder"]["patch_embed"] == {"kernel": True, "bias": False}
  assert m["encoder"]["norm"] == {"scale": False, "bias": False}
  assert m["encoder"]["cls_token"] is False and m["decoder"]["mask_token"] is False
  assert m["decoder"]["pred"]["kernel"] is True
