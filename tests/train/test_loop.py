"""train/loop.py, the one training loop: exact resume, accumulation inside the step, the
non-finite guard, the device feed's checkpointed batch."""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

from mae_jax import errors
from mae_jax.io import checkpointing
from mae_jax.train import pretrain

from conftest import run_losses, tiny_config


def test_resume_gives_the_same_losses_step_for_step(cifar_folder, tmp_path):
  # Each step accumulates 2 micro-batches of 32 (the loop, the feed and the checkpoints with K > 1).
  make = lambda steps: tiny_config(cifar_folder, max_steps=steps, log_every_steps=1,
                                   checkpoint_every_steps=4, figure_every_steps=1000,
                                   grad_accum_steps=2)
  full = pretrain.run(make(12), str(tmp_path / "full"))
  pretrain.run(make(6), str(tmp_path / "split"))  # stops at 6: a checkpoint is saved at the end
  assert checkpointing.Checkpointer(str(tmp_path / "split"), 4, 3).latest_step() == 6
  resumed = pretrain.run(make(12), str(tmp_path / "split"))
  a, b = run_losses(tmp_path / "full"), run_losses(tmp_path / "split")
  assert sorted(a) == sorted(b) == list(range(1, 13))
  assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]  # bit-identical
  for x, y in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("per_device", [True, False])
def test_accumulation_inside_the_step_is_one_update_on_the_mean_gradient(per_device):
  """K micro-batches in one step: the parameters equal one update on the mean of the K
  micro-batches' gradients, computed here by hand, each micro-batch masked with the noise of
  fold_in(rng, k) (the key a run without accumulation would give it). Plain SGD, whose update is
  linear in the gradient: AdamW's first update is lr * sign(g) wherever |g| >> eps, and would hide
  a wrong gradient."""
  from mae_jax.data import pipeline
  from mae_jax.models import masking
  from mae_jax.models.mae import mae_from_config
  from mae_jax.runtime.parallel import Mesh
  c = tiny_config("unused")
  k, m = 4, 8
  model = mae_from_config(c.model, 32)
  tx = optax.sgd(0.5)
  state = pretrain.create_train_state(model, tx, 0)
  images = np.random.default_rng(0).integers(0, 256, (k, m, 32, 32, 3), dtype=np.uint8)
  spec = pretrain.StepSpec(model, tx, micro_batches=k, mesh=Mesh() if per_device else None,
                           per_device_accumulation=per_device)
  step = jax.jit(functools.partial(pretrain.pretrain_step, spec=spec))
  new, metrics = step(state, {"image": images})

  @jax.jit
  def loss_and_grads(params, micro_images, i):
    def loss(params):
      noise = masking.random_noise(jax.random.fold_in(state.rng, i), m, model.num_patches)
      return model.apply({"params": params}, pipeline.normalize(micro_images, (0.5,) * 3, (0.5,) * 3),
                         noise)[0]
    return jax.value_and_grad(loss)(params)
  losses, grads = zip(*[loss_and_grads(state.params, images[i], i) for i in range(k)])
  mean_grads = jax.tree.map(lambda *g: sum(g) / k, *grads)
  updates, _ = tx.update(mean_grads, state.opt_state, state.params)
  expected = optax.apply_updates(state.params, updates)
  assert int(new.step) == 1
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(mean_grads)), rtol=1e-5)
  for path, x in jax.tree_util.tree_leaves_with_path(new.params):
    y = functools.reduce(lambda t, p: t[p.key], path, expected)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
  # The micro-batches did not all give the same gradient (else the mean would prove nothing).
  assert not np.allclose(grads[0]["decoder"]["pred"]["kernel"], grads[1]["decoder"]["pred"]["kernel"])


def _exploding(cifar_folder, **overrides):
  """The tiny preset with a learning rate that overflows float32 by the third step (the warmup's
  first step has lr 0, its second lr ~1e33)."""
  c = tiny_config(cifar_folder, log_every_steps=1, checkpoint_every_steps=2, figure_every_steps=1000,
                  **overrides)
  c.optimizer.base_lr, c.warmup_epochs = 1e36, 1
  return c


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(cifar_folder, tmp_path):
  with pytest.raises(errors.NonFiniteError) as e:
    pretrain.run(_exploding(cifar_folder, max_steps=12), str(tmp_path))
  bad = int(str(e.value).split(":")[0].removeprefix("step "))
  ckpt = checkpointing.Checkpointer(str(tmp_path), 2, 3)
  newest = ckpt.latest_step()
  ckpt.close()
  assert 2 <= newest < bad <= 12, str(e.value)
  assert f"the last good checkpoint is step {newest}" in str(e.value)
  params, _, _ = checkpointing.restore_params(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_skip_nonfinite_skips_and_counts_the_updates(cifar_folder, tmp_path):
  state = pretrain.run(_exploding(cifar_folder, max_steps=6, skip_nonfinite=True), str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert int(state.step) == 6
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows[-1]["step"] == 6 and rows[-1]["skipped_nonfinite"] >= 1


def test_profile_steps_write_a_trace_of_the_chosen_steps(cifar_folder, tmp_path):
  c = tiny_config(cifar_folder, max_steps=4, log_every_steps=1, figure_every_steps=1000,
                  profile_start_step=2, profile_num_steps=2)
  pretrain.run(c, str(tmp_path))
  traces = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "profile") for f in fs]
  assert any(t.endswith(".xplane.pb") for t in traces), traces
  import gzip
  events = json.load(gzip.open(next(t for t in traces if t.endswith(".trace.json.gz"))))["traceEvents"]
  steps = {e.get("args", {}).get("step_num") for e in events if e.get("name") == "train"}
  assert steps == {"2", "3"}, steps  # the chosen steps, annotated with their numbers
