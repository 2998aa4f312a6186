"""Weights as files: reading and writing the official/timm `.pth` and `.safetensors` files and
Hugging Face ViTMAE folders, telling the formats apart, loading any of them as mae_jax
parameters and a config (`load_foreign`), and exporting a workdir (`export`). The name
mapping itself is mae_jax/io/convert.py."""

import argparse
import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np

from mae_jax.errors import ConvertError
from mae_jax.io import checkpoint_noise, checkpointing, convert, model_card
from mae_jax.models.layers import LN_EPS
from mae_jax.runtime import durable


def _torch():
  try:
    import torch
  except ImportError:
    raise ConvertError("reading or writing .pth files needs PyTorch: pip install torch "
                       "(or use .safetensors files, which need only the safetensors package)") from None
  return torch


def read_state_dict(path: str) -> dict:
  """A .pth / .pt / .bin (torch.load, weights only) or .safetensors file -> {name: numpy array};
  a {'model': ...} or {'state_dict': ...} wrapper is unwrapped."""
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  torch = _torch()
  try:
    # Training checkpoints of the official code also hold its argparse arguments: allowed, as
    # plain data; anything else that is not tensors and containers stays refused.
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConvertError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
  for wrapper in ("model", "state_dict", "module"):
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      out[k] = v.detach().float().numpy() if v.is_floating_point() else v.numpy()
  return out


def write_state_dict(sd: dict, path: str, wrap: bool, safetensors: bool) -> None:
  """`sd` as a .safetensors file, or as a torch.save file ({'model': sd} with `wrap`)."""
  if safetensors:
    from safetensors.numpy import save_file
    save_file(sd, path, metadata={"format": "pt"})
    return
  torch = _torch()
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}  # a writable copy
  with open(path, "wb") as f:  # Python's writes keep the OSError (a full disk) that torch's would not
    torch.save({"model": tensors} if wrap else tensors, f)


def detect_format(path: str) -> str:
  if os.path.isdir(path):
    if checkpointing.is_workdir(path):
      return "mae_jax"
    if is_hf_folder(path):
      return "hf"
    raise ConvertError(f"{path} is a folder but neither a mae_jax workdir (checkpoints/) nor a Hugging "
                       "Face model (config.json and model.safetensors or pytorch_model.bin)")
  if not os.path.exists(path):
    raise ConvertError(f"{path} does not exist")
  return "timm" if path.endswith(".safetensors") else "official"


def read_hf(folder: str) -> tuple[dict, dict]:
  """(official state dict, shape facts from config.json) of a Hugging Face ViTMAE folder."""
  with open(os.path.join(folder, "config.json")) as f:
    cfg = json.load(f)
  if cfg.get("model_type") not in (None, "vit_mae"):
    raise ConvertError(f"{folder}/config.json is a {cfg.get('model_type')!r} model, not vit_mae")
  for name in HF_WEIGHTS:
    if os.path.exists(os.path.join(folder, name)):
      sd = read_state_dict(os.path.join(folder, name))
      break
  else:
    raise ConvertError(f"{folder} has no model.safetensors or pytorch_model.bin")
  facts = {"encoder_heads": cfg.get("num_attention_heads"), "decoder_heads": cfg.get("decoder_num_attention_heads"),
           "norm_pix_loss": cfg.get("norm_pix_loss"), "layer_norm_eps": cfg.get("layer_norm_eps", 1e-12),
           "mask_ratio": cfg.get("mask_ratio")}
  if cfg.get("hidden_act", "gelu") != "gelu" or not cfg.get("qkv_bias", True):
    raise ConvertError(f"{folder}: hidden_act {cfg.get('hidden_act')!r} / qkv_bias {cfg.get('qkv_bias')} "
                       "differ from MAE's (exact gelu, qkv with bias)")
  return convert.hf_to_official(sd), {k: v for k, v in facts.items() if v is not None}


def hf_config(config: dict, shape: dict) -> dict:
  m = config["model"]
  return {"architectures": ["ViTMAEForPreTraining" if shape["decoder"] else "ViTMAEModel"],
          "model_type": "vit_mae", "hidden_size": m["encoder_width"],
          "num_hidden_layers": m["encoder_depth"], "num_attention_heads": m["encoder_heads"],
          "intermediate_size": int(m["encoder_width"] * m["mlp_ratio"]), "hidden_act": "gelu",
          "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
          "layer_norm_eps": m["layer_norm_eps"], "image_size": config["dataset"]["image_size"],
          "patch_size": m["patch_size"], "num_channels": 3, "qkv_bias": True,
          "decoder_num_attention_heads": m["decoder_heads"], "decoder_hidden_size": m["decoder_width"],
          "decoder_num_hidden_layers": m["decoder_depth"],
          "decoder_intermediate_size": int(m["decoder_width"] * m["mlp_ratio"]),
          "mask_ratio": m["mask_ratio"], "norm_pix_loss": bool(m["norm_pix_loss"])}


# ----------------------------------------------------------------------------
# Import: a PyTorch checkpoint -> a mae_jax workdir.
# ----------------------------------------------------------------------------
def load_foreign(src: str, fmt: str = "", encoder_heads: int = 0, decoder_heads: int = 0,
                 norm_pix_loss: Optional[bool] = None, fallback_heads=(0, 0)) -> tuple[dict, dict]:
  """(mae_jax parameters, the config dict to save with them) of an official, timm or Hugging
  Face checkpoint. Attention heads: the flags', else the source config's, else the paper's for
  that width, else `fallback_heads` (a job's config, for --pretrained)."""
  from mae_jax import config_lib
  fmt = fmt or detect_format(src)
  if fmt == "mae_jax":
    raise ConvertError(f"{src} is a mae_jax workdir already")
  if fmt == "hf":
    sd, facts = read_hf(src)
  elif fmt in ("official", "timm"):
    sd, facts = read_state_dict(src), {}
    # A head of 0 classes (saved from timm with num_classes=0) carries nothing.
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and v.shape[0] == 0)}
  else:
    raise ConvertError(f"unknown format {fmt!r}; use one of {', '.join(convert.FORMATS)}")
  shape = convert.describe_official(sd)
  params = convert.official_to_params(sd)

  def heads(part, flag_value):
    width = shape.get(f"{part}_width")
    value = (flag_value or facts.get(f"{part}_heads") or convert.HEADS_BY_WIDTH.get(width)
             or fallback_heads[part == "decoder"])
    if not value:
      raise ConvertError(f"the {part} width {width} does not say how many attention heads it has; "
                         f"pass --{part}_heads=N")
    if width % value:
      raise ConvertError(f"--{part}_heads={value} does not divide the {part} width {width}")
    return value

  c = config_lib.pretrain_config()
  c.dataset.image_size = shape["image_size"]
  c.model.update(patch_size=shape["patch_size"], encoder_width=shape["encoder_width"],
                 encoder_depth=shape["encoder_depth"], encoder_heads=heads("encoder", encoder_heads),
                 mlp_ratio=shape["mlp_ratio"], layer_norm_eps=facts.get("layer_norm_eps", LN_EPS))
  if shape["decoder"]:
    c.model.update(decoder_width=shape["decoder_width"], decoder_depth=shape["decoder_depth"],
                   decoder_heads=heads("decoder", decoder_heads))
  if "mask_ratio" in facts:
    c.model.mask_ratio = facts["mask_ratio"]
  if norm_pix_loss is not None:
    c.model.norm_pix_loss = norm_pix_loss
  elif "norm_pix_loss" in facts:
    c.model.norm_pix_loss = facts["norm_pix_loss"]
  config = c.to_dict()
  # `settings`: what the source (or a flag) said of how its weights compute, which a job using
  # them adopts over its own config (checkpointing.adopt_pretrained_settings).
  settings = {"layer_norm_eps": c.model.layer_norm_eps}
  if norm_pix_loss is not None or "norm_pix_loss" in facts:
    settings["norm_pix_loss"] = c.model.norm_pix_loss
  config["converted_from"] = {"path": os.path.abspath(src), "format": fmt, "settings": settings,
                              "parts": [p for p in ("encoder", "decoder", "fc_norm", "head") if p in params]}
  return params, config


def is_foreign(path: str) -> bool:
  """Whether a `--pretrained` path is a PyTorch checkpoint (a file, or a Hugging Face folder)
  rather than a mae_jax workdir."""
  return os.path.isfile(path) or (os.path.isdir(path) and not checkpointing.is_workdir(path) and is_hf_folder(path))


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def is_hf_folder(path: str) -> bool:
  """A Hugging Face model folder: config.json and the weights (a mae_jax workdir has a
  config.json too, but no weights file)."""
  return os.path.exists(os.path.join(path, "config.json")) and any(
      os.path.exists(os.path.join(path, name)) for name in HF_WEIGHTS)


# ----------------------------------------------------------------------------
# Export: a mae_jax workdir -> a PyTorch checkpoint.
# ----------------------------------------------------------------------------
def export(workdir: str, dst: str, fmt: str, results: Sequence[str] = (), repo: Optional[str] = None) -> int:
  """Writes the newest checkpoint of `workdir` to `dst` in `fmt`; returns the tensors written. A
  Hugging Face folder gets a model card (README.md) naming `repo`, with the `results` files'
  figures (model_card.py)."""
  params, config, step = checkpointing.restore_params(workdir)
  params = {k: v for k, v in params.items() if k in ("encoder", "decoder", "fc_norm", "head")}
  if checkpointing.has_batch_stats(workdir, step):
    # A linear probe's head reads BatchNorm-normalised features, which no target format's head
    # does: only the (frozen, pretrained) encoder goes out.
    params = {"encoder": params["encoder"]}
    print(f"{workdir} is a linear probe: its head needs the probe's BatchNorm statistics, which "
          "the target formats have no place for; exporting the encoder only")
  sd = convert.params_to_official(params, config["model"]["patch_size"], config["dataset"]["image_size"])
  shape = convert.describe_official(sd)
  if fmt not in convert.FORMATS:
    raise ConvertError(f"unknown --to={fmt!r}; use one of {', '.join(convert.FORMATS)}")
  if fmt == "hf" and shape["head"]:
    raise ConvertError("a fine-tuned classifier has no Hugging Face ViTMAE form; export it with "
                       "--to=official or --to=timm")
  check_destination(dst, fmt)
  # Written under a temporary name beside dst, flushed, renamed: a killed or failed export
  # leaves nothing under dst (runtime/durable.py).
  with durable.replacing(dst) as tmp:
    if fmt == "official":
      out = sd
      write_state_dict(out, tmp, wrap=True, safetensors=dst.endswith(".safetensors"))
    elif fmt == "timm":  # the encoder (and a fine-tuned head): timm's VisionTransformer
      out = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
      write_state_dict(out, tmp, wrap=False, safetensors=dst.endswith(".safetensors"))
    else:
      out = convert.official_to_hf(sd, encoder_only=not shape["decoder"])
      os.makedirs(tmp)
      write_state_dict(out, os.path.join(tmp, "model.safetensors"), wrap=False, safetensors=True)
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config(config, shape), f, indent=2)
      with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(model_card.card(config, shape, workdir, step, results, repo or os.path.basename(dst.rstrip("/"))))
  return len(out)


def unreadable_reason(path: str, fmt: str) -> Optional[str]:
  """Why the export `path` in `fmt` cannot be read (a file cut short by an interrupted write of
  an earlier version), or None when it reads whole."""
  try:
    if fmt == "hf":
      read_hf(path)
    else:
      read_state_dict(path)
  except Exception as e:
    return checkpoint_noise.failure_reason(e)
  return None


def check_destination(dst: str, fmt: str) -> None:
  """Refuses an existing export that reads (never overwritten); one that does not read (cut
  short by an interrupted write) is moved out of the way, to be replaced."""
  if not os.path.lexists(dst):
    return
  reason = unreadable_reason(dst, fmt)
  if reason is None:
    raise ConvertError(f"{dst} exists and reads as a complete {fmt} export; give a new path (or "
                       "delete it to write it again)")
  print(f"{dst} exists but cannot be read ({reason}): an interrupted write left it; replacing it")
  if os.path.isdir(dst) and not os.path.islink(dst):
    shutil.rmtree(dst)
  else:
    os.remove(dst)
