"""io/hub.py: weights by Hugging Face Hub id, read from huggingface_hub's cache offline
(HF_HUB_OFFLINE=1, a cache the test fills as a download would), for the jobs and for convert."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mae_jax.io import checkpointing

from conftest import REPO, run_cli, small_folder, tiny_config, tiny_workdir

REVISION = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo, fill):
  """huggingface_hub's cache layout for `repo` at one revision; `fill(folder)` writes its files."""
  root = cache / f"models--{repo.replace('/', '--')}"
  snapshot = root / "snapshots" / REVISION
  snapshot.mkdir(parents=True)
  (root / "refs").mkdir()
  (root / "refs" / "main").write_text(REVISION)
  fill(snapshot)


def _env(cache):
  return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}


def _convert(*args, env):
  return subprocess.run([sys.executable, "-m", "mae_jax.convert", *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, timeout=300, env=env)


def test_jobs_and_convert_take_hub_ids_from_the_cache_offline(cifar_folder, tmp_path, monkeypatch):
  pytest.importorskip("huggingface_hub")
  src = tiny_workdir(tmp_path / "run")
  cache = tmp_path / "hub"
  env = _env(cache)
  m = tiny_config("unused").model
  heads = [f"--encoder_heads={m.encoder_heads}", f"--decoder_heads={m.decoder_heads}"]
  # transformers' ViTMAE, as `huggingface-cli download` leaves it in the cache
  _cache_repo(cache, "acme/vit-mae-tiny", lambda d: (
      os.rmdir(d), _convert(src, d, "--to=hf", env=env).check_returncode()))
  # timm's layout: its config.json names an architecture, the weights are its state dict
  _cache_repo(cache, "timm/vit_tiny_test.mae", lambda d: (
      _convert(src, d / "model.safetensors", "--to=timm", env=env).check_returncode(),
      (d / "config.json").write_text('{"architecture": "vit_tiny_test"}')))

  out = _convert("hf://acme/vit-mae-tiny", tmp_path / "from_hf", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  out = _convert("timm/vit_tiny_test.mae", tmp_path / "from_timm", *heads, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  original, _, _ = checkpointing.restore_params(src)
  for got in ("from_hf", "from_timm"):
    params, _, _ = checkpointing.restore_params(str(tmp_path / got))
    np.testing.assert_array_equal(params["encoder"]["block0"]["fc1"]["kernel"],
                                  original["encoder"]["block0"]["fc1"]["kernel"])

  folder = small_folder(cifar_folder, tmp_path / "images")
  for name, value in env.items():
    monkeypatch.setenv(name, value)  # run_cli passes the environment on
  out = run_cli(tmp_path / "probe", "--config.max_steps=2", "--config.probe.batch_size=8",
                "--pretrained=hf://acme/vit-mae-tiny",
                folder=folder, module="mae_jax.probe")
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.exists(tmp_path / "probe" / "results.json")
  # Not in the cache, and offline: one line saying so and how to fetch it; nothing written.
  out = run_cli(tmp_path / "probe2", "--pretrained=hf://facebook/vit-mae-base", folder=folder,
                module="mae_jax.probe")
  assert out.returncode == 2 and "not in the Hugging Face cache" in out.stderr, out.stderr[-3000:]
  assert "huggingface-cli download facebook/vit-mae-base" in out.stderr and "Traceback" not in out.stderr
  assert not os.path.exists(tmp_path / "probe2")
