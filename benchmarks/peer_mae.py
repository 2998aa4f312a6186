"""Our MAE pretraining step beside another public JAX MAE's, compiled for the same target and
shapes: FLOPs, bytes accessed (XLA's count, and the part in HBM), intensity, roofline time and
peak memory per chip, from the compiled programs (mae_jax/tools/roofline.py; nothing is run).

    git clone https://github.com/SarthakYadav/jax-mae /tmp/jax-mae    # MIT; Flax linen, 2022
    python -m benchmarks.peer_mae --peer=/tmp/jax-mae --config=configs/imagenet_vit_b.py \\
        --target=tpu:v5e:2x2 --config.batch_size=512 --dtypes=float32,bfloat16

The peer is Sarthak Yadav's jax-mae (the Flax port of the official models_mae.py that its
README describes; Hugging Face transformers has no Flax ViTMAE). Its model is imported from the
checkout as it is (`mae/models/mae.py`, built with the config's encoder, decoder, patch and image
size); its training step is the one of its `mae/train_mae.py`, written for `jax.jit` over the
same data mesh as ours instead of `pmap` (the same program: the batch split over the devices,
the gradients averaged): its MAE loss (`mae/models/loss.py`, with the config's norm_pix_loss),
`optax.adamw` with its weight decay, the images in bfloat16 as its `half_precision` feeds them.
Its layers take no compute dtype, so with float32 parameters its program is float32 whatever the
input; on TPUs XLA runs float32 matmuls at default precision with bfloat16 inputs, and keeps some
of the peer's matmul outputs in bfloat16 (its compiled HLO shows them): it stands between our
float32 and bfloat16 rows.

Ours is `mae_jax.compile`'s program for the config in each of --dtypes. One row per program.
"""

import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from mae_jax import cli, config_check
from mae_jax.tools import compile as compile_tool
from mae_jax.tools import roofline, targets

FLAGS = flags.FLAGS


def _peer_modules(peer_path: str):
  """The peer's `mae.models.loss` and `mae.models.mae`, imported from its checkout (its `mae/` is a
  namespace package) without touching the import path."""
  folder = os.path.join(os.path.abspath(peer_path), "mae")
  if not os.path.isfile(os.path.join(folder, "models", "mae.py")):
    raise SystemExit(f"--peer={peer_path}: no mae/models/mae.py there; clone "
                     "https://github.com/SarthakYadav/jax-mae and pass its folder")
  spec = importlib.machinery.ModuleSpec("mae", None, is_package=True)
  spec.submodule_search_locations = [folder]
  sys.modules["mae"] = importlib.util.module_from_spec(spec)
  return importlib.import_module("mae.models.loss"), importlib.import_module("mae.models.mae")


def peer_step_program(peer, config, target):
  """The peer's pretraining step for `config`'s shapes on `target`'s devices: (jitted step,
  abstract arguments). `peer`: its loss and model modules (`_peer_modules`)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  peer_loss, peer_mae = peer

  m, size = config.model, config.dataset.image_size
  model = peer_mae.MaskedAutoencoderViT(
      img_size=size, patch_size=m.patch_size, embed_dim=m.encoder_width, depth=m.encoder_depth,
      num_heads=m.encoder_heads, decoder_embed_dim=m.decoder_width, decoder_depth=m.decoder_depth,
      decoder_num_heads=m.decoder_heads, mlp_ratio=m.mlp_ratio,
      norm_layer=functools.partial(nn.LayerNorm, epsilon=1e-6))
  tx = optax.adamw(learning_rate=1.5e-4, weight_decay=config.optimizer.weight_decay)
  mesh = jax.sharding.Mesh(list(target.devices), ("data",))
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  def init(key):
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    params = model.init({"params": key, "random_masking": key}, images, m.mask_ratio)["params"]
    return params, tx.init(params)

  abstract_params, abstract_opt = jax.eval_shape(init, jax.random.key(0))

  def step(params, opt_state, images, key):
    def loss_fn(p):
      pred, target, mask = model.apply({"params": p}, images, m.mask_ratio, rngs={"random_masking": key})
      return peer_loss.mae_loss(pred, target, mask, norm_pix_loss=m.norm_pix_loss)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def spec(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)

  args = (spec(abstract_params, replicated), spec(abstract_opt, replicated),
          jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.bfloat16, sharding=batch),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated))
  return jax.jit(step, donate_argnums=(0, 1)), args


def compile_peer(peer, config, target) -> dict:
  step, args = peer_step_program(peer, config, target)
  print(f"compiling the peer's step for {target.name} ...", flush=True)
  compiled = step.lower(*args).compile()
  fallback = 0.0
  if not roofline.cost(compiled)["flops"]:  # XLA:GPU without the device: ours' FLOPs stand in
    fallback = compile_tool.flops_per_image(config) * config.batch_size / target.num_devices
  return {"roofline": roofline.summary(compiled, compiled.as_text(), target.peak_flops,
                                       target.memory_bandwidth, fallback),
          "peak_bytes_per_device": compile_tool.peak_bytes(compiled.memory_analysis())}


def row(name: str, r: dict) -> str:
  roof = r["roofline"]
  roofline_ms = f"{roof['hbm_roofline_step_s'] * 1e3:.1f}" if "hbm_roofline_step_s" in roof else "n/a"
  return (f"| {name} | {roof['flops_per_device'] / 1e12:.3f} | {roof['bytes_accessed_per_device'] / 2**30:.2f} | "
          f"{roof['hbm_bytes'] / 2**30:.2f} | {roof['hbm_arithmetic_intensity']:.1f} | {roofline_ms} | "
          f"{compile_tool.fmt_bytes(r['peak_bytes_per_device'])} |")


def main(argv):
  del argv
  cli.default_verbosity()
  peer = _peer_modules(FLAGS.peer)  # a wrong --peer fails before anything compiles
  targets.prepare(FLAGS.target)
  config = FLAGS.config
  cli.guarded(lambda: config_check.validate(config, ("pretrain",)))
  target = targets.get(FLAGS.target)
  m = config.model
  print(f"{target.name}: {target.num_devices} x {target.device_kind} | ViT {m.encoder_depth}x"
        f"{m.encoder_width}/{m.patch_size}, decoder {m.decoder_depth}x{m.decoder_width} | "
        f"{config.dataset.image_size} px | batch {config.batch_size} "
        f"({config.batch_size // target.num_devices} per device) | host {compile_tool.machine(target)['host_cpu']}")
  rows = []
  for dtype in FLAGS.dtypes:
    c = config.copy_and_resolve_references()
    c.model.dtype = dtype
    rows.append(row(f"mae_jax, {dtype} compute", compile_tool.compile_step(c, "pretrain", target)))
  rows.append(row("jax-mae (peer): float32 as written, bfloat16 images",
                  compile_peer(peer, config, target)))
  print("\nper device and step, by XLA's counts of the compiled programs (not a measurement):")
  print("| program | TFLOP | GiB accessed (XLA) | GiB in HBM | FLOP/HBM byte | roofline ms (HBM) | peak memory |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  print("\n".join(rows))
  return 0


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=False)
  flags.DEFINE_string("target", "tpu:v5e:2x2", f"What to compile for: {targets.EXAMPLES}.")
  flags.DEFINE_string("peer", None, "A checkout of https://github.com/SarthakYadav/jax-mae.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Our compute dtypes to compile.")
  flags.mark_flags_as_required(["config", "peer"])
  app.run(main)
