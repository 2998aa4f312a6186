"""models/attention_backends.py: which attention a model runs on which device."""

import jax.numpy as jnp

from mae_jax import config_lib
from mae_jax.models import attention_backends


def test_attention_backend_is_cudnn_only_where_the_fused_kernel_applies(caplog):
  import types
  bf16 = jnp.bfloat16
  gpu = lambda cc: types.SimpleNamespace(platform="gpu", compute_capability=cc)
  tpu = types.SimpleNamespace(platform="tpu")
  assert attention_backends.attention_backend("", bf16, (64, 32)) == "xla"                # this CPU
  assert attention_backends.attention_backend("", bf16, (64, 32), gpu("9.0")) == "cudnn"  # ViT-B/L encoder, decoder
  assert attention_backends.attention_backend("", bf16, (80, 32), gpu("9.0")) == "cudnn"  # ViT-H/14
  assert attention_backends.attention_backend("", jnp.float32, (64, 32), gpu("9.0")) == "xla"  # float32: XLA
  assert attention_backends.attention_backend("", bf16, (64, 20), gpu("9.0")) == "xla"    # a head dim cuDNN does not take
  assert attention_backends.attention_backend("xla", bf16, (64, 32), gpu("9.0")) == "xla"
  assert attention_backends.attention_backend("", bf16, (64, 32), gpu("7.0")) == "xla"    # before Ampere
  # JAX's cuDNN attention does not train on odd lengths: ViT-B/16's decoder sees 197 tokens.
  vit_b = config_lib.imagenet_config("b").model
  assert attention_backends.sequence_lengths(vit_b, 224) == (50, 197)
  assert attention_backends.sequence_lengths(vit_b, 224, decoder=False) == (197,)
  assert attention_backends.attention_backend("", bf16, (64, 32), gpu("9.0"), (50, 197)) == "xla"
  assert attention_backends.attention_backend("", bf16, (64, 32), gpu("9.0"), (50, 196)) == "cudnn"
  with attention_backends.building_for(gpu("9.0")):  # mae_jax.compile for a GPU that is not here
    assert attention_backends.attention_backend("", bf16, (64, 32)) == "cudnn"
  assert attention_backends.attention_backend("", bf16, (64, 32)) == "xla"
  # Asked for where it cannot run: XLA's attention, and the reason logged (not a failure at compile).
  for device, reason in ((tpu, "NVIDIA GPUs only"), (gpu("9.0"), "bfloat16 or float16")):
    with caplog.at_level("WARNING"):
      dtype = jnp.float32 if device.platform == "gpu" else bf16
      assert attention_backends.attention_backend("cudnn", dtype, (64,), device) == "xla"
    assert reason in caplog.text
