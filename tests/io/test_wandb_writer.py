"""The opt-in Weights & Biases writer, run for real in W&B's offline mode (WANDB_MODE=offline:
the run is recorded under workdir/wandb/ for `wandb sync`, nothing is sent)."""

import json

import pytest

from conftest import small_folder, tiny_config

pytest.importorskip("wandb", reason="the wandb extra (pip install -e '.[wandb]')")


def test_a_run_logs_its_rows_and_figures_to_wandb_offline(cifar_folder, tmp_path, monkeypatch):
  from mae_jax.io import wandb_writer
  from mae_jax.train import pretrain
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  folder = small_folder(cifar_folder, tmp_path / "images")
  workdir = tmp_path / "run"
  c = tiny_config(folder, batch_size=8, num_epochs=3, max_steps=6, log_every_steps=2,
                  figure_every_steps=3, wandb_project="mae-jax-test")
  pretrain.run(c, str(workdir))
  run_dir, = (workdir / "wandb").glob("offline-run-*")
  assert run_dir.name.endswith(wandb_writer.run_id(str(workdir)))  # the same id when resumed
  record, = run_dir.glob("run-*.wandb")
  logged = record.read_bytes()
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 6]
  for r in rows:  # each row's values, as metrics.jsonl has them, are in W&B's record
    for key in ("loss", "grad_norm", "lr"):
      assert json.dumps(r[key]).encode() in logged, (key, r)
  assert len(list((run_dir / "files" / "media" / "images").glob("reconstruction_*.png"))) == 2  # steps 3, 6


def test_wandb_project_without_wandb_or_empty_is_a_config_error(monkeypatch):
  import importlib.util

  from mae_jax import config_check
  from mae_jax.errors import ConfigError
  c = tiny_config("unused", wandb_project="")
  with pytest.raises(ConfigError, match="wandb_project='' names no project"):
    config_check.validate(c)
  c = tiny_config("unused", wandb_project="p")
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(ConfigError, match=r'wandb is not installed: pip install -e "\.\[wandb\]"'):
    config_check.validate(c)
