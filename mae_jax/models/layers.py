"""The transformer's building blocks, as the official MAE's timm blocks compute them.

Pre-norm `Block`: LayerNorm (eps 1e-6) -> multi-head self-attention with one fused qkv Linear
-> residual; LayerNorm -> MLP (ratio 4, exact erf GELU) -> residual. Linear layers are
xavier-uniform with zero biases (`dense`).

LayerNorm (`normalize`), GELU (`gelu`) and the attention (`attention`) carry hand-written
backward passes that keep only what the backward pass needs (x, the mean and 1/std; x; q, k, v
and the float32 probabilities), as fused kernels do; their forward outputs are what autodiff's
formulas give, bit for bit, and the tests check the gradients against autodiff. Under a scanned
or rematerialised layer stack this roughly halves the activations kept (docs/scaling.md).
On a GPU the attention can instead be cuDNN's fused kernel (`attention_backend`).
"""

import contextlib
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mae_jax.models import masking
from mae_jax.runtime.parallel import batch_sharded

LN_EPS = 1e-6
xavier = nn.initializers.xavier_uniform()
normal_02 = nn.initializers.normal(stddev=0.02)

def dense(features: int, dtype: Any, name: Optional[str] = None, bias_init=nn.initializers.zeros) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=xavier,
                  bias_init=bias_init, name=name)


def conv_default_bias(fan_in: int):
  """PyTorch's default Conv2d bias init, uniform(+-1 / sqrt(fan_in)): the official MAE keeps it for
  the patch projection, since its init re-initialises only Linear and LayerNorm layers."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x, scale, bias, eps: float, dtype):
  """LayerNorm over the last axis, statistics in float32: (x - mean) * rsqrt(var + eps) * scale
  + bias, var = E[x^2] - E[x]^2 (flax's nn.LayerNorm, bit for bit), cast to `dtype`.

  Its backward pass keeps only x, the mean and 1/std, as fused LayerNorm kernels (PyTorch's
  native_layer_norm, Apex) do. Left to autodiff, the float32 intermediates are what a scanned
  layer saves for the backward pass: four activation-sized float32 residuals per norm."""
  return _normalize_fwd(x, scale, bias, eps, dtype)[0]


def _normalize_fwd(x, scale, bias, eps, dtype):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.maximum(0.0, jnp.mean(xf * xf, axis=-1, keepdims=True) - mean * mean)
  rstd = jax.lax.rsqrt(var + eps)
  y = (xf - mean) * (rstd * scale) + bias
  return y.astype(dtype), (x, mean, rstd, scale)


def _normalize_bwd(eps, dtype, residuals, g):
  x, mean, rstd, scale = residuals
  g = g.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  rows = tuple(range(g.ndim - 1))
  g_hat = g * scale
  dx = rstd * (g_hat - jnp.mean(g_hat, axis=-1, keepdims=True)
               - x_hat * jnp.mean(g_hat * x_hat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), jnp.sum(g * x_hat, axis=rows), jnp.sum(g, axis=rows)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nn.Module):
  """nn.LayerNorm's parameters (`scale`, `bias`, float32) around `normalize`."""
  epsilon: float = LN_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    return normalize(x, scale, bias, self.epsilon, jnp.dtype(self.dtype))


def layer_norm(dtype: Any, name: Optional[str] = None, eps: float = LN_EPS) -> LayerNorm:
  return LayerNorm(epsilon=eps, dtype=dtype, name=name)


@jax.custom_vjp
def gelu(x):
  """Exact GELU as torch.nn.GELU() computes it: x/2 * (1 + erf(x/sqrt 2)). (jax.nn.gelu's exact
  form uses erfc, which XLA lowers to a costlier select of two approximations.)

  Its backward pass keeps only x and computes Phi(x) + x phi(x) from it in float32, as PyTorch's
  GELU backward does; autodiff of the formula would save three more activation-sized tensors."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


def _gelu_bwd(x, g):
  xf = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(xf * np.float32(np.sqrt(0.5))))
  pdf = jnp.exp(-0.5 * xf * xf) * np.float32(1.0 / np.sqrt(2.0 * np.pi))
  return ((g.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(lambda x: (gelu(x), x), _gelu_bwd)


@jax.custom_vjp
def attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v over (B, heads, N, head_dim) inputs, the softmax in float32.

  Heads-first operands make both products plain batched matmuls (no per-head transposes inside
  the backward pass). q is scaled before the product, as timm's Attention does. The backward
  pass keeps q, k, v and the float32 probabilities, and takes the softmax's gradient from them
  (p * (dp - sum(dp * p))); autodiff would also keep the probabilities' compute-dtype copy and
  the softmax's unnormalised exponentials."""
  return _attention_fwd(q, k, v)[0]


def _attention_fwd(q, k, v):
  q = q * np.asarray(q.shape[-1] ** -0.5, q.dtype)
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v), (q, k, v, probs)


def _attention_bwd(residuals, g):
  q, k, v, probs = residuals
  dv = jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), g)
  dp = jnp.einsum("bhqd,bhkd->bhqk", g, v).astype(jnp.float32)
  ds = (probs * (dp - jnp.sum(dp * probs, axis=-1, keepdims=True))).astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k) * np.asarray(q.shape[-1] ** -0.5, q.dtype)
  return dq, jnp.einsum("bhqk,bhqd->bhkd", ds, q), dv


attention.defvjp(_attention_fwd, _attention_bwd)


# The device models are built for when it is not one present (mae_jax.compile for a TPU or GPU
# target); None: the first device present.
_target_device = None


@contextlib.contextmanager
def building_for(device):
  """Models built inside choose their attention backend for `device` (a TPU or GPU compiled
  for without the hardware) instead of the first device present."""
  global _target_device
  previous, _target_device = _target_device, device
  try:
    yield
  finally:
    _target_device = previous


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
  device = device or _target_device or jax.devices()[0]
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
  patches = (image_size // model_cfg.patch_size) ** 2
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


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (as timm's, which MAE uses)."""
  num_heads: int
  dtype: Any = jnp.float32
  implementation: Optional[str] = None  # None/'xla' everywhere; 'cudnn' for fused GPU attention

  @nn.compact
  def __call__(self, x):
    b, n, d = x.shape
    qkv = dense(3 * d, self.dtype, "qkv")(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    if self.implementation == "cudnn":  # the fused kernel takes (B, N, heads, head_dim)
      out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                         implementation="cudnn")
    else:
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
      out = attention(q, k, v).transpose(0, 2, 1, 3)
    return dense(d, self.dtype, "proj")(out.reshape(b, n, d))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per example. The rate may also come at
  call time (a traced per-layer rate, inside scanned blocks)."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool, rate=None):
    rate = self.rate if rate is None else rate
    if deterministic or (isinstance(rate, float) and rate == 0.0):
      return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)); x + mlp(norm(x)). Its activations keep their
  rows split over the devices (`batch_sharded`), so that under FSDP each device gathers the
  layer's weights, not the other devices' activations."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  ln_eps: float = LN_EPS  # the official 1e-6; Hugging Face's configs say 1e-12

  @nn.compact
  def __call__(self, x, deterministic: bool = True, drop_rate=None):
    d = x.shape[-1]
    x = batch_sharded(x)
    y = Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")(
        layer_norm(self.dtype, "norm1", self.ln_eps)(x))
    x = batch_sharded(x + DropPath(self.drop_path)(y, deterministic, drop_rate))
    y = layer_norm(self.dtype, "norm2", self.ln_eps)(x)
    y = batch_sharded(dense(int(d * self.mlp_ratio), self.dtype, "fc1")(y))
    y = gelu(y)
    y = dense(d, self.dtype, "fc2")(y)
    return batch_sharded(x + DropPath(self.drop_path)(y, deterministic, drop_rate))

