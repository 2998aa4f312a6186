"""mae_jax's pretraining against the official MAE loop, end to end, over seeds.

  python -m benchmarks.train_vs_official --folder=data/cifar10-jpeg --out=runs/vs_official \
      [--shape=small|medium] [--epochs=3] [--seeds=0,1,2]

For each seed, one after the other, the reference loop below (`--side=official`) and
`python -m mae_jax.main` (`--side=mae_jax`) pretrain the same MAE with one recipe on the folder's
train split (labels unused); `python -m mae_jax.evaluate` then measures both encoders alike
(masked MSE on the test split, kNN top-1 with a memory of train images). The last lines are a
table of both sides' loss curves and evaluations (mean and spread over the seeds) and their
differences. A finished run is skipped when the command is run again (the out folder keeps every
run's metrics.jsonl, weights and results.json); `--only=official|mae_jax` runs one side.

The recipe is the official `main_pretrain.py` one at a small scale: RandomResizedCrop(size,
scale 0.2-1, bicubic) + horizontal flip, ImageNet mean/std, `norm_pix_loss`, mask 0.75, AdamW
(0.9, 0.95), weight decay 0.05 on matrices (none on biases and norms), lr = base_lr x batch / 256
with a per-iteration linear warmup and half-cycle cosine, drop_last batches.

The reference loop is the official one written from facebookresearch/mae (`main_pretrain.py`,
`engine_pretrain.py`, `util/lr_sched.py`): torchvision's `ImageFolder` with the official
transforms, a shuffling `DataLoader`, `OfficialMAE` (benchmarks/official_mae.py: the official
model and initialisation), `torch.optim.AdamW` over the official parameter groups, the lr set
before every iteration, and the loss of every iteration logged as `loss.item()`. Its weights are
saved as the official `checkpoint-N.pth`, which mae_jax reads directly.

Diagnostics, each printing a table (docs/numerics.md has what they showed), run as
`python -m benchmarks.official_diagnostics --diagnose=NAME` with the flags above:
  --diagnose=init     the loss on one batch from each side's own initialisation, over seeds, and
                      every parameter tensor's mean and standard deviation on both sides;
  --diagnose=augment  crop area / aspect / pixel statistics of mae_jax's train batches against
                      torchvision's RandomResizedCrop on the same folder, and with --weights the
                      loss of one trained model on both pipelines' batches;
  --diagnose=parity   N steps of both training steps from identical weights, batches and masking
                      noise (multi-step parity): the two loss curves and the weights' drift;
  --diagnose=swap     both loops, as users run them, for N steps from their own and from the other
                      side's initial weights for each seed: what the early loss follows.

torch, torchvision and timm come with the dev extra (pip install -e ".[dev]").
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Model shapes: (patch, encoder width, depth, heads, decoder width, depth, heads).
SHAPES = {
    "small": (4, 64, 2, 2, 32, 1, 2),      # mae_jax's tiny preset
    "medium": (4, 128, 4, 4, 64, 2, 2),
}


def recipe(shape="small", image_size=32, batch=256, epochs=3, warmup_epochs=1, base_lr=1.5e-3,
           workers=2) -> dict:
  """The model and recipe both sides train, as one flat dict."""
  patch, ew, ed, eh, dw, dd, dh = SHAPES[shape]
  return dict(image_size=image_size, patch=patch, enc_width=ew, enc_depth=ed, enc_heads=eh,
              dec_width=dw, dec_depth=dd, dec_heads=dh, mask_ratio=0.75, norm_pix_loss=True,
              batch=batch, epochs=epochs, warmup_epochs=warmup_epochs, base_lr=base_lr,
              weight_decay=0.05, crop_scale=(0.2, 1.0), workers=workers)


def recipe_from_args(args) -> dict:
  return recipe(args.shape, args.image_size, args.batch, args.epochs, args.warmup_epochs,
                args.base_lr, args.workers)


# ----------------------------------------------------------------------------
# The reference: the official pretraining loop.
# ----------------------------------------------------------------------------
def official_transform(r: dict):
  """The official train transform: RandomResizedCrop (bicubic), flip, ToTensor, Normalize."""
  from benchmarks import torch_cpu
  transforms = torch_cpu.tolerant_import("torchvision.transforms")
  return transforms.Compose([
      transforms.RandomResizedCrop(r["image_size"], scale=tuple(r["crop_scale"]), interpolation=3),
      transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])


def official_model(r: dict):
  from benchmarks import official_mae
  return official_mae.OfficialMAE(
      img_size=r["image_size"], patch_size=r["patch"], embed_dim=r["enc_width"],
      depth=r["enc_depth"], num_heads=r["enc_heads"], decoder_embed_dim=r["dec_width"],
      decoder_depth=r["dec_depth"], decoder_num_heads=r["dec_heads"],
      norm_pix_loss=r["norm_pix_loss"], mask_ratio=r["mask_ratio"])


def official_pretrain(folder: str, out: str, r: dict, seed: int, threads: int,
                      init_from: str = "", max_steps: int = 0) -> None:
  """The official main_pretrain.py loop on `folder`/train; writes out/metrics.jsonl (one row per
  iteration: step, loss, lr), out/checkpoint-{epochs-1}.pth and out/done.json. `init_from`: an
  official state dict (.pth) to start from instead of the seed's initialisation; `max_steps` > 0
  stops after that many iterations (the schedule unchanged)."""
  import torch
  from benchmarks import official_mae
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  np.random.seed(seed)
  dataset = official_mae.ImageFolder(os.path.join(folder, "train"), official_transform(r))
  loader = torch.utils.data.DataLoader(
      dataset, batch_size=r["batch"], shuffle=True, num_workers=r["workers"], drop_last=True,
      generator=torch.Generator().manual_seed(seed), persistent_workers=r["workers"] > 0,
      # Forked workers of a process that has started JAX's threads may deadlock: spawn them then.
      multiprocessing_context="spawn" if r["workers"] and "jax" in sys.modules else None)
  model = official_model(r).train()
  if init_from:
    model.load_state_dict(torch.load(init_from)["model"])
  lr = r["base_lr"] * r["batch"] / 256
  optimizer = torch.optim.AdamW(official_mae.param_groups(model, r["weight_decay"]), lr=lr,
                                betas=(0.9, 0.95))
  os.makedirs(out, exist_ok=True)
  start, step = time.time(), 0
  with open(os.path.join(out, "metrics.jsonl"), "w") as log:
    for epoch in range(r["epochs"]):
      for i, (samples, _) in enumerate(loader):
        now = official_mae.lr_at(i / len(loader) + epoch, lr, 0.0, r["warmup_epochs"], r["epochs"])
        for group in optimizer.param_groups:
          group["lr"] = now
        loss, _, _, _ = model(samples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        log.write(json.dumps({"step": step, "loss": loss.item(), "lr": now}) + "\n")
        if step == max_steps:
          break
      if step == max_steps:
        break
      print(f"official seed {seed}: epoch {epoch + 1}/{r['epochs']}, step {step}, "
            f"loss {loss.item():.4f}, {time.time() - start:.0f} s", flush=True)
  torch.save({"model": model.state_dict(), "epoch": r["epochs"] - 1,
              "args": argparse.Namespace(mask_ratio=r["mask_ratio"], norm_pix_loss=r["norm_pix_loss"])},
             os.path.join(out, f"checkpoint-{r['epochs'] - 1}.pth"))
  with open(os.path.join(out, "done.json"), "w") as f:
    json.dump({"seconds": time.time() - start, "steps": step}, f)


# ----------------------------------------------------------------------------
# mae_jax, run as a user runs it.
# ----------------------------------------------------------------------------
def mae_jax_fields(folder: str, r: dict, seed: int) -> dict:
  """The config fields that give `configs/cifar10_vit_t.py:tiny` the recipe."""
  return {"seed": seed, "dataset.source": "folder", "dataset.folder": folder,
       "dataset.image_size": r["image_size"], "dataset.mean": tuple(IMAGENET_MEAN),
       "dataset.std": tuple(IMAGENET_STD), "dataset.random_resized_crop": True,
       "dataset.crop_scale": tuple(r["crop_scale"]), "dataset.hflip": True,
       "dataset.interpolation": "bicubic", "dataset.num_workers": r["workers"],
       "model.patch_size": r["patch"], "model.encoder_width": r["enc_width"],
       "model.encoder_depth": r["enc_depth"], "model.encoder_heads": r["enc_heads"],
       "model.decoder_width": r["dec_width"], "model.decoder_depth": r["dec_depth"],
       "model.decoder_heads": r["dec_heads"], "model.mask_ratio": r["mask_ratio"],
       "model.norm_pix_loss": r["norm_pix_loss"], "batch_size": r["batch"],
       "num_epochs": r["epochs"], "warmup_epochs": r["warmup_epochs"], "max_steps": 0,
       "optimizer.base_lr": r["base_lr"], "optimizer.weight_decay": r["weight_decay"],
       "log_every_steps": 1, "figure_every_steps": 100000, "checkpoint_every_steps": 100000}


def mae_jax_overrides(folder: str, r: dict, seed: int, **changes) -> list:
  """`mae_jax_fields`, with `changes` (dotted names as keyword names with '__' for '.'), as
  command-line overrides."""
  fields = {**mae_jax_fields(folder, r, seed), **{k.replace("__", "."): v for k, v in changes.items()}}
  fmt = lambda v: "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else str(v)
  return [f"--config.{k}={fmt(v)}" for k, v in fields.items()]


CONFIG = "configs/cifar10_vit_t.py:tiny"


def run_logged(cmd: list, log_path: str) -> None:
  print("$ " + " ".join(cmd), flush=True)
  with open(log_path, "a") as log:
    result = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if result.returncode:
    sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}; see {log_path}")


def mae_jax_pretrain(folder: str, out: str, r: dict, seed: int, init_from: str = "",
                     max_steps: int = 0) -> None:
  """`python -m mae_jax.main` with the recipe (from the weights of `init_from` when given,
  stopping after `max_steps` when > 0), the workdir `out`; writes out/done.json."""
  start = time.time()
  os.makedirs(out, exist_ok=True)
  extra = [f"--pretrained={init_from}"] if init_from else []
  run_logged([sys.executable, "-m", "mae_jax.main", f"--config={CONFIG}", f"--workdir={out}"]
             + mae_jax_overrides(folder, r, seed, max_steps=max_steps) + extra,
             os.path.join(out, "stdout.log"))
  with open(os.path.join(out, "done.json"), "w") as f:
    json.dump({"seconds": time.time() - start}, f)


def evaluate(folder: str, pretrained: str, out: str, r: dict, args) -> dict:
  """`mae_jax.evaluate` of a run's weights (a workdir or an official .pth): results.json's metrics."""
  results = os.path.join(out, "results.json")
  if not os.path.exists(results):
    cmd = [sys.executable, "-m", "mae_jax.evaluate", f"--config={CONFIG}",
           f"--pretrained={pretrained}", f"--workdir={out}",
           f"--config.evaluate.num_images={args.eval_images}",
           f"--config.evaluate.knn_train_examples={args.knn_memory}"]
    os.makedirs(out, exist_ok=True)
    run_logged(cmd + mae_jax_overrides(folder, r, 0), os.path.join(out, "stdout.log"))
  with open(results) as f:
    return json.load(f)["metrics"]


def loss_curve(run_dir: str) -> np.ndarray:
  """The per-step training loss of a run, index 0 = step 1."""
  rows = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "loss" in row:
        rows[int(row["step"])] = float(row["loss"])
  return np.array([rows[s] for s in sorted(rows)])


# ----------------------------------------------------------------------------
# The comparison.
# ----------------------------------------------------------------------------
SUMMARY_ROWS = [
    ("initial loss (step 1)", lambda c, e, d: c[0]),
    ("mean loss, steps 1-20", lambda c, e, d: c[:20].mean()),
    ("mean loss, steps 31-50", lambda c, e, d: c[30:50].mean()),
    ("mean loss, steps 91-110", lambda c, e, d: c[90:110].mean()),
    ("loss at the end (last 20 steps)", lambda c, e, d: c[-20:].mean()),
    ("masked MSE (normalised), test", lambda c, e, d: e["masked_mse_normalized"]),
    ("kNN top-1", lambda c, e, d: e["knn_top1"]),
    ("wall time, pretraining (s)", lambda c, e, d: d["seconds"]),
]


def summary(runs: dict) -> str:
  """Markdown table: each row's per-seed values and mean ± std per side, and the difference of
  the means with its standard error (a difference of two or more standard errors is one the seeds
  can tell from seed noise)."""
  sides = [s for s in ("official", "mae_jax") if runs.get(s)]
  head = "| | " + " | ".join(f"{s}, seeds {'/'.join(str(k) for k in sorted(runs[s]))}" for s in sides)
  lines = [head + (" | mae_jax - official (standard error) |" if len(sides) == 2 else " |"),
           "|" + " --- |" * (len(sides) + 1 + (len(sides) == 2))]
  for name, fn in SUMMARY_ROWS:
    cells, means, sq_err = [], {}, 0.0
    digits = 1 if name.startswith(("kNN", "wall")) else 3
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
  r = recipe_from_args(args)
  folder = os.path.abspath(args.folder)
  seeds = [int(s) for s in args.seeds.split(",")]
  sides = [args.only] if args.only else ["official", "mae_jax"]
  root = os.path.join(os.path.abspath(args.out), args.shape)
  print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"recipe: {json.dumps(r)}", flush=True)
  runs = {s: {} for s in sides}
  for seed in seeds:
    for side in sides:
      run_dir = os.path.join(root, f"{side}_seed{seed}")
      if not os.path.exists(os.path.join(run_dir, "done.json")):
        if side == "official":
          official_pretrain(folder, run_dir, r, seed, args.threads)
        else:
          mae_jax_pretrain(folder, run_dir, r, seed)
      weights = (os.path.join(run_dir, f"checkpoint-{r['epochs'] - 1}.pth") if side == "official"
                 else run_dir)
      ev = evaluate(folder, weights, run_dir + "_eval", r, args)
      with open(os.path.join(run_dir, "done.json")) as f:
        done = json.load(f)
      runs[side][seed] = (loss_curve(run_dir), ev, done)
      c = runs[side][seed][0]
      print(f"{side} seed {seed}: {len(c)} steps, first-20 mean {c[:20].mean():.4f}, last-20 mean "
            f"{c[-20:].mean():.4f}, masked MSE {ev['masked_mse_normalized']:.4f}, kNN {ev['knn_top1']:.2f}",
            flush=True)
  table = summary(runs)
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write(table + "\n")
  print(table)


def arguments(diagnose: bool = False) -> argparse.ArgumentParser:
  """The comparison's flags (with `diagnose`, also official_diagnostics.py's)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--folder", required=True, help="image folder with train/<class>/ and test/<class>/")
  p.add_argument("--out", default="runs/vs_official")
  p.add_argument("--shape", choices=sorted(SHAPES), default="small")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--warmup_epochs", type=int, default=1)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--base_lr", type=float, default=1.5e-3)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--only", choices=["official", "mae_jax"], default="")
  p.add_argument("--workers", type=int, default=2, help="data loader processes on each side")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch's threads")
  p.add_argument("--eval_images", type=int, default=2000, help="test images evaluated")
  p.add_argument("--knn_memory", type=int, default=10000, help="train images in the kNN memory")
  if diagnose:
    p.add_argument("--diagnose", choices=["init", "augment", "parity", "swap"], required=True)
    p.add_argument("--steps", type=int, default=100, help="--diagnose=parity and swap: steps; "
                   "augment: batches / 10 compared")
    p.add_argument("--weights", default="", help="--diagnose=augment: an official checkpoint whose "
                   "loss on both pipelines' batches is compared (e.g. a run's checkpoint-2.pth)")
  return p


def main(argv=None):
  compare(arguments().parse_args(argv))


if __name__ == "__main__":
  main()
