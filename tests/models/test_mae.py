"""The MAE of models/mae.py against the official models_mae.py: patch order, position embeddings,
masking by noise ranks, the masked (and per-patch normalised) loss, parameter count and
initialisation, shapes and the dtype policy, the mask-token ablation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
