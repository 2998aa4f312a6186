"""The layers of models/layers.py: exact GELU and LayerNorm (with their hand-written backward
passes), attention against the per-head softmax formula and its gradients, what a bfloat16 block keeps
for its backward pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import print_saved_residuals

from mae_jax.models import layers


def test_block_uses_exact_gelu_and_layernorm_eps():
  blk = layers.Block(num_heads=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 4))
  p = blk.init(jax.random.PRNGKey(1), x)["params"]
  # Recompute the block by hand with erf-GELU and eps 1e-6.
  def ln(v, s, b):
    mu = v.mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * s + b
  x_ = np.asarray(x[0], np.float64)
  h = ln(x_, p["norm1"]["scale"], p["norm1"]["bias"])
  qkv = h @ np.asarray(p["attn"]["qkv"]["kernel"]) + np.asarray(p["attn"]["qkv"]["bias"])
  q, k, v = qkv[:, :4], qkv[:, 4:8], qkv[:, 8:]
  a = q @ k.T / 2.0
  a = np.exp(a - a.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  x_ = x_ + (a @ v) @ np.asarray(p["attn"]["proj"]["kernel"]) + np.asarray(p["attn"]["proj"]["bias"])
  h = ln(x_, p["norm2"]["scale"], p["norm2"]["bias"]) @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"])
  h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
  want = x_ + h @ np.asarray(p["fc2"]["kernel"]) + np.asarray(p["fc2"]["bias"])
  np.testing.assert_allclose(blk.apply({"params": p}, x)[0], want, rtol=1e-5, atol=1e-5)


def test_gelu_is_torchs_exact_erf_formula():
  x = np.linspace(-12, 12, 4001).astype(np.float32)
  want = 0.5 * x.astype(np.float64) * (1 + np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2)))
  np.testing.assert_allclose(layers.gelu(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)
  grad = jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x))
  cdf = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  np.testing.assert_allclose(grad, cdf + x * np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi),
                             rtol=1e-5, atol=1e-6)


def test_layer_norm_is_flax_s_with_a_backward_pass_from_the_saved_statistics():
  """`normalize` (mean and 1/std kept for the backward pass) against flax's nn.LayerNorm: the same
  outputs bit for bit, and gradients within float32 rounding of autodiff's."""
  import flax.linen as nn
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 48)) * 3 + 1
  w = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  for dtype, rtol, atol in ((jnp.float32, 1e-4, 2e-5), (jnp.bfloat16, 1e-2, 2e-2)):  # bf16: one ulp
    ref = nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32)
    xi = x.astype(dtype)
    p = ref.init(jax.random.PRNGKey(1), xi)
    p = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), p)
    ours = layers.LayerNorm(epsilon=1e-6, dtype=dtype)
    assert ours.init(jax.random.PRNGKey(1), xi)["params"].keys() == p["params"].keys()
    np.testing.assert_array_equal(np.asarray(ours.apply(p, xi), np.float32), np.asarray(ref.apply(p, xi), np.float32))
    loss = lambda m: (lambda p, x: jnp.sum(m.apply(p, x).astype(jnp.float32) * w))
    for got, want in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(p, xi)),
                         jax.tree.leaves(jax.grad(loss(ref), (0, 1))(p, xi))):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol, atol=atol)


def test_attention_gradients_equal_autodiff_of_the_softmax_formula():
  def plain(q, k, v):
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (2 * jax.random.normal(key, (2, 3, 17, 8)) for key in keys[:3])
  w = jax.random.normal(keys[3], q.shape)
  loss = lambda f: (lambda *a: jnp.sum(f(*a) * w))
  np.testing.assert_allclose(layers.attention(q, k, v), plain(q, k, v), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(loss(layers.attention), (0, 1, 2))(q, k, v), jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_bfloat16_block_keeps_few_activations_for_its_backward_pass(capsys):
  """What a block saves for the backward pass (what a scanned layer stacks over the depth): no
  float32 activation but the attention probabilities, and two MLP-wide tensors (fc1's output
  and GELU's), not autodiff's five (three GELU intermediates) plus four float32 ones per norm."""
  b, n, d = 2, 5, 8
  blk = layers.Block(num_heads=2, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(0), (b, n, d)).astype(jnp.bfloat16)
  p = blk.init(jax.random.PRNGKey(1), x)["params"]
  capsys.readouterr()
  print_saved_residuals(lambda p, x: blk.apply({"params": p}, x), p, x)
  saved = [line.split(" ", 1) for line in capsys.readouterr().out.splitlines() if line.strip()]
  activations = [(aval, why) for aval, why in saved if not why.startswith("from the argument p")]
  shapes = [aval for aval, _ in activations]
  assert [a for a in shapes if a.startswith("f32") and not a.endswith(",1]")] == [f"f32[{b},2,{n},{n}]"]
  assert shapes.count(f"bf16[{b},{n},{4 * d}]") == 2


def test_multi_head_attention_against_per_head_softmax():
  """3 heads of width 4: the qkv output is split (q|k|v) then (head, head_dim), as timm's reshape
  (B, N, 3, heads, head_dim); each head is softmax(q k^T / sqrt(4)) v on its own slice."""
  heads, hd, n = 3, 4, 5
  attn = layers.Attention(num_heads=heads)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, n, heads * hd))
  p = attn.init(jax.random.PRNGKey(1), x)["params"]
  got = attn.apply({"params": p}, x)
  for b in range(2):
    qkv = np.asarray(x[b], np.float64) @ np.asarray(p["qkv"]["kernel"]) + np.asarray(p["qkv"]["bias"])
    q, k, v = (qkv[:, i * heads * hd:(i + 1) * heads * hd].reshape(n, heads, hd) for i in range(3))
    out = np.zeros((n, heads, hd))
    for h in range(heads):
      s = q[:, h] @ k[:, h].T / math.sqrt(hd)
      a = np.exp(s - s.max(-1, keepdims=True))
      out[:, h] = (a / a.sum(-1, keepdims=True)) @ v[:, h]
    want = out.reshape(n, heads * hd) @ np.asarray(p["proj"]["kernel"]) + np.asarray(p["proj"]["bias"])
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
