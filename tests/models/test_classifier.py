"""Probe and fine-tune heads, lr decay groups, freezing, mixing, drop path, augmentations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.data import augment
from mae_jax.models import classifier, layers, mae
from mae_jax.train import classify, optim

from conftest import tiny_config


def _classifier(**kw):
  args = dict(num_classes=10, image_size=(16, 16), patch_size=4, width=32, depth=3, num_heads=2)
  return classifier.Classifier(**{**args, **kw})


def _init(m):
  return m.init(jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)))


def test_probe_head_is_batchnorm_without_affine_then_linear():
  m = _classifier(probe=True, global_pool=False, learned_pos_embed=False)
  v = _init(m)
  assert set(v) == {"params", "batch_stats"}
  assert "head_norm" not in v["params"]  # no scale, no bias
  assert set(v["batch_stats"]["head_norm"]) == {"mean", "var"}
  assert "norm" in v["params"]["encoder"] and "fc_norm" not in v["params"]
  assert float(jnp.std(v["params"]["head"]["kernel"])) == pytest.approx(0.01, rel=0.2)
  # Logits = linear(BN(cls features)) with the running statistics at eval.
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  feats = m.apply(v, x, method=classifier.Classifier.features)
  bn = v["batch_stats"]["head_norm"]
  want = (feats - bn["mean"]) / jnp.sqrt(bn["var"] + 1e-6) @ v["params"]["head"]["kernel"]
  np.testing.assert_allclose(m.apply(v, x), want + v["params"]["head"]["bias"], rtol=1e-5, atol=1e-6)


def test_finetune_head_pools_patch_tokens_into_fc_norm():
  m = _classifier(global_pool=True)
  v = _init(m)
  assert "fc_norm" in v["params"] and "norm" not in v["params"]["encoder"]
  assert "pos_embed" in v["params"]["encoder"]  # learned, starting from sin-cos; its cls row zeros
  np.testing.assert_allclose(v["params"]["encoder"]["pos_embed"][0],
                             mae.sincos_2d(32, (4, 4), cls_token=True), atol=1e-7)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  tokens, _, _ = m.apply(v, x, method=lambda mod, x: mod.encoder(x))
  pooled = tokens[:, 1:].mean(1)
  mu, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
  fc = (pooled - mu) / jnp.sqrt(var + 1e-6) * v["params"]["fc_norm"]["scale"] + v["params"]["fc_norm"]["bias"]
  np.testing.assert_allclose(m.apply(v, x, method=classifier.Classifier.features), fc, rtol=1e-5, atol=1e-5)


def test_layer_decay_groups_by_hand():
  params = _init(_classifier())["params"]
  scales = classifier.layer_decay_scales(params, depth=3, decay=0.5)
  # num_layers = depth + 1 = 4: embeddings 0.5^4, block i 0.5^(3 - i), after the blocks 1.
  assert scales["encoder"]["patch_embed"]["kernel"] == 0.5**4
  assert scales["encoder"]["cls_token"] == 0.5**4 and scales["encoder"]["pos_embed"] == 0.5**4
  assert scales["encoder"]["block0"]["attn"]["qkv"]["kernel"] == 0.5**3
  assert scales["encoder"]["block2"]["fc2"]["bias"] == 0.5**1
  assert scales["fc_norm"]["scale"] == 1.0 and scales["head"]["kernel"] == 1.0


def test_trainable_labels_for_probe_and_partial_finetuning():
  params = _init(_classifier())["params"]
  labels = classifier.trainable_labels(params, depth=3, trainable_blocks=1)
  assert labels["encoder"]["block2"]["fc1"]["kernel"] == "train"
  assert labels["encoder"]["block1"]["fc1"]["kernel"] == "freeze"
  assert labels["encoder"]["patch_embed"]["kernel"] == "freeze"
  assert labels["fc_norm"]["scale"] == "train" and labels["head"]["kernel"] == "train"
  probe = classifier.trainable_labels(params, 3, -1, probe=True)
  assert {l for path, l in jax.tree_util.tree_leaves_with_path(probe) if path[0].key != "head"} == {"freeze"}


def test_frozen_parameters_do_not_move_and_decay_scales_updates():
  c = tiny_config("unused")
  c.finetune.update(trainable_blocks=1, layer_decay=0.5, weight_decay=0.0)
  m = _classifier(depth=2)
  params = _init(m)["params"]
  tx = optim.classification_optimizer(c.finetune, 1e-2, params, depth=2, probe=False)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["encoder"]["block0"]["fc1"]["kernel"]).max()) == 0.0
  # Adam's first step is lr * sign(g) (bias-corrected): scaled by 0.5^(3 - 2) for block1.
  np.testing.assert_allclose(updates["encoder"]["block1"]["fc1"]["kernel"], -1e-2 * 0.5, rtol=1e-4)
  np.testing.assert_allclose(updates["head"]["kernel"], -1e-2, rtol=1e-4)


def test_label_smoothing_and_mixup_targets_by_hand():
  t = augment.one_hot(jnp.array([0, 2]), 4, smoothing=0.1)
  np.testing.assert_allclose(t, [[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
  images = jnp.stack([jnp.zeros((8, 8, 3)), jnp.ones((8, 8, 3))])
  targets = augment.one_hot(jnp.array([0, 1]), 2)
  for seed in range(4):
    mixed, y = augment.mixup_cutmix(jax.random.PRNGKey(seed), images, targets, 0.8, 1.0)
    # The batch is mixed with its reverse: image 0 holds (1 - lam) of image 1, and its target
    # gives class 1 the same share, whether by mixup (blend) or cutmix (pasted box area).
    share = float(mixed[0].mean())
    np.testing.assert_allclose(y[0], [1 - share, share], atol=1e-6)
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(mixed[1], 1.0 - mixed[0], atol=1e-6)


def test_cutmix_pastes_a_box_and_mixup_blends():
  images = jnp.stack([jnp.zeros((16, 16, 1)), jnp.ones((16, 16, 1))])
  targets = augment.one_hot(jnp.array([0, 1]), 2)
  cut, _ = augment.mixup_cutmix(jax.random.PRNGKey(0), images, targets, 0.0, 1.0)
  assert set(np.unique(np.asarray(cut))) <= {0.0, 1.0}  # only whole pixels move
  mix, y = augment.mixup_cutmix(jax.random.PRNGKey(0), images, targets, 0.8, 0.0)
  assert np.unique(np.asarray(mix[0])).size == 1  # a uniform blend
  assert 0 < float(y[0, 1]) < 1


def test_drop_path_by_hand():
  dp = layers.DropPath(0.5)
  x = jnp.ones((1000, 3, 2))
  np.testing.assert_array_equal(dp.apply({}, x, deterministic=True), x)
  y = dp.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})
  per_example = np.asarray(y[:, 0, 0])
  assert set(np.unique(per_example)) == {0.0, 2.0}  # whole examples dropped, the rest scaled 1/keep
  np.testing.assert_array_equal(np.asarray(y), per_example[:, None, None] * np.ones((1, 3, 2)))
  assert 0.4 < (per_example == 0).mean() < 0.6


def test_random_erasing_boxes():
  x = jnp.zeros((256, 32, 32, 3))
  y = np.asarray(augment.random_erasing(jax.random.PRNGKey(0), x, prob=1.0))
  erased = (y != 0).any(-1)
  frac = erased.mean(axis=(1, 2))
  hit = frac > 0
  assert 0.6 < hit.mean() <= 1.0  # boxes that do not fit are skipped, as one timm attempt
  assert (frac[hit] >= 0.015).all() and (frac[hit] <= 0.36).all()
  for i in np.flatnonzero(hit)[:20]:  # each erased region is one solid rectangle
    rows, cols = np.flatnonzero(erased[i].any(1)), np.flatnonzero(erased[i].any(0))
    assert erased[i][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  assert (np.asarray(augment.random_erasing(jax.random.PRNGKey(0), x, prob=0.0)) == 0).all()


def test_rand_augment_is_seeded_and_keeps_shape():
  img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  a = augment.rand_augment(img, np.random.default_rng(5))
  b = augment.rand_augment(img, np.random.default_rng(5))
  assert a.shape == img.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  for name, op in augment.RAND_OPS.items():  # every op runs at every level
    for m in (0.0, 5.0, 10.0):
      out = np.asarray(op(__import__("PIL.Image").Image.fromarray(img), m, np.random.default_rng(0)))
      assert out.shape == img.shape, name


def test_pos_embed_interpolation_and_pretrained_merge():
  pos = mae.sincos_2d(32, (4, 4), cls_token=True)[None]
  pos[0, 0] = 0.5  # a learned cls row is carried over as it is
  np.testing.assert_array_equal(classifier.interpolate_pos_embed(pos, (4, 4), (4, 4)), pos)
  bigger = classifier.interpolate_pos_embed(pos, (4, 4), (8, 8))
  assert bigger.shape == (1, 65, 32)
  np.testing.assert_array_equal(bigger[0, 0], pos[0, 0])
  pos[0, 0] = 0.0  # as pretraining leaves it
  pretrain = mae.MAE(image_size=(16, 16), patch_size=4, encoder_width=32, encoder_depth=3,
                     encoder_heads=2, decoder_width=16, decoder_depth=1, decoder_heads=2)
  pre = pretrain.init(jax.random.PRNGKey(3), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16)))["params"]
  target = _classifier(image_size=(32, 32))  # a larger image: an 8 x 8 grid
  params = target.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  merged = classifier.merge_pretrained(params, pre["encoder"], (4, 4), (8, 8))
  np.testing.assert_array_equal(merged["encoder"]["block1"]["fc1"]["kernel"],
                                pre["encoder"]["block1"]["fc1"]["kernel"])
  np.testing.assert_array_equal(merged["head"]["kernel"], params["head"]["kernel"])
  assert "norm" not in merged["encoder"]  # the global-pool head uses fc_norm instead
  np.testing.assert_allclose(merged["encoder"]["pos_embed"],
                             classifier.interpolate_pos_embed(pos, (4, 4), (8, 8)), atol=1e-6)


def test_probe_step_accumulates_micro_batches_and_passes_batchnorm_statistics_on():
  """Two micro-batches in one probe step: the mean of their gradients in one update, and the
  BatchNorm running statistics updated by the first micro-batch, then the second."""
  import functools

  import optax
  m = _classifier(probe=True, global_pool=False, learned_pos_embed=False)
  v = _init(m)
  tx = optax.sgd(0.5)
  state = classify.create_train_state(tx, 0, v)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (2, 4, 16, 16, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, (2, 4)).astype(np.int32)}
  step = functools.partial(classify.classify_step, model=m, tx=tx, mean=(0.5,) * 3, std=(0.5,) * 3,
                           num_classes=10, micro_batches=2)
  new, metrics = jax.jit(step)(state, batch)

  stats, grads, losses = v["batch_stats"], [], []
  for k in range(2):
    images = (batch["image"][k] / 255.0 - 0.5) / 0.5

    def loss(params, stats=stats, k=k, images=images):
      logits, upd = m.apply({"params": params, "batch_stats": stats}, images, train=True,
                            mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"][k]).mean(), upd
    (value, upd), g = jax.value_and_grad(loss, has_aux=True)(state.params)
    stats = upd["batch_stats"]
    grads.append(g)
    losses.append(value)
  mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, mean_grads)
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(new.params), jax.tree.leaves(expected)):  # jit vs eager: 1e-6
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
  for x, y in zip(jax.tree.leaves(new.model_state["batch_stats"]), jax.tree.leaves(stats)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
  # Either micro-batch's gradient alone would miss by far more than the tolerance.
  for g in grads:
    assert np.abs(0.5 * (g["head"]["kernel"] - mean_grads["head"]["kernel"])).max() > 1e-3
