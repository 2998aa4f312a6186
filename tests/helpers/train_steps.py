"""Runs N pretraining steps on fixed global batches of real images and prints the losses (JSON),
then the labels and feature sum of an evaluation pass over 9 images.

Used by tests in fresh interpreters: with XLA_FLAGS=--xla_force_host_platform_device_count=8
(8 simulated devices), or as one of several processes (--num_processes, --process_id, --port)
joined by jax.distributed over CPU collectives. Every setting sees the same global batches, so
their losses must agree with the single-device run.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--folder", required=True)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--fsdp", action="store_true", help="shard the train state (FSDP)")
  p.add_argument("--accum", type=int, default=1, help="micro-batches per step (grad_accum_steps)")
  a = p.parse_args()

  from mae_jax.runtime import parallel
  if a.num_processes > 1:
    parallel.initialize_distributed(f"localhost:{a.port}", a.num_processes, a.process_id)
  import jax

  from mae_jax.data import pipeline, sources
  from mae_jax.train import optim, pretrain

  from conftest import tiny_config

  c = tiny_config(a.folder)
  c.sharding.fsdp = a.fsdp
  c.batch_size, c.grad_accum_steps = a.batch, a.accum
  mesh = parallel.Mesh()
  step, init, _, sharding = pretrain.sharded_step(c, mesh, optim.warmup_cosine(1e-3, 0.0, 2, a.steps))
  state = jax.jit(init, out_shardings=sharding)()
  # Per parameter: its global shape and the shape one device holds.
  shards = {jax.tree_util.keystr(path): [list(x.shape), list(x.addressable_shards[0].data.shape)]
            for path, x in jax.tree_util.tree_leaves_with_path(state.params)}
  src = sources.ImageFolderSource(a.folder, "test")
  k, n, i = a.accum, jax.process_count(), jax.process_index()
  losses = []
  for t in range(a.steps):
    global_images = pipeline.load_images(src, range(t * a.batch, (t + 1) * a.batch), 32)
    # This process's rows: its share of each of the K micro-batches (as its loader would give).
    micro = global_images.reshape(k, n, a.batch // (k * n), *global_images.shape[1:])
    local = micro[:, i].reshape(-1, *global_images.shape[1:])
    state, metrics = step(state, mesh.put_batch({"image": local}, k))
    losses.append(float(metrics["loss"]))
  # An evaluation pass over 9 images in global batches of 4 (8 with 8 devices): with 2 processes
  # the shards are 5 and 4 images in local batches of 2, so the second process runs out a batch
  # early and pads a whole batch; every image must still count once.
  from mae_jax.evaluators import knn
  from mae_jax.models import mae
  c.evaluate.batch_size = max(4, jax.device_count())
  encoder = mae.encoder_from_config(c.model, c.dataset.image_size)
  feats, labels = knn.extract_features(c, mesh, encoder,
                                            state.params["encoder"], sources.evenly_spaced(src, 9), True)
  if jax.process_index() == 0:
    print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                      "losses": losses, "shards": shards, "eval_labels": sorted(labels.tolist()),
                      "eval_feature_sum": float(feats.sum())}))


if __name__ == "__main__":
  main()
