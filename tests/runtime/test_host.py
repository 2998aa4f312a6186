"""The host allocator setting of mae_jax/runtime/host.py: XLA's freed CPU scratch memory is reused."""

import os
import subprocess
import sys
import textwrap

import pytest

from mae_jax.runtime import host

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A jitted function whose scratch memory (exp(x) and the product, 16 MB each, and the matmul's
# working buffers) glibc by default maps afresh and gives back on every call, run a few times;
# prints page faults per call. (2048 rather than 4096: the same effect, 1/8 the FLOPs.)
SCRIPT = textwrap.dedent("""
    import resource, sys
    from mae_jax.runtime import host
    kept = host.keep_freed_memory() if sys.argv[1] == "keep" else False
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: (jnp.exp(x) @ jnp.exp(x).T).sum())
    x = jnp.full((2048, 2048), 0.001)
    for _ in range(2):
      f(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
      f(x).block_until_ready()
    print(kept, host.freed_memory_kept(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // 4)
""")


def _faults_per_call(mode: str):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("MAE_JAX_SYSTEM_MALLOC", None)
  out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out[0] == out[1]  # what keep_freed_memory returned is what the process reports
  return out[0] == "True", int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_scratch_memory_is_reused_instead_of_faulted_in_again():
  kept, faults_kept = _faults_per_call("keep")
  _, faults_default = _faults_per_call("default")
  assert kept
  # By default every call maps its blocks afresh: one fault per 4 KiB page (about 500,000 per
  # call measured at this size).
  assert faults_default > 16_000
  assert faults_kept < faults_default / 20


def test_applied_only_where_jax_runs_on_the_cpu(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host.cpu_backend_expected()
  assert not host.keep_freed_memory()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host.cpu_backend_expected()
  monkeypatch.setenv("MAE_JAX_SYSTEM_MALLOC", "1")
  assert not host.keep_freed_memory()


def test_accelerator_plugins_without_an_accelerator_leave_jax_on_the_cpu(monkeypatch):
  # libtpu and the CUDA plugin come with the dev extra to compile for TPUs and GPUs; without a
  # device file of one, JAX runs on the CPU and the CPU's allocator setting applies.
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(host.importlib.util, "find_spec", lambda name: object())  # libtpu "installed"
  attached = []
  monkeypatch.setattr(host.glob, "glob", lambda pattern: [p for p in attached if p.startswith(pattern[:9])])
  assert host.cpu_backend_expected()
  attached.append("/dev/accel0")
  assert not host.cpu_backend_expected()


ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx f16c avx2 fma
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse4_2 avx f16c avx2 fma
"""
ZEN4 = "model name\t: AMD EPYC 9B14\nflags\t\t: fpu avx avx2 avx512f avx512bw avx512_bf16\n"
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes sve\n"


def test_cpu_description_names_the_widest_vector_instruction_set():
  cores = host.available_cores()
  assert host.cpu_description(ZEN3) == f"AMD EPYC 7B13, {cores} cores, AVX2"
  assert host.cpu_description(ZEN4) == f"AMD EPYC 9B14, {cores} cores, AVX-512"
  # aarch64 lists no model name: the machine's processor name stands in for it.
  assert host.cpu_description(GRAVITON).endswith(f", {cores} cores, SVE")
  assert host.cpu_description("").endswith(f"{cores} cores")
