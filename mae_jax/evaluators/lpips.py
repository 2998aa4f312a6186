"""LPIPS (Zhang et al., 2018; the `lpips` package, v0.1) in JAX, for AlexNet and VGG16 backbones.

The weights come from a file made once with `python -m mae_jax.lpips --net=alex|vgg --out=FILE`
(mae_jax/lpips.py) on a machine with torch, torchvision and the `lpips` package. The file
holds the torch tensors as they are: `features.<i>.weight|bias` (torchvision indices) and
`lin<k>.weight`."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.errors import LPIPSWeightsError

# torchvision `features` layers up to each LPIPS tap: ('conv', index, stride, padding) or ('pool', k, s).
ALEX = [
    [("conv", 0, 4, 2)],
    [("pool", 3, 2), ("conv", 3, 1, 2)],
    [("pool", 3, 2), ("conv", 6, 1, 1)],
    [("conv", 8, 1, 1)],
    [("conv", 10, 1, 1)],
]
VGG16 = [
    [("conv", 0, 1, 1), ("conv", 2, 1, 1)],
    [("pool", 2, 2), ("conv", 5, 1, 1), ("conv", 7, 1, 1)],
    [("pool", 2, 2), ("conv", 10, 1, 1), ("conv", 12, 1, 1), ("conv", 14, 1, 1)],
    [("pool", 2, 2), ("conv", 17, 1, 1), ("conv", 19, 1, 1), ("conv", 21, 1, 1)],
    [("pool", 2, 2), ("conv", 24, 1, 1), ("conv", 26, 1, 1), ("conv", 28, 1, 1)],
]
NETS = {"alex": ALEX, "vgg": VGG16}
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


def load_weights(path: str, net: str) -> dict:
  """The .npz weights for `net`; a clear error naming the file when it is absent or wrong."""
  if not path or not os.path.exists(path):
    raise LPIPSWeightsError(
        f"LPIPS ({net}) weights file {path!r} not found. Make it once with "
        f"`python -m mae_jax.lpips --net={net} --out=FILE` (needs torch, torchvision and lpips), "
        f"then pass --config.evaluate.lpips_{net}=FILE; or leave it '' to skip LPIPS ({net}).")
  with np.load(path) as f:
    weights = {k: f[k] for k in f.files}
  needed = [f"features.{op[1]}.weight" for layer in NETS[net] for op in layer if op[0] == "conv"]
  missing = [k for k in needed + [f"lin{k}.weight" for k in range(5)] if k not in weights]
  if missing:
    raise LPIPSWeightsError(f"{path!r} is not an LPIPS {net} weights file (missing {missing[:3]})")
  return weights


def _conv(x, w, b, stride, padding):
  y = jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + b[None, :, None, None]


def _pool(x, k, s):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, s, s), "VALID")


def _features(weights, x, net):
  taps = []
  for layer in NETS[net]:
    for op in layer:
      if op[0] == "pool":
        x = _pool(x, op[1], op[2])
      else:
        _, i, stride, pad = op
        x = jax.nn.relu(_conv(x, weights[f"features.{i}.weight"], weights[f"features.{i}.bias"],
                              stride, pad))
    taps.append(x)
  return taps


def lpips(weights: dict, img0, img1, net: str = "alex"):
  """LPIPS distance per image. img0, img1: (N, H, W, 3) in [0, 1]. Returns (N,)."""
  def prep(img):
    x = jnp.transpose(img, (0, 3, 1, 2)) * 2.0 - 1.0  # the package takes [-1, 1], NCHW
    return (x - SHIFT[None, :, None, None]) / SCALE[None, :, None, None]

  f0, f1 = _features(weights, prep(img0), net), _features(weights, prep(img1), net)
  total = 0.0
  for k, (a, b) in enumerate(zip(f0, f1)):
    a = a / (jnp.sqrt(jnp.sum(a**2, axis=1, keepdims=True)) + 1e-10)
    b = b / (jnp.sqrt(jnp.sum(b**2, axis=1, keepdims=True)) + 1e-10)
    w = weights[f"lin{k}.weight"][0, :, 0, 0]  # (C,), a 1x1 conv without bias
    total = total + jnp.mean(jnp.einsum("nchw,c->nhw", (a - b) ** 2, w), axis=(1, 2))
  return total


def weights_from_torch(model, net: str) -> dict:
  """An `lpips.LPIPS` torch model's weights in this module's layout (numpy)."""
  out = {}
  for k in range(5):
    for name, mod in getattr(model.net, f"slice{k + 1}").named_children():
      if hasattr(mod, "weight") and mod.weight is not None:
        out[f"features.{name}.weight"] = mod.weight.detach().cpu().numpy()
        out[f"features.{name}.bias"] = mod.bias.detach().cpu().numpy()
    lin = getattr(model, f"lin{k}").model
    out[f"lin{k}.weight"] = [m for m in lin if hasattr(m, "weight")][0].weight.detach().cpu().numpy()
  return out
