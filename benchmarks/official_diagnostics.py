"""Stage-by-stage checks of mae_jax's pretraining against the official loop
(`python -m benchmarks.official_diagnostics --diagnose=init|augment|parity|swap --folder=...`,
with the comparison's flags of benchmarks/train_vs_official.py).

Each function measures one stage on both sides and prints a table:
  init     the loss on one batch from each side's own initialisation, over many seeds, and every
           parameter tensor's mean, standard deviation and extremes on both sides;
  augment  the train crops' area and aspect, and the batches' pixel statistics, of mae_jax's
           loader against torchvision's RandomResizedCrop + flip on the same folder;
  parity   N training steps of both from identical weights, batches and masking noise: the two
           loss curves, and how far the weights have drifted apart;
  swap     both loops as users run them (their own data order, crops and masks) for N steps, each
           from its own initial weights and from the other side's, per seed: whether the early
           loss follows the loop or the initial weights.
"""

import functools
import os
import sys

import numpy as np

from benchmarks import train_vs_official as tvo


def _torch_batches(folder: str, r: dict, n: int, seed: int):
  """`n` train batches of the official pipeline (NCHW float tensors, normalised), and the size of
  the train split."""
  import torch
  from benchmarks import official_mae
  torch.manual_seed(seed)
  dataset = official_mae.ImageFolder(os.path.join(folder, "train"), tvo.official_transform(r))
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=r["batch"], shuffle=True, drop_last=True, num_workers=r["workers"],
      generator=torch.Generator().manual_seed(seed),
      multiprocessing_context="spawn" if r["workers"] and "jax" in sys.modules else None)
  out = []
  for samples, _ in loader:
    out.append(samples)
    if len(out) == n:
      break
  return out, len(dataset)


def _mae_jax_config(folder: str, r: dict, seed: int = 0):
  """The config `python -m mae_jax.main` runs with in the comparison."""
  from configs import cifar10_vit_t
  from mae_jax import config_lib
  return config_lib.set_fields(cifar10_vit_t.get_config("tiny"), tvo.mae_jax_fields(folder, r, seed))


def _param_rows(tree, prefix=""):
  """{'encoder/block0/attn/qkv/kernel': array, ...} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_param_rows(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = np.asarray(v)
  return out


def init(args, r: dict) -> None:
  """Initial loss over seeds on one batch, and per-tensor init statistics."""
  import jax
  import torch
  from mae_jax.io import convert
  from mae_jax.train import pretrain
  from mae_jax.models.mae import mae_from_config
  folder = os.path.abspath(args.folder)
  imgs = _torch_batches(folder, r, 1, 0)[0][0]
  seeds = range(int(args.seeds)) if args.seeds.isdigit() else [int(s) for s in args.seeds.split(",")]
  noise = torch.rand(imgs.shape[0], (r["image_size"] // r["patch"]) ** 2,
                     generator=torch.Generator().manual_seed(12345))
  config = _mae_jax_config(folder, r)
  model = mae_from_config(config.model, r["image_size"])
  x, nz = imgs.numpy().transpose(0, 2, 3, 1), noise.numpy()
  loss_of = jax.jit(lambda p: model.apply({"params": p}, x, nz)[0])
  losses = {"official": [], "mae_jax": []}
  stats = {"official": {}, "mae_jax": {}}
  for seed in seeds:
    # mae_jax: the parameters create_train_state makes for config.seed = seed.
    params = pretrain.init_params(model, jax.random.split(jax.random.PRNGKey(seed))[0])
    losses["mae_jax"].append(float(loss_of(params)))
    torch.manual_seed(seed)
    ref = tvo.official_model(r)
    with torch.no_grad():
      losses["official"].append(float(ref(imgs, noise)[0]))
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    for side, tree in (("mae_jax", params), ("official", convert.official_to_params(sd))):
      for name, a in _param_rows(jax.device_get(tree)).items():
        stats[side].setdefault(name, []).append((a.mean(), a.std(), a.min(), a.max()))
  n = len(losses["official"])
  print(f"\ninitial loss on one batch of {imgs.shape[0]} images (the official pipeline's first "
        f"batch, one fixed masking noise), each side's own initialisation, {n} seeds:\n")
  print("| | mean | std over seeds | standard error of the mean |\n| --- | --- | --- | --- |")
  for side in ("official", "mae_jax"):
    v = np.array(losses[side])
    print(f"| {side} | {v.mean():.4f} | {v.std(ddof=1):.4f} | {v.std(ddof=1) / np.sqrt(n):.4f} |")
  d = np.mean(losses["mae_jax"]) - np.mean(losses["official"])
  se = np.sqrt(np.var(losses["mae_jax"], ddof=1) / n + np.var(losses["official"], ddof=1) / n)
  print(f"| mae_jax - official | {d:+.4f} | | {se:.4f} |")
  print(f"\nevery parameter tensor, mean over {n} seeds of its statistics (official names mapped "
        "to mae_jax's; kernels are the transposed Linear weights):\n")
  print("| tensor | shape | mean (official / mae_jax) | std (official / mae_jax) | "
        "min (official / mae_jax) | max (official / mae_jax) |\n| --- | --- | --- | --- | --- | --- |")
  for name in sorted(stats["mae_jax"]):
    o, m = np.mean(stats["official"][name], 0), np.mean(stats["mae_jax"][name], 0)
    shape = "x".join(map(str, _param_rows(jax.device_get(params))[name].shape))
    print(f"| {name} | {shape} | " + " | ".join(f"{a:.4g} / {b:.4g}" for a, b in zip(o, m)) + " |")


def _mae_jax_crops(config, n: int):
  """`n` RandomResizedCrop boxes (height, width) as mae_jax's loader draws them on a CIFAR image."""
  from mae_jax.data import transforms
  rng = np.random.default_rng(0)
  s = config.dataset.image_size
  return np.array([transforms.random_resized_crop_box(s, s, rng, tuple(config.dataset.crop_scale))[2:]
                   for _ in range(n)], np.float64)


def augment(args, r: dict) -> None:
  """Crop area / aspect distributions and batch pixel statistics, both pipelines."""
  import torch
  from benchmarks import torch_cpu
  from mae_jax.data import pipeline
  from mae_jax.data import sources
  tv_transforms = torch_cpu.tolerant_import("torchvision.transforms")
  folder = os.path.abspath(args.folder)
  config = _mae_jax_config(folder, r)
  s, n = r["image_size"], 20000
  torch.manual_seed(0)
  crop = tv_transforms.RandomResizedCrop(s, scale=tuple(r["crop_scale"]))
  img = torch.zeros(3, s, s)
  tv_boxes = np.array([crop.get_params(img, crop.scale, crop.ratio)[2:] for _ in range(n)], np.float64)
  mj_boxes = _mae_jax_crops(config, n)
  batches = max(1, args.steps // 10)
  tv = np.concatenate([b.numpy().transpose(0, 2, 3, 1) for b in _torch_batches(folder, r, batches, 0)[0]])
  source = sources.make_source(config.dataset, sources.resolved_splits(config.dataset)[0])
  loader = iter(pipeline.make_loader(config.dataset, source, train=True, global_batch_size=r["batch"], seed=0))
  mean, std = np.array(tvo.IMAGENET_MEAN), np.array(tvo.IMAGENET_STD)
  mj = np.concatenate([(next(loader)["image"] / 255.0 - mean) / std for _ in range(batches)])

  def box_stats(b):
    area, aspect = b[:, 0] * b[:, 1] / (s * s), b[:, 1] / b[:, 0]
    return [area.mean(), np.median(area), (area == 1).mean(), np.exp(np.log(aspect).mean()),
            np.log(aspect).std()]

  def pixel_stats(x):
    p = r["patch"]
    g = s // p
    patches = x.reshape(len(x), g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(len(x), g * g, -1)
    return [*x.mean((0, 1, 2)), *x.std((0, 1, 2)), np.abs(np.diff(x, axis=2)).mean(),
            patches.std(-1, ddof=1).mean()]

  print(f"\nRandomResizedCrop({s}, scale {tuple(r['crop_scale'])}) boxes on a {s}x{s} image, "
        f"{n} draws each:\n")
  print("| | mean area | median area | whole image | geometric mean aspect (w/h) | std log aspect |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, b in (("torchvision", tv_boxes), ("mae_jax", mj_boxes)):
    print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in box_stats(b)) + " |")
  print(f"\ntrain batches ({len(tv)} images each side, normalised):\n")
  print("| | mean R / G / B | std R / G / B | mean abs. horizontal step | mean within-patch std |")
  print("| --- | --- | --- | --- | --- |")
  for name, x in (("torchvision", tv), ("mae_jax", mj)):
    v = pixel_stats(x)
    print(f"| {name} | {v[0]:.4f} / {v[1]:.4f} / {v[2]:.4f} | {v[3]:.4f} / {v[4]:.4f} / {v[5]:.4f} "
          f"| {v[6]:.4f} | {v[7]:.4f} |")
  if args.weights:
    batch_difficulty(r, args.weights, tv, mj)


def batch_difficulty(r: dict, weights: str, tv: np.ndarray, mj: np.ndarray) -> None:
  """The loss of one trained model (an official checkpoint, `weights`) on each pipeline's batches,
  with masking noise drawn alike: how hard the batches are as a whole, which pixel statistics
  alone may not show."""
  import jax
  from mae_jax.io import convert, foreign
  from mae_jax.models.mae import mae_from_config
  model = mae_from_config(_mae_jax_config("", r).model, r["image_size"])
  sd = foreign.read_state_dict(weights)
  params = {k: v for k, v in convert.official_to_params(sd).items() if k in ("encoder", "decoder")}
  loss = jax.jit(lambda x, noise: model.apply({"params": params}, x, noise)[0])
  rng, b, length = np.random.default_rng(0), r["batch"], (r["image_size"] // r["patch"]) ** 2
  out = {}
  for name, x in (("torchvision", tv), ("mae_jax", mj)):
    out[name] = np.array([float(loss(x[i:i + b].astype(np.float32), rng.random((b, length)).astype(np.float32)))
                          for i in range(0, len(x) - b + 1, b)])
  n = len(out["mae_jax"])
  se = np.sqrt(out["mae_jax"].var(ddof=1) / n + out["torchvision"].var(ddof=1) / n)
  print(f"\nthe loss of {weights} on {n} batches of each: torchvision {out['torchvision'].mean():.4f}, "
        f"mae_jax {out['mae_jax'].mean():.4f}, difference {out['mae_jax'].mean() - out['torchvision'].mean():+.4f} "
        f"(standard error {se:.4f})")


def run_parity(folder: str, r: dict, steps: int, steps_per_epoch: int = 0, threads: int = 0):
  """`steps` updates of the official loop and of mae_jax's `pretrain_step` from the same initial
  weights (the official init, converted), on the same batches (the official pipeline's) with the
  same masking noise, each side with its own optimizer and lr schedule over `r`'s epochs of
  `steps_per_epoch` updates (default: the train split's). Returns (official losses, mae_jax
  losses, {tensor: largest |difference| / largest |value|} of the final weights)."""
  import jax
  import torch
  from benchmarks import official_mae
  from mae_jax.io import convert
  from mae_jax.train import optim
  from mae_jax.train import pretrain
  from mae_jax.models.mae import mae_from_config
  config = _mae_jax_config(folder, r)
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(0)
  ref = tvo.official_model(r).train()
  sd = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  params = {k: v for k, v in convert.official_to_params(sd).items() if k in ("encoder", "decoder")}
  batches, train_size = _torch_batches(folder, r, steps, 0)
  per_epoch = steps_per_epoch or train_size // r["batch"]
  lr = r["base_lr"] * r["batch"] / 256
  model = mae_from_config(config.model, r["image_size"])
  schedule = optim.warmup_cosine(lr, 0.0, int(r["warmup_epochs"] * per_epoch), r["epochs"] * per_epoch)
  tx = optim.pretraining_optimizer(config.optimizer, schedule)
  state = pretrain.create_train_state(model, tx, 0, params=params)
  spec = pretrain.StepSpec(model, tx, tvo.IMAGENET_MEAN, tvo.IMAGENET_STD)
  step = jax.jit(functools.partial(pretrain.pretrain_step, spec=spec))
  opt = torch.optim.AdamW(official_mae.param_groups(ref, r["weight_decay"]), lr=lr, betas=(0.9, 0.95))
  g = torch.Generator().manual_seed(1)
  mean, std = np.array(tvo.IMAGENET_MEAN), np.array(tvo.IMAGENET_STD)
  theirs, ours = [], []
  for i, imgs in enumerate(batches):
    noise = torch.rand(imgs.shape[0], (r["image_size"] // r["patch"]) ** 2, generator=g)
    for group in opt.param_groups:
      group["lr"] = official_mae.lr_at(i / per_epoch, lr, 0.0, r["warmup_epochs"], r["epochs"])
    loss = ref(imgs, noise)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()
    theirs.append(loss.item())
    # mae_jax's step takes uint8 images: the same pixels, recovered from the normalised batch.
    u8 = np.rint((imgs.numpy().transpose(0, 2, 3, 1) * std + mean) * 255).astype(np.uint8)
    state, metrics = step(state, {"image": u8, "mask_noise": noise.numpy()})
    ours.append(float(metrics["loss"]))
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  final = _param_rows({k: v for k, v in convert.official_to_params(sd).items() if k in ("encoder", "decoder")})
  mine = _param_rows(jax.device_get(state.params))
  return np.array(theirs), np.array(ours), {k: _drift(k, mine[k], final[k]) for k in mine}


def _drift(name: str, ours: np.ndarray, theirs: np.ndarray) -> float:
  """Largest |difference| / largest |value| of one tensor. The key bias (the middle third of a
  qkv bias) is left out: it adds the same q.b to every score of a row, which the softmax
  removes, so its gradient is rounding noise on both sides, which Adam scales up to steps of
  about lr / 10 in directions that differ."""
  if name.endswith("attn/qkv/bias"):
    d = len(theirs) // 3
    ours, theirs = np.concatenate([ours[:d], ours[2 * d:]]), np.concatenate([theirs[:d], theirs[2 * d:]])
  return float(np.max(np.abs(ours - theirs)) / (np.max(np.abs(theirs)) + 1e-12))


def parity(args, r: dict) -> None:
  """Prints `run_parity`'s loss curves and weight drift."""
  theirs, ours, drift = run_parity(os.path.abspath(args.folder), r, args.steps, threads=args.threads)
  print(f"\n{len(ours)} steps from identical weights, batches and masking noise:\n")
  print("| step | official loss | mae_jax loss | difference |\n| --- | --- | --- | --- |")
  for s, (a, b) in enumerate(zip(theirs, ours), 1):
    if s in (1, 2, 5) or s % 10 == 0:
      print(f"| {s} | {a:.5f} | {b:.5f} | {b - a:+.1e} |")
  diffs = ours - theirs
  worst = max(drift, key=drift.get)
  print(f"\nlargest |loss difference| {np.abs(diffs).max():.2e}; mean difference {diffs.mean():+.2e}; "
        f"weights after {len(ours)} steps: largest difference {drift[worst]:.2e} of the tensor's "
        f"largest value ({worst}); median over tensors {np.median(list(drift.values())):.2e}")


def _initial_weights(r: dict, seed: int, out: str) -> dict:
  """Both sides' initial weights for `seed`, saved as official checkpoints: {side: path}."""
  import jax
  import torch
  from mae_jax.io import convert
  from mae_jax.train import pretrain
  from mae_jax.models.mae import mae_from_config
  os.makedirs(out, exist_ok=True)
  model = mae_from_config(_mae_jax_config("", r).model, r["image_size"])
  params = jax.device_get(pretrain.init_params(model, jax.random.split(jax.random.PRNGKey(seed))[0]))
  torch.manual_seed(seed)
  sds = {"official": tvo.official_model(r).state_dict(),
         "mae_jax": {k: torch.from_numpy(v) for k, v in
                     convert.params_to_official(params, r["patch"], r["image_size"]).items()}}
  paths = {}
  for side, sd in sds.items():
    paths[side] = os.path.join(out, f"init_{side}_seed{seed}.pth")
    torch.save({"model": sd}, paths[side])
  return paths


def swap(args, r: dict) -> None:
  """Each loop for `args.steps` steps from its own and from the other side's initial weights."""
  folder = os.path.abspath(args.folder)
  root = os.path.join(os.path.abspath(args.out), args.shape, "swap")
  seeds = [int(s) for s in args.seeds.split(",")]
  rows = []
  for seed in seeds:
    inits = _initial_weights(r, seed, root)
    for loop in ("official", "mae_jax"):
      for init in ("official", "mae_jax"):
        run_dir = os.path.join(root, f"{loop}_loop_{init}_init_seed{seed}")
        if not os.path.exists(os.path.join(run_dir, "done.json")):
          if loop == "official":
            tvo.official_pretrain(folder, run_dir, r, seed, args.threads, inits[init], args.steps)
          else:
            tvo.mae_jax_pretrain(folder, run_dir, r, seed, inits[init], args.steps)
        c = tvo.loss_curve(run_dir)
        rows.append((seed, loop, init, c[0], c[:20].mean(), c[30:50].mean(), c[-10:].mean()))
  print(f"\neach loop run as users run it, for {args.steps} steps, from either side's initial "
        "weights of the same seed:\n")
  print(f"| seed | loop | initial weights | loss at step 1 | mean, steps 1-20 | mean, steps 31-50 | "
        f"mean, steps {args.steps - 9}-{args.steps} |\n| --- | --- | --- | --- | --- | --- | --- |")
  for seed, loop, init, *v in rows:
    print(f"| {seed} | {loop} | {init} | " + " | ".join(f"{x:.4f}" for x in v) + " |")


def main(argv=None):
  args = tvo.arguments(diagnose=True).parse_args(argv)
  return globals()[args.diagnose](args, tvo.recipe_from_args(args))


if __name__ == "__main__":
  main()
