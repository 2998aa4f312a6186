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

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

