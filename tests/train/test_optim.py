"""Learning-rate schedule, scaling rule and weight-decay groups against hand-computed values."""

import math

import jax.numpy as jnp
import pytest

from mae_jax.train import optim


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


def _params():
  return {"encoder": {"cls_token": jnp.zeros((1, 1, 8)), "pos_embed": jnp.zeros((1, 4, 8)),
                      "patch_embed": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)},
                      "norm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)}},
          "decoder": {"mask_token": jnp.zeros((1, 1, 8)), "pred": {"kernel": jnp.zeros((8, 4))}}}


def test_pretraining_decays_every_parameter_of_two_or_more_dimensions():
  """As the official main_pretrain.py (timm's add_weight_decay): the 3-D cls and mask tokens
  decay; biases and norms do not."""
  m = optim.pretrain_decay_mask(_params())
  assert m["encoder"]["patch_embed"] == {"kernel": True, "bias": False}
  assert m["encoder"]["norm"] == {"scale": False, "bias": False}
  assert m["encoder"]["cls_token"] is True and m["decoder"]["mask_token"] is True
  assert m["decoder"]["pred"]["kernel"] is True


def test_finetuning_exempts_the_position_embedding_and_cls_token():
  """As the official models_vit.no_weight_decay: pos_embed and cls_token, biases and norms."""
  m = optim.finetune_decay_mask(_params())
  assert m["encoder"]["patch_embed"] == {"kernel": True, "bias": False}
  assert m["encoder"]["norm"] == {"scale": False, "bias": False}
  assert m["encoder"]["cls_token"] is False and m["encoder"]["pos_embed"] is False
  assert m["decoder"]["pred"]["kernel"] is True
