"""What durable checkpoints cost: saving a pretraining train state with and without the flushes
that make it survive a power cut (fsync of every file and folder, and of the rename).

  python -m benchmarks.checkpoint_sync --config=configs/imagenet_vit_b.py --dir=runs/sync_bench [--reps=3]

The state is the config's (parameters and AdamW moments in float32: 3 x 112 M values for
ViT-B/16 with its decoder), filled with random numbers (a checkpoint of zeros would compress).
Each repetition saves it as the training loop does (`Checkpointer.save`, then `wait`, which
settles the save) twice, alternating: once with the flushes skipped, once as mae_jax does, timing
the flushes inside it. The figures are medians; the last line reads
`checkpoint: B bytes, save W s without the flushes, S s with them; the flushes F s of it (P%)`.
The page cache decides most of it: a save that fits in memory returns once the kernel holds the
data, and the flushes then wait for the disk to take it.
"""

import argparse
import os
import shutil
import statistics
import time


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/imagenet_vit_b.py")
  p.add_argument("--dir", required=True, help="where the checkpoints are written (removed afterwards)")
  p.add_argument("--reps", type=int, default=3)
  a = p.parse_args()

  from mae_jax.runtime import host
  host.run_jax_on_cpu()
  import grain
  import jax
  import numpy as np

  from mae_jax import config_lib
  from mae_jax.io import checkpointing
  from mae_jax.models.mae import mae_from_config
  from mae_jax.runtime import durable
  from mae_jax.tools.compile import machine
  from mae_jax.train import optim, pretrain

  path, _, arg = a.config.partition(":")
  config = config_lib.load_config_file(path, arg or None)
  model = mae_from_config(config.model, config.dataset.image_size)
  tx = optim.pretraining_optimizer(config.optimizer, optim.warmup_cosine(1e-4, 0.0, 1, 10))
  abstract = jax.eval_shape(lambda: pretrain.create_train_state(model, tx, 0))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype)
                       if np.issubdtype(s.dtype, np.floating) else np.zeros(s.shape, s.dtype), abstract)
  state = jax.device_put(state)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  data_iter = grain.MapDataset.range(8).to_iter_dataset().__iter__()
  print(f"{a.config}: train state {n_bytes / 2**30:.2f} GiB | host {machine()['host_cpu']} | disk of {os.path.abspath(a.dir)}",
        flush=True)

  real_sync = durable.sync_tree
  timings = {"without": [], "with": [], "flush": []}

  def timed_sync(root):  # the flushes inside a save, after orbax wrote and renamed the step
    t0 = time.perf_counter()
    real_sync(root)
    timings["flush"].append(time.perf_counter() - t0)

  try:
    for rep in range(a.reps):
      for variant in ("without", "with"):
        workdir = os.path.join(a.dir, f"{variant}_{rep}")
        durable.sync_tree = timed_sync if variant == "with" else (lambda root: None)
        ckpt = checkpointing.Checkpointer(workdir, every_steps=1, keep=1)
        t0 = time.perf_counter()
        ckpt.save(1, state, data_iter, {"bench": True}, force=True)
        ckpt.wait()
        timings[variant].append(time.perf_counter() - t0)
        ckpt.close()
        shutil.rmtree(workdir)
        print(f"rep {rep} {variant}: {timings[variant][-1]:.2f} s"
              + (f" (flushes {timings['flush'][-1]:.2f} s)" if variant == "with" else ""), flush=True)
  finally:
    durable.sync_tree = real_sync
    shutil.rmtree(a.dir, ignore_errors=True)
  without, with_ = statistics.median(timings["without"]), statistics.median(timings["with"])
  flush = statistics.median(timings["flush"])
  print(f"checkpoint: {n_bytes} bytes, save {without:.2f} s without the flushes, {with_:.2f} s with them; "
        f"the flushes {flush:.2f} s of it ({flush / with_ * 100:.0f}%)")


if __name__ == "__main__":
  main()
