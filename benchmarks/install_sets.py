"""Size and install time of each install set, each into a fresh virtual environment.

    python -m benchmarks.install_sets                 # every set
    python -m benchmarks.install_sets --sets=,tpu     # the base set and .[tpu]

For each set: `python -m venv`, then `pip install --no-cache-dir -e ".[SET]"` (downloads
included, from whatever index pip is set up to use), timed as a whole; then the size of the
environment on the disk, and whether `import mae_jax.main` and JAX's platforms come up. With
`--run`, the base set also runs the tiny pretraining preset on an image folder (the main command
without a download). Prints one table row per set; the environments are removed after.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ("", "tensorboard", "gcs", "tpu", "cuda12", "dev")


def _size_gb(folder: str) -> float:
  out = subprocess.run(["du", "-sb", folder], capture_output=True, text=True, check=True).stdout
  return int(out.split()[0]) / 1e9


def measure(extra: str, run_folder: str) -> str:
  venv = tempfile.mkdtemp(prefix="mae-jax-install-")
  try:
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    spec = f".[{extra}]" if extra else "."
    start = time.perf_counter()
    done = subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-cache-dir", "-e", spec],
                          cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
      return f"| `{spec}` | install failed: {done.stderr.strip().splitlines()[-1][:200]} | | |"
    probe = subprocess.run([py, "-c", "import mae_jax.main, jax; print(sorted({d.platform for d in jax.devices()}))"],
                           cwd="/", capture_output=True, text=True)
    noise = sum("cudart_stub" in line for line in probe.stderr.splitlines())
    note = f"imports; platforms {probe.stdout.strip()}" if not probe.returncode else "import failed"
    note += f"; {noise} cudart_stub lines at import" if noise else "; nothing printed at import"
    if run_folder and not extra:
      workdir = os.path.join(venv, "run")
      ran = subprocess.run([py, "-m", "mae_jax.main", "--config=configs/cifar10_vit_t.py:tiny",
                            f"--workdir={workdir}", "--config.dataset.source=folder",
                            f"--config.dataset.folder={run_folder}"], cwd=ROOT, capture_output=True, text=True)
      note += "; tiny pretraining ran" if ran.returncode == 0 else f"; tiny pretraining failed (rc {ran.returncode})"
    return f"| `{spec}` | {_size_gb(venv):.2f} GB | {seconds / 60:.1f} min | {note} |"
  finally:
    shutil.rmtree(venv, ignore_errors=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sets", default=",".join(SETS), help="comma-separated extras; empty = the base set")
  parser.add_argument("--run", default="", help="an image folder: the base set runs the tiny preset on it")
  args = parser.parse_args()
  print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}", flush=True)
  print("| set | size | install | check |\n| --- | --- | --- | --- |", flush=True)
  for extra in args.sets.split(","):
    print(measure(extra.strip(), args.run), flush=True)


if __name__ == "__main__":
  main()
