"""The model against hand computations and the official implementation's conventions."""

import math

import jax
from jax.ad_checkpoint import print_saved_residuals
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import config_lib
from mae_jax.models import layer_stack
from mae_jax.models import layers
from mae_jax.models import attention_backends
from mae_jax.models import mae
from configs import cifar10_vit_t


def test_patchify_order_and_round_trip():
  imgs = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  patches = mae.patchify(imgs, 4)
  assert patches.shape == (2, 6, 48)  # (8/4) * (12/4) patches of 4*4*3
  # Patch 1 is row 0, column 1 of the grid; flattened in (p, p, C) order.
  np.testing.assert_array_equal(patches[0, 1], imgs[0, 0:4, 4:8, :].reshape(-1))
  np.testing.assert_array_equal(patches[1, 3], imgs[1, 4:8, 0:4, :].reshape(-1))
  np.testing.assert_array_equal(mae.unpatchify(patches, 4, (2, 3)), imgs)


def test_sincos_2d_against_hand_computation():
  d, grid = 8, (2, 3)
  emb = mae.sincos_2d(d, grid, cls_token=True)
  assert emb.shape == (1 + 6, d) and emb.dtype == np.float32
  np.testing.assert_array_equal(emb[0], 0.0)  # cls position
  for idx in range(6):
    row, col = divmod(idx, 3)
    # Each half has d/2 = 4 channels: [sin(x w0), sin(x w1), cos(x w0), cos(x w1)], w_k = 1/10000^(k/2).
    want = []
    for x in (col, row):  # first half encodes the column, second the row (official meshgrid order)
      w = [1.0, 1.0 / 10000 ** 0.5]
      want += [math.sin(x * w[0]), math.sin(x * w[1]), math.cos(x * w[0]), math.cos(x * w[1])]
    np.testing.assert_allclose(emb[1 + idx], want, rtol=1e-6, atol=1e-7)


def test_sincos_needs_width_divisible_by_4():
  with pytest.raises(ValueError, match="divisible by 4"):
    mae.sincos_2d(6, (2, 2))


def test_random_masking_keeps_len_keep_and_restores_order():
  b, length, d, ratio = 3, 16, 5, 0.75
  x = jax.random.normal(jax.random.PRNGKey(0), (b, length, d))
  noise = jax.random.uniform(jax.random.PRNGKey(1), (b, length))
  kept, mask, ids_restore = mae.random_masking(x, noise, ratio)
  len_keep = int(length * (1 - ratio))
  assert kept.shape == (b, len_keep, d)
  np.testing.assert_array_equal(mask.sum(1), length - len_keep)
  for i in range(b):
    keep_idx = np.argsort(np.asarray(noise[i]))[:len_keep]  # the smallest noise is kept
    np.testing.assert_array_equal(kept[i], x[i, keep_idx])
    np.testing.assert_array_equal(np.flatnonzero(mask[i] == 0), np.sort(keep_idx))
    # ids_restore inverts the shuffle: shuffled[ids_restore] is the original order.
    shuffled = np.argsort(np.asarray(noise[i]))
    np.testing.assert_array_equal(shuffled[np.asarray(ids_restore[i])], np.arange(length))
  # The same noise gives the same mask; other noise another one.
  _, mask2, _ = mae.random_masking(x, noise, ratio)
  np.testing.assert_array_equal(mask, mask2)
  _, mask3, _ = mae.random_masking(x, jax.random.uniform(jax.random.PRNGKey(2), (b, length)), ratio)
  assert not np.array_equal(mask, mask3)


def test_random_masking_with_tied_noise_matches_two_stable_argsorts():
  """Ties (block masks and grid masks make them) are broken by patch index, as torch.argsort's
  and numpy's stable sorts do."""
  b, length, d = 4, 49, 3
  x = jax.random.normal(jax.random.PRNGKey(0), (b, length, d))
  noise = jax.random.randint(jax.random.PRNGKey(1), (b, length), 0, 4).astype(jnp.float32) / 4
  kept, mask, ids_restore = mae.random_masking(x, noise, 0.6)
  for i in range(b):
    shuffle = np.argsort(np.asarray(noise[i]), kind="stable")
    np.testing.assert_array_equal(ids_restore[i], np.argsort(shuffle, kind="stable"))
    np.testing.assert_array_equal(kept[i], x[i, shuffle[:19]])  # int(49 * 0.4) = 19 kept
    np.testing.assert_array_equal(mask[i], np.isin(np.arange(length), shuffle[19:]).astype(np.float32))


def test_loss_counts_masked_patches_only():
  target = jnp.zeros((1, 4, 2))
  pred = jnp.array([[[1.0, 1.0], [2.0, 0.0], [3.0, 3.0], [0.0, 4.0]]])
  mask = jnp.array([[0.0, 1.0, 0.0, 1.0]])
  # Masked patches 1 and 3: per-patch MSE (4 + 0) / 2 = 2 and (0 + 16) / 2 = 8 -> mean 5.
  assert float(mae.mae_loss(target, pred, mask, norm_pix_loss=False)) == pytest.approx(5.0)
  changed_visible = pred.at[0, 0].set(100.0).at[0, 2].set(-7.0)
  assert float(mae.mae_loss(target, changed_visible, mask, False)) == pytest.approx(5.0)


def test_norm_pix_loss_uses_unbiased_variance():
  t = jnp.array([[[1.0, 2.0, 3.0, 6.0]]])
  mean, var_unbiased = 3.0, ((4 + 1 + 0 + 9) / 3)  # ddof=1: divide by n - 1 = 3
  want = (np.array([1.0, 2.0, 3.0, 6.0]) - mean) / np.sqrt(var_unbiased + 1e-6)
  np.testing.assert_allclose(mae.normalize_patches(t)[0, 0], want, rtol=1e-6)
  np.testing.assert_allclose(mae.unnormalize_patches(mae.normalize_patches(t), t), t, rtol=1e-5)
  loss = mae.mae_loss(t, jnp.zeros_like(t), jnp.ones((1, 1)), norm_pix_loss=True)
  assert float(loss) == pytest.approx(float(np.mean(want**2)), rel=1e-6)


def _vit_t2():
  c = cifar10_vit_t.get_config()
  return mae.mae_from_config(c.model, c.dataset.image_size)


def _block_params(d):
  return 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)


def test_parameter_count_of_vit_t2_mae():
  m = _vit_t2()
  params = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                          jnp.zeros((1, 256)))["params"]
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  d, dd, patch_dim = 192, 192, 2 * 2 * 3
  encoder = (patch_dim * d + d) + d + 12 * _block_params(d) + 2 * d  # embed, cls, blocks, norm
  decoder = (d * dd + dd) + dd + 4 * _block_params(dd) + 2 * dd + (dd * patch_dim + patch_dim)
  assert count(params["encoder"]) == encoder == 5_341_440  # 12 x 444,864 + 2,496 + 192 + 384
  assert count(params["decoder"]) == decoder
  assert count(params) == encoder + decoder


def test_init_follows_official_scheme():
  m = _vit_t2()
  params = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 256)))["params"]
  qkv = params["encoder"]["block0"]["attn"]["qkv"]
  bound = math.sqrt(6 / (192 + 3 * 192))  # xavier-uniform over the whole fused (192, 576) weight
  assert float(jnp.abs(qkv["kernel"]).max()) <= bound
  assert float(jnp.abs(qkv["kernel"]).max()) > 0.95 * bound
  np.testing.assert_array_equal(qkv["bias"], 0.0)
  ln = params["encoder"]["block0"]["norm1"]
  np.testing.assert_array_equal(ln["scale"], 1.0)
  np.testing.assert_array_equal(ln["bias"], 0.0)
  assert float(jnp.std(params["decoder"]["mask_token"])) == pytest.approx(0.02, rel=0.25)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  # The patch projection's bias keeps PyTorch's Conv2d default, uniform(+-1/sqrt(C p p)) = +-1/sqrt(12)
  # for 2x2 RGB patches: its 192 values lie within the bound, spread over it (std bound / sqrt(3)).
  b = np.asarray(params["encoder"]["patch_embed"]["bias"])
  bound = 1 / math.sqrt(3 * 2 * 2)
  assert b.shape == (192,) and np.abs(b).max() <= bound and np.abs(b).max() > 0.9 * bound
  assert b.std() == pytest.approx(bound / math.sqrt(3), rel=0.15) and abs(b.mean()) < 0.1 * bound


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


def test_mae_forward_shapes_and_bfloat16_policy():
  m = mae.MAE(image_size=(16, 16), patch_size=4, encoder_width=32, encoder_depth=1,
              encoder_heads=2, decoder_width=16, decoder_depth=1, decoder_heads=2,
              dtype=jnp.bfloat16, norm_pix_loss=True)
  imgs = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  noise = jax.random.uniform(jax.random.PRNGKey(1), (2, 16))
  params = m.init(jax.random.PRNGKey(2), imgs, noise)["params"]
  loss, pred, mask = m.apply({"params": params}, imgs, noise)
  assert pred.shape == (2, 16, 48) and mask.shape == (2, 16)
  assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  latent, _, _ = m.apply({"params": params}, imgs, noise, 0.75, method=lambda mod, *a: mod.encoder(*a))
  assert latent.shape == (2, 1 + 4, 32) and latent.dtype == jnp.bfloat16


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_rematerialised_blocks_give_the_same_loss_and_gradients(remat):
  c = cifar10_vit_t.get_config("tiny")
  plain = mae.mae_from_config(c.model, 32)
  c.model.remat = remat
  rematted = mae.mae_from_config(c.model, 32)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  noise = jax.random.uniform(jax.random.PRNGKey(1), (4, plain.num_patches))
  params = plain.init(jax.random.PRNGKey(2), images, noise)["params"]
  # The same parameter tree: a checkpoint of one loads into the other.
  assert (jax.tree.structure(rematted.init(jax.random.PRNGKey(2), images, noise)["params"])
          == jax.tree.structure(params))
  grad = lambda m: jax.jit(jax.value_and_grad(lambda p: m.apply({"params": p}, images, noise)[0]))(params)
  (loss_a, grads_a), (loss_b, grads_b) = grad(plain), grad(rematted)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  # The backward pass really recomputes: the remat'd program holds the forward matmuls twice.
  hlo = lambda m: jax.jit(jax.grad(lambda p: m.apply({"params": p}, images, noise)[0])).lower(
      params).as_text()
  if remat == "block":
    assert hlo(rematted).count("dot_general") > hlo(plain).count("dot_general")


def test_fine_tuning_with_drop_path_is_the_same_under_remat():
  from mae_jax.models import classifier
  c = cifar10_vit_t.get_config("tiny")
  make = lambda: classifier.classifier_from_config(c, 10, probe=False, drop_path=0.3)
  plain = make()
  c.model.remat = "block"
  rematted = make()
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  params = plain.init(jax.random.PRNGKey(1), images)["params"]
  rngs = {"dropout": jax.random.PRNGKey(3)}
  grad = lambda m: jax.grad(lambda p: m.apply({"params": p}, images, train=True, rngs=rngs).sum())(params)
  for a, b in zip(jax.tree.leaves(grad(plain)), jax.tree.leaves(grad(rematted))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["none", "block"])
def test_scanned_layers_match_the_unrolled_ones(remat):
  c = cifar10_vit_t.get_config("tiny")
  c.model.remat = remat
  unrolled = mae.mae_from_config(c.model, 32)
  scanned = mae.mae_from_config(c.model, 32, scan_layers=True)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  noise = jax.random.uniform(jax.random.PRNGKey(1), (4, unrolled.num_patches))
  params = unrolled.init(jax.random.PRNGKey(2), images, noise)["params"]
  stacked = layer_stack.stack_layers(params)
  shapes = jax.tree.map(np.shape, scanned.init(jax.random.PRNGKey(2), images, noise)["params"])
  assert jax.tree.map(np.shape, stacked) == shapes
  assert shapes["encoder"]["blocks"]["fc1"]["kernel"] == (2, 64, 256)
  assert shapes["decoder"]["blocks"]["attn"]["qkv"]["bias"] == (1, 96)
  assert layer_stack.is_scanned(stacked) and not layer_stack.is_scanned(params)
  loss = lambda m, p: m.apply({"params": p}, images, noise)[0]
  loss_u, grads_u = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params)
  loss_s, grads_s = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(layer_stack.stack_layers(grads_u)), jax.tree.leaves(grads_s)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  # The layout conversions are exact inverses.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(layer_stack.unstack_layers(stacked))):
    np.testing.assert_array_equal(a, b)


def test_scanned_biases_and_norms_are_not_decayed():
  from mae_jax.train import optim
  c = cifar10_vit_t.get_config("tiny")
  images, noise = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 64))
  params = mae.mae_from_config(c.model, 32).init(jax.random.PRNGKey(0), images, noise)["params"]
  unrolled_mask = optim.pretrain_decay_mask(params)
  scanned_mask = optim.pretrain_decay_mask(layer_stack.stack_layers(params))
  assert scanned_mask["encoder"]["blocks"]["fc1"] == {"bias": False, "kernel": True}
  for part in ("encoder", "decoder"):  # every layer's mask is the unrolled block's
    assert scanned_mask[part]["blocks"] == unrolled_mask[part]["block0"]
    rest = lambda m: {k: v for k, v in m.items() if not k.startswith("block")}
    assert rest(scanned_mask[part]) == rest(unrolled_mask[part])


def test_attention_backend_is_cudnn_only_where_the_fused_kernel_applies(caplog):
  import types
  bf16 = jnp.bfloat16
  gpu = lambda cc: types.SimpleNamespace(platform="gpu", compute_capability=cc)
  tpu = types.SimpleNamespace(platform="tpu")
  assert attention_backends.attention_backend("", bf16, (64, 32)) == "xla"                # this CPU
  assert attention_backends.attention_backend("", bf16, (64, 32), gpu("9.0")) == "cudnn"  # ViT-B/L encoder, decoder
  assert attention_backends.attention_backend("", bf16, (80, 32), gpu("9.0")) == "cudnn"  # ViT-H/14
  assert attention_backends.attention_backend("", jnp.float32, (64, 32), gpu("9.0")) == "xla"  # float32: XLA
  assert attention_backends.attention_backend("", bf16, (64, 20), gpu("9.0")) == "xla"    # a head dim cuDNN does not take
  assert attention_backends.attention_backend("xla", bf16, (64, 32), gpu("9.0")) == "xla"
  assert attention_backends.attention_backend("", bf16, (64, 32), gpu("7.0")) == "xla"    # before Ampere
  # JAX's cuDNN attention does not train on odd lengths: ViT-B/16's decoder sees 197 tokens.
  vit_b = config_lib.imagenet_config("b").model
  assert attention_backends.sequence_lengths(vit_b, 224) == (50, 197)
  assert attention_backends.sequence_lengths(vit_b, 224, decoder=False) == (197,)
  assert attention_backends.attention_backend("", bf16, (64, 32), gpu("9.0"), (50, 197)) == "xla"
  assert attention_backends.attention_backend("", bf16, (64, 32), gpu("9.0"), (50, 196)) == "cudnn"
  with attention_backends.building_for(gpu("9.0")):  # mae_jax.compile for a GPU that is not here
    assert attention_backends.attention_backend("", bf16, (64, 32)) == "cudnn"
  assert attention_backends.attention_backend("", bf16, (64, 32)) == "xla"
  # Asked for where it cannot run: XLA's attention, and the reason logged (not a failure at compile).
  for device, reason in ((tpu, "NVIDIA GPUs only"), (gpu("9.0"), "bfloat16 or float16")):
    with caplog.at_level("WARNING"):
      dtype = jnp.float32 if device.platform == "gpu" else bf16
      assert attention_backends.attention_backend("cudnn", dtype, (64,), device) == "xla"
    assert reason in caplog.text
