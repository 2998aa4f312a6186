"""Weights in and out (mae_jax.convert): small random PyTorch models in each format, converted and
run in mae_jax on the same images and masking noise; exports read back by the PyTorch models."""

import argparse
import json
import os
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
from benchmarks import torch_cpu

torch = pytest.importorskip("torch")
# timm and transformers import torchvision, whose PyPI wheel needs the tolerant import on CPU torch.
timm_vit = torch_cpu.tolerant_import("timm.models.vision_transformer")
from torch import nn

from mae_jax import convert as convert_cmd
from mae_jax import errors
from mae_jax.io import checkpointing, foreign, weights
from mae_jax.models.classifier import Classifier
from mae_jax.models.mae import mae_from_config, sincos_2d
from mae_jax.train import pretrain

from benchmarks.official_mae import (
  OfficialMAE,  # the official model; default shape = the constants below
)

IMG, P, D, DEPTH, HEADS, DD, DDEPTH, DHEADS = 32, 4, 64, 2, 2, 32, 1, 2
L = (IMG // P) ** 2
TOL = dict(rtol=1e-5, atol=1e-5)


def randomize(module: nn.Module, seed: int, skip=("pos_embed", "position_embeddings")) -> nn.Module:
  """Every trainable tensor drawn at random (so that a swapped weight and bias, or a transposed
  matrix, shows); the fixed sin-cos position embeddings kept unless `skip` is empty."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if not any(s in name for s in skip):
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
  return module.eval()


def vit_mae():
  return torch_cpu.tolerant_import("transformers.models.vit_mae.modeling_vit_mae")


def hf_model(norm_pix_loss=True):
  m = vit_mae()
  cfg = m.ViTMAEConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                       intermediate_size=4 * D, image_size=IMG, patch_size=P, decoder_hidden_size=DD,
                       decoder_num_hidden_layers=DDEPTH, decoder_num_attention_heads=DHEADS,
                       decoder_intermediate_size=4 * DD, norm_pix_loss=norm_pix_loss)
  model = m.ViTMAEForPreTraining(cfg)
  with torch.no_grad():  # as in the hub's checkpoints (transformers 5 leaves them zero until loaded)
    model.vit.embeddings.position_embeddings.copy_(torch.from_numpy(sincos_2d(D, (8, 8), True))[None])
    model.decoder.decoder_pos_embed.copy_(torch.from_numpy(sincos_2d(DD, (8, 8), True))[None])
  return randomize(model, 1, skip=("position_embeddings", "decoder_pos_embed"))


def timm_classifier():
  """timm's fine-tuning ViT as the official models_vit (global pool, fc_norm, head), with a
  learned (random) position embedding."""
  return randomize(timm_vit.VisionTransformer(img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH,
                                              num_heads=HEADS, num_classes=10, global_pool="avg"), 2, skip=())


def inputs(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, IMG, IMG, 3)).astype(np.float32), rng.random((batch, L)).astype(np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def run_mae(params, config, imgs, noise):
  """(loss, pred, mask, encoder tokens) of mae_jax's MAE with `params`."""
  model = mae_from_config(ml_collections.ConfigDict(config["model"]), config["dataset"]["image_size"])
  variables = {"params": params}
  loss, pred, mask = model.apply(variables, imgs, noise)
  latent = model.apply(variables, imgs, noise, model.mask_ratio, method=lambda m, *a: m.encoder(*a))[0]
  return [np.asarray(x) for x in (loss, pred, mask, latent)]


def assert_close(ours, theirs, names=("loss", "pred", "mask", "latent")):
  """Each output within TOL; the largest differences are printed (pytest -s shows them)."""
  diffs = []
  for name, a, b in zip(names, ours, theirs):
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    np.testing.assert_allclose(a, b, **TOL, err_msg=name)
    diffs.append(f"{name} {np.max(np.abs(a - b)):.1e}")
  print("max |mae_jax - PyTorch|: " + ", ".join(diffs))


def test_official_full_checkpoint_gives_the_official_model_outputs(tmp_path):
  ref = randomize(OfficialMAE(), 0)
  path = str(tmp_path / "checkpoint-799.pth")
  # As main_pretrain.py saves it: the model beside the epoch and its argparse arguments.
  torch.save({"model": ref.state_dict(), "epoch": 799, "args": argparse.Namespace(mask_ratio=0.75)}, path)
  params, config = foreign.load_foreign(path, encoder_heads=HEADS, decoder_heads=DHEADS)
  assert config["model"]["encoder_depth"] == DEPTH and config["model"]["decoder_width"] == DD
  assert config["dataset"]["image_size"] == IMG and config["model"]["layer_norm_eps"] == 1e-6
  imgs, noise = inputs()
  with torch.no_grad():
    theirs = ref(nchw(imgs), torch.from_numpy(noise))
  assert_close(run_mae(params, config, imgs, noise), theirs)


def test_official_encoder_only_checkpoint_gives_the_encoder_and_says_the_decoder_is_missing(tmp_path):
  ref = randomize(OfficialMAE(), 3)
  encoder_only = {k: v for k, v in ref.state_dict().items()
                  if not (k.startswith("decoder") or k == "mask_token")}
  src = str(tmp_path / "mae_pretrain_tiny.pth")
  torch.save({"model": encoder_only}, src)
  dst = str(tmp_path / "converted")
  assert convert_cmd.main([src, dst, "--encoder_heads=2"]) == 0
  params, saved, _ = checkpointing.restore_params(dst)
  assert set(params) == {"encoder"}
  imgs, noise = inputs(1)
  model = mae_from_config(ml_collections.ConfigDict(saved["model"]), IMG)
  ours = model.apply({"params": params}, imgs, noise, 0.75, method=lambda m, *a: m.encoder(*a))[0]
  with torch.no_grad():
    theirs = ref.forward_encoder(nchw(imgs), torch.from_numpy(noise))[0]
  assert_close([np.asarray(ours)], [theirs], names=("latent",))
  config = ml_collections.ConfigDict(saved)
  with pytest.raises(errors.CheckpointMismatchError, match="holds an encoder only.*reconstruction needs the MAE decoder.*mae_visualize_vit"):
    weights.load_mae_params(dst, config, "reconstruction")


def test_hugging_face_pretraining_model_gives_its_outputs_and_its_config(tmp_path):
  hf = hf_model()
  hf.save_pretrained(str(tmp_path / "hf"))
  params, config = foreign.load_foreign(str(tmp_path / "hf"))
  m = config["model"]
  # Read from config.json, not assumed: heads, norm_pix_loss and HF's LayerNorm epsilon (1e-12).
  assert (m["encoder_heads"], m["decoder_heads"], m["norm_pix_loss"], m["layer_norm_eps"]) == (HEADS, DHEADS, True, 1e-12)
  imgs, noise = inputs(2)
  with torch.no_grad():
    out = hf(pixel_values=nchw(imgs), noise=torch.from_numpy(noise))
    latent = hf.vit(pixel_values=nchw(imgs), noise=torch.from_numpy(noise)).last_hidden_state
  assert_close(run_mae(params, config, imgs, noise), (out.loss, out.logits, out.mask, latent))
  # The encoder alone (ViTMAEModel, no "vit." prefix), in the older file (pytorch_model.bin),
  # which transformers 5 no longer writes.
  folder = tmp_path / "hf_encoder"
  hf.vit.save_pretrained(str(folder))
  from safetensors.torch import load_file
  torch.save(load_file(str(folder / "model.safetensors")), str(folder / "pytorch_model.bin"))
  os.remove(folder / "model.safetensors")
  encoder, _ = foreign.load_foreign(str(tmp_path / "hf_encoder"))
  assert set(encoder) == {"encoder"}
  jax.tree.map(np.testing.assert_array_equal, encoder["encoder"], params["encoder"])


def test_timm_mae_encoder_gives_its_features(tmp_path):
  """timm's MAE encoder layout (vit_*.mae: cls-token pooling, final norm, no head)."""
  from safetensors.torch import save_file
  ref = randomize(timm_vit.VisionTransformer(img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH,
                                             num_heads=HEADS, num_classes=0), 8)
  with torch.no_grad():
    ref.pos_embed.copy_(torch.from_numpy(sincos_2d(D, (8, 8), True))[None])  # as MAE pretrained it
  path = str(tmp_path / "vit_tiny.mae.safetensors")
  save_file(ref.state_dict(), path)
  params, config = foreign.load_foreign(path, encoder_heads=HEADS)
  assert set(params) == {"encoder"} and "pos_embed" not in params["encoder"]
  model = mae_from_config(ml_collections.ConfigDict(config["model"]), IMG)
  imgs, _ = inputs(5)
  ours = model.apply({"params": params}, imgs, method=lambda m, x: m.encoder(x)[0])
  with torch.no_grad():
    assert_close([np.asarray(ours)], [ref.forward_features(nchw(imgs))], names=("timm features",))


def test_timm_fine_tuned_classifier_gives_its_logits(tmp_path):
  from safetensors.torch import save_file
  ref = timm_classifier()
  path = str(tmp_path / "vit_finetuned.safetensors")
  save_file(ref.state_dict(), path)
  params, config = foreign.load_foreign(path, encoder_heads=HEADS)  # 64 wide: not in the paper's table
  assert set(params) == {"encoder", "fc_norm", "head"} and "pos_embed" in params["encoder"]
  model = Classifier(num_classes=10, image_size=(IMG, IMG), patch_size=P, width=D, depth=DEPTH,
                     num_heads=HEADS, global_pool=True, learned_pos_embed=True)
  imgs, _ = inputs(3)
  with torch.no_grad():
    theirs = ref(nchw(imgs)).numpy()
  assert_close([np.asarray(model.apply({"params": params}, imgs))], [theirs], names=("logits",))


def test_export_round_trip_is_bit_identical_and_pytorch_reads_each_format(tmp_path):
  ref = randomize(OfficialMAE(), 4)
  src = str(tmp_path / "full.pth")
  torch.save({"model": ref.state_dict()}, src)
  workdir = str(tmp_path / "work")
  assert convert_cmd.main([src, workdir, "--encoder_heads=2", "--decoder_heads=2"]) == 0
  params, saved, _ = checkpointing.restore_params(workdir)

  for fmt, dst in (("official", "out.pth"), ("timm", "out.safetensors"), ("hf", "out_hf")):
    dst = str(tmp_path / dst)
    assert convert_cmd.main([workdir, dst, f"--to={fmt}"]) == 0
    back, _ = foreign.load_foreign(dst, fmt, encoder_heads=2, decoder_heads=2)
    expected = params if fmt != "timm" else {"encoder": params["encoder"]}  # timm: the encoder
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, expected))

  # A workdir of scanned (stacked) layers exports the same file as the unrolled one.
  from mae_jax.models.layer_stack import stack_layers
  checkpointing.write_workdir(stack_layers(params), saved, str(tmp_path / "scanned"))
  assert convert_cmd.main([str(tmp_path / "scanned"), str(tmp_path / "scanned.pth"), "--to=official"]) == 0
  a = torch.load(str(tmp_path / "scanned.pth"), weights_only=True)["model"]
  b = torch.load(str(tmp_path / "out.pth"), weights_only=True)["model"]
  assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
  # The official file holds the official module's state dict, key for key.
  official = torch.load(str(tmp_path / "out.pth"), weights_only=True)["model"]
  assert official.keys() == ref.state_dict().keys()
  # Hugging Face's own class reads the folder; its outputs are ours.
  hf = vit_mae().ViTMAEForPreTraining.from_pretrained(str(tmp_path / "out_hf")).eval()
  assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss == saved["model"]["norm_pix_loss"]
  imgs, noise = inputs(4)
  with torch.no_grad():
    out = hf(pixel_values=nchw(imgs), noise=torch.from_numpy(noise))
  assert_close(run_mae(params, saved, imgs, noise)[:3], (out.loss, out.logits, out.mask))
  # timm's VisionTransformer takes the encoder file strictly; its features are our tokens.
  from safetensors.torch import load_file
  vit = timm_vit.VisionTransformer(img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH, num_heads=HEADS,
                                   num_classes=0).eval()
  vit.load_state_dict(load_file(str(tmp_path / "out.safetensors")), strict=True)
  timm = torch_cpu.tolerant_import("timm")  # and as a user would: create_model with the file
  created = timm.create_model("vit_tiny_patch16_224", img_size=IMG, patch_size=P, embed_dim=D, depth=DEPTH,
                              num_heads=HEADS, num_classes=0, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "out.safetensors")))
  assert all(torch.equal(a, b) for a, b in zip(created.state_dict().values(), vit.state_dict().values()))
  model = mae_from_config(ml_collections.ConfigDict(saved["model"]), IMG)
  ours = model.apply({"params": params}, imgs, method=lambda m, x: m.encoder(x)[0])
  with torch.no_grad():
    assert_close([np.asarray(ours)], [vit.forward_features(nchw(imgs))], names=("timm features",))


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
  sd = {k: v.numpy() for k, v in randomize(OfficialMAE(), 5).state_dict().items()}
  from safetensors.numpy import save_file

  def convert_dict(d, **kw):
    path = str(tmp_path / "bad.safetensors")
    save_file(d, path)
    return foreign.load_foreign(path, encoder_heads=2, decoder_heads=2, **kw)

  renamed = dict(sd)
  renamed["blocks.1.attn.qkv_weight"] = renamed.pop("blocks.1.attn.qkv.weight")
  with pytest.raises(errors.ConvertError, match=r"1 missing: blocks\.1\.attn\.qkv\.weight.*1 unknown: "
                     r"blocks\.1\.attn\.qkv_weight \(expected e\.g\. blocks\.1\.attn\.qkv\.weight\)"):
    convert_dict(renamed)
  wrong = dict(sd)
  wrong["blocks.1.mlp.fc2.weight"] = np.zeros((D, 3 * D), np.float32)
  with pytest.raises(errors.ConvertError, match=r"blocks\.1\.mlp\.fc2\.weight has shape \(64, 192\).*needs \(64, 256\)"):
    convert_dict(wrong)
  with pytest.raises(errors.ConvertError, match="not a MAE ViT state dict.*patch_embed.proj.weight"):
    convert_dict({"conv1.weight": np.zeros((8, 3, 3, 3), np.float32)})
  with pytest.raises(errors.ConvertError, match="does not say how many attention heads.*--encoder_heads"):
    path = str(tmp_path / "ok.safetensors")
    save_file(sd, path)
    foreign.load_foreign(path)
  workdir = str(tmp_path / "ft")
  path = str(tmp_path / "ft.safetensors")
  from safetensors.torch import save_file as save_torch
  save_torch(timm_classifier().state_dict(), path)
  assert convert_cmd.main([path, workdir, "--encoder_heads=2"]) == 0
  assert convert_cmd.main([workdir, str(tmp_path / "ft_hf"), "--to=hf"]) == 2  # no ViTMAE form
  with open(os.path.join(checkpointing.checkpoint_dir(workdir), "0", "config", "metadata")) as f:
    assert json.load(f)["converted_from"]["parts"] == ["encoder", "fc_norm", "head"]


def test_jobs_take_a_pytorch_checkpoint_as_pretrained_directly(cifar_folder, tmp_path):
  """--pretrained=<.pth file | Hugging Face folder>: converted in memory, nothing written beside
  it; the weights' own settings (HF's LayerNorm epsilon and norm_pix_loss) are adopted."""
  from conftest import run_cli as _cli
  src = str(tmp_path / "official.pth")
  torch.save({"model": randomize(OfficialMAE(), 6).state_dict()}, src)  # the tiny preset's shape
  out = _cli(tmp_path / "ft", "--config.max_steps=4", "--config.evaluate.num_images=100",
             f"--pretrained={src}", folder=cifar_folder, module="mae_jax.finetune")
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.load(open(tmp_path / "ft" / "results.json"))
  assert r["pretrained"] == {"workdir": src, "step": 0} and r["step"] == 4
  assert set(os.listdir(tmp_path)) == {"official.pth", "ft"}

  hf = hf_model(norm_pix_loss=True)  # the CIFAR-10 config trains without it
  hf.save_pretrained(str(tmp_path / "hf"))
  before = sorted(os.listdir(tmp_path / "hf"))
  out = _cli(tmp_path / "eval", "--config.evaluate.num_images=100", f"--pretrained={tmp_path / 'hf'}",
             folder=cifar_folder, module="mae_jax.evaluate")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "model.layer_norm_eps=1e-12, model.norm_pix_loss=True" in out.stdout
  r = json.load(open(tmp_path / "eval" / "results.json"))
  assert r["config"]["model"]["layer_norm_eps"] == 1e-12 and r["config"]["model"]["norm_pix_loss"]
  assert r["metrics"]["images"] == 100 and sorted(os.listdir(tmp_path / "hf")) == before


def test_pretraining_continues_from_converted_weights_with_their_decoder(cifar_folder, tmp_path):
  from conftest import run_cli as _cli
  from conftest import tiny_config
  src = str(tmp_path / "full.pth")
  torch.save({"model": randomize(OfficialMAE(), 7).state_dict()}, src)
  params, _ = foreign.load_foreign(src, fallback_heads=(HEADS, DHEADS))
  # One update at a negligible learning rate: the state it ends with is the converted weights.
  c = tiny_config(cifar_folder, max_steps=1, log_every_steps=1, checkpoint_every_steps=1)
  c.optimizer.update(base_lr=1e-12, weight_decay=0.0)
  c.model.scan_layers = True  # the weights are stacked into the scanned layout on the way in
  state = pretrain.run(c, str(tmp_path / "run"), pretrained=src)
  from mae_jax.models.layer_stack import unstack_layers
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               unstack_layers(jax.device_get(state.params)), params)
  assert int(state.step) == 1
  # A converted workdir is not a run to resume, and a fine-tuned classifier cannot pretrain.
  assert convert_cmd.main([src, str(tmp_path / "conv"), "--encoder_heads=2", "--decoder_heads=2"]) == 0
  out = _cli(tmp_path / "conv", folder=cifar_folder)
  assert out.returncode == 2 and f"start from them with --pretrained={tmp_path / 'conv'}" in out.stderr
  ft = str(tmp_path / "ft.safetensors")
  from safetensors.torch import save_file
  save_file(timm_classifier().state_dict(), ft)
  out = _cli(tmp_path / "run2", f"--pretrained={ft}", folder=cifar_folder)
  assert out.returncode == 2 and "holds a fine-tuned classifier" in out.stderr
  assert "pretraining needs the MAE decoder" in out.stderr and "Traceback" not in out.stderr
