"""The official MAE in PyTorch, as a reference to measure mae_jax against.

`OfficialMAE` is facebookresearch/mae's `MaskedAutoencoderViT` (models_mae.py) written out for any
shape: timm's `Block` (as the official code), the same module names (so its `state_dict` is the
official checkpoint layout that `mae_jax.convert` reads), fixed sin-cos position embeddings, and
the official initialisation (`init_official`): xavier-uniform Linear weights and the patch
projection's flattened weight, zero Linear biases, normal(0.02) cls and mask tokens, LayerNorm
ones/zeros, and the patch projection's bias left at PyTorch's Conv2d default.

Used by benchmarks/train_vs_official.py (the reference pretraining loop) and tests/io/test_convert.py
and tests/integration/test_official_loop.py. torch and timm come with the dev extra.
"""

import functools

import numpy as np
import torch
from torch import nn
from benchmarks import torch_cpu

# timm imports torchvision, whose PyPI wheel needs the tolerant import beside a CPU torch.
timm_vit = torch_cpu.tolerant_import("timm.models.vision_transformer")


class ImageFolder(torch.utils.data.Dataset):
  """torchvision's `ImageFolder` behind a class of this module. A DataLoader worker started by
  spawn unpickles the dataset; finding this class first, it imports this module, and with it
  torchvision through the tolerant import, before torchvision's own classes."""

  def __init__(self, root: str, transform):
    datasets = torch_cpu.tolerant_import("torchvision.datasets")
    self.folder = datasets.ImageFolder(root, transform=transform)

  def __len__(self):
    return len(self.folder)

  def __getitem__(self, i):
    return self.folder[i]


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """(1 + grid*grid, dim) float32: the cls row (zeros), then the official 2D sin-cos embedding,
  the first half of the channels for the column, the second for the row."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  half = lambda pos: np.concatenate([np.sin(np.outer(pos.reshape(-1), omega)),
                                     np.cos(np.outer(pos.reshape(-1), omega))], axis=1)
  emb = np.concatenate([half(cols), half(rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0).astype(np.float32)


class OfficialMAE(nn.Module):
  """MaskedAutoencoderViT of any shape. `forward(imgs, noise)` takes NCHW images and the (N, L)
  masking noise (drawn with torch.rand when None, as the official code does) and returns
  (loss, pred, mask, latent)."""

  def __init__(self, img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2,
               decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0,
               norm_pix_loss=True, mask_ratio=0.75):
    super().__init__()
    self.p, self.grid = patch_size, img_size // patch_size
    self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    block = lambda d, h: timm_vit.Block(d, h, mlp_ratio, qkv_bias=True, norm_layer=norm)
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(embed_dim, self.grid))[None],
                                  requires_grad=False)
    self.blocks = nn.ModuleList([block(embed_dim, num_heads) for _ in range(depth)])
    self.norm = norm(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(
        torch.from_numpy(sincos_2d(decoder_embed_dim, self.grid))[None], requires_grad=False)
    self.decoder_blocks = nn.ModuleList([block(decoder_embed_dim, decoder_num_heads)
                                         for _ in range(decoder_depth)])
    self.decoder_norm = norm(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)
    init_official(self)

  def patchify(self, imgs):
    n, g, p = imgs.shape[0], self.grid, self.p
    x = imgs.reshape(n, 3, g, p, g, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, g * g, p * p * 3)

  def forward_encoder(self, x, noise):
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
    n, length, d = x.shape
    keep = int(length * (1 - self.mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x), mask, ids_restore

  def forward_decoder(self, latent, ids_restore):
    x = self.decoder_embed(latent)
    tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:], tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore[:, :, None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]

  def forward_loss(self, imgs, pred, mask):
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.0e-6) ** 0.5
    return (((pred - target) ** 2).mean(dim=-1) * mask).sum() / mask.sum()

  def forward(self, imgs, noise=None):
    if noise is None:
      noise = torch.rand(imgs.shape[0], self.grid ** 2)
    latent, mask, ids_restore = self.forward_encoder(imgs, noise)
    pred = self.forward_decoder(latent, ids_restore)
    return self.forward_loss(imgs, pred, mask), pred, mask, latent


def init_official(model: OfficialMAE) -> OfficialMAE:
  """The official `initialize_weights`: the patch projection's weight xavier-uniform as a flattened
  (out, C*p*p) matrix (its bias keeps the Conv2d default), cls and mask tokens normal(0.02), then
  every Linear xavier-uniform with a zero bias and every LayerNorm ones/zeros. The fused qkv
  Linear is one (3D, D) matrix, so its xavier bound is sqrt(6 / 4D)."""
  with torch.no_grad():
    w = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.normal_(model.cls_token, std=0.02)
    nn.init.normal_(model.mask_token, std=0.02)
    for m in model.modules():
      if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
          nn.init.zeros_(m.bias)
      elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
  return model


def param_groups(model: nn.Module, weight_decay: float):
  """The official pretraining parameter groups (timm's add_weight_decay as main_pretrain.py calls
  it): no decay on 1-D tensors and biases, `weight_decay` on the rest; frozen tensors (the
  position embeddings) left out."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
  return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(progress_epochs: float, lr: float, min_lr: float, warmup_epochs: float,
          epochs: float) -> float:
  """The official per-iteration schedule (util/lr_sched.py), at a fractional epoch: linear warmup
  from 0, then half-cycle cosine down to min_lr."""
  if progress_epochs < warmup_epochs:
    return lr * progress_epochs / warmup_epochs
  t = (progress_epochs - warmup_epochs) / (epochs - warmup_epochs)
  return min_lr + (lr - min_lr) * 0.5 * (1.0 + np.cos(np.pi * t))
