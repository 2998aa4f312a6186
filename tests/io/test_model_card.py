"""`mae_jax.convert --to=hf`: the export's model card, and `--push`, which publishes it to the Hub.
No machine here reaches the Hub: the push is run offline, where it must fail in one line that
keeps the export and says how to upload it."""

import json

import pytest

from conftest import tiny_workdir


def _pretraining_workdir(tmp_path):
  workdir = tiny_workdir(tmp_path / "pre")
  rows = [{"step": 10, "loss": 0.5, "wall_time": 1.0}, {"step": 20, "loss": 0.25, "wall_time": 2.0}]
  (tmp_path / "pre" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return workdir


def _probe_results(tmp_path, workdir):
  """A results.json as mae_jax.probe writes it (its fields that the card reads)."""
  from mae_jax import config_lib

  from configs import cifar10_vit_t
  path = tmp_path / "probe_results.json"
  path.write_text(json.dumps({"mode": "probe", "config": config_lib.apply_arg(cifar10_vit_t.get_config(), "tiny").to_dict(),
                              "labels": {"examples": 1000}, "metrics": {"top1": 71.25, "top5": 97.5},
                              "pretrained": {"workdir": workdir, "step": 0}}))
  return str(path)


def test_the_hf_export_carries_a_model_card_and_an_offline_push_keeps_it(tmp_path, monkeypatch, capsys):
  import huggingface_hub

  from mae_jax import convert as convert_cmd

  from benchmarks import torch_cpu
  pytest.importorskip("torch", reason="transformers' model is a test-only reference (pip install -e '.[dev]')")
  # transformers imports torchvision, whose PyPI wheel needs the tolerant import on CPU torch.
  vit_mae = torch_cpu.tolerant_import("transformers.models.vit_mae.modeling_vit_mae")
  workdir = _pretraining_workdir(tmp_path)
  dst = tmp_path / "hf"
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  assert convert_cmd.main([workdir, str(dst), "--to=hf", "--push=me/mae-tiny",
                           f"--results={_probe_results(tmp_path, workdir)}"]) == 2
  err = capsys.readouterr().err
  assert "could not publish" in err and f"The export is complete in {dst}" in err
  assert f"huggingface-cli upload me/mae-tiny {dst}" in err
  card = huggingface_hub.ModelCard.load(dst / "README.md")
  assert card.data.library_name == "transformers" and "vit-mae" in card.data.tags
  text = (dst / "README.md").read_text()
  assert "| encoder | 64 wide x 2 blocks, 2 heads, patch 4, image 32 px |" in text
  assert "| decoder | 32 wide x 1 blocks, 2 heads |" in text
  assert "| last pretraining loss | 0.2500 at step 20 |" in text
  assert "| probe (cifar10, 1,000 labelled images) | top-1 71.25%, top-5 97.50% |" in text
  assert 'ViTMAEForPreTraining.from_pretrained("me/mae-tiny")' in text
  assert vit_mae.ViTMAEForPreTraining.from_pretrained(dst).config.hidden_size == 64  # the card beside the weights


def test_push_needs_the_hf_format_and_bad_results_write_nothing(tmp_path, capsys):
  from mae_jax import convert as convert_cmd
  workdir = _pretraining_workdir(tmp_path)
  assert convert_cmd.main([workdir, str(tmp_path / "w.pth"), "--to=timm", "--push=me/x"]) == 2
  assert "--push publishes a Hugging Face folder: add --to=hf" in capsys.readouterr().err
  (tmp_path / "bad.json").write_text("{")
  assert convert_cmd.main([workdir, str(tmp_path / "hf"), "--to=hf", f"--results={tmp_path / 'bad.json'}"]) == 2
  assert "not a results.json of mae_jax.probe" in capsys.readouterr().err
  assert not (tmp_path / "hf").exists() and not (tmp_path / "w.pth").exists()
