"""What a program is compiled for: the devices present, or a TPU slice, 8 H100s or N simulated CPU
devices on a machine that has none of them.

XLA's TPU and GPU compilers run without the hardware: libtpu describes any TPU topology
(`jax.experimental.topologies.get_topology_desc`), and the CUDA plugin compiles for a GPU given
its target description (a `GpuTargetConfig` text proto; on a real GPU it is read from the device).
A `Target` carries those devices and what a fit verdict and a step-time estimate need: the memory
a program may use per device and the device's peak bfloat16 FLOP/s.
"""

import dataclasses
import math
import os
import re
from typing import Optional

from mae_jax.errors import TargetError
from mae_jax.runtime import host

GiB = 2**30

# Memory a program may use per device, as XLA:TPU reports it (libtpu 0.0.42: the "available HBM"
# of a program that does not fit; a little under the chip's HBM, which XLA keeps some of).
# A chip of two TensorCores shown as two devices (v4, TPU7x topologies) gives each half.
TPU_AVAILABLE_BYTES = {"TPU v4": 15.25 * GiB, "TPU v5 lite": 15.75 * GiB, "TPU v5": 95.74 * GiB,
                       "TPU v6 lite": 31.25 * GiB, "TPU7x": 94.75 * GiB}
# Published peak dense bfloat16 FLOP/s per chip (vendor data sheets), for step-time estimates.
PEAK_FLOPS_PER_CHIP = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12,
                       "TPU v6 lite": 918e12, "TPU7x": 2307e12, "NVIDIA H100 80GB HBM3": 989e12}
# Published HBM bandwidth per chip, bytes/s (Cloud TPU system-architecture pages; NVIDIA's H100 SXM
# data sheet, also XLA's H100 description below): the roofline's memory side (roofline.py).
HBM_BYTES_PER_S_PER_CHIP = {"TPU v4": 1228e9, "TPU v5 lite": 819e9, "TPU v5": 2765e9,
                            "TPU v6 lite": 1640e9, "TPU7x": 7370e9, "NVIDIA H100 80GB HBM3": 3352e9}

# XLA's description of an H100 SXM 80 GB (jax issue #28376 / XLA PR #25919; on a real GPU, JAX reads
# it from the device). Compiling for it needs the CUDA plugin and a ptxas, not the GPU.
H100_TARGET_CONFIG = """gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32
  shared_memory_per_block: 49152  shared_memory_per_core: 233472
  threads_per_core_limit: 2048  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000  l2_cache_size: 52428800  clock_rate_ghz: 1.98
  device_memory_size: 84929347584  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
GPU_TARGET_CONFIGS = {"h100": H100_TARGET_CONFIG}

EXAMPLES = "tpu:v5e:2x2, tpu:v5p:4x4x4, tpu:v6e:2x2, gpu:h100x8, cpu:8 or present"


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, and what their memory and speed are (None where not known)."""
  name: str
  platform: str                 # 'tpu', 'gpu' or 'cpu' (the compiler that runs)
  devices: tuple
  device_kind: str
  memory_bytes: Optional[float]  # per device, the most a program may use
  peak_flops: Optional[float]    # per device, dense bfloat16 (float32 on a CPU)
  present: bool                  # the hardware is this machine's (else: compiled for it only)
  memory_note: str = ""          # how memory_bytes was found
  memory_bandwidth: Optional[float] = None  # per device, HBM bytes/s

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def parse(spec: str) -> tuple:
  """'tpu:v5e:2x2' -> ('tpu', 'v5e:2x2'); 'gpu:h100x8' -> ('gpu', 'h100x8'); 'cpu:8'; 'present'."""
  kind, _, rest = spec.partition(":")
  if spec == "present" or (kind in ("tpu", "gpu", "cpu") and rest):
    return kind, rest
  raise TargetError(f"--target={spec!r}: expected one of {EXAMPLES}")


def prepare(spec: str) -> None:
  """What must happen before JAX starts: simulated CPU devices for 'cpu:N'; for a TPU or GPU
  compiled for without the hardware, JAX itself on the CPU (the compilers load as libraries)."""
  kind, rest = parse(spec)
  if kind == "present":
    return
  if not os.environ.get("JAX_PLATFORMS"):
    host.run_jax_on_cpu()
  if kind == "cpu":
    if not rest.isdigit() or int(rest) < 1:
      raise TargetError(f"--target=cpu:{rest}: the number of simulated devices, e.g. cpu:8")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={rest}".strip()


def get(spec: str) -> Target:
  """The target `spec` names (call `prepare(spec)` before JAX starts)."""
  import jax
  kind, rest = parse(spec)
  if kind in ("tpu", "gpu"):  # a program for absent hardware cannot be cached by this process's client
    jax.config.update("jax_enable_compilation_cache", False)
  if kind == "present" or (kind == "cpu" and jax.default_backend() == "cpu"):
    devices = tuple(jax.devices())
    if kind == "cpu" and len(devices) != int(rest):
      raise TargetError(f"--target={spec}: JAX started with {len(devices)} CPU devices; the "
                        "simulated devices are set before JAX starts (run the command again as it is)")
    return _present(spec, devices)
  if kind == "tpu":
    return _tpu(spec, rest)
  if kind == "gpu":
    return _gpu(spec, rest)
  raise TargetError(f"--target={spec}: JAX runs on {jax.default_backend()}, so simulated CPU "
                    "devices are not available; set JAX_PLATFORMS=cpu")


def _topology(spec: str, **kwargs):
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(**kwargs)
  except Exception as e:  # a missing compiler, or a topology it does not know
    raise TargetError(f"--target={spec}: {kwargs.get('platform')} topology not available "
                      f"({str(e).splitlines()[0][:200]}); {_install_hint(kwargs.get('platform'))}") from e


def _install_hint(platform) -> str:
  if platform == "tpu":
    return 'compiling for a TPU needs libtpu: pip install -e ".[targets]"'
  return 'compiling for a GPU needs the CUDA plugin, a ptxas and cuDNN: pip install -e ".[targets]"' 


def _tpu(spec: str, topology: str) -> Target:
  try:
    import libtpu  # noqa: F401  (only to say clearly what is missing)
  except ImportError as e:
    raise TargetError(f"--target={spec}: {_install_hint('tpu')}") from e
  # No chip is driven here: other processes may load libtpu at the same time, and there is no
  # Cloud metadata server to ask.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  devices = tuple(_topology(spec, topology_name=topology, platform="tpu").devices)
  kind = devices[0].device_kind
  dims = [int(d) for d in re.findall(r"\d+", topology.partition(":")[2])]
  chips = math.prod(dims) if dims else len(devices)
  per_chip, bandwidth = PEAK_FLOPS_PER_CHIP.get(kind), HBM_BYTES_PER_S_PER_CHIP.get(kind)
  return Target(spec, "tpu", devices, kind, TPU_AVAILABLE_BYTES.get(kind),
                per_chip * chips / len(devices) if per_chip else None, present=False,
                memory_note="what XLA:TPU lets a program use",
                memory_bandwidth=bandwidth * chips / len(devices) if bandwidth else None)


def _gpu(spec: str, name: str) -> Target:
  m = re.fullmatch(r"([a-z0-9]+?)(?:x(\d+))?", name)
  if not m or m.group(1) not in GPU_TARGET_CONFIGS:
    raise TargetError(f"--target={spec}: GPUs known: {', '.join(f'gpu:{k}x8' for k in GPU_TARGET_CONFIGS)}")
  config, n = GPU_TARGET_CONFIGS[m.group(1)], int(m.group(2) or 1)
  devices = tuple(_topology(spec, platform="cuda", target_config=config, topology=f"1x1x{n}").devices)
  kind = devices[0].device_kind
  memory = float(re.search(r"device_memory_size:\s*(\d+)", config).group(1))
  fraction = gpu_memory_fraction()
  return Target(spec, "gpu", devices, kind, memory * fraction, PEAK_FLOPS_PER_CHIP.get(kind), present=False,
                memory_note=f"{fraction:.0%} of {memory / GiB:.2f} GiB, JAX's preallocation",
                memory_bandwidth=HBM_BYTES_PER_S_PER_CHIP.get(kind))


def gpu_memory_fraction() -> float:
  """The share of a GPU's memory JAX takes for its programs: 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION
  says otherwise (JAX preallocates it at start-up; the rest stays with CUDA and cuDNN)."""
  return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))


def _present(spec: str, devices: tuple) -> Target:
  d = devices[0]
  if d.platform == "cpu":
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / len(devices)  # host RAM shared
    return Target(spec, "cpu", devices, d.device_kind, memory, None, present=True,
                  memory_note=f"the host's memory shared by {len(devices)} devices" if len(devices) > 1 else "the host's memory")
  try:
    memory = d.memory_stats().get("bytes_limit")
  except Exception:  # a backend without memory statistics
    memory = TPU_AVAILABLE_BYTES.get(d.device_kind)
  return Target(spec, d.platform, devices, d.device_kind, memory,
                PEAK_FLOPS_PER_CHIP.get(d.device_kind), present=True,
                memory_bandwidth=HBM_BYTES_PER_S_PER_CHIP.get(d.device_kind))
