"""The host's memory allocator, set up for XLA's CPU runtime.

On CPU, XLA takes each step's scratch memory in one block (1.5 GB for the CIFAR-10 ViT-T/2 step at
batch 32) and frees it when the step ends. glibc serves blocks that large straight from mmap and
gives them back with munmap, so every step the kernel maps and zeroes every page again: about
400,000 page faults per step, a third of the step's time on a 2-core CPU. Telling glibc to keep
freed memory in its heap (one arena, no mmap, no trimming) lets the next step reuse it.

On GPU and TPU the scratch memory lives on the device, so nothing is changed there.
Set MAE_JAX_SYSTEM_MALLOC=1 to keep glibc's defaults.

The price is paid once, at compile time: with one arena XLA's compiler threads take turns at
malloc, and a compile takes up to half as long again (the scanned ViT-H step for 8 simulated
devices: 10.3 s against 6.9 s; ViT-T/2's float32 step: 7.3 s against 5.8 s, won back within 10
steps). So the ahead-of-time bench, which compiles and runs nothing, leaves the setting off.
"""

import ctypes
import glob
import importlib.metadata
import importlib.util
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


# Device files of the accelerators JAX drives: NVIDIA GPUs, AMD GPUs (ROCm), TPU chips (v4 and
# v5p as /dev/accel*, v5e and later through VFIO).
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def accelerator_attached() -> bool:
  """Whether a GPU or TPU is attached to this machine (one of its device files exists)."""
  return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def run_jax_on_cpu() -> None:
  """Makes JAX use its CPU backend, also when it is imported already (it reads JAX_PLATFORMS on
  import): where accelerator plugins are installed without the hardware, or to compile for
  hardware that is not here."""
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def cpu_backend_expected() -> bool:
  """True when JAX will run on the CPU: JAX_PLATFORMS names cpu first, or no accelerator plugin
  (CUDA, ROCm: registered under the `jax_plugins` entry points; TPU: libtpu) is installed, or no
  accelerator is attached (the plugins are there only to compile for one: mae_jax.compile)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if not accelerator_attached():
    return True
  if importlib.util.find_spec("libtpu") is not None:
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


_freed_memory_kept = False  # set by keep_freed_memory, read by freed_memory_kept


def keep_freed_memory() -> bool:
  """Asks glibc to keep freed memory for reuse instead of returning it to the kernel.

  Returns whether it was applied: on Linux with glibc, when JAX will run on the CPU, and unless
  MAE_JAX_SYSTEM_MALLOC is set. Call it before JAX starts (the arena limit binds only threads
  that have not allocated yet).
  """
  if (not sys.platform.startswith("linux") or os.environ.get("MAE_JAX_SYSTEM_MALLOC")
      or not cpu_backend_expected()):
    return False
  try:
    libc = ctypes.CDLL(None)  # the C library this process already uses
  except OSError:
    return False
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return False  # not glibc (musl, for one, ignores these settings)
  settings = ((M_ARENA_MAX, 1),        # threads share the main heap: big blocks need no mmap
              (M_MMAP_MAX, 0),         # big blocks come from the heap, not from fresh mappings
              (M_TRIM_THRESHOLD, -1))  # freed memory stays in the heap for the next step
  global _freed_memory_kept
  _freed_memory_kept = all(libc.mallopt(param, value) == 1 for param, value in settings)
  return _freed_memory_kept


def freed_memory_kept() -> bool:
  """Whether `keep_freed_memory` was applied in this process (a label for speed figures)."""
  return _freed_memory_kept


def available_cores() -> int:
  """The cores this process may run on (its CPU affinity where the OS has one)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# The widest vector instruction set a CPU offers, by the flags Linux lists for it, widest first.
_VECTOR_ISAS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sve", "SVE"),
                ("asimd", "NEON"))


def cpu_description(cpuinfo: str | None = None) -> str:
  """The host CPU for labelling a measurement: model, cores this process may use, and its widest
  vector instruction set, e.g. 'AMD EPYC, 2 cores, AVX2'. CPU speed figures depend on the last
  (XLA's and PyTorch's matrix kernels differ most between AVX2 and AVX-512 hosts).
  `cpuinfo`: the text of /proc/cpuinfo (read on Linux when not given)."""
  if cpuinfo is None and os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpuinfo = f.read()
  fields = {}
  for line in (cpuinfo or "").splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())  # the first processor's
  model = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  isa = next((name for flag, name in _VECTOR_ISAS if flag in flags), None)
  return ", ".join([model, f"{available_cores()} cores"] + ([isa] if isa else []))
