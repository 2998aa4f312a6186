"""models/layer_stack.py: rematerialised and scanned blocks compute what the plain unrolled ones do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import layer_stack, mae

from configs import cifar10_vit_t


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
