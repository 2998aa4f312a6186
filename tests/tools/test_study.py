"""The label-efficiency study (mae_jax.study) end to end at a tiny size: label subsets, kept
pretraining checkpoints probed by step, resume, the tables and plots."""

import json
import os

import pytest

from mae_jax import config_lib
from mae_jax.tools import study

from conftest import REPO, small_folder


def _tiny_study(folder):
  c = config_lib.load_config_file(str(REPO / "configs/studies/cifar10_label_efficiency.py"), "tiny")
  return config_lib.set_fields(c, {"dataset.source": "folder", "dataset.folder": folder,
                                   "dataset.num_workers": 0})


def test_the_study_runs_every_part_once_and_reports(cifar_folder, tmp_path):
  folder = small_folder(cifar_folder, tmp_path / "images")  # 16 train images: 2 updates per epoch
  c = _tiny_study(folder)
  work = str(tmp_path / "study")
  names = [p.name for p in study.parts(c)]
  assert names[0] == "pretrain" and "finetune_scratch_50pct_seed1" in names
  assert "finetune_mae_50pct_epoch1" in names and len(names) == len(set(names)) == 1 + 3 * 6 + 3
  text = study.run(c, work)
  # Pretraining kept its epoch-1 checkpoint (step 2) besides the last (step 6).
  assert {"2", "6"} <= set(os.listdir(os.path.join(work, "pretrain", "checkpoints")))
  read = lambda part: json.load(open(os.path.join(work, part, "results.json")))
  assert read("finetune_mae_50pct_epoch1")["pretrained"]["step"] == 2
  assert read("finetune_mae_50pct_seed0")["pretrained"]["step"] == 6
  assert read("finetune_scratch_50pct_seed0")["from_scratch"]
  subsets = [read(f"probe_mae_50pct_seed{s}")["labels"] for s in (0, 1)]
  assert [s["examples"] for s in subsets] == [8, 8] and subsets[0]["per_class_min"] == 4
  assert read("knn_random_100pct_seed0")["labels"] is None  # the whole split
  assert "| 50% (8) |" in text and "| 100% |" in text and "Along pretraining" in text
  for name in ("results.md", "results.json", "labels.png", "pretraining.png"):
    assert os.path.getsize(os.path.join(work, name)) > 0
  # Run again: every part is done, nothing is redone.
  stamp = os.path.getmtime(os.path.join(work, "probe_mae_50pct_seed0", "results.json"))
  study.run(c, work)
  assert os.path.getmtime(os.path.join(work, "probe_mae_50pct_seed0", "results.json")) == stamp


def test_an_interrupted_part_is_charged_for_every_invocation(tmp_path, monkeypatch):
  c = _tiny_study(str(tmp_path / "unused"))
  part = next(p for p in study.parts(c) if p.job == "knn" and p.encoder == "random")
  calls = []

  def knn_job(config, out, pretrained, step):  # first invocation interrupted, second finishes
    calls.append(out)
    if len(calls) == 1:
      raise KeyboardInterrupt
  monkeypatch.setattr(study, "knn_job", knn_job)
  work = str(tmp_path / "study")
  with pytest.raises(KeyboardInterrupt):  # the part's wall time is still written
    study.run_part(c, part, work)
  path = os.path.join(work, part.name, "wall_time.json")
  first = json.load(open(path))
  assert first["invocations"] == 1 and first["seconds"] >= 0
  study.run_part(c, part, work)
  second = json.load(open(path))
  assert second["invocations"] == 2 and second["seconds"] >= first["seconds"]
