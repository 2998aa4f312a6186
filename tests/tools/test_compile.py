"""tools/compile.py: steps compiled for TPU and GPU targets without the hardware (libtpu, the CUDA
plugin), cuDNN attention where it can train, the fit verdict and its search."""

import logging

import pytest

from mae_jax import config_lib
from mae_jax.models import attention_backends
from mae_jax.tools import compile as compile_lib
from mae_jax.tools import hlo, targets

from conftest import REPO


def _libtpu():
  pytest.importorskip("libtpu", reason="libtpu is not installed (pip install \"jax[tpu]\")")
  return targets.get("tpu:v5e:2x2")


def _h100s():
  pytest.importorskip("jax_plugins.xla_cuda12", reason="the CUDA plugin is not installed "
                      "(pip install \"jax[cuda12-local]\" nvidia-cuda-nvcc-cu12 nvidia-cudnn-cu12)")
  return targets.get("gpu:h100x8")


def _tiny(**model):
  c = config_lib.load_config_file(str(REPO / "configs" / "cifar10_vit_t.py"), "tiny")
  c.model.update(**model)
  return c


def _hlo(config, target, job="pretrain") -> str:
  with attention_backends.building_for(target.devices[0]):
    step, abstract, batch = compile_lib.step_program(config, job, target.devices)
    return step.lower(abstract, batch).compile().as_text()


def test_tpu_paths_compile_and_fit():
  tpu = _libtpu()
  assert (tpu.num_devices, tpu.device_kind, tpu.present) == (4, "TPU v5 lite", False)
  bf16_device_crops = _tiny(dtype="bfloat16")
  bf16_device_crops.dataset.resize_on = "device"
  fsdp = _tiny(dtype="bfloat16")
  fsdp.sharding.fsdp = True
  for config in (bf16_device_crops, fsdp):
    r = compile_lib.fit_verdict(config, "pretrain", tpu, search=False)
    assert r["fits"] and 0 < r["peak_bytes_per_device"] < tpu.memory_bytes
    assert r["micro_batch_per_device"] == config.batch_size // 4
    # XLA:TPU's own counts, and ours from the kernels of the compiled program (tiled layouts
    # padded): within 15% of each other; the v5e's ridge is 197e12 / 819e9 = 241 FLOP/byte.
    roof = r["roofline"]
    assert roof["flops_per_device"] > 0 and roof["bytes_accessed_per_device"] > 0
    assert abs(roof["kernel_bytes"] / roof["bytes_accessed_per_device"] - 1) < 0.15
    assert round(roof["ridge_flops_per_byte"]) == 241
    assert roof["roofline_step_s"] == max(roof["flops_per_device"] / tpu.peak_flops,
                                          roof["bytes_accessed_per_device"] / tpu.memory_bandwidth)
    assert any(" attention (" in s["stage"] for s in roof["stages"])
    # XLA:TPU places some operands and results in VMEM: HBM traffic is a part of all bytes.
    assert 0 < roof["hbm_bytes"] < roof["kernel_bytes"]
  assert r["collective_bytes_per_device"] > 0
  for job in ("probe", "finetune"):
    assert compile_lib.fit_verdict(bf16_device_crops, job, tpu, search=False)["fits"]
  # Scanned, rematerialised FSDP layers: XLA:TPU writes its loop without a trip count; the
  # counts take the bound from the loop's condition (2 layers), so the gathers inside count twice.
  scanned = _tiny(dtype="bfloat16", scan_layers=True, remat="block")
  scanned.sharding.fsdp = True
  text = _hlo(scanned, tpu)
  assert " while(" in text and "known_trip_count" not in text
  gathers = lambda line: int(" all-gather" in line)
  assert hlo.per_run(text, gathers) > sum(map(gathers, text.splitlines()))
  # XLA's cost analysis counts that loop's body once: the roofline takes the FLOPs of the
  # unrolled step (XLA:CPU) and the bytes of the kernels, loops per iteration, and says so.
  roof = compile_lib.fit_verdict(scanned, "pretrain", tpu, search=False)["roofline"]
  assert "loop bodies counted once" in roof["counted_by"]
  assert roof["flops_per_device"] == pytest.approx(compile_lib.flops_per_image(scanned) * scanned.batch_size / 4, rel=1e-6)
  assert roof["bytes_accessed_per_device"] == roof["kernel_bytes"]


def test_gpu_paths_compile_with_cudnn_attention():
  h100 = _h100s()
  assert (h100.num_devices, h100.device_kind) == (8, "NVIDIA H100 80GB HBM3")
  # 28 px at patch 4: 49 patches, 14 tokens in the encoder (13 kept + class), 50 in the decoder:
  # even lengths, which JAX's cuDNN attention trains on.
  even = _tiny(dtype="bfloat16", mask_ratio=0.72)
  even.dataset.image_size = 28
  assert attention_backends.sequence_lengths(even.model, 28) == (14, 50)
  r = compile_lib.fit_verdict(even, "pretrain", h100, search=False)
  assert r["fits"] and 0 < r["peak_bytes_per_device"] < h100.memory_bytes
  # XLA:GPU compiled for a target counts nothing: the FLOPs come from XLA:CPU's count of the same
  # step (per image x images per device), the bytes from the compiled program's kernels.
  roof = r["roofline"]
  assert roof["counted_by"] != "XLA" and roof["bytes_accessed_per_device"] == roof["kernel_bytes"] > 0
  assert roof["hbm_bytes"] == roof["kernel_bytes"]  # XLA:GPU writes no memory spaces
  assert roof["flops_per_device"] == pytest.approx(
      compile_lib.flops_per_image(even) * r["micro_batch_per_device"], rel=1e-6)
  assert round(roof["ridge_flops_per_byte"]) == round(989e12 / 3352e9)
  even.dataset.resize_on = "device"
  even.sharding.fsdp = True
  even.model.update(scan_layers=True, remat="block")
  hlo = _hlo(even, h100)
  assert "__cudnn$fmha" in hlo and "all-gather" in hlo  # fused attention; FSDP's gathers


def test_cudnn_asked_where_it_cannot_train_falls_back_with_a_reason(caplog):
  h100 = _h100s()
  odd = _tiny(dtype="bfloat16", attention_impl="cudnn")  # 32 px: 17 and 65 tokens
  with caplog.at_level(logging.WARNING):
    hlo = _hlo(odd, h100)
  assert "__cudnn$fmha" not in hlo
  assert "odd sequence lengths" in caplog.text and "[17, 65]" in caplog.text


def test_a_program_over_the_memory_is_a_verdict_and_the_search_finds_what_fits(monkeypatch):
  tpu = _libtpu()
  # 2^18 images a device: XLA:TPU refuses the program (over a v5e's 15.75 GiB): a verdict.
  big = _tiny()
  big.batch_size = 4 * 2**18
  r = compile_lib.fit_verdict(big, "pretrain", tpu, search=False)
  assert not r["fits"] and "Ran out of memory" in r["reason"]
  # XLA:GPU compiles what does not fit; the verdict compares the peak with the memory JAX takes
  # (here made 8 MiB). The search goes to more micro-batches until one fits.
  _h100s()  # skips where XLA:GPU cannot compile
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", str(8 * 2**20 / 84929347584))
  small_gpu = targets.get("gpu:h100x8")
  assert small_gpu.memory_bytes == pytest.approx(8 * 2**20)
  config = _tiny()
  config.batch_size = 8 * 256
  r = compile_lib.fit_verdict(config, "pretrain", small_gpu)
  assert not r["fits"] and "over the device's" in r["reason"]
  best = r["largest_fitting"]
  assert best is not None and best["grad_accum_steps"] > 1 and best["peak_bytes_per_device"] <= 8 * 2**20
  assert [t["fits"] for t in r["tried"]] == [False] * (len(r["tried"]) - 1) + [True]
  assert [t["grad_accum_steps"] for t in r["tried"]] == [2**i for i in range(len(r["tried"]))]
