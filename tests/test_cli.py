"""The command line as a user runs it: end to end, clear errors, SIGTERM and resume."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mae_jax import config_lib
from conftest import REPO, tiny_config

CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.py")))
CONFIGS = [c for c in CONFIGS if not c.endswith("__init__.py")]


def _cli(workdir, *overrides, folder=None, wait=True, module="mae_jax.main",
         config="configs/cifar10_vit_t.py:tiny"):
  args = [sys.executable, "-m", module, f"--config={REPO / config}", f"--workdir={workdir}"]
  if folder:
    args += ["--config.dataset.source=folder", f"--config.dataset.folder={folder}",
             "--config.dataset.num_workers=1"]
  args += list(overrides)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  if not wait:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
  return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_cli_end_to_end(cifar_folder, tmp_path):
  out = _cli(tmp_path, "--config.max_steps=20", "--config.checkpoint_every_steps=10",
             "--config.figure_every_steps=10", folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "step 20/20" in out.stdout and "img/s" in out.stdout and "ETA" in out.stdout
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [10, 20] and all("loss" in r and "lr" in r for r in rows)
  assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert os.path.exists(tmp_path / "figures" / "reconstruction_00000010.png")
  assert os.path.exists(tmp_path / "figures" / "reconstruction_00000020.png")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
  assert json.load(open(tmp_path / "config.json"))["model"]["patch_size"] == 4

  # The same command with more steps resumes from step 20.
  out = _cli(tmp_path, "--config.max_steps=30", "--config.checkpoint_every_steps=10",
             "--config.figure_every_steps=10", folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stdout and "step 30/30" in out.stdout
  assert "step 10/30" not in out.stdout

  # A different model in the same workdir: a clear error, and the checkpoints stay.
  out = _cli(tmp_path, "--config.model.encoder_width=128", folder=cifar_folder)
  assert out.returncode == 2
  assert "different model" in out.stderr and "encoder_width: checkpoint 64 vs config 128" in out.stderr
  assert "Traceback" not in out.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20", "30"]


@pytest.mark.parametrize("override, message", [
    ("--config.dataset.image_size=30", "not divisible by model.patch_size"),
    ("--config.model.mask_ratio=1.0", "outside [0, 1)"),
    ("--config.grad_accum_steps=5", "batch_size=64 is not divisible by grad_accum_steps=5"),
    ("--config.dataset.name=mnist_typo", "unknown dataset.name='mnist_typo'"),
    ("--config.dataset.folder=/nonexistent/cifar", "does not exist"),
])
def test_cli_bad_config_errors(tmp_path, override, message):
  out = _cli(tmp_path / "w", "--config.dataset.source=folder", "--config.dataset.folder=/tmp", override)
  assert out.returncode == 2, out.stderr[-2000:]
  assert message in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_cli_batch_not_divisible_by_devices(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  out = _cli(tmp_path / "w", "--config.dataset.source=folder", "--config.dataset.folder=/tmp",
             "--config.batch_size=60")
  assert out.returncode == 2
  assert "global micro-batch 60 (batch_size / grad_accum_steps) is not divisible by the 8 devices" in out.stderr


def test_cli_empty_image_folder(tmp_path):
  (tmp_path / "data" / "train" / "cls").mkdir(parents=True)
  out = _cli(tmp_path / "w", folder=str(tmp_path / "data"))
  assert out.returncode == 2 and "holds no images" in out.stderr and "Traceback" not in out.stderr


def test_validate_rejects_more(tmp_path):
  c = tiny_config(str(tmp_path))
  c.model.encoder_heads = 3  # 64 is not divisible by 3
  c.batch_size, c.grad_accum_steps = 64, 0
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert "encoder_width=64 is not divisible by model.encoder_heads=3" in str(e.value)
  assert "grad_accum_steps=0 must be >= 1" in str(e.value)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_file_loads_and_validates(path, tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for arg in (None, "tiny"):
    c = mod.get_config(arg)
    if c.dataset.source == "folder":
      c.dataset.folder = str(tmp_path)
    config_lib.validate(c)
    assert c.dataset.image_size % c.model.patch_size == 0


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(cifar_folder, tmp_path):
  proc = _cli(tmp_path, "--config.max_steps=100000", "--config.log_every_steps=1",
              "--config.checkpoint_every_steps=100000", folder=cifar_folder, wait=False)
  deadline = time.time() + 300
  metrics = tmp_path / "metrics.jsonl"
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "checkpoint saved" in out
  saved = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert len(saved) == 1 and saved[0] >= 5
  last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert saved[0] == last_logged
  out = _cli(tmp_path, f"--config.max_steps={saved[0] + 3}", "--config.log_every_steps=1",
             folder=cifar_folder)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stdout and f"step {saved[0] + 3}/{saved[0] + 3}" in out.stdout
