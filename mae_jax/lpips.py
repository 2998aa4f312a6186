"""LPIPS (Zhang et al., 2018; the `lpips` package, v0.1) in JAX, for AlexNet and VGG16 backbones.

The weights come from a file the user makes once, on a machine with torch, torchvision and the
`lpips` package (the backbone's ImageNet weights are downloaded by torchvision there):

    python -m mae_jax.lpips --net=alex --out=weights/lpips_alex.npz
    python -m mae_jax.lpips --net=vgg --out=weights/lpips_vgg.npz

and then passes to evaluation (`--config.evaluate.lpips_alex=weights/lpips_alex.npz`). The file
holds the torch tensors as they are: `features.<i>.weight|bias` (torchvision indices) and
`lin<k>.weight`.
"""

import argparse
import os
import sys

import numpy as np

from mae_jax.evaluators.lpips import NETS, weights_from_torch
from mae_jax.runtime import durable


def main(argv=None):
  p = argparse.ArgumentParser(description="Write LPIPS weights (.npz) from the lpips package.")
  p.add_argument("--net", choices=sorted(NETS), required=True)
  p.add_argument("--out", required=True)
  a = p.parse_args(argv)
  import lpips as lpips_torch  # torch, torchvision and lpips are needed for this step only
  model = lpips_torch.LPIPS(net=a.net, pretrained=True, pnet_rand=False, verbose=False)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with durable.replacing(a.out) as tmp, open(tmp, "wb") as f:
    np.savez(f, **weights_from_torch(model, a.net))
  print(f"wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
