"""The label-efficiency study: its parts, each a job in its own folder, and its reports
(`python -m mae_jax.study`)."""

import dataclasses
import json
import os
import time
from typing import Optional

from mae_jax import config_check, errors
from mae_jax.runtime import durable

JOBS = ("pretrain", "finetune", "probe", "knn")
PRETRAIN = "pretrain"


@dataclasses.dataclass(frozen=True)
class Part:
  """One job of the study: `job` on the encoder `encoder` ('mae': the pretraining's, at
  `epoch` (0: its last checkpoint), or 'random'), at label `fraction` with `seed`."""
  name: str
  job: str
  encoder: str = "mae"
  fraction: float = 1.0
  seed: int = 0
  epoch: int = 0
  overrides: tuple = ()  # the study's per-fraction config changes, (dotted name, value) pairs


def _pct(fraction: float) -> str:
  return f"{fraction * 100:g}pct"


def parts(study) -> list:
  """Every part of the study, pretraining first, in the order they run."""
  s = study.study
  out = [Part(PRETRAIN, "pretrain")]
  for fraction, seeds, overrides in s.labels:
    over = tuple(sorted(dict(overrides).items()))
    for seed in range(seeds):
      for job in s.jobs:
        for encoder in ("mae", "random"):
          name = f"{job}_{'scratch' if job == 'finetune' and encoder == 'random' else encoder}"
          out.append(Part(f"{name}_{_pct(fraction)}_seed{seed}", job, encoder, fraction, seed,
                          overrides=over))
  along = dict((f, dict(o)) for f, _, o in s.labels)
  for epoch in s.along_epochs:
    for job in s.along_jobs:
      out.append(Part(f"{job}_mae_{_pct(s.along_fraction)}_epoch{epoch}", job, "mae",
                      s.along_fraction, 0, epoch,
                      tuple(sorted(along.get(s.along_fraction, {}).items()))))
  return out


def part_config(study, part: Part):
  """The study's config for one part: its label subset and seed, and the fraction's changes."""
  import copy

  from mae_jax import config_lib
  c = copy.deepcopy(study)
  with c.unlocked():
    del c["study"]
  if part.job == "pretrain":
    return c
  return config_lib.set_fields(c, {"dataset.label_fraction": part.fraction,
                                   "dataset.label_seed": part.seed, "seed": part.seed,
                                   **dict(part.overrides)})


def pretrained_step(study, epoch: int) -> Optional[int]:
  """The pretraining step at the end of `epoch` (None: the last checkpoint)."""
  if not epoch:
    return None
  from mae_jax.data import sources
  from mae_jax.train import loop
  source = sources.make_source(study.dataset, sources.resolved_splits(study.dataset)[0])
  return epoch * loop.steps_per_epoch(len(source), study.batch_size)


def knn_job(config, workdir: str, pretrained: Optional[str], step: Optional[int]) -> dict:
  """kNN top-1 of the encoder of `pretrained` (at `step`), or without it of the MAE's random
  initialisation (config.seed), with the labelled subset as memory; writes results.json."""
  import jax

  from mae_jax.data import sources
  from mae_jax.evaluators import knn
  from mae_jax.io import weights
  from mae_jax.models.mae import mae_from_config
  from mae_jax.runtime.parallel import Mesh
  from mae_jax.train import pretrain
  if pretrained:
    params, step = weights.load_mae_params(pretrained, config, "kNN", step)
    encoder = params["encoder"]
  else:
    model = mae_from_config(config.model, config.dataset.image_size, scan_layers=False)
    encoder = pretrain.init_params(model, jax.random.split(jax.random.PRNGKey(config.seed))[0])["encoder"]
  train, test = sources.labelled_sources(config.dataset)
  top1 = knn.knn_eval(config, Mesh(), encoder, train, test)
  result = {"metrics": {"top1": top1}, "labels": sources.subset_info(train),
            "pretrained": {"workdir": pretrained, "step": step} if pretrained else None}
  os.makedirs(workdir, exist_ok=True)
  durable.write_json(os.path.join(workdir, "results.json"), result)
  return result


def run_part(study, part: Part, workdir: str) -> None:
  """Runs (or resumes) one part in workdir/<part.name>; adds this invocation's wall time to the
  part's (an interrupted part that resumes is charged for every invocation)."""
  from mae_jax.train import classify, pretrain
  c = part_config(study, part)
  out = os.path.join(workdir, part.name)
  start = time.time()
  pre_dir = os.path.join(workdir, PRETRAIN)
  pretrained = pre_dir if part.encoder == "mae" else None
  step = pretrained_step(study, part.epoch) if pretrained else None
  try:
    if part.job == "pretrain":
      pretrain.run(c, out)
      durable.write_json(os.path.join(out, "results.json"), {"metrics": pretrain.summary(out)})
    elif part.job == "knn":
      knn_job(c, out, pretrained, step)
    else:
      classify.run(c, out, pretrained, part.job, step)
  finally:  # also on Ctrl-C / SIGTERM (the trainer saves, then raises)
    _add_wall_time(out, time.time() - start)


def _add_wall_time(out: str, seconds: float) -> None:
  path = os.path.join(out, "wall_time.json")
  t = _read(path) or {}
  os.makedirs(out, exist_ok=True)
  durable.write_json(path, {"seconds": t.get("seconds", 0.0) + seconds,
                            "invocations": t.get("invocations", 0) + 1})


def _read(path: str):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def collect(study, workdir: str) -> list:
  """One row per finished part: its fields, top-1 (pretraining: final loss) and wall time."""
  rows = []
  for p in parts(study):
    r = _read(os.path.join(workdir, p.name, "results.json"))
    if r is None:
      continue
    t = _read(os.path.join(workdir, p.name, "wall_time.json")) or {}
    value = r["metrics"].get("top1", r["metrics"].get("final_loss"))
    rows.append({"part": p.name, "job": p.job, "encoder": p.encoder, "fraction": p.fraction,
                 "seed": p.seed, "epoch": p.epoch, "value": value,
                 "examples": (r.get("labels") or {}).get("examples"), "seconds": t.get("seconds")})
  return rows


def _stats(values) -> str:
  import numpy as np
  if not values:
    return ""
  v = np.asarray(values, float)
  return f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (n={len(v)})" if len(v) > 1 else f"{v[0]:.2f}"


def _values(rows, **match):
  return [r["value"] for r in rows if all(r[k] == v for k, v in match.items())]


def report(study, workdir: str, rows: list) -> str:
  """results.md: accuracy against labels (MAE vs random/scratch, with the gap), accuracy along
  pretraining, and compute per part; results.json; the two plots."""
  import numpy as np
  s = study.study
  total_epochs = study.num_epochs
  lines = [f"# {s.title}", "", "Top-1 on the whole test split, mean ± std over seeds (label subsets "
           "differ by seed).", "",
           "| labels | fine-tune from MAE | from scratch | gap | probe, MAE | probe, random | gap | "
           "kNN, MAE | kNN, random |", "|" + " --- |" * 9]
  for fraction, _, _ in s.labels:
    at = dict(fraction=fraction, epoch=0)
    cells = []
    for job, (a, b) in (("finetune", ("mae", "random")), ("probe", ("mae", "random")),
                        ("knn", ("mae", "random"))):
      va, vb = _values(rows, job=job, encoder=a, **at), _values(rows, job=job, encoder=b, **at)
      cells += [_stats(va), _stats(vb)]
      if job != "knn":
        cells.append(f"{np.mean(va) - np.mean(vb):+.2f}" if va and vb else "")
    examples = next((r["examples"] for r in rows if r["fraction"] == fraction and r["examples"]), None)
    label = f"{fraction * 100:g}%" + (f" ({examples:,})" if examples else "")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", f"Along pretraining ({s.along_fraction * 100:g}% labels, seed 0; the last row is "
            "the final encoder):", "", "| pretraining epoch | " + " | ".join(s.along_jobs) + " |",
            "|" + " --- |" * (len(s.along_jobs) + 1)]
  along = {}
  for epoch in [*s.along_epochs, total_epochs]:
    e = 0 if epoch == total_epochs else epoch
    vals = [(_values(rows, job=j, encoder="mae", fraction=s.along_fraction, seed=0, epoch=e) or [None])[0]
            for j in s.along_jobs]
    along[epoch] = vals
    lines.append(f"| {epoch} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |")
  lines += ["", "Compute per part kind (this machine):", "", "| part | runs | wall time |",
            "| --- | --- | --- |"]
  kinds = {}
  for r in rows:
    kind = r["part"].split("_seed")[0].split("_epoch")[0] + ("_along" if r["epoch"] else "")
    kinds.setdefault(kind, []).append(r["seconds"] or 0.0)
  for kind, secs in kinds.items():
    lines.append(f"| {kind} | {len(secs)} | {sum(secs) / 60:.1f} min |")
  total = sum(r["seconds"] or 0.0 for r in rows)
  lines += [f"| all | {len(rows)} | {total / 60:.1f} min |"]
  text = "\n".join(lines) + "\n"
  durable.write_text(os.path.join(workdir, "results.md"), text)
  durable.write_json(os.path.join(workdir, "results.json"),
                     {"parts": rows, "along": {str(k): v for k, v in along.items()}})
  _plots(study, rows, along, workdir)
  return text


def _plots(study, rows, along, workdir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  s = study.study
  fractions = [f for f, _, _ in s.labels]
  fig, ax = plt.subplots(figsize=(5.5, 4))
  styles = {("finetune", "mae"): ("fine-tune, MAE", "C0", "-"),
            ("finetune", "random"): ("fine-tune, scratch", "C0", "--"),
            ("probe", "mae"): ("probe, MAE", "C1", "-"), ("probe", "random"): ("probe, random", "C1", "--"),
            ("knn", "mae"): ("kNN, MAE", "C2", "-"), ("knn", "random"): ("kNN, random", "C2", "--")}
  for (job, enc), (label, color, ls) in styles.items():
    pts = [(f * 100, _values(rows, job=job, encoder=enc, fraction=f, epoch=0)) for f in fractions]
    pts = [(x, np.mean(v), np.std(v)) for x, v in pts if v]
    if pts:
      x, m, sd = map(np.array, zip(*pts))
      # Hollow markers for the random/scratch side: the legend's short lines hide the dashes.
      ax.errorbar(x, m, yerr=sd, color=color, ls=ls, marker="o", mfc="white" if enc == "random" else color,
                  capsize=3, label=label)
  ax.set_xscale("log")
  ax.set_xticks([f * 100 for f in fractions], [f"{f * 100:g}%" for f in fractions])
  ax.minorticks_off()
  _save(fig, ax, "labelled training images", "Accuracy against labels", os.path.join(workdir, "labels.png"))
  fig, ax = plt.subplots(figsize=(5.5, 4))
  epochs = sorted(along)
  for i, job in enumerate(s.along_jobs):
    pts = [(e, along[e][i]) for e in epochs if along[e][i] is not None]
    if pts:
      name = {"finetune": "fine-tune", "probe": "linear probe", "knn": "kNN"}.get(job, job)
      ax.plot(*zip(*pts), marker="o", label=f"{name}, MAE ({s.along_fraction * 100:g}% labels)")
  _save(fig, ax, "pretraining epoch", "Accuracy along pretraining", os.path.join(workdir, "pretraining.png"))


def _save(fig, ax, xlabel: str, title: str, path: str) -> None:
  import matplotlib.pyplot as plt
  ax.set_xlabel(xlabel)
  ax.set_ylabel("test top-1 (%)")
  ax.set_title(title)
  ax.legend(fontsize=7, handlelength=3)
  fig.tight_layout()
  with durable.replacing(path) as tmp, open(tmp, "wb") as f:
    fig.savefig(f, dpi=120, format="png")
  plt.close(fig)


def run(study, workdir: str, only=(), report_only: bool = False) -> str:
  """Runs the study's parts (all, or those named in `only`) in order, then writes the reports."""
  from mae_jax.io import metrics as metrics_lib
  all_parts = parts(study)
  names = [p.name for p in all_parts]
  unknown = [n for n in only if n not in names]
  if unknown:
    raise errors.ConfigError(f"--part: {', '.join(unknown)} not in this study; --list names its parts")
  for p in all_parts:  # every part's config is checked before any work starts
    try:
      config_check.validate(part_config(study, p), (p.job,) if p.job != "knn" else ("pretrain",))
    except errors.ConfigError as e:
      raise errors.ConfigError(f"part {p.name!r}: {e}") from None
  os.makedirs(workdir, exist_ok=True)
  todo = [p for p in all_parts if not only or p.name in only]
  if not report_only:
    for i, p in enumerate(todo, 1):
      if os.path.exists(os.path.join(workdir, p.name, "results.json")):
        continue
      if p.encoder == "mae" and p.job != "pretrain" and not os.path.exists(
          os.path.join(workdir, PRETRAIN, "results.json")):
        raise errors.ConfigError(f"part {p.name!r} needs the pretraining; run the part "
                                     f"'{PRETRAIN}' first (or the whole study)")
      done = sum(os.path.exists(os.path.join(workdir, q.name, "results.json")) for q in all_parts)
      metrics_lib.log(f"study: part {p.name} ({done} of {len(all_parts)} parts done) ...")
      run_part(study, p, workdir)
  text = report(study, workdir, collect(study, workdir))
  metrics_lib.log(f"study '{study.study.title}' -> {workdir}/results.md\n{text}")
  return text
