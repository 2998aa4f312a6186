"""Probe, fine-tune and evaluate: learning on real data, and each entry point from the CLI."""

import json
import os

import pytest

from mae_jax.evaluators import knn
from mae_jax.io import weights
from mae_jax.train import classify, pretrain

from conftest import run_cli as _cli
from conftest import small_folder, tiny_config

# The learning check: the tiny preset pretrained for 2,000 steps (about 2 minutes on two CPU
# cores). Measured on this recipe: probe 34.1% vs 28.5% for a random encoder, kNN 32.0% vs 27.1%,
# with mean-pooled patch features; the cls token, barely trained this early, is no better than
# random, so the check pools. The images are read in the main process: on two cores, worker
# processes contend with XLA's threads (600 steps took 50-57 s without workers, 59-65 s with 2);
# the CLI tests run the workers.
LEARN = dict(max_steps=2000, log_every_steps=500, figure_every_steps=100000,
             checkpoint_every_steps=100000, num_epochs=3)


def _learn_config(folder, **overrides):
  c = tiny_config(folder, **{**LEARN, **overrides})
  c.optimizer.base_lr = 3e-3
  c.probe.global_pool = True
  c.evaluate.update(num_images=2000, knn_train_examples=5000)
  return c


@pytest.fixture(scope="module")
def pretrained(cifar_folder, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained"))
  pretrain.run(_learn_config(cifar_folder), workdir)
  return workdir


def test_probe_and_knn_learn_from_pretraining(cifar_folder, pretrained, tmp_path):
  c = _learn_config(cifar_folder, max_steps=300)
  probe = classify.run(c, str(tmp_path / "probe"), pretrained, "probe")["metrics"]["top1"]
  probe_random = classify.run(c, str(tmp_path / "probe_random"), None, "probe")["metrics"]["top1"]
  mesh = pretrain.Mesh()
  from mae_jax.data import sources
  train, test = sources.make_source(c.dataset, "train"), sources.make_source(c.dataset, "test")
  params, _ = weights.load_mae_params(pretrained, c, "reconstruction")
  import jax
  import jax.numpy as jnp

  from mae_jax.models.mae import mae_from_config
  random_params = mae_from_config(c.model, 32).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 64)))["params"]
  knn_top1 = knn.knn_eval(c, mesh, params["encoder"], train, test)
  knn_random = knn.knn_eval(c, mesh, random_params["encoder"], train, test)
  print(f"probe {probe:.2f} vs random {probe_random:.2f}; kNN {knn_top1:.2f} vs random {knn_random:.2f}")
  assert probe > 25.0 and knn_top1 > 25.0  # chance is 10%
  assert probe > probe_random + 3.0
  assert knn_top1 > knn_random + 3.0


def test_probe_finetune_evaluate_from_the_cli(cifar_folder, pretrained, tmp_path):
  config = ["--config.max_steps=20", "--config.evaluate.num_images=200"]
  for job in ("probe", "finetune"):
    # The probe's random crops are resampled in its step; fine-tuning's RandAugment keeps them on
    # the host.
    out = _cli(tmp_path / job, *config, f"--pretrained={pretrained}", "--config.dataset.resize_on=device",
               "--config.probe.random_resized_crop=True", folder=cifar_folder, module=f"mae_jax.{job}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("train crops resampled on the device" in out.stdout) == (job == "probe"), out.stdout
    r = json.load(open(tmp_path / job / "results.json"))
    assert r["mode"] == job and r["step"] == 20 and r["pretrained"]["workdir"] == pretrained
    assert 0 <= r["metrics"]["top1"] <= r["metrics"]["top5"] <= 100
    assert r["config"]["model"]["encoder_width"] == 64
    rows = [json.loads(l) for l in open(tmp_path / job / "metrics.jsonl")]
    assert rows[-1]["step"] == 20 and "test_top1" in rows[-1]
    assert os.listdir(tmp_path / job / "checkpoints") == ["20"]
  _exports_load_in_timm(tmp_path)
  # Resume: the same command with more steps goes on from step 20.
  out = _cli(tmp_path / "probe", *config[:-2], "--config.max_steps=30", f"--pretrained={pretrained}",
             folder=cifar_folder, module="mae_jax.probe")
  assert out.returncode == 0 and "resumed from" in out.stdout and "step 30/30" in out.stdout
  # From scratch: no --pretrained.
  out = _cli(tmp_path / "scratch", *config, folder=cifar_folder, module="mae_jax.finetune")
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.load(open(tmp_path / "scratch" / "results.json"))
  assert r["from_scratch"] and r["pretrained"] is None
  # Evaluate: numbers, figure, metrics log.
  out = _cli(tmp_path / "eval", *config, f"--pretrained={pretrained}", folder=cifar_folder,
             module="mae_jax.evaluate")
  assert out.returncode == 0, out.stderr[-3000:]
  m = json.load(open(tmp_path / "eval" / "results.json"))["metrics"]
  assert m["images"] == 200 and m["mask_ratio"] == 0.75
  assert 0 < m["masked_mse_pixel"] < m["masked_mse_normalized"] * 10
  assert 0 < m["ssim"] < 1 and 5 < m["psnr"] < 60 and m["masked_laplacian_l1"] > 0
  assert 10 < m["knn_top1"] <= 100
  assert os.path.exists(tmp_path / "eval" / "reconstruction.png")
  assert "eval/psnr" in json.loads(open(tmp_path / "eval" / "metrics.jsonl").readline())


def _exports_load_in_timm(tmp_path):
  """The fine-tuned classifier goes out to timm whole (its logits are ours); the linear probe's
  encoder only (its head needs BatchNorm statistics timm has no place for)."""
  import ml_collections
  import numpy as np

  from mae_jax import convert as convert_cmd
  from mae_jax.io import checkpointing
  from mae_jax.models import classifier

  from benchmarks import torch_cpu
  timm_vit = torch_cpu.tolerant_import("timm.models.vision_transformer")
  import torch
  from safetensors.torch import load_file
  for job in ("probe", "finetune"):
    dst = str(tmp_path / f"{job}.safetensors")
    assert convert_cmd.main([str(tmp_path / job), dst, "--to=timm"]) == 0
    params, saved, _ = checkpointing.restore_params(str(tmp_path / job))
    m = saved["model"]
    vit = timm_vit.VisionTransformer(img_size=32, patch_size=m["patch_size"], embed_dim=m["encoder_width"],
                                     depth=m["encoder_depth"], num_heads=m["encoder_heads"],
                                     num_classes=10 if job == "finetune" else 0, global_pool="token").eval()
    vit.load_state_dict(load_file(dst), strict=True)
  model = classifier.classifier_from_config(ml_collections.ConfigDict(saved), 10, probe=False, global_pool=False)
  imgs = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = vit(torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, imgs)), theirs, rtol=1e-4, atol=1e-4)


def test_job_errors(cifar_folder, pretrained, tmp_path):
  # A config whose encoder is not the checkpoint's.
  out = _cli(tmp_path / "p", "--config.model.encoder_width=128", f"--pretrained={pretrained}",
             folder=cifar_folder, module="mae_jax.probe")
  assert out.returncode == 2 and "different encoder" in out.stderr and "Traceback" not in out.stderr
  # No checkpoint where --pretrained points (a Hub id given as a path, say): nothing is written.
  for where in (tmp_path, "facebook/vit-mae-base"):
    out = _cli(tmp_path / "p2", f"--pretrained={where}", folder=cifar_folder, module="mae_jax.finetune")
    assert out.returncode == 2 and "no checkpoint found" in out.stderr and "nothing was written" in out.stderr
    assert not os.path.exists(tmp_path / "p2")
  # LPIPS asked for without its weights file: the file is named, nothing is written.
  out = _cli(tmp_path / "e", "--config.evaluate.lpips_alex=/nowhere/alex.npz",
             f"--pretrained={pretrained}", folder=cifar_folder, module="mae_jax.evaluate")
  assert out.returncode == 2 and "/nowhere/alex.npz" in out.stderr
  assert not os.path.exists(tmp_path / "e" / "results.json")
  # Evaluating a run of another model size: the message names --pretrained, the option to change.
  out = _cli(tmp_path / "e2", "--config.model.decoder_depth=2", f"--pretrained={pretrained}",
             folder=cifar_folder, module="mae_jax.evaluate")
  assert out.returncode == 2 and f"--pretrained={pretrained} holds a checkpoint of a different model" in out.stderr
  assert "decoder_depth: checkpoint 1 vs config 2" in out.stderr and "--workdir" not in out.stderr


def test_probe_finetune_and_evaluate_read_a_scanned_pretraining_checkpoint(cifar_folder, tmp_path):
  import numpy as np

  from mae_jax.io import checkpointing
  c = tiny_config(cifar_folder, max_steps=2, log_every_steps=1, figure_every_steps=1000,
                  **{"model.scan_layers": True})
  state = pretrain.run(c, str(tmp_path / "pre"))
  assert "blocks" in state.params["encoder"]
  encoder, _, _ = weights.load_encoder(str(tmp_path / "pre"), c)
  np.testing.assert_array_equal(encoder["block1"]["fc1"]["kernel"],
                                np.asarray(state.params["encoder"]["blocks"]["fc1"]["kernel"][1]))
  # Fine-tuning accumulates 2 micro-batches per step.
  c.update_from_flattened_dict({"max_steps": 2, "evaluate.num_images": 16, "finetune.grad_accum_steps": 2})
  for job in ("probe", "finetune"):
    metrics = classify.run(c, str(tmp_path / job), str(tmp_path / "pre"), job)["metrics"]
    assert 0.0 <= metrics["top1"] <= 100.0
  params, _ = weights.load_mae_params(str(tmp_path / "pre"), c, "reconstruction")
  assert "block0" in params["decoder"] and not checkpointing.layer_stack.is_scanned(params)


def test_knn_during_pretraining_is_logged(cifar_folder, tmp_path):
  c = tiny_config(cifar_folder, max_steps=10, log_every_steps=5, figure_every_steps=1000)
  c.evaluate.update(knn_every_steps=5, knn_train_examples=300, num_images=100, batch_size=50)
  pretrain.run(c, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  knn = [r for r in rows if "knn_top1" in r]
  assert [r["step"] for r in knn] == [5, 10]
  assert all(0.0 <= r["knn_top1"] <= 100.0 for r in knn)


def test_checkpoints_kept_along_pretraining_are_probed_by_step_on_a_label_subset(cifar_folder, tmp_path):
  folder = small_folder(cifar_folder, tmp_path / "images")
  # 16 images, batch 4: 4 updates per epoch; 3 epochs; every epoch's checkpoint kept, besides the last 1.
  c = tiny_config(folder, batch_size=4, num_epochs=3, max_steps=0, log_every_steps=4,
                  figure_every_steps=1000, checkpoint_every_steps=1000, keep_checkpoints=1,
                  keep_checkpoint_every_epochs=1)
  pretrain.run(c, str(tmp_path / "pre"))
  assert sorted(int(s) for s in os.listdir(tmp_path / "pre" / "checkpoints")) == [4, 8, 12]
  out = _cli(tmp_path / "probe", f"--pretrained={tmp_path / 'pre'}", "--pretrained_step=4",
             "--config.dataset.labels_per_class=3", "--config.probe.batch_size=2",
             "--config.max_steps=3", "--config.evaluate.num_images=8", folder=folder, module="mae_jax.probe")
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.load(open(tmp_path / "probe" / "results.json"))
  assert r["pretrained"]["step"] == 4 and r["labels"]["examples"] == 6
  assert r["labels"]["per_class_min"] == r["labels"]["per_class_max"] == 3
  out = _cli(tmp_path / "probe5", f"--pretrained={tmp_path / 'pre'}", "--pretrained_step=5",
             folder=folder, module="mae_jax.probe")
  assert out.returncode == 2 and "has no checkpoint of step 5; it keeps steps 4, 8, 12" in out.stderr
