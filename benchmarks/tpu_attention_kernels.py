"""One attention's forward and backward, compiled for a TPU slice three ways, by the compiled
programs' counts (nothing is run): XLA's attention as the model has it (`layers.attention`, its
custom backward pass), and JAX's Pallas TPU kernels, `splash_attention` and `flash_attention`,
which never write the score matrix. Prints XLA's bytes accessed and the HBM traffic
(mae_jax/tools/hlo.py) per chip.

    python -m benchmarks.tpu_attention_kernels                              # the ViT-B decoder
    python -m benchmarks.tpu_attention_kernels --tokens=197 --heads=12 --head_dim=64  # ViT-B, whole images

The Pallas kernels run per device inside `shard_map` (Mosaic kernels are not partitioned
automatically), on the sequence padded to a multiple of 128 (their block size) with the padding
masked out (splash: a mask over the real keys; flash: segment ids). Needs libtpu (the `targets`
extra).
"""

import argparse
import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", default="v5e:2x2", help="a TPU topology (jax.experimental.topologies)")
  parser.add_argument("--batch_per_chip", type=int, default=128)
  parser.add_argument("--tokens", type=int, default=197)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head_dim", type=int, default=32)
  a = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import topologies
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from mae_jax.models.layers import attention
  from mae_jax.tools import hlo, roofline

  devices = topologies.get_topology_desc(a.target, "tpu").devices
  mesh = Mesh(np.array(devices), ("data",))
  n, h, d = a.tokens, a.heads, a.head_dim
  padded = -(-n // 128) * 128
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, padded - n), (0, 0)))
  per_device = functools.partial(jax.shard_map, mesh=mesh, out_specs=P("data"), check_vma=False)

  def splash(q, k, v, layout):
    keys = np.zeros((padded, padded), bool)
    keys[:, :n] = True
    block = min(padded, 512)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([sm.NumpyMask(keys)] * h), head_shards=1, q_seq_shards=1,
        block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=128, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=128, block_q_dq=block,
                                  block_kv_dq=block, k_layout=layout, v_layout=layout))
    run = per_device(lambda q, k, v: jax.vmap(kernel)(q * d ** -0.5, k, v), in_specs=P("data"))
    return run(pad(q), pad(k), pad(v))[:, :, :n]

  def flash(q, k, v):
    real = jnp.broadcast_to((jnp.arange(padded) < n).astype(jnp.int32), (q.shape[0], padded))
    run = per_device(lambda q, k, v, s: fa.flash_attention(q, k, v, segment_ids=fa.SegmentIds(s, s), sm_scale=d ** -0.5),
                     in_specs=P("data"))
    return run(pad(q), pad(k), pad(v), real)[:, :, :n]

  kernels = {"XLA (the model's attention)": attention,
             "splash, keys/values sequence-minor": functools.partial(splash, layout=sk.QKVLayout.SEQ_MINOR),
             "splash, head-dim-minor": functools.partial(splash, layout=sk.QKVLayout.HEAD_DIM_MINOR),
             "flash": flash}
  spec = jax.ShapeDtypeStruct((a.batch_per_chip * len(devices), h, n, d), jnp.bfloat16,
                              sharding=NamedSharding(mesh, P("data")))
  grad_spec = jax.ShapeDtypeStruct(spec.shape, jnp.float32, sharding=spec.sharding)
  print(f"{a.target}: {a.batch_per_chip} images per chip, {n} tokens, {h} heads of {d}, bfloat16; "
        "forward + backward, per chip (compiled, not run)")
  print("| kernel | GiB accessed (XLA) | GiB in HBM | peak memory GiB |\n| --- | --- | --- | --- |")
  for name, fn in kernels.items():
    # the output's gradient comes in as an argument, as from the layers above
    loss = lambda q, k, v, g, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * g)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec, grad_spec).compile()
    in_hbm = sum(k["hbm_bytes"] for k in hlo.kernels(compiled.as_text()))
    print(f"| {name} | {roofline.cost(compiled)['bytes_accessed'] / 2**30:.3f} | {in_hbm / 2**30:.3f} | "
          f"{compiled.memory_analysis().peak_memory_in_bytes / 2**30:.3f} |", flush=True)


if __name__ == "__main__":
  main()
