"""The evaluation job: reconstruction quality and kNN top-1 of a pretrained MAE on the test
split, written to results.json (`python -m mae_jax.evaluate`)."""

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import config_lib
from mae_jax.data import pipeline, sources
from mae_jax.evaluators import figures, knn, lpips, reconstruction
from mae_jax.io import metrics as metrics_lib
from mae_jax.io import weights
from mae_jax.io import workdir as workdir_lib
from mae_jax.models import masking
from mae_jax.models.mae import (
  mae_from_config,
)
from mae_jax.runtime import durable, paths
from mae_jax.runtime.parallel import Mesh


# ----------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------
@workdir_lib.holding_workdir
def run(config, workdir: str, pretrained: str, pretrained_step: Optional[int] = None) -> dict:
  e = config.evaluate
  mesh = Mesh()
  mask_ratio = config.model.mask_ratio if e.mask_ratio is None else e.mask_ratio
  # Evaluation runs unrolled (restore_params gives that layout, whichever pretraining used).
  model = mae_from_config(config.model, config.dataset.image_size, scan_layers=False).clone(
      mask_ratio=mask_ratio)
  lpips_weights = {net: lpips.load_weights(path, net)
                   for net, path in (("alex", e.lpips_alex), ("vgg", e.lpips_vgg)) if path is not None}
  params, step = weights.load_mae_params(pretrained, config, "reconstruction", pretrained_step)
  params = mesh.replicate(params)
  train_source, test_source = sources.labelled_sources(config.dataset)
  test_source = sources.evenly_spaced(test_source, e.num_images)
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)

  sums_fn = jax.jit(functools.partial(reconstruction.reconstruction_sums, model, mean=mean, std=std,
                                      lpips_weights=lpips_weights), out_shardings=mesh.replicated)
  sampling = config.model.mask_sampling
  batch_size = config_lib.eval_batch_size(config)
  noise_for = lambda i: masking.fixed_noise(sampling, config.seed + 2 + i, batch_size, model.grid, mask_ratio)
  totals = None
  for i, local in enumerate(pipeline.eval_batches(config.dataset, test_source, batch_size, ("image",))):
    batch = mesh.put_batch(local)
    sums = sums_fn(params, batch["image"], mesh.replicate(noise_for(i)), batch["valid"])
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  results = reconstruction.summarize({k: float(v) for k, v in jax.device_get(totals).items()})
  results["mask_ratio"] = mask_ratio
  results["knn_top1"] = knn.knn_eval(config, mesh, params["encoder"], train_source, test_source)

  n = min(e.figure_images, len(test_source))
  images = pipeline.load_images(test_source, range(n), config.dataset.image_size, config.dataset.interpolation)
  noise = noise_for(0)[:n]
  panels = jax.jit(functools.partial(figures.reconstruction_panels, model, mean=mean, std=std),
                   out_shardings=mesh.replicated)
  cols = jax.device_get(panels(params, mesh.replicate(images), mesh.replicate(np.asarray(noise))))
  if jax.process_index() == 0:
    paths.makedirs(workdir)
    figures.save_grid(os.path.join(workdir, "reconstruction.png"), cols, figures.PANEL_TITLES)
    record = {"metrics": results, "pretrained": {"workdir": paths.absolute(pretrained), "step": step},
              "knn_labels": sources.subset_info(train_source), "config": config.to_dict()}
    durable.write_json(os.path.join(workdir, "results.json"), record)
    writer = metrics_lib.MetricWriter(workdir, keep_row=lambda s: s != step)  # one row per step
    writer.write(step, {f"eval/{k}": v for k, v in results.items()})
    writer.close()
  metrics_lib.log("evaluate: " + " | ".join(
      f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
  return results
