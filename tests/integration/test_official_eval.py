"""mae_jax's linear probe and fine-tuning against the official main_linprobe.py / main_finetune.py
(the references in benchmarks/official_eval.py): many steps of both jobs from the same weights
and batches, the optimizers and parameter groups, and the augmentations as timm draws them."""

import pathlib
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
torch = pytest.importorskip("torch")
from mae_jax.data import augment, transforms
from mae_jax.io import convert
from mae_jax.models import classifier
from mae_jax.train import optim

from benchmarks import eval_vs_official, official_eval

SHAPE = "small"


@pytest.mark.parametrize("job,base_lr", [("probe", 40.0), ("finetune", 1e-2)])
def test_thirty_steps_match_the_official_job_from_the_same_weights_and_batches(cifar_folder, job, base_lr):
  """Warmup (10 steps) and cosine (20) on real images: each step's loss within float32 rounding,
  and afterwards the evaluation logits (the probe's BatchNorm running statistics, the learned
  position embedding with its cls row, fc_norm) together while they moved by far more. Probe:
  LARS with its exclusions, cls token, BatchNorm without affine; fine-tuning: layer decay 0.75,
  weight decay with its exemptions, label smoothing 0.1, global pool + fc_norm, min_lr."""
  r = eval_vs_official.job_recipe(job, SHAPE, epochs=3, batch=32, warmup_epochs=1, workers=0, base_lr=base_lr)
  if job == "finetune":
    r.update(drop_path=0.0, mixup=0.0, cutmix=0.0, random_erasing=0.0)
  theirs, ours, logits_diff, moved = eval_vs_official.run_parity(job, cifar_folder, r, steps=30, steps_per_epoch=10)
  assert len(ours) == 30
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)
  assert logits_diff < 1e-4 and moved > 0.5, (logits_diff, moved)
  if job == "finetune":
    assert theirs[-10:].mean() < theirs[0] - 0.05  # it learned


def test_lars_orders_momentum_and_lr_as_the_official_optimizer():
  """optim.lars against util/lars.py over 12 steps of a changing lr (a matrix with decay and trust
  ratio, a bias without): equal; optax.lars, which puts the lr inside the momentum, is not."""
  rng = np.random.default_rng(0)
  w0, b0 = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)
  grads = [(rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32))
           for _ in range(12)]
  lrs = [0.5 * (i + 1) / 4 if i < 4 else 0.5 * (1 + np.cos(np.pi * (i - 4) / 8)) / 2 for i in range(12)]
  tw, tb = torch.tensor(w0, requires_grad=True), torch.tensor(b0, requires_grad=True)
  ref = official_eval.LARS([tw, tb], weight_decay=0.05)
  for (gw, gb), lr in zip(grads, lrs):
    tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
    for group in ref.param_groups:
      group["lr"] = lr
    ref.step()

  def run(tx):
    params = {"kernel": jnp.asarray(w0), "bias": jnp.asarray(b0)}
    state = tx.init(params)
    for gw, gb in grads:
      updates, state = tx.update({"kernel": jnp.asarray(gw), "bias": jnp.asarray(gb)}, state, params)
      params = optax.apply_updates(params, updates)
    return params

  schedule = lambda count: jnp.asarray(lrs)[count]
  ours = run(optim.lars(schedule, weight_decay=0.05))
  np.testing.assert_allclose(ours["kernel"], tw.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours["bias"], tb.detach().numpy(), rtol=1e-5, atol=1e-6)
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  theirs_optax = run(optax.lars(schedule, weight_decay=0.05, weight_decay_mask=mask, trust_ratio_mask=mask))
  assert np.abs(theirs_optax["bias"] - tb.detach().numpy()).max() > 1e-2


def test_layer_decay_scales_and_decay_exemptions_equal_param_groups_lrd():
  """Each parameter's lr scale and weight decay from the official param_groups_lrd on the
  official ViT (fine-tuning, global pool), carried to mae_jax's names by the checkpoint
  converter, against classifier.layer_decay_scales and optim.finetune_decay_mask."""
  depth, decay = 3, 0.75
  model = official_eval.official_vit(32, 4, 32, depth, 2, 10, global_pool=True)
  groups = official_eval.param_groups_lrd(model, 0.05, decay)
  scale_sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  decay_sd = dict(scale_sd)
  for g in groups:
    for name, p in zip(g["names"], g["params"]):
      scale_sd[name] = np.full(p.shape, g["lr_scale"], np.float32)
      decay_sd[name] = np.full(p.shape, g["weight_decay"], np.float32)
  want_scale, want_decay = convert.official_to_params(scale_sd), convert.official_to_params(decay_sd)
  got_scale = classifier.layer_decay_scales(want_scale, depth, decay)
  got_decay = optim.finetune_decay_mask(want_decay)
  flat = lambda t: dict(jax.tree_util.tree_flatten_with_path(t)[0])
  ws, wd, gs, gd = flat(want_scale), flat(want_decay), flat(got_scale), flat(got_decay)
  assert ws.keys() == gs.keys() and len(ws) > 20
  for path in ws:
    np.testing.assert_allclose(np.unique(ws[path]), [gs[path]], rtol=1e-6, err_msg=str(path))
    assert (np.unique(wd[path])[0] > 0) == bool(gd[path]), path


# ----------------------------------------------------------------------------
# Augmentations as timm draws them.
# ----------------------------------------------------------------------------
def _astronaut(size=64):
  from PIL import Image
  from skimage import data as skdata
  return np.asarray(Image.fromarray(skdata.astronaut()).resize((size, size), Image.BICUBIC))


@pytest.mark.parametrize("magnitude", [0.0, 4.5, 9.0, 10.0])
def test_every_rand_augment_op_equals_timms(magnitude, monkeypatch):
  """Each of the 15 ops of 'rand-m9-mstd0.5-inc1' at a fixed magnitude and both signs, against
  timm's op with the official hparams (bicubic resampling, ImageNet-mean fill): the same pixels.
  (Posterize at magnitude 10 keeps no bit: black, as the reference's Pillow-proof posterize.)"""
  from PIL import Image
  aa = official_eval.timm_data.auto_augment
  hparams = {"img_mean": augment._FILL, "interpolation": Image.BICUBIC}
  img = _astronaut()

  class FixedRng:
    def __init__(self, draw):
      self.draw = draw

    def random(self):
      return self.draw

  for name in augment.RAND_OPS:
    for negate in (False, True):  # mae_jax negates where rng.random() < 0.5
      ours = np.asarray(augment.RAND_OPS[name](Image.fromarray(img), magnitude, FixedRng(0.1 if negate else 0.9)))
      monkeypatch.setattr(aa, "_randomly_negate", lambda v, n=negate: -v if n else v)
      theirs = np.asarray(aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(Image.fromarray(img)))
      np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} m={magnitude} negated={negate}")


def test_rand_augment_draws_ops_and_magnitudes_as_timm():
  """Over 3,000 images: how many ops apply per image, which ops, and their magnitudes, recorded on
  both sides (ops replaced by recorders), agree within sampling error."""
  aa = official_eval.timm_data.auto_augment
  img = np.zeros((8, 8, 3), np.uint8)
  mine, theirs = [], []
  saved = dict(augment.RAND_OPS)
  try:
    for name in saved:
      augment.RAND_OPS[name] = (lambda n: lambda im, m, rng: (mine.append((n, m)), im)[1])(name)
    rng = np.random.default_rng(0)
    for _ in range(3000):
      augment.rand_augment(img, rng, 2, 9.0, 0.5)
  finally:
    augment.RAND_OPS.update(saved)
  ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": augment._FILL})
  for op in ra.ops:
    op.aug_fn = (lambda n: lambda im, *args, **kw: (theirs.append(n), im)[1])(op.name)
    op.level_fn = (lambda n: lambda m, h: (theirs.append(m), ())[1])(op.name)
  np.random.seed(0)
  random.seed(0)
  from PIL import Image
  pil = Image.fromarray(img)
  for _ in range(3000):
    ra(pil)
  their_pairs = list(zip(theirs[1::2], theirs[0::2]))  # level_fn (magnitude) runs before aug_fn (name)
  assert abs(len(mine) - len(their_pairs)) < 4 * np.sqrt(3000 * 2 * 0.25)  # ~ Binomial(6000, 0.5)
  assert abs(len(mine) / 6000 - 0.5) < 0.03
  names = sorted(augment.RAND_OPS)
  count = lambda pairs: np.array([sum(p[0] == n for p in pairs) for n in names]) / len(pairs)
  np.testing.assert_allclose(count(mine), count(their_pairs), atol=0.025)
  m_mine, m_theirs = np.array([m for _, m in mine]), np.array([m for _, m in their_pairs])
  assert m_mine.max() <= 10.0 and m_theirs.max() <= 10.0
  assert abs(m_mine.mean() - m_theirs.mean()) < 0.05 and abs(m_mine.std() - m_theirs.std()) < 0.05


def test_random_erasing_draws_boxes_as_timm():
  """Pixel-mode random erasing with probability 0.25 on 4,000 images of 32 x 32: the share of
  erased images and the distribution of the erased area and height (boxes seen through the
  noise they hold) agree with timm's RandomErasing."""
  n, h = 4000, 32
  erase = official_eval.timm_data.random_erasing.RandomErasing(probability=0.25, mode="pixel", device="cpu")
  random.seed(0)
  torch.manual_seed(0)
  theirs = np.stack([erase(torch.zeros(3, h, h)).numpy().transpose(1, 2, 0) for _ in range(n)])
  ours = np.asarray(augment.random_erasing(jax.random.PRNGKey(0), jnp.zeros((n, h, h, 3)), 0.25))

  def boxes(x):
    hit = np.any(x != 0, axis=-1)
    erased = hit.any(axis=(1, 2))
    rows = hit.any(axis=2).sum(1)[erased]
    return erased.mean(), hit.sum(axis=(1, 2))[erased] / h / h, rows

  (p1, a1, r1), (p2, a2, r2) = boxes(ours), boxes(theirs)
  assert abs(p1 - 0.25) < 0.03 and abs(p2 - 0.25) < 0.03
  assert abs(a1.mean() - a2.mean()) < 0.02, (a1.mean(), a2.mean())
  assert abs(np.median(r1) - np.median(r2)) <= 1.0
  assert abs(r1.std() - r2.std()) < 1.0


def test_mixup_and_cutmix_lambdas_follow_timms_mixup():
  """mixup 0.8 / cutmix 1.0, switch 0.5, label smoothing 0.1, batch mode on 32 x 32: the weight of
  an image's own label and the share of cutmix batches (a hard box edge) over 2,000 batches, each
  side's own draws, agree with timm's Mixup."""
  n, k = 2000, 10
  mix = official_eval.timm_data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=k)
  np.random.seed(0)
  x = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
  y = torch.tensor([0, 1])
  t_lam, t_cut = [], []
  for _ in range(n):
    xi, yi = mix(x.clone(), y)
    t_lam.append(float(yi[0, 0]))
    vals = np.unique(np.round(xi[0].numpy(), 6))
    t_cut.append(len(vals) <= 2 and not (0 < vals).all() if len(vals) > 1 else False)
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  xj, tj = jnp.stack([jnp.zeros((32, 32, 3)), jnp.ones((32, 32, 3))]), augment.one_hot(jnp.array([0, 1]), k, 0.1)
  outs = jax.vmap(lambda key: augment.mixup_cutmix(key, xj, tj, 0.8, 1.0))(keys)
  o_lam = np.asarray(outs[1][:, 0, 0])
  o_cut = [len(np.unique(np.round(im, 6))) == 2 for im in np.asarray(outs[0][:, 0])]
  assert abs(np.mean(o_lam) - np.mean(t_lam)) < 0.02 and abs(np.std(o_lam) - np.std(t_lam)) < 0.02
  assert abs(np.mean(o_cut) - np.mean(t_cut)) < 0.05, (np.mean(o_cut), np.mean(t_cut))
  assert min(o_lam) >= 0.1 / k - 1e-6 and max(o_lam) <= 1 - 0.1 + 0.1 / k + 1e-6


def test_evaluation_transform_equals_the_official_resize_and_centre_crop(cifar_folder):
  """dataset.eval_crop_pct = 224/256: Resize(int(32 / 0.875) = 36, bicubic) then CenterCrop(32),
  pixel for pixel on real images and on a non-square one, as util/datasets.build_transform."""
  from PIL import Image
  tf = official_eval.eval_transform(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
  files = sorted(pathlib.Path(cifar_folder, "test", "cat").iterdir())[:4]
  images = [np.asarray(Image.open(f).convert("RGB")) for f in files] + [_astronaut(96)[:, :70]]
  for img in images:
    ours = transforms.center_crop_resize(img, 32, "bicubic", 224 / 256)
    theirs = np.rint(tf(Image.fromarray(img)).numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    np.testing.assert_array_equal(ours, theirs)


def test_probe_crop_box_follows_the_official_clamped_rule():
  """crop_mode 'clamp' against util/crop.RandomResizedCrop.get_params over 4,000 draws on a
  40 x 30 image: box height, width and area agree in distribution, and boxes reach the clamp."""
  from PIL import Image
  img = Image.new("RGB", (40, 30))
  torch.manual_seed(0)
  theirs = np.array([official_eval.ClampedRandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))[2:]
                     for _ in range(4000)])
  ours = np.array([transforms.random_resized_crop_box(30, 40, np.random.default_rng(s), (0.08, 1.0), mode="clamp")[2:]
                   for s in range(4000)])
  for i in range(2):
    assert abs(ours[:, i].mean() - theirs[:, i].mean()) < 0.5, (i, ours[:, i].mean(), theirs[:, i].mean())
  assert abs((ours[:, 0] == 30).mean() - (theirs[:, 0] == 30).mean()) < 0.03
  assert (ours[:, 0] == 30).mean() > 0.02
