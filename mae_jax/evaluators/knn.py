"""kNN top-1 of frozen encoder features: k nearest train features by cosine similarity, votes
weighted by exp(sim / temperature) (k 20, temperature 0.07 by default, as the kNN monitors of
the MAE literature)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import config_lib
from mae_jax.data import pipeline, sources
from mae_jax.models.mae import encoder_from_config
from mae_jax.runtime.parallel import Mesh
from mae_jax.runtime.progress import PassProgress


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
  progress = PassProgress("kNN features", len(source))
  for local in pipeline.eval_batches(config.dataset, source, size, ("image", "label")):
    batch = mesh.put_batch(local)
    f, y, valid = jax.device_get(fn(encoder_params, batch))
    out_f.append(f[valid > 0])
    out_y.append(y[valid > 0])
    progress.update(sum(len(x) for x in out_y))
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
