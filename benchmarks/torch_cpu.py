"""Importing torchvision-dependent packages (lpips, transformers) beside a CPU build of torch.

PyPI's torchvision wheels carry CUDA-only compiled ops, which a CPU torch cannot load: importing
torchvision then fails while registering their fake kernels ("operator torchvision::nms does not
exist"). lpips and transformers need only torchvision's pure-Python parts, so `tolerant_import`
skips the registrations whose op does not exist. Used by the benchmarks and the tests.
"""

import importlib


def tolerant_import(name: str):
  """`importlib.import_module(name)`, tolerating torchvision's missing compiled ops."""
  import torch
  real = torch.library.register_fake

  def tolerant(op, *args, **kwargs):
    if args and callable(args[0]):  # register_fake(op, fn)
      try:
        return real(op, *args, **kwargs)
      except RuntimeError:
        return args[0]
    decorator = real(op, *args, **kwargs)

    def apply(fn):
      try:
        return decorator(fn)
      except RuntimeError:
        return fn
    return apply

  torch.library.register_fake = tolerant
  try:
    return importlib.import_module(name)
  finally:
    torch.library.register_fake = real
