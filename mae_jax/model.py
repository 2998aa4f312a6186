"""The Masked Autoencoder: patchify, masking, ViT encoder, lightweight decoder, loss.

Follows facebookresearch/mae `models_mae.py` numerically (docs/numerics.md has the details and
how they are checked):
  * patches flattened in (p, p, C) order, row-major over the patch grid;
  * fixed 2D sin-cos position embeddings, zeros for the cls token;
  * masking by the ranks (argsort) of uniform noise, cls token prepended after masking;
  * pre-norm blocks, LayerNorm eps 1e-6, exact (erf) GELU, qkv with bias;
  * xavier-uniform Linear layers with zero biases, except the patch projection's bias, which keeps
    PyTorch's conv default; normal(0.02) cls and mask tokens;
  * loss on masked patches only, optional per-patch normalised target
    with the unbiased variance.

Parameters are float32; `dtype` sets the compute dtype (bfloat16 on accelerators).
The loss is always computed in float32.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.parallel import batch_sharded

LN_EPS = 1e-6
xavier = nn.initializers.xavier_uniform()
normal_02 = nn.initializers.normal(stddev=0.02)


# ----------------------------------------------------------------------------
# Patches and position embeddings (plain functions: no parameters).
# ----------------------------------------------------------------------------
def patchify(imgs: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, p*p*C), each patch flattened in (p, p, C) order."""
  b, h, w, c = imgs.shape
  gh, gw = h // p, w // p
  x = imgs.reshape(b, gh, p, gw, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
  return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: jax.Array, p: int, grid: tuple[int, int], channels: int = 3) -> jax.Array:
  """(B, L, p*p*C) -> (B, H, W, C); the inverse of `patchify`."""
  b = x.shape[0]
  gh, gw = grid
  x = x.reshape(b, gh, gw, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, embed_dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k/D)."""
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid: tuple[int, int], cls_token: bool = False) -> np.ndarray:
  """Fixed 2D sin-cos position embedding, (gh*gw [+1], embed_dim), float32.

  As in the official code, the first half of the channels encodes the column
  (w) index and the second half the row (h) index; the cls row is zeros.
  """
  if embed_dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
  gh, gw = grid
  cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
  emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
  return emb.astype(np.float32)


def noise_ranks(noise: jax.Array) -> jax.Array:
  """(B, L) -> each patch's position when its row is sorted ascending, ties by index: the
  official `argsort(argsort(noise))`, counted by comparisons (B x L x L) instead of two sorts,
  which XLA runs slowly on CPU and TPU."""
  length = noise.shape[1]
  idx = jnp.arange(length)
  before = (noise[:, :, None] < noise[:, None, :]) | (
      (noise[:, :, None] == noise[:, None, :]) & (idx[:, None] < idx[None, :]))
  return before.sum(axis=1, dtype=jnp.int32)


def random_masking(x: jax.Array, noise: jax.Array, mask_ratio: float):
  """Keeps the `int(L * (1 - mask_ratio))` patches with the smallest noise.

  Returns (x_kept (B, len_keep, D) in ascending noise order, mask (B, L) with 1 on removed
  patches, ids_restore (B, L) such that gathering the [kept, removed] order with it gives back
  the original order). Static-shaped: len_keep is a Python int.
  """
  length = x.shape[1]
  len_keep = int(length * (1 - mask_ratio))
  ids_restore = noise_ranks(noise)  # = argsort(ids_shuffle), ids_shuffle = argsort(noise)
  # ids_keep[:, r] = the patch of rank r, for the len_keep smallest ranks.
  is_rank = ids_restore[:, None, :] == jnp.arange(len_keep)[None, :, None]  # (B, len_keep, L)
  ids_keep = jnp.sum(jnp.where(is_rank, jnp.arange(length), 0), axis=-1)
  x_kept = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return x_kept, mask, ids_restore


# ----------------------------------------------------------------------------
# Transformer pieces.
# ----------------------------------------------------------------------------
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


def attention_backend(requested: str, dtype, head_dims) -> str:
  """The attention implementation a model uses: `requested` ('xla' or 'cudnn') if given; else
  cuDNN's fused kernel where JAX supports it (a GPU of compute capability 8.0 or more, bfloat16 or
  float16 compute, head dimensions multiples of 8 up to 128) and XLA's einsums elsewhere."""
  if requested:
    return requested
  if jax.default_backend() != "gpu" or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return "xla"
  if any(d % 8 or d > 128 for d in head_dims):
    return "xla"
  try:
    capability = float(getattr(jax.devices()[0], "compute_capability", 0))
  except ValueError:
    capability = 0.0
  return "cudnn" if capability >= 8.0 else "xla"


def attention_from_config(model_cfg, decoder: bool = True) -> str:
  """`attention_backend` for a `config.model`: its encoder's heads, and its decoder's when the
  model has the decoder."""
  m = model_cfg
  heads = [m.encoder_width // m.encoder_heads]
  if decoder:
    heads.append(m.decoder_width // m.decoder_heads)
  return attention_backend(m.get("attention_impl", ""), m.dtype, heads)


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


class ScanBlock(Block):
  """A Block as one step of `nn.scan`: (x, this layer's drop-path rate) -> (x, None)."""
  deterministic: bool = True

  def __call__(self, x, drop_rate):
    return super().__call__(x, self.deterministic, drop_rate), None


def block_stack(x, depth: int, drop_rates, *, num_heads: int, mlp_ratio: float, dtype,
                attention_impl, remat: str, scan: bool, deterministic: bool = True,
                ln_eps: float = LN_EPS):
  """`depth` pre-norm blocks over x (called inside a compact module). Unrolled, their parameters
  are `block0` ... `block{depth-1}`; with `scan`, one `nn.scan` whose parameters are stacked
  along a leading layer axis under `blocks` (one block to compile instead of `depth`;
  `stack_layers` / `unstack_layers` convert between the two)."""
  if not scan:
    for i in range(depth):
      x = block_type(remat)(num_heads, mlp_ratio, float(drop_rates[i]), dtype, attention_impl,
                            ln_eps, name=f"block{i}")(x, deterministic)
    return x
  scanned = nn.scan(block_type(remat, scan=True), variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True}, in_axes=0, length=depth)
  x, _ = scanned(num_heads, mlp_ratio, 0.0, dtype, attention_impl, ln_eps,
                 deterministic=deterministic, name="blocks")(x, jnp.asarray(drop_rates, jnp.float32))
  return x


def _is_block_name(key) -> bool:
  return isinstance(key, str) and key.startswith("block") and key[5:].isdigit()


def _stack(leaves):
  if isinstance(leaves[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + leaves[0].shape, leaves[0].dtype)
  stack = np.stack if isinstance(leaves[0], np.ndarray) else jnp.stack
  return stack(leaves)


def stack_layers(tree):
  """Unrolled -> scanned layout: every dict holding `block0` ... `block{n-1}` gets them stacked
  leaf by leaf into `blocks`. Works on any pytree holding parameter-shaped dicts (parameters,
  optimizer moments) whose leaves are arrays or ShapeDtypeStructs."""
  def convert(node):
    if not isinstance(node, dict):
      return node
    blocks = sorted((k for k in node if _is_block_name(k)), key=lambda k: int(k[5:]))
    out = {k: convert(v) for k, v in node.items() if not _is_block_name(k)}
    if blocks:
      out["blocks"] = jax.tree.map(lambda *xs: _stack(xs), *[node[k] for k in blocks])
    return out
  return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, dict))


def unstack_layers(tree):
  """Scanned -> unrolled layout: the inverse of `stack_layers`."""
  def take(x, i):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x[i]

  def convert(node):
    if not isinstance(node, dict):
      return node
    out = {k: convert(v) for k, v in node.items() if k != "blocks"}
    if "blocks" in node:
      depth = jax.tree.leaves(node["blocks"])[0].shape[0]
      for i in range(depth):
        out[f"block{i}"] = jax.tree.map(lambda x: take(x, i), node["blocks"])
    return out
  return jax.tree.map(convert, tree, is_leaf=lambda x: isinstance(x, dict))


def is_scanned(params) -> bool:
  """Whether a parameter tree holds scanned (`blocks`) layers."""
  return any(isinstance(v, dict) and "blocks" in v for v in params.values())


# What a rematerialised block keeps for the backward pass ('none': everything, no remat).
REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,  # only the block's input; all recomputed
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the matmul outputs too
}


def block_type(remat: str = "none", scan: bool = False):
  """`Block` (`ScanBlock` for nn.scan), or with `remat` 'block' / 'dots' its rematerialised form
  (same parameters), whose activations are recomputed in the backward pass instead of kept:
  memory for compute."""
  block = ScanBlock if scan else Block
  if remat == "none":
    return block
  # static_argnums counts self: Block's argument 2 is `deterministic`, a Python bool (ScanBlock
  # holds it as a field).
  return nn.remat(block, policy=REMAT_POLICIES[remat], static_argnums=() if scan else (2,))


class Encoder(nn.Module):
  """ViT encoder. With `noise`, only the visible patches go through the blocks."""
  patch_size: int
  grid: tuple[int, int]
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  learned_pos_embed: bool = False  # fine-tuning learns it (from the sin-cos values), as timm's ViT
  final_norm: bool = True          # off when a classifier pools patch tokens into its own fc_norm
  mask_token: bool = False         # ablation: keep all patches, removed ones replaced by a mask token
  remat: str = "none"              # 'none', 'block' or 'dots' (see REMAT_POLICIES)
  scan: bool = False               # the blocks as one nn.scan (see block_stack)
  ln_eps: float = LN_EPS

  @nn.compact
  def __call__(self, imgs, noise=None, mask_ratio: float = 0.0, deterministic: bool = True):
    """Returns (tokens (B, 1 + len_keep, D), after the final norm if any; mask; ids_restore)."""
    x = patchify(imgs, self.patch_size).astype(self.dtype)
    # The patch projection is a Linear on flattened patches (= the official conv: xavier on its
    # flattened weight, the conv's default bias).
    x = dense(self.width, self.dtype, "patch_embed", conv_default_bias(x.shape[-1]))(x)
    pos = sincos_2d(self.width, self.grid)[None]
    if self.learned_pos_embed:
      pos = self.param("pos_embed", lambda *_: jnp.asarray(pos), pos.shape)
    mask = ids_restore = None
    if noise is not None and self.mask_token:
      # SimMIM-like ablation: the encoder sees every position, removed patches as a learned token.
      _, mask, _ = random_masking(x, noise, mask_ratio)
      token = self.param("mask_token", normal_02, (1, 1, self.width), jnp.float32).astype(self.dtype)
      x = jnp.where(mask[:, :, None] > 0, token, x)
    x = x + pos.astype(self.dtype)
    if noise is not None and not self.mask_token:
      x, mask, ids_restore = random_masking(x, noise, mask_ratio)
    cls = self.param("cls_token", normal_02, (1, 1, self.width), jnp.float32)
    # The cls position embedding is zeros, so the cls token goes in as it is.
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width)), x], 1)
    rates = np.linspace(0, self.drop_path, self.depth)  # stochastic depth decay rule
    x = block_stack(x, self.depth, rates, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    dtype=self.dtype, attention_impl=self.attention_impl, remat=self.remat,
                    scan=self.scan, deterministic=deterministic, ln_eps=self.ln_eps)
    if self.final_norm:
      x = layer_norm(self.dtype, "norm", self.ln_eps)(x)
    return x, mask, ids_restore


class Decoder(nn.Module):
  """Lightweight decoder: embed, insert mask tokens, unshuffle, blocks, predict pixels."""
  patch_size: int
  grid: tuple[int, int]
  width: int
  depth: int
  num_heads: int
  channels: int = 3
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = "none"
  scan: bool = False
  ln_eps: float = LN_EPS

  @nn.compact
  def __call__(self, latent, ids_restore):
    """latent (B, 1 + len_keep, D_enc) -> predicted patches (B, L, p*p*C). With ids_restore None
    the latent already holds every position in order (mask tokens in the encoder)."""
    x = dense(self.width, self.dtype, "embed")(latent)
    if ids_restore is not None:
      b, length = ids_restore.shape
      mask_token = self.param("mask_token", normal_02, (1, 1, self.width), jnp.float32)
      fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, length + 1 - x.shape[1], self.width))
      x_ = jnp.concatenate([x[:, 1:], fill], axis=1)  # [kept, removed] order, no cls
      x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)  # back to patch order
      x = jnp.concatenate([x[:, :1], x_], axis=1)
    x = x + sincos_2d(self.width, self.grid, cls_token=True).astype(self.dtype)[None]
    x = block_stack(x, self.depth, np.zeros(self.depth), num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, dtype=self.dtype, attention_impl=self.attention_impl,
                    remat=self.remat, scan=self.scan, ln_eps=self.ln_eps)
    x = layer_norm(self.dtype, "norm", self.ln_eps)(x)
    x = dense(self.patch_size**2 * self.channels, self.dtype, "pred")(x)
    return x[:, 1:]  # drop the cls position


def mae_loss(target_patches, pred, mask, norm_pix_loss: bool):
  """Mean squared error per patch, averaged over the masked (removed) patches only."""
  target = target_patches.astype(jnp.float32)
  pred = pred.astype(jnp.float32)
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def laplacian(images):
  """Per-channel Laplacian of (B, H, W, C) images, zero padding, same size."""
  c = images.shape[-1]
  kernel = jnp.tile(jnp.asarray(LAPLACIAN, images.dtype)[:, :, None, None], (1, 1, 1, c))
  return jax.lax.conv_general_dilated(
      jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0))), kernel, (1, 1), "VALID",
      feature_group_count=c, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)


def masked_laplacian_loss(pred_images, target_images, mask_images):
  """The frequency loss of curriculum masking with Laplacian and uniformity losses (STL-10): mean |Lap(pred) - Lap(target)| over the masked pixels (x channels)."""
  err = jnp.abs(laplacian(pred_images) - laplacian(target_images)) * mask_images
  return err.sum() / jnp.maximum(mask_images.sum(), 1.0)


def uniformity_loss(features, t: float = 2.0):
  """Wang & Isola's uniformity of (B, D) features, L2-normalised here: log mean over pairs i < j
  of exp(-t ||z_i - z_j||^2)."""
  z = features.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  sq = jnp.maximum(2.0 - 2.0 * z @ z.T, 0.0)  # squared distances of unit vectors
  b = z.shape[0]
  pairs = jnp.triu(jnp.ones((b, b), bool), k=1)
  return jnp.log(jnp.sum(jnp.where(pairs, jnp.exp(-t * sq), 0.0)) / (b * (b - 1) / 2))


def normalize_patches(patches, eps: float = 1e-6):
  """Per-patch (t - mean) / sqrt(var + eps), with the unbiased variance (torch's .var default)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def unnormalize_patches(pred, target_patches, eps: float = 1e-6):
  """The inverse of `normalize_patches` with the target patches' own statistics: maps a
  norm_pix_loss prediction back to the (dataset-normalised) pixel space, for display and metrics."""
  mean = target_patches.mean(axis=-1, keepdims=True)
  var = target_patches.var(axis=-1, keepdims=True, ddof=1)
  return pred * jnp.sqrt(var + eps) + mean


class MAE(nn.Module):
  """Masked autoencoder with a ViT encoder (`encoder`) and a lightweight decoder (`decoder`)."""
  image_size: tuple[int, int]
  patch_size: int
  encoder_width: int
  encoder_depth: int
  encoder_heads: int
  decoder_width: int
  decoder_depth: int
  decoder_heads: int
  mlp_ratio: float = 4.0
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  channels: int = 3
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  mask_token_in_encoder: bool = False  # the paper's and the CIFAR-10 ViT-T/2 study's ablation
  laplacian_weight: float = 0.0        # lambda_freq of the STL-10 curriculum study (0.05)
  uniformity_weight: float = 0.0       # lambda_unif of the STL-10 curriculum study (0.01)
  remat: str = "none"                  # rematerialised blocks: 'none', 'block' or 'dots'
  scan_layers: bool = False            # encoder and decoder blocks as one nn.scan each
  ln_eps: float = LN_EPS               # LayerNorm epsilon (weights converted from Hugging Face: 1e-12)

  @property
  def grid(self) -> tuple[int, int]:
    return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  def setup(self):
    self.encoder = Encoder(self.patch_size, self.grid, self.encoder_width, self.encoder_depth,
                           self.encoder_heads, self.mlp_ratio, 0.0, self.dtype, self.attention_impl,
                           mask_token=self.mask_token_in_encoder, remat=self.remat,
                           scan=self.scan_layers, ln_eps=self.ln_eps)
    self.decoder = Decoder(self.patch_size, self.grid, self.decoder_width, self.decoder_depth,
                           self.decoder_heads, self.channels, self.mlp_ratio, self.dtype,
                           self.attention_impl, self.remat, self.scan_layers, self.ln_eps)

  def __call__(self, imgs, noise):
    """imgs (B, H, W, C) normalised; noise (B, L) uniform. Returns (loss, pred, mask).

    The loss is the masked MSE plus, where weighted, the Laplacian and uniformity terms of the STL-10 curriculum study;
    each term is also sown into the 'losses' collection for logging.
    """
    latent, mask, ids_restore = self.encoder(imgs, noise, self.mask_ratio)
    pred = self.decoder(latent, ids_restore).astype(jnp.float32)
    target = patchify(imgs, self.patch_size)
    loss = mae_loss(target, pred, mask, self.norm_pix_loss)
    self.sow("losses", "mse", loss)
    if self.laplacian_weight > 0:
      if self.norm_pix_loss:
        target = normalize_patches(target.astype(jnp.float32))
      to_img = lambda x: unpatchify(x, self.patch_size, self.grid, self.channels)
      mask_img = to_img(jnp.repeat(mask[:, :, None], target.shape[-1], axis=-1))
      lap = masked_laplacian_loss(to_img(pred), to_img(target.astype(jnp.float32)), mask_img)
      self.sow("losses", "laplacian", lap)
      loss = loss + self.laplacian_weight * lap
    if self.uniformity_weight > 0:
      if ids_restore is not None:  # the encoder saw only visible patches
        pooled = latent[:, 1:].mean(axis=1)
      else:
        keep = (1.0 - mask)[:, :, None]
        pooled = (latent[:, 1:] * keep).sum(axis=1) / keep.sum(axis=1)
      unif = uniformity_loss(pooled)
      self.sow("losses", "uniformity", unif)
      loss = loss + self.uniformity_weight * unif
    return loss, pred, mask


def mae_from_config(model_cfg, image_size: int, scan_layers: Optional[bool] = None) -> MAE:
  """Builds the MAE module from a `config.model` ConfigDict (`scan_layers` overrides the
  config's layer layout)."""
  return MAE(
      image_size=(image_size, image_size),
      patch_size=model_cfg.patch_size,
      encoder_width=model_cfg.encoder_width,
      encoder_depth=model_cfg.encoder_depth,
      encoder_heads=model_cfg.encoder_heads,
      decoder_width=model_cfg.decoder_width,
      decoder_depth=model_cfg.decoder_depth,
      decoder_heads=model_cfg.decoder_heads,
      mlp_ratio=model_cfg.mlp_ratio,
      mask_ratio=model_cfg.mask_ratio,
      norm_pix_loss=model_cfg.norm_pix_loss,
      dtype=jnp.dtype(model_cfg.dtype),
      attention_impl=attention_from_config(model_cfg),
      mask_token_in_encoder=model_cfg.get("mask_token_in_encoder", False),
      laplacian_weight=model_cfg.get("laplacian_weight", 0.0),
      uniformity_weight=model_cfg.get("uniformity_weight", 0.0),
      remat=model_cfg.get("remat", "none"),
      scan_layers=model_cfg.get("scan_layers", False) if scan_layers is None else scan_layers,
      ln_eps=model_cfg.get("layer_norm_eps", LN_EPS),
  )
