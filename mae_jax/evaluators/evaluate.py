"""The evaluation job: reconstruction quality and kNN top-1 of a pretrained MAE on the test
split, written to results.json (`python -m mae_jax.evaluate`)."""

import functools
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import config_lib
from mae_jax.data import pipeline, sources
from mae_jax.evaluators import figures, lpips
from mae_jax.io import metrics as metrics_lib
from mae_jax.io import weights
from mae_jax.io import workdir as workdir_lib
from mae_jax.models import masking
from mae_jax.models.curriculum_losses import depthwise_filter, laplacian
from mae_jax.models.mae import (
  encoder_from_config,
  mae_from_config,
  normalize_patches,
  patchify,
  unnormalize_patches,
  unpatchify,
)
from mae_jax.runtime.parallel import Mesh


# ----------------------------------------------------------------------------
# Image metrics (pure; per image).
# ----------------------------------------------------------------------------
def gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
  g /= g.sum()
  return np.outer(g, g).astype(np.float32)


def ssim(a, b, data_range: float = 1.0):
  """Mean SSIM per image of (N, H, W, C) images; the mean over the valid window positions and
  channels (= skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1))."""
  k = gaussian_kernel()
  if min(a.shape[1:3]) < k.shape[0]:  # images smaller than the window: shrink it
    k = gaussian_kernel(min(a.shape[1:3]) // 2 * 2 - 1, 1.5)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_a, mu_b = depthwise_filter(a, k), depthwise_filter(b, k)
  var_a = depthwise_filter(a * a, k) - mu_a**2
  var_b = depthwise_filter(b * b, k) - mu_b**2
  cov = depthwise_filter(a * b, k) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))


def psnr(a, b, data_range: float = 1.0):
  mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def reconstruction_sums(model, params, images_uint8, noise, valid, mean, std, lpips_weights: dict):
  """Pure: per-batch sums of every reconstruction metric over the valid images."""
  imgs = pipeline.normalize(images_uint8, mean, std)
  _, pred, mask = model.apply({"params": params}, imgs, noise)
  p, grid, c = model.patch_size, model.grid, imgs.shape[-1]
  target = patchify(imgs, p)
  w_mask = mask * valid[:, None]
  loss_target = normalize_patches(target) if model.norm_pix_loss else target
  sums = {"images": valid.sum(), "masked_patches": w_mask.sum(),
          "mse_norm": (jnp.mean((pred - loss_target) ** 2, -1) * w_mask).sum()}
  if model.norm_pix_loss:  # back to the dataset-normalised space with each patch's statistics
    pred = unnormalize_patches(pred, target)
  pred_px = pipeline.denormalize(unpatchify(pred, p, grid, c), mean, std)
  orig_px = pipeline.denormalize(imgs, mean, std)
  removed = unpatchify(jnp.repeat(mask[:, :, None], target.shape[-1], -1), p, grid, c)
  sums["mse_pixel"] = (jnp.mean((patchify(pred_px, p) - patchify(orig_px, p)) ** 2, -1) * w_mask).sum()
  pasted = orig_px * (1 - removed) + pred_px * removed
  sums["psnr"] = (psnr(pasted, orig_px) * valid).sum()
  sums["ssim"] = (ssim(pasted, orig_px) * valid).sum()
  lap_err = jnp.abs(laplacian(pred_px) - laplacian(orig_px)) * removed
  sums["laplacian_l1"] = (lap_err.sum(axis=(1, 2, 3)) * valid).sum()
  sums["masked_values"] = (removed.sum(axis=(1, 2, 3)) * valid).sum()
  for net, net_weights in lpips_weights.items():
    sums[f"lpips_{net}"] = (lpips.lpips(net_weights, pasted, orig_px, net) * valid).sum()
  return sums


def summarize(sums: dict) -> dict:
  out = {"images": int(sums["images"]),
         "masked_mse_normalized": sums["mse_norm"] / sums["masked_patches"],
         "masked_mse_pixel": sums["mse_pixel"] / sums["masked_patches"],
         "psnr": sums["psnr"] / sums["images"],
         "ssim": sums["ssim"] / sums["images"],
         "masked_laplacian_l1": sums["laplacian_l1"] / sums["masked_values"]}
  for k in sums:
    if k.startswith("lpips_"):
      out[k] = sums[k] / sums["images"]
  return out


# ----------------------------------------------------------------------------
# kNN on frozen features.
# ----------------------------------------------------------------------------
def extract_features(config, mesh: Mesh, encoder, encoder_params, source, global_pool: bool):
  """L2-normalised features of every record of `source` (host numpy) and their labels."""
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)

  def feats(params, batch):
    tokens, _, _ = encoder.apply({"params": params}, pipeline.normalize(batch["image"], mean, std))
    f = (tokens[:, 1:].mean(1) if global_pool else tokens[:, 0]).astype(jnp.float32)
    f = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    return f, batch["label"], batch["valid"]

  fn = jax.jit(feats, out_shardings=mesh.replicated)  # replicated: every process gets all rows
  size = config_lib.eval_batch_size(config)
  out_f, out_y = [], []
  for local in pipeline.eval_batches(config.dataset, source, size, ("image", "label")):
    batch = mesh.put_batch(local)
    f, y, valid = jax.device_get(fn(encoder_params, batch))
    out_f.append(f[valid > 0])
    out_y.append(y[valid > 0])
  return np.concatenate(out_f), np.concatenate(out_y)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def knn_predict(train_f, train_y, test_f, k: int, num_classes: int, temperature: float):
  """Weighted kNN (as DINO's): the k most cosine-similar memory features vote exp(sim / T)."""
  sim = test_f @ train_f.T
  top_sim, top_idx = jax.lax.top_k(sim, k)
  votes = jax.nn.one_hot(train_y[top_idx], num_classes) * jnp.exp(top_sim / temperature)[..., None]
  return jnp.argmax(votes.sum(1), axis=-1)


def knn_accuracy(train_f, train_y, test_f, test_y, k: int, temperature: float, chunk: int = 1024) -> float:
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  k = min(k, len(train_f))
  hits = 0
  for i in range(0, len(test_f), chunk):
    pred = knn_predict(train_f, train_y, test_f[i:i + chunk], k, num_classes, temperature)
    hits += int((np.asarray(pred) == test_y[i:i + chunk]).sum())
  return 100.0 * hits / len(test_f)


def knn_eval(config, mesh: Mesh, encoder_params, train_source, test_source) -> float:
  e = config.evaluate
  encoder = encoder_from_config(config.model, config.dataset.image_size, remat="none")
  pool = config.probe.global_pool
  train_f, train_y = extract_features(config, mesh, encoder, encoder_params,
                                      sources.evenly_spaced(train_source, e.knn_train_examples), pool)
  test_f, test_y = extract_features(config, mesh, encoder, encoder_params,
                                    sources.evenly_spaced(test_source, e.num_images), pool)
  return knn_accuracy(train_f, train_y, test_f, test_y, e.knn_k, e.knn_temperature)


# ----------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------
@workdir_lib.holding_workdir
def run(config, workdir: str, pretrained: str, pretrained_step: Optional[int] = None) -> dict:
  e = config.evaluate
  mesh = Mesh()
  mask_ratio = e.mask_ratio if e.mask_ratio >= 0 else config.model.mask_ratio
  # Evaluation runs unrolled (restore_params gives that layout, whichever pretraining used).
  model = mae_from_config(config.model, config.dataset.image_size, scan_layers=False).clone(
      mask_ratio=mask_ratio)
  lpips_weights = {net: lpips.load_weights(path, net)
                   for net, path in (("alex", e.lpips_alex), ("vgg", e.lpips_vgg)) if path}
  params, step = weights.load_mae_params(pretrained, config, "reconstruction", pretrained_step)
  params = mesh.replicate(params)
  train_source, test_source = sources.labelled_sources(config.dataset)
  test_source = sources.evenly_spaced(test_source, e.num_images)
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)

  sums_fn = jax.jit(functools.partial(reconstruction_sums, model, mean=mean, std=std,
                                      lpips_weights=lpips_weights), out_shardings=mesh.replicated)
  sampling = config.model.mask_sampling
  batch_size = config_lib.eval_batch_size(config)
  noise_for = lambda i: masking.fixed_noise(sampling, config.seed + 2 + i, batch_size, model.grid, mask_ratio)
  totals = None
  for i, local in enumerate(pipeline.eval_batches(config.dataset, test_source, batch_size, ("image",))):
    batch = mesh.put_batch(local)
    sums = sums_fn(params, batch["image"], mesh.replicate(noise_for(i)), batch["valid"])
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  results = summarize({k: float(v) for k, v in jax.device_get(totals).items()})
  results["mask_ratio"] = mask_ratio
  results["knn_top1"] = knn_eval(config, mesh, params["encoder"], train_source, test_source)

  n = min(e.figure_images, len(test_source))
  images = pipeline.load_images(test_source, range(n), config.dataset.image_size, config.dataset.interpolation)
  noise = noise_for(0)[:n]
  panels = jax.jit(functools.partial(figures.reconstruction_panels, model, mean=mean, std=std),
                   out_shardings=mesh.replicated)
  cols = jax.device_get(panels(params, mesh.replicate(images), mesh.replicate(np.asarray(noise))))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    figures.save_grid(os.path.join(workdir, "reconstruction.png"), cols, figures.PANEL_TITLES)
    record = {"metrics": results, "pretrained": {"workdir": os.path.abspath(pretrained), "step": step},
              "knn_labels": sources.subset_info(train_source), "config": config.to_dict()}
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(record, f, indent=2)
    writer = metrics_lib.MetricWriter(workdir, keep_row=lambda s: s != step)  # one row per step
    writer.write(step, {f"eval/{k}": v for k, v in results.items()})
    writer.close()
  metrics_lib.log("evaluate: " + " | ".join(
      f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in results.items()))
  return results
