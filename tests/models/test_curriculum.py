"""Curriculum masking (the STL-10 study): the schedule's values and a run whose ratio ramps."""

import json
import math

import numpy as np
import pytest

from mae_jax.models import masking
from mae_jax.train import pretrain

from conftest import tiny_config


def test_curriculum_schedule_values():
  r = lambda step, shape="linear", bucket=0.05: masking.curriculum_ratio(step, 100, 0.5, 0.75, 5, shape, bucket)
  assert r(0) == 0.5 and r(200) == 0.6 and r(500) == 0.75 and r(10_000) == 0.75
  assert r(250, bucket=0) == pytest.approx(0.625)
  assert r(125, "cosine", 0) == pytest.approx(0.5 + 0.25 * (1 - math.cos(math.pi / 4)) / 2)
  assert r(125, "cosine") == 0.55
  assert len({r(s) for s in range(600)}) == 6  # 0.5, 0.55, ..., 0.75: six compilations


def test_curriculum_run_ramps_the_ratio(cifar_folder, tmp_path):
  c = tiny_config(cifar_folder, max_steps=12, log_every_steps=1, figure_every_steps=1000)
  # Ramped over 10 steps in buckets of 0.125: three ratios, so three compilations of the step.
  c.model.update(curriculum_start_ratio=0.5, curriculum_epochs=10 * 64 / 50000, curriculum_bucket=0.125)
  pretrain.run(c, str(tmp_path))
  ratios = [json.loads(l)["mask_ratio"] for l in open(tmp_path / "metrics.jsonl")]
  assert ratios[0] == 0.5 and ratios[-1] == 0.75
  assert all(a <= b for a, b in zip(ratios, ratios[1:]))
  assert set(np.round(ratios, 6)) == {0.5, 0.625, 0.75}
