"""Config fields that may be unset hold None (not a sentinel number), also in configs written
before; validation skips them and checks them once set."""

import pytest

from mae_jax import config_check, config_lib, errors

from conftest import REPO


def test_unset_fields_are_none_and_take_their_type_when_set():
  c = config_lib.pretrain_config()
  assert c.model.curriculum_start_ratio is None and c.finetune.trainable_blocks is None
  assert c.evaluate.mask_ratio is None
  assert c.model.attention_impl is None and c.evaluate.lpips_alex is None and c.evaluate.lpips_vgg is None
  assert (c.dataset.pretrain_split, c.dataset.train_split, c.dataset.eval_split) == (None, None, None)
  c.dataset.eval_split = "val"
  assert c.dataset.eval_split == "val"
  c.model.curriculum_start_ratio = 0.5
  c.finetune.trainable_blocks = 2
  assert (c.model.curriculum_start_ratio, c.finetune.trainable_blocks) == (0.5, 2)
  with pytest.raises(TypeError):
    c.finetune.trainable_blocks = "two"


def test_validation_skips_unset_fields_and_checks_set_ones():
  c = config_lib.load_config_file(str(REPO / "configs/cifar10_vit_t.py"), "tiny")  # tfds: no folder
  config_check.validate(c, ("pretrain", "finetune", "evaluate"))  # every optional field None
  c.model.curriculum_start_ratio = 1.2
  with pytest.raises(errors.ConfigError, match=r"curriculum_start_ratio in \[0, 1\)"):
    config_check.validate(c)
  c.model.curriculum_start_ratio = None
  c.evaluate.mask_ratio = 1.5
  with pytest.raises(errors.ConfigError, match=r"evaluate.mask_ratio=1.5 must be in \[0, 1\)"):
    config_check.validate(c)
  c.evaluate.mask_ratio = None
  c.model.attention_impl = "flash"
  with pytest.raises(errors.ConfigError, match=r"model.attention_impl='flash' must be 'xla', 'cudnn' or None"):
    config_check.validate(c)
  c.model.attention_impl = None
  c.dataset.eval_split = ""
  with pytest.raises(errors.ConfigError, match=r"dataset.eval_split='' names no split"):
    config_check.validate(c)


def test_unset_splits_are_the_datasets_defaults_and_set_ones_are_used():
  from mae_jax.data import sources
  c = config_lib.pretrain_config()
  assert sources.resolved_splits(c.dataset) == ("train", "test")
  c.dataset.eval_split, c.dataset.train_split = "val", "train[:10%]"
  assert sources.resolved_splits(c.dataset, labelled=True) == ("train[:10%]", "val")


def test_configs_written_with_negative_or_empty_sentinels_read_back_as_unset():
  saved = config_lib.pretrain_config().to_dict()
  saved["model"]["curriculum_start_ratio"] = -1.0
  saved["finetune"]["trainable_blocks"] = -1
  saved["evaluate"]["mask_ratio"] = -1.0
  saved["finetune"].pop("crop_mode")  # a field added since: filled with today's default
  up = config_lib.upgrade(saved)
  assert up["model"]["curriculum_start_ratio"] is None and up["finetune"]["trainable_blocks"] is None
  assert up["evaluate"]["mask_ratio"] is None and up["finetune"]["crop_mode"] == "retry"
  saved["dataset"]["eval_split"] = saved["model"]["attention_impl"] = saved["evaluate"]["lpips_vgg"] = ""
  up = config_lib.upgrade(saved)  # '' meant unset for these
  assert up["dataset"]["eval_split"] is None and up["model"]["attention_impl"] is None
  assert up["evaluate"]["lpips_vgg"] is None
  saved["model"]["curriculum_start_ratio"] = 0.5  # a set value stays
  assert config_lib.upgrade(saved)["model"]["curriculum_start_ratio"] == 0.5
