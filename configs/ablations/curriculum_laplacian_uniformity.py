"""Curriculum masking with Laplacian and uniformity losses (Rana et al., on STL-10): the original
MAE vs curriculum masking (0.5 -> 0.75 over 5 epochs) + masked Laplacian loss (0.05) + uniformity
loss (0.01), and each addition alone. The study reports
(STL-10, 10 epochs) LP 40.27 -> 44.48, FT 35.56 -> 36.45, masked Laplacian error 0.03324 -> 0.03037.
Here on CIFAR-10 ViT-T/2 (point --config at stl10 by copying this file with base
'../stl10_vit.py'); ':tiny' for the CPU-sized study."""

from mae_jax import config_lib

CURRICULUM = {"model.curriculum_start_ratio": 0.5, "model.curriculum_epochs": 5.0}
LAPLACIAN = {"model.laplacian_weight": 0.05}
UNIFORMITY = {"model.uniformity_weight": 0.01}


def get_config(arg=None):
  curriculum = dict(CURRICULUM)
  if arg == "tiny":  # the curriculum over the first half of the 200 tiny steps
    curriculum["model.curriculum_epochs"] = 100 * 64 / 50000
  return config_lib.study_config(
      __file__, "../cifar10_vit_t.py", arg, title="Original MAE vs curriculum masking + Laplacian + uniformity", axis="run",
      metric="probe_top1", jobs=("pretrain", "probe", "finetune", "evaluate"),
      runs=[("original", {}), ("curriculum", curriculum), ("laplacian", LAPLACIAN),
            ("uniformity", UNIFORMITY), ("all_three", {**curriculum, **LAPLACIAN, **UNIFORMITY})])
