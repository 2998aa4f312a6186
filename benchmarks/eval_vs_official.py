"""mae_jax's linear probe and fine-tuning against the official main_linprobe.py / main_finetune.py,
end to end, over seeds, from one pretrained encoder.

  python -m benchmarks.eval_vs_official --folder=data/cifar10-jpeg --out=runs/eval_vs_official \
      [--shape=small|medium] [--jobs=probe,finetune] [--seeds=0,1,2] [--label_fraction=0.1]

1. Pretrains the shape's MAE once with `python -m mae_jax.main` (the pretraining comparison's
   recipe, benchmarks/train_vs_official.py, seed 0) and writes it as an official checkpoint with
   `python -m mae_jax.convert --to=official`: both sides start from that one file.
2. Draws a class-balanced subset of the labelled train split (`--label_fraction`, subset seed 0)
   as a folder of links, so that both sides train on the same images; the test split is whole.
3. For each seed and job: the official loop (benchmarks/official_eval.py, in this process) and
   `python -m mae_jax.probe|finetune --config=configs/cifar10_vit_t.py:tiny,official_eval` with
   the same recipe. Each writes its per-iteration losses and its top-1 on the whole test split.
4. Prints a table per job: top-1 and loss windows, per seed and mean ± std per side, and the
   difference of the means with its standard error; writes it to OUT/SHAPE/summary.md.

A finished run is skipped when the command is run again. The recipes are the official ones at a
small scale (docs/numerics.md): the probe is LARS at the paper's absolute lr (blr 0.1 at batch
16384 is lr 6.4; blr 0.1 at batch 256 barely moves the head in a short run), wd 0, cls token,
BatchNorm without affine, one clamped RandomResizedCrop + flip; fine-tuning is AdamW with layer
decay 0.75, wd 0.05, drop path 0.1, mixup 0.8 / cutmix 1.0, label smoothing 0.1, RandAugment
m9 mstd0.5, random erasing 0.25, global pool + fc_norm; both a per-iteration warmup + cosine
and the official evaluation transform (resize to size / 0.875, centre crop).
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

from benchmarks import train_vs_official as tvo

CONFIG = "configs/cifar10_vit_t.py:tiny,official_eval"


def job_recipe(job: str, shape: str, image_size: int = 32, epochs: int = 0, batch: int = 0,
               base_lr: float = 0.0, warmup_epochs: int = -1, num_classes: int = 10,
               workers: int = 2) -> dict:
  """The job's recipe and the model shape, as one flat dict (0 / -1: the job's default)."""
  patch, ew, ed, eh, *_ = tvo.SHAPES[shape]
  r = dict(job=job, shape=shape, image_size=image_size, patch=patch, enc_width=ew, enc_depth=ed,
           enc_heads=eh, num_classes=num_classes, workers=workers, mean=tvo.IMAGENET_MEAN,
           std=tvo.IMAGENET_STD)
  if job == "probe":
    r.update(epochs=10, warmup_epochs=2, batch=256, base_lr=6.4, min_lr=0.0, weight_decay=0.0)
  else:
    r.update(epochs=6, warmup_epochs=1, batch=128, base_lr=1e-3, min_lr=1e-6, weight_decay=0.05,
             layer_decay=0.75, drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
             randaug="rand-m9-mstd0.5-inc1", random_erasing=0.25)
  r.update({k: v for k, v in dict(epochs=epochs, batch=batch, base_lr=base_lr).items() if v})
  if warmup_epochs >= 0:
    r["warmup_epochs"] = warmup_epochs
  return r


# ----------------------------------------------------------------------------
# The reference side.
# ----------------------------------------------------------------------------
def official_run(folder: str, out: str, r: dict, seed: int, init_pth: str, threads: int) -> None:
  """The official probe or fine-tuning loop on folder/train, evaluated on folder/test; writes
  out/metrics.jsonl (step, loss, lr per iteration) and out/results.json (top-1, seconds)."""
  import torch
  from benchmarks import official_eval as oe
  from benchmarks import official_mae
  torch.set_num_threads(threads)
  oe.seed_everything(seed)
  job, size = r["job"], r["image_size"]
  train_tf = (oe.probe_train_transform(size, r["mean"], r["std"]) if job == "probe" else
              oe.finetune_train_transform(size, r["mean"], r["std"], r))
  spawn = "spawn" if r["workers"] and "jax" in sys.modules else None
  train = official_mae.ImageFolder(os.path.join(folder, "train"), train_tf)
  test = official_mae.ImageFolder(os.path.join(folder, "test"), oe.eval_transform(size, r["mean"], r["std"]))
  loader = torch.utils.data.DataLoader(
      train, batch_size=r["batch"], shuffle=True, drop_last=True, num_workers=r["workers"],
      generator=torch.Generator().manual_seed(seed), persistent_workers=r["workers"] > 0,
      multiprocessing_context=spawn)
  test_loader = torch.utils.data.DataLoader(test, batch_size=256, shuffle=False,
                                            num_workers=r["workers"], multiprocessing_context=spawn)
  model = oe.official_vit(size, r["patch"], r["enc_width"], r["enc_depth"], r["enc_heads"],
                          r["num_classes"], global_pool=job == "finetune",
                          drop_path=r.get("drop_path", 0.0))
  model = oe.load_encoder(model, torch.load(init_pth)["model"], job)
  optimizer = oe.make_optimizer(model, job, r)
  mixup_fn, loss_fn = oe.criterion(job, r)
  os.makedirs(out, exist_ok=True)
  start, step = time.time(), 0
  with open(os.path.join(out, "metrics.jsonl"), "w") as log:
    for epoch in range(r["epochs"]):
      model.train()
      for i, (images, labels) in enumerate(loader):
        lr = oe.lr_at(i / len(loader) + epoch, r)
        oe.set_lr(optimizer, lr)
        loss = oe.train_step(model, optimizer, mixup_fn, loss_fn, images, labels)
        step += 1
        log.write(json.dumps({"step": step, "loss": loss, "lr": lr}) + "\n")
      print(f"official {job} seed {seed}: epoch {epoch + 1}/{r['epochs']}, loss {loss:.4f}, "
            f"{time.time() - start:.0f} s", flush=True)
  acc, count = oe.top1(model, test_loader)
  write_json(os.path.join(out, "results.json"),
             {"top1": acc, "examples": count, "steps": step, "seconds": time.time() - start})


# ----------------------------------------------------------------------------
# mae_jax, run as a user runs it.
# ----------------------------------------------------------------------------
def mae_jax_overrides(folder: str, r: dict, seed: int) -> list:
  job = r["job"]
  fields = {
      "seed": seed, "max_steps": 0, "dataset.source": "folder", "dataset.folder": folder,
      "dataset.image_size": r["image_size"], "dataset.mean": tuple(r["mean"]),
      "dataset.std": tuple(r["std"]), "dataset.num_workers": r["workers"],
      "model.patch_size": r["patch"], "model.encoder_width": r["enc_width"],
      "model.encoder_depth": r["enc_depth"], "model.encoder_heads": r["enc_heads"],
      f"{job}.num_epochs": r["epochs"], f"{job}.warmup_epochs": r["warmup_epochs"],
      f"{job}.batch_size": r["batch"], f"{job}.base_lr": r["base_lr"], f"{job}.min_lr": r["min_lr"],
      f"{job}.weight_decay": r["weight_decay"], f"{job}.eval_every_epochs": r["epochs"],
      f"{job}.log_every_steps": 1, f"{job}.checkpoint_every_steps": 100000,
      "evaluate.batch_size": 256}
  if job == "finetune":
    fields.update({f"finetune.{k}": r[k] for k in ("layer_decay", "drop_path", "mixup", "cutmix",
                                                   "label_smoothing", "random_erasing")})
  fmt = lambda v: "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)
  return [f"--config.{k}={fmt(v)}" for k, v in fields.items()]


def mae_jax_run(folder: str, out: str, r: dict, seed: int, init_pth: str) -> None:
  """`python -m mae_jax.probe|finetune` with the recipe; its results.json gains the seconds."""
  start = time.time()
  os.makedirs(out, exist_ok=True)
  tvo.run_logged([sys.executable, "-m", f"mae_jax.{r['job']}", f"--config={CONFIG}",
                  f"--pretrained={init_pth}", f"--workdir={out}"] + mae_jax_overrides(folder, r, seed),
                 os.path.join(out, "stdout.log"))
  with open(os.path.join(out, "results.json")) as f:
    res = json.load(f)
  write_json(os.path.join(out, "results.json"), {**res, "top1": res["metrics"]["top1"],
                                                 "seconds": time.time() - start})


# ----------------------------------------------------------------------------
# The shared start: one encoder, one label subset.
# ----------------------------------------------------------------------------
def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def pretrained_encoder(folder: str, root: str, shape: str, epochs: int) -> str:
  """The shape's MAE pretrained by mae_jax (seed 0), as an official .pth; made once."""
  pth = os.path.join(root, "pretrained.pth")
  if not os.path.exists(pth):
    run = os.path.join(root, "pretrain")
    if not os.path.exists(os.path.join(run, "done.json")):
      tvo.mae_jax_pretrain(folder, run, tvo.recipe(shape, epochs=epochs), seed=0)
    tvo.run_logged([sys.executable, "-m", "mae_jax.convert", run, pth + ".partial.pth", "--to=official"],
                   os.path.join(root, "convert.log"))
    os.replace(pth + ".partial.pth", pth)
  return pth


def label_subset(folder: str, root: str, fraction: float, seed: int = 0) -> str:
  """root/labels_F: train/<class>/ links to a class-balanced `fraction` of folder/train (drawn
  with `seed`), test/ a link to folder/test. Made once."""
  out = os.path.join(root, f"labels_{fraction:g}")
  if os.path.exists(os.path.join(out, "done")):
    return out
  rng = np.random.default_rng(seed)
  for cls in sorted(os.listdir(os.path.join(folder, "train"))):
    files = sorted(os.listdir(os.path.join(folder, "train", cls)))
    keep = sorted(rng.choice(len(files), max(1, round(len(files) * fraction)), replace=False))
    os.makedirs(os.path.join(out, "train", cls), exist_ok=True)
    for i in keep:
      link = os.path.join(out, "train", cls, files[i])
      if not os.path.lexists(link):
        os.symlink(os.path.join(folder, "train", cls, files[i]), link)
  if not os.path.lexists(os.path.join(out, "test")):
    os.symlink(os.path.join(folder, "test"), os.path.join(out, "test"))
  open(os.path.join(out, "done"), "w").close()
  return out


# ----------------------------------------------------------------------------
# The comparison.
# ----------------------------------------------------------------------------
ROWS = [
    ("test top-1 (%)", lambda c, res: res["top1"], 2),
    ("mean loss, first 20 steps", lambda c, res: c[:20].mean(), 3),
    ("mean loss, last 20 steps", lambda c, res: c[-20:].mean(), 3),
    ("wall time (s)", lambda c, res: res["seconds"], 0),
]


def summary(runs: dict) -> str:
  """Markdown table: per seed and mean ± std per side, the difference of the means (standard
  error): a difference of two or more standard errors is one the seeds can tell from noise."""
  sides = [s for s in ("official", "mae_jax") if runs.get(s)]
  lines = ["| | " + " | ".join(f"{s}, seeds {'/'.join(map(str, sorted(runs[s])))}" for s in sides)
           + (" | mae_jax - official (standard error) |" if len(sides) == 2 else " |"),
           "|" + " --- |" * (len(sides) + 1 + (len(sides) == 2))]
  for name, fn, digits in ROWS:
    cells, means, sq_err = [], {}, 0.0
    for s in sides:
      vals = np.array([fn(*runs[s][k]) for k in sorted(runs[s])], np.float64)
      means[s] = vals.mean()
      spread = f" ± {vals.std(ddof=1):.{digits}f}" if len(vals) > 1 else ""
      sq_err += vals.var(ddof=1) / len(vals) if len(vals) > 1 else np.nan
      cells.append(" / ".join(f"{v:.{digits}f}" for v in vals) + f" (mean {vals.mean():.{digits}f}{spread})")
    diff = (f" {means['mae_jax'] - means['official']:+.{digits}f} ({np.sqrt(sq_err):.{digits}f}) |"
            if len(sides) == 2 else "")
    lines.append(f"| {name} | " + " | ".join(cells) + " |" + diff)
  return "\n".join(lines)


def compare(args) -> None:
  folder = os.path.abspath(args.folder)
  root = os.path.join(os.path.abspath(args.out), args.shape)
  os.makedirs(root, exist_ok=True)
  seeds = [int(s) for s in args.seeds.split(",")]
  sides = [args.only] if args.only else ["official", "mae_jax"]
  print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; shape "
        f"{args.shape}; labels {args.label_fraction:g}", flush=True)
  init = pretrained_encoder(folder, root, args.shape, args.pretrain_epochs)
  subset = label_subset(folder, os.path.abspath(args.out), args.label_fraction)
  tables = []
  for job in args.jobs.split(","):
    r = job_recipe(job, args.shape, args.image_size, args.epochs, args.batch, args.base_lr,
                   args.warmup_epochs, workers=args.workers)
    print(f"{job} recipe: {json.dumps(r)}", flush=True)
    runs = {s: {} for s in sides}
    for seed in seeds:
      for side in sides:
        run_dir = os.path.join(root, f"{job}_labels{args.label_fraction:g}", f"{side}_seed{seed}")
        if not os.path.exists(os.path.join(run_dir, "results.json")):
          if side == "official":
            official_run(subset, run_dir, r, seed, init, args.threads)
          else:
            mae_jax_run(subset, run_dir, r, seed, init)
        with open(os.path.join(run_dir, "results.json")) as f:
          res = json.load(f)
        runs[side][seed] = (tvo.loss_curve(run_dir), res)
        print(f"{job} {side} seed {seed}: top-1 {res['top1']:.2f}, {res['seconds']:.0f} s", flush=True)
    tables.append(f"### {job}, shape {args.shape}, {args.label_fraction:g} of the labels\n\n"
                  f"recipe: `{json.dumps(r)}`\n\n" + summary(runs))
  text = "\n\n".join(tables)
  write_json(os.path.join(root, f"summary_labels{args.label_fraction:g}.json"), {"markdown": text})
  print(text)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--folder", required=True, help="image folder with train/<class>/ and test/<class>/")
  p.add_argument("--out", default="runs/eval_vs_official")
  p.add_argument("--shape", choices=sorted(tvo.SHAPES), default="small")
  p.add_argument("--jobs", default="probe,finetune")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--label_fraction", type=float, default=0.1)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--pretrain_epochs", type=int, default=3)
  p.add_argument("--epochs", type=int, default=0, help="0: the job's default (probe 10, fine-tune 6)")
  p.add_argument("--warmup_epochs", type=int, default=-1, help="-1: the job's default (2, 1)")
  p.add_argument("--batch", type=int, default=0, help="0: the job's default (256, 128)")
  p.add_argument("--base_lr", type=float, default=0.0, help="0: the job's default (6.4, 1e-3)")
  p.add_argument("--only", choices=["official", "mae_jax"], default="")
  p.add_argument("--workers", type=int, default=2, help="data loader processes on each side")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's threads")
  compare(p.parse_args(argv))


if __name__ == "__main__":
  main()


# ----------------------------------------------------------------------------
# Multi-step parity: both training steps from identical weights and batches.
# ----------------------------------------------------------------------------
def folder_batches(folder: str, n: int, batch: int, size: int = 32, seed: int = 0):
  """`n` batches of (uint8 images (B, size, size, 3), int labels) drawn from folder/train, the
  classes in sorted order as ImageFolder numbers them, each image resized to size x size."""
  from PIL import Image
  classes = sorted(os.listdir(os.path.join(folder, "train")))
  files = [(os.path.join(folder, "train", c, f), i) for i, c in enumerate(classes)
           for f in sorted(os.listdir(os.path.join(folder, "train", c)))]
  pick = np.random.default_rng(seed).choice(len(files), n * batch, replace=False)
  images = np.stack([np.asarray(Image.open(files[j][0]).convert("RGB").resize((size, size), Image.BICUBIC))
                     for j in pick])
  labels = np.array([files[j][1] for j in pick], np.int32)
  return [(images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]) for i in range(n)]


def parity_config(job: str, r: dict, **section):
  """mae_jax's config for the parity run: the official recipe, the shape of `r`, `section`'s
  fields of the job's section."""
  from configs import cifar10_vit_t
  from mae_jax import config_check
  c = cifar10_vit_t.get_config("tiny,official_eval")
  c.dataset.update(image_size=r["image_size"], mean=tuple(r["mean"]), std=tuple(r["std"]))
  c.model.update(patch_size=r["patch"], encoder_width=r["enc_width"], encoder_depth=r["enc_depth"],
                 encoder_heads=r["enc_heads"])
  c[job].update(num_epochs=r["epochs"], warmup_epochs=r["warmup_epochs"], batch_size=r["batch"],
                base_lr=r["base_lr"], min_lr=r["min_lr"], weight_decay=r["weight_decay"], **section)
  config_check.validate(c, jobs=(job,))
  return c


def run_parity(job: str, folder: str, r: dict, steps: int, steps_per_epoch: int, seed: int = 0):
  """`steps` updates of the official loop and of mae_jax's `classify_step`, from the same weights
  (an encoder with the official MAE initialisation, the official head initialisation) on the
  same batches, each side with its own optimizer and per-iteration lr schedule over r's epochs of
  `steps_per_epoch` updates. The random parts (drop path, mixup, cutmix, random erasing) must be
  off in `r`: their draws cannot be shared. Returns (official losses, mae_jax losses, the largest
  |difference| of the two models' evaluation logits on a held-out batch afterwards, and the
  largest change of the official model's logits there over the run)."""
  import jax
  import torch
  from benchmarks import official_eval as oe
  from benchmarks import official_mae
  from mae_jax.models import classifier
  from mae_jax.train import classify
  from mae_jax.io import convert
  from mae_jax.train import optim
  assert not any(r.get(k, 0) for k in ("drop_path", "mixup", "cutmix", "random_erasing")), r
  torch.manual_seed(seed)
  mae = official_mae.OfficialMAE(img_size=r["image_size"], patch_size=r["patch"], embed_dim=r["enc_width"],
                                 depth=r["enc_depth"], num_heads=r["enc_heads"])
  sd = mae.state_dict()
  ref = oe.official_vit(r["image_size"], r["patch"], r["enc_width"], r["enc_depth"], r["enc_heads"],
                        r["num_classes"], global_pool=job == "finetune")
  ref = oe.load_encoder(ref, sd, job)
  opt = oe.make_optimizer(ref, job, r)
  _, loss_fn = oe.criterion(job, r)

  section = {} if job == "probe" else {k: r[k] for k in ("layer_decay", "label_smoothing", "drop_path",
                                                          "mixup", "cutmix", "random_erasing")}
  config = parity_config(job, r, **section)
  model = classify.model_from_config(config, job, r["num_classes"])
  variables = jax.device_get(classify.init_function(config, model)())
  grid = (r["image_size"] // r["patch"],) * 2
  encoder = convert.official_to_params({k: v.detach().numpy() for k, v in sd.items()})["encoder"]
  params = classifier.merge_pretrained(variables["params"], encoder, grid, grid)
  head = ref.head[1] if job == "probe" else ref.head
  params["head"] = {"kernel": head.weight.detach().numpy().T.copy(), "bias": head.bias.detach().numpy().copy()}
  variables = {**variables, "params": params}
  peak = optim.peak_lr(r["base_lr"], r["batch"])
  schedule = optim.warmup_cosine(peak, r["min_lr"], r["warmup_epochs"] * steps_per_epoch,
                                 r["epochs"] * steps_per_epoch)
  tx = optim.classification_optimizer(config[job], schedule, params, r["enc_depth"], job == "probe")
  state = classify.create_train_state(tx, seed, variables)
  step = jax.jit(classify.task(config, job, model, tx, variables, r["num_classes"]).train_step)

  mean, std = np.array(r["mean"], np.float32), np.array(r["std"], np.float32)
  to_torch = lambda u8: torch.from_numpy(((u8 / np.float32(255) - mean) / std).transpose(0, 3, 1, 2).copy())
  batches = folder_batches(folder, steps + 1, r["batch"], r["image_size"], seed)
  held_images, _ = batches[steps]
  ref.eval()
  with torch.no_grad():
    before = ref(to_torch(held_images)).numpy()
  theirs, ours = [], []
  for i, (images, labels) in enumerate(batches[:steps]):
    ref.train()
    oe.set_lr(opt, oe.lr_at(i / steps_per_epoch, r))
    theirs.append(oe.train_step(ref, opt, None, loss_fn, to_torch(images), torch.from_numpy(labels).long()))
    state, metrics = step(state, {"image": images, "label": labels})
    ours.append(float(metrics["loss"]))
  ref.eval()
  with torch.no_grad():
    want = ref(to_torch(held_images)).numpy()
  got = model.apply({"params": state.params, **(state.model_state or {})},
                    classify.pipeline.normalize(held_images, tuple(r["mean"]), tuple(r["std"])), train=False)
  return (np.array(theirs), np.array(ours), float(np.max(np.abs(np.asarray(got) - want))),
          float(np.max(np.abs(want - before))))
