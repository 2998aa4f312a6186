"""The sweep runner on a two-point CPU-sized study: reports written, finished runs skipped."""

import csv
import glob
import os

import pytest

from mae_jax import config_check, config_lib, errors
from mae_jax.tools import sweep
from mae_jax.train import pretrain

from conftest import REPO

STUDIES = sorted(glob.glob(str(REPO / "configs" / "ablations" / "*.py")))


def _two_point_study(folder):
  study = config_lib.load_config_file(str(REPO / "configs" / "ablations" / "mask_ratio.py"), "tiny")
  study.dataset.update(source="folder", folder=folder, num_workers=0)
  study.max_steps = 10
  study.log_every_steps = 5
  study.evaluate.update(num_images=100, knn_train_examples=200, batch_size=50)
  study.sweep.runs = [("ratio_0.5", {"model.mask_ratio": 0.5}), ("ratio_0.75", {"model.mask_ratio": 0.75})]
  study.sweep.jobs = ("pretrain", "probe", "evaluate")
  return study


def test_sweep_writes_reports_and_skips_finished_runs(cifar_folder, tmp_path):
  study = _two_point_study(cifar_folder)
  rows = sweep.run(study, str(tmp_path))
  assert [r["run"] for r in rows] == ["ratio_0.5", "ratio_0.75"]
  with open(tmp_path / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [float(r["mask_ratio"]) for r in table] == [0.5, 0.75]
  for key in ("pretrain_final_loss", "pretrain_final_mse", "probe_top1", "evaluate_masked_mse_pixel", "evaluate_knn_top1",
              "gflops_per_image"):
    assert all(r[key] != "" for r in table), key
  # A lower ratio keeps more patches: more encoder FLOPs.
  assert float(table[0]["gflops_per_image"]) > float(table[1]["gflops_per_image"])
  md = (tmp_path / "results.md").read_text()
  assert md.startswith("### Masking ratio") and "| ratio_0.5 | 0.5 |" in md
  assert os.path.getsize(tmp_path / "probe_top1.png") > 1000
  assert os.path.getsize(tmp_path / "loss_curves.png") > 1000
  # Again: every job is found done and skipped; the results stay as they were.
  stamp = os.path.getmtime(tmp_path / "ratio_0.5" / "probe" / "results.json")
  again = sweep.run(study, str(tmp_path))
  assert again == rows
  assert os.path.getmtime(tmp_path / "ratio_0.5" / "probe" / "results.json") == stamp
  assert sorted(os.listdir(tmp_path / "ratio_0.5" / "pretrain" / "checkpoints")) == ["10"]


def test_unknown_run_label(cifar_folder, tmp_path):
  with pytest.raises(errors.ConfigError, match="not a run of this study"):
    sweep.run(_two_point_study(cifar_folder), str(tmp_path), only="ratio_0.6")


@pytest.mark.parametrize("path", STUDIES, ids=os.path.basename)
def test_every_study_config_is_valid(path, tmp_path):
  for arg in (None, "tiny"):
    study = config_lib.load_config_file(path, arg)
    assert study.sweep.runs and set(study.sweep.jobs) <= set(sweep.JOBS)
    for label, overrides in study.sweep.runs:
      c = sweep.run_config(study, dict(overrides))
      config_check.validate(c)


def test_the_pretraining_summary_separates_the_reconstruction_term(tmp_path):
  rows = ['{"step": 5, "loss": 0.9}', '{"step": 5, "test_top1": 10.0}',
          '{"step": 10, "loss": 0.25, "loss_mse": 0.3, "loss_uniformity": -5.0, "lr": 0.1}']
  (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
  assert pretrain.summary(str(tmp_path)) == {
      "final_loss": 0.25, "final_mse": 0.3, "final_loss_uniformity": -5.0, "steps": 10}
  # Without extra terms the loss is the reconstruction term.
  (tmp_path / "metrics.jsonl").write_text(rows[0] + "\n")
  assert pretrain.summary(str(tmp_path)) == {"final_loss": 0.9, "final_mse": 0.9, "steps": 5}
