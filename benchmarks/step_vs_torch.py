"""The MAE pretraining step of mae_jax against the PyTorch reference, side by side on this machine.

  python -m benchmarks.step_vs_torch --config=configs/cifar10_vit_t.py [--batch=32] [--steps=5] [--reps=5]

Both sides do the same work: one pretraining step (masking at the config's ratio, forward,
backward, AdamW with b = (0.9, 0.95) and weight decay) on the same images, in float32. The PyTorch
side is transformers' `ViTMAEForPreTraining` built with the config's shape (it implements the
official architecture; fused or separate qkv does not change the math) and `torch.optim.AdamW`,
with as many threads as the cores JAX uses. Compilation and warm-up are excluded. The
repetitions alternate (mae_jax, PyTorch, mae_jax, ...) so that both sides see the same machine;
the figures are medians over repetitions. The last line reads
`step: mae_jax A img/s, PyTorch B img/s, ratio R.RRx`.

  python -m benchmarks.step_vs_torch --config=configs/cifar10_vit_t.py --attention

times one attention instead (softmax(q k^T / sqrt d) v, forward and backward, float32) at the
shapes of the config's encoder (visible tokens) and decoder (all tokens): mae_jax's
`layers.attention` under `jax.grad` against torch's `scaled_dot_product_attention` and
`backward()`, and how many cores each side kept busy (process CPU time over wall time). Its
last line reads `attention: mae_jax A ms, PyTorch B ms, ratio R.RRx` (decoder shape, per call).

torch and transformers come with the dev extra (pip install -e ".[dev]").
"""

import argparse
import functools
import os
import statistics
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mae_jax_step(config, images):
  """A function running one mae_jax pretraining step (compiled, state donated) on `images`."""
  import jax
  from mae_jax.train import optim
  from mae_jax.train import pretrain
  from mae_jax.models.mae import mae_from_config
  model = mae_from_config(config.model, config.dataset.image_size)
  schedule = optim.warmup_cosine(optim.peak_lr(config.optimizer.base_lr, config.batch_size), 0.0, 0, 10**6)
  tx = optim.pretraining_optimizer(config.optimizer, schedule)
  state = jax.jit(functools.partial(pretrain.create_train_state, model, tx, config.seed))()
  spec = pretrain.StepSpec(model, tx, tuple(config.dataset.mean), tuple(config.dataset.std))
  step = jax.jit(functools.partial(pretrain.pretrain_step, spec=spec), donate_argnums=(0,))
  batch = {"image": jax.device_put(images)}
  holder = [state]

  def run():
    holder[0], metrics = step(holder[0], batch)
    jax.block_until_ready(metrics["loss"])
  return run


def pytorch_step(config, images, threads: int):
  """A function running one step of transformers' ViTMAEForPreTraining with torch's AdamW."""
  import numpy as np
  import torch
  from benchmarks import torch_cpu
  vit_mae = torch_cpu.tolerant_import("transformers.models.vit_mae.modeling_vit_mae")
  torch.set_num_threads(threads)
  torch.manual_seed(config.seed)
  m, size = config.model, config.dataset.image_size
  hf_config = vit_mae.ViTMAEConfig(
      image_size=size, patch_size=m.patch_size, num_channels=3, hidden_size=m.encoder_width,
      num_hidden_layers=m.encoder_depth, num_attention_heads=m.encoder_heads,
      intermediate_size=int(m.encoder_width * m.mlp_ratio), decoder_hidden_size=m.decoder_width,
      decoder_num_hidden_layers=m.decoder_depth, decoder_num_attention_heads=m.decoder_heads,
      decoder_intermediate_size=int(m.decoder_width * m.mlp_ratio), hidden_act="gelu",
      layer_norm_eps=1e-6, qkv_bias=True, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = vit_mae.ViTMAEForPreTraining(hf_config).train()
  o = config.optimizer
  opt = torch.optim.AdamW(model.parameters(), lr=o.base_lr * config.batch_size / 256, betas=(o.b1, o.b2),
                          weight_decay=o.weight_decay)
  mean = np.asarray(config.dataset.mean, np.float32)
  std = np.asarray(config.dataset.std, np.float32)
  x = torch.from_numpy(((images / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2).copy())
  length = (size // m.patch_size) ** 2

  def run():
    noise = torch.rand(x.shape[0], length)  # masking on this side too: fresh noise every step
    loss = model(pixel_values=x, noise=noise).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
  return run


def attention_calls(batch: int, heads: int, tokens: int, head_dim: int, threads: int):
  """Forward + backward of one attention of this shape: (mae_jax function, PyTorch function)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from mae_jax.models import layers
  torch.set_num_threads(threads)
  q, k, v, w = np.random.default_rng(0).standard_normal((4, batch, heads, tokens, head_dim), np.float32)
  grad = jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(layers.attention(q, k, v) * w), argnums=(0, 1, 2)))
  args = [jax.device_put(a) for a in (q, k, v, w)]
  tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
  tw = torch.from_numpy(w)

  def run_torch():
    (torch.nn.functional.scaled_dot_product_attention(tq, tk, tv) * tw).sum().backward()
  return (lambda: jax.block_until_ready(grad(*args))), run_torch


def alternate(sides: dict, warmup: int, reps: int, measure):
  """Warms every side up, then yields one {side: measure(run)} per repetition, the sides taking
  turns, so that all of them see the same machine."""
  for run in sides.values():
    for _ in range(warmup):
      run()
  for _ in range(reps):
    yield {name: measure(run) for name, run in sides.items()}


def timed(run, calls: int) -> tuple:
  """(wall ms per call, cores busy: process CPU time over wall time)."""
  cpu, t = time.process_time(), time.perf_counter()
  for _ in range(calls):
    run()
  wall = time.perf_counter() - t
  return wall / calls * 1e3, (time.process_time() - cpu) / wall


def attention_main(config, a, threads: int):
  """The `--attention` mode: both sides' attention at the encoder's and the decoder's shape."""
  m, size = config.model, config.dataset.image_size
  patches = (size // m.patch_size) ** 2
  visible = int(patches * (1 - m.mask_ratio))
  shapes = {"encoder": (m.encoder_heads, visible + 1, m.encoder_width // m.encoder_heads),
            "decoder": (m.decoder_heads, patches + 1, m.decoder_width // m.decoder_heads)}
  medians = {}
  for part, (heads, tokens, head_dim) in shapes.items():
    sides = dict(zip(("mae_jax", "PyTorch"), attention_calls(a.batch, heads, tokens, head_dim, threads)))
    reps = list(alternate(sides, a.warmup, a.reps, lambda run: timed(run, a.steps)))
    medians[part] = {n: (statistics.median(r[n][0] for r in reps), statistics.median(r[n][1] for r in reps))
                     for n in sides}
    print(f"{part}: batch {a.batch} x {heads} heads, {tokens} tokens, head dim {head_dim}: " + ", ".join(
        f"{n} {ms:.2f} ms ({cores:.1f} cores)" for n, (ms, cores) in medians[part].items()), flush=True)
  j, t = medians["decoder"]["mae_jax"][0], medians["decoder"]["PyTorch"][0]
  print(f"attention: mae_jax {j:.2f} ms, PyTorch {t:.2f} ms, ratio {t / j:.2f}x")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="configs/*.py[:arg]")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--steps", type=int, default=5, help="steps per timed repetition")
  p.add_argument("--reps", type=int, default=5, help="alternated repetitions per side")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
  p.add_argument("--attention", action="store_true",
                 help="time one attention (forward + backward) at the config's shapes instead")
  a = p.parse_args()

  from mae_jax.runtime import host
  malloc_kept = host.keep_freed_memory()  # as the mae_jax entry points do, before JAX starts
  import jax
  import numpy as np
  from mae_jax import config_lib
  path, _, arg = a.config.partition(":")
  config = config_lib.load_config_file(path, arg or None)
  config.model.dtype = "float32"
  threads = host.available_cores()
  if a.attention:
    print(f"{host.cpu_description()} | {jax.devices()[0].platform}, {threads} threads | {a.config} | "
          f"{a.reps} alternated repetitions of {a.steps} calls, float32", flush=True)
    return attention_main(config, a, threads)
  size = config.dataset.image_size
  images = np.random.default_rng(0).integers(0, 256, (a.batch, size, size, 3), dtype=np.uint8)
  sides = {"mae_jax": mae_jax_step(config, images), "PyTorch": pytorch_step(config, images, threads)}
  print(f"{host.cpu_description()} | {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
        f"{threads} threads | {a.config} | "
        f"batch {a.batch} | {a.reps} alternated repetitions of {a.steps} steps, float32 | "
        f"host malloc keeps freed memory: {'yes' if malloc_kept else 'no'}", flush=True)
  rates = {name: [] for name in sides}
  images_per_second = lambda run: a.batch * 1e3 / timed(run, a.steps)[0]
  for rep, got in enumerate(alternate(sides, a.warmup, a.reps, images_per_second)):
    for name, rate in got.items():
      rates[name].append(rate)
    print(f"rep {rep + 1}: " + ", ".join(f"{n} {r:.1f} img/s" for n, r in got.items()), flush=True)
  jax_rate, torch_rate = (statistics.median(rates[n]) for n in ("mae_jax", "PyTorch"))
  print(f"step: mae_jax {jax_rate:.1f} img/s, PyTorch {torch_rate:.1f} img/s, ratio {jax_rate / torch_rate:.2f}x")


if __name__ == "__main__":
  main()
