"""Which attention kernel a model uses, and for which device: cuDNN's fused attention where it
can train (NVIDIA GPUs of compute capability 8.0+, bfloat16/float16, head dimensions that
are multiples of 8 up to 128, even sequence lengths), XLA's einsums elsewhere; and the device
a model is built for when it is not present (`building_for`, used by mae_jax.compile)."""

import contextlib
import contextvars
import functools
import math

import jax
import jax.numpy as jnp
from absl import logging

from mae_jax.models import masking

# The device models are built for when it is not one present (mae_jax.compile for a TPU or GPU
# target); None: the first device present.
_target_device = contextvars.ContextVar("mae_jax_target_device", default=None)


@contextlib.contextmanager
def building_for(device):
  """Models built inside choose their attention backend for `device` (a TPU or GPU compiled
  for without the hardware) instead of the first device present."""
  token = _target_device.set(device)
  try:
    yield
  finally:
    _target_device.reset(token)


def cudnn_unavailable(device, dtype, head_dims, sequence_lengths=()) -> str:
  """Why cuDNN's fused attention cannot train on `device` ('' when it can): JAX supports it on
  NVIDIA GPUs of compute capability 8.0 or more, in bfloat16 or float16, for head dimensions
  that are multiples of 8 up to 128; and JAX 0.10's training path rejects odd sequence lengths
  (its empty stand-in for a bias counts as a bias), which a class token makes of every even
  grid: 197 tokens for ViT-B/16 at 224 px."""
  if device.platform != "gpu":
    return f"it runs on NVIDIA GPUs only, and this is a {device.platform} device"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"it needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name}"
  if any(d % 8 or d > 128 for d in head_dims):
    return f"it needs head dimensions that are multiples of 8 up to 128, not {list(head_dims)}"
  odd = sorted({n for n in sequence_lengths if n % 2})
  if odd:
    return f"JAX's cuDNN attention does not train on odd sequence lengths, and this model has {odd} tokens"
  try:
    capability = float(getattr(device, "compute_capability", 0))
  except ValueError:
    capability = 0.0
  if capability < 8.0:
    return f"it needs compute capability 8.0 or more, and this GPU has {capability or 'unknown'}"
  return ""


@functools.lru_cache(maxsize=None)
def _warn(message: str) -> None:  # once per distinct message
  logging.warning(message)


def attention_backend(requested: str, dtype, head_dims, device=None, sequence_lengths=()) -> str:
  """The attention implementation a model uses on `device` (default: the target of
  `building_for`, else the first device present): cuDNN's fused kernel where it can train,
  XLA's einsums elsewhere. `requested` 'xla' forces XLA; 'cudnn' where cuDNN cannot train falls
  back to XLA with a logged reason, so that a config written for a GPU runs everywhere."""
  device = device or _target_device.get() or jax.devices()[0]
  if requested == "xla":
    return "xla"
  why = cudnn_unavailable(device, dtype, head_dims, sequence_lengths)
  if requested == "cudnn" and why:
    _warn(f"model.attention_impl='cudnn' is not possible ({why}): XLA's attention is used instead")
  return "xla" if why else "cudnn"


def sequence_lengths(model_cfg, image_size: int, decoder: bool = True) -> tuple:
  """The tokens every attention of a model sees: with the decoder (the MAE), the class token and
  the kept patches in the encoder, the class token and every patch in the decoder; without it
  (an encoder or classifier on whole images), the class token and every patch."""
  patches = math.prod(masking.patch_grid(image_size, model_cfg.patch_size))
  if not decoder:
    return (1 + patches,)
  return (1 + masking.num_kept(patches, model_cfg.mask_ratio), 1 + patches)


def attention_from_config(model_cfg, image_size: int, decoder: bool = True) -> str:
  """`attention_backend` for a `config.model` at `image_size`: its encoder's heads, and its
  decoder's when the model has the decoder."""
  m = model_cfg
  heads = [m.encoder_width // m.encoder_heads]
  if decoder:
    heads.append(m.decoder_width // m.decoder_heads)
  return attention_backend(m.attention_impl, m.dtype, heads,
                           sequence_lengths=sequence_lengths(m, image_size, decoder))


def describe(model) -> str:
  """How a model (MAE or classifier) computes, for the first log line of a job."""
  layout = "scanned" if getattr(model, "scan_layers", False) else "unrolled"
  return (f"attention {model.attention_impl or 'xla'} | {jnp.dtype(model.dtype).name} compute | "
          f"{layout} layers, remat {getattr(model, 'remat', 'none')}")
