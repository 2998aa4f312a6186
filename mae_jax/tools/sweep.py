"""Ablation studies: one config per run from a `sweep` section, the jobs of each, and the
reports (`python -m mae_jax.sweep`)."""

import copy
import csv
import json
import os

from mae_jax import config_check, errors
from mae_jax.runtime import durable

JOBS = ("pretrain", "probe", "finetune", "evaluate")


def run_config(study, overrides: dict):
  """The study's config without its sweep section, with one run's fields set."""
  c = copy.deepcopy(study)
  with c.unlocked():
    del c["sweep"]
  from mae_jax import config_lib
  return config_lib.set_fields(c, overrides)


def _read_json(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def forward_gflops(config) -> float:
  """GFLOP per image of the MAE forward pass (XLA's cost analysis), for the FLOPs columns."""
  import jax
  import jax.numpy as jnp

  from mae_jax.models.mae import mae_from_config
  m = mae_from_config(config.model, config.dataset.image_size)
  size = config.dataset.image_size
  imgs, noise = jnp.zeros((1, size, size, 3)), jnp.zeros((1, m.num_patches))
  params = jax.eval_shape(m.init, jax.random.PRNGKey(0), imgs, noise)
  cost = jax.jit(m.apply).lower(params, imgs, noise).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) / 1e9


def run_one(study, label: str, overrides: dict, workdir: str) -> dict:
  """Runs (or skips, or resumes) every job of one run; returns its row of results."""
  from mae_jax.evaluators import evaluate
  from mae_jax.io import metrics as metrics_lib
  from mae_jax.train import classify, pretrain
  c = run_config(study, overrides)
  root = os.path.join(workdir, label)
  pre_dir = os.path.join(root, "pretrain")
  for job in study.sweep.jobs:
    job_dir = os.path.join(root, job)
    if _read_json(os.path.join(job_dir, "results.json")) is not None:
      metrics_lib.log(f"[{label}] {job}: done, skipped")
      continue
    metrics_lib.log(f"[{label}] {job} ...")
    if job == "pretrain":
      pretrain.run(c, job_dir)
      durable.write_json(os.path.join(job_dir, "results.json"), {"metrics": pretrain.summary(job_dir)})
    elif job in ("probe", "finetune"):
      classify.run(c, job_dir, pre_dir, job)
    elif job == "evaluate":
      evaluate.run(c, job_dir, pre_dir)
  return collect_row(study, label, overrides, workdir)


def collect_row(study, label: str, overrides: dict, workdir: str) -> dict:
  from mae_jax.train import pretrain
  row = {"run": label, **{k.split(".")[-1]: v for k, v in overrides.items()}}
  row["gflops_per_image"] = round(forward_gflops(run_config(study, overrides)), 4)
  for job in study.sweep.jobs:
    job_dir = os.path.join(workdir, label, job)
    r = _read_json(os.path.join(job_dir, "results.json"))
    if r is not None and job == "pretrain":
      # results.json marks the job done; metrics.jsonl stays the record, so a results.json
      # written before the loss terms were summarised still reports every term.
      r = {"metrics": pretrain.summary(job_dir)}
    for k, v in ((r or {}).get("metrics") or {}).items():
      if isinstance(v, (int, float)) and k not in ("examples", "images", "steps", "mask_ratio"):
        row[f"{job}_{k}"] = round(float(v), 4)
  return row


def write_reports(study, rows: list, workdir: str) -> None:
  if not rows:
    return
  swept = [k.split(".")[-1] for _, overrides in study.sweep.runs for k in overrides]
  columns = list(dict.fromkeys(["run", *swept, *(k for r in rows for k in r)]))
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
  base = min((r["gflops_per_image"] for r in rows), default=0) or 1.0
  lines = [f"### {study.sweep.title}", "", "| " + " | ".join(columns + ["FLOPs"]) + " |",
           "|" + " --- |" * (len(columns) + 1)]
  for r in rows:
    cells = [_fmt(r.get(k, "")) for k in columns] + [f"{r['gflops_per_image'] / base:.1f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", f"Metric of the plot: `{study.sweep.metric}`. FLOPs: the MAE forward pass per image "
            "relative to the cheapest run (XLA cost analysis)."]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  _plots(study, rows, workdir)


def _fmt(v):
  return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plots(study, rows, workdir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  metric, axis = study.sweep.metric, study.sweep.axis
  xs = [r.get(axis, r["run"]) for r in rows]
  ys = [r.get(metric) for r in rows]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  if all(isinstance(x, (int, float)) for x in xs):
    pts = sorted((x, y) for x, y in zip(xs, ys) if y is not None)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
  else:
    ax.bar([str(x) for x in xs], [y or 0 for y in ys])
  ax.set_xlabel(axis)
  ax.set_ylabel(metric)
  ax.set_title(study.sweep.title)
  fig.tight_layout()
  _save_png(fig, os.path.join(workdir, f"{metric}.png"))
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6, 4))
  for r in rows:
    path = os.path.join(workdir, r["run"], "pretrain", "metrics.jsonl")
    if os.path.exists(path):
      pts = [json.loads(line) for line in open(path)]
      pts = [p for p in pts if "loss" in p]
      ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], label=r["run"])
  ax.set_xlabel("step")
  ax.set_ylabel("pretraining loss")
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save_png(fig, os.path.join(workdir, "loss_curves.png"))
  plt.close(fig)


def run(study, workdir: str, only: str = "", report_only: bool = False) -> list:
  """Runs the study's runs (all, or the one labelled `only`), then writes the reports."""
  from mae_jax.io import metrics as metrics_lib
  os.makedirs(workdir, exist_ok=True)
  runs = [(label, dict(overrides)) for label, overrides in study.sweep.runs]
  labels = [label for label, _ in runs]
  if only and only not in labels:
    raise errors.ConfigError(f"--run={only!r} is not a run of this study; runs: {', '.join(labels)}")
  for label, overrides in runs:  # every run's config is checked before any work starts
    try:
      config_check.validate(run_config(study, overrides), study.sweep.jobs)
    except errors.ConfigError as e:
      raise errors.ConfigError(f"run {label!r}: {e}") from None
  rows = []
  for label, overrides in runs:
    if report_only or (only and label != only):
      rows.append(collect_row(study, label, overrides, workdir))
    else:
      rows.append(run_one(study, label, overrides, workdir))
  write_reports(study, rows, workdir)
  metrics_lib.log(f"study '{study.sweep.title}': {len(rows)} runs -> {workdir}/results.md")
  return rows


def _save_png(fig, path: str) -> None:
  with durable.replacing(path) as tmp, open(tmp, "wb") as f:
    fig.savefig(f, dpi=120, format="png")
