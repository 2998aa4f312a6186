"""Extra pretraining losses: plug-ins added to the MAE's masked MSE, outside the model.

A plug-in is a frozen dataclass with a `name` (its value is logged as `loss_<name>`), a
`weight`, `couples_rows` and `__call__(LossInputs) -> scalar`. `couples_rows` says whether the
loss of a batch is *not* the mean of its rows' losses (a term comparing rows with each other):
then the training step cannot accumulate micro-batches per device and all-reduce once, and
accumulates them whole instead (train/pretrain.py). The MAE adds `weight * value` of each
plug-in it is given (`MAE.extra_losses`); `from_config` builds them from `config.model`.

The two here are the STL-10 curriculum study's: a masked high-frequency (Laplacian) L1 between
prediction and target, and the uniformity of the encoder's pooled visible tokens.
"""

import dataclasses
from typing import Callable

import jax

from mae_jax.models import curriculum_losses


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What a plug-in may read of one forward pass."""
  target: jax.Array      # (B, L, p*p*C) float32: the MSE's target patches (per-patch normalised with norm_pix_loss)
  pred: jax.Array        # (B, L, p*p*C) float32: the decoder's prediction
  mask: jax.Array        # (B, L): 1 where masked
  latent: jax.Array      # (B, 1 + n, D): the encoder's output, cls token first
  all_positions: bool    # the latent holds every position (mask-token ablation), not the visible ones
  to_images: Callable    # (B, L, p*p*C) -> (B, H, W, C)


@dataclasses.dataclass(frozen=True)
class LaplacianLoss:
  """Mean |Laplacian(pred) - Laplacian(target)| over the masked pixels (x channels)."""
  weight: float
  name = "laplacian"
  couples_rows = False

  def __call__(self, x: LossInputs):
    mask_patches = x.mask[:, :, None].repeat(x.target.shape[-1], axis=-1)
    return curriculum_losses.masked_laplacian_loss(x.to_images(x.pred), x.to_images(x.target),
                                                   x.to_images(mask_patches))


@dataclasses.dataclass(frozen=True)
class UniformityLoss:
  """Wang & Isola's uniformity of the mean visible patch token of each image: the rows of a
  batch are compared with each other."""
  weight: float
  name = "uniformity"
  couples_rows = True

  def __call__(self, x: LossInputs):
    pooled = curriculum_losses.visible_mean(x.latent[:, 1:], x.mask, all_positions=x.all_positions)
    return curriculum_losses.uniformity_loss(pooled)


def from_config(model_cfg) -> tuple:
  """The plug-ins `config.model` weights above 0 (`laplacian_weight`, `uniformity_weight`)."""
  found = (LaplacianLoss(model_cfg.laplacian_weight), UniformityLoss(model_cfg.uniformity_weight))
  return tuple(loss for loss in found if loss.weight > 0)


def couple_rows(losses) -> bool:
  """Whether any of `losses` compares the rows of a batch with each other."""
  return any(loss.couples_rows for loss in losses)
