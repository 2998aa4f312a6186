"""Weights in and out: the official MAE, timm and Hugging Face checkpoints <-> mae_jax workdirs.

  python -m mae_jax.convert SRC DST [--from=official|timm|hf] [--to=official|timm|hf]

SRC a PyTorch checkpoint, DST a new mae_jax workdir (usable at once as --pretrained=DST):
  * official: `torch.load`-able .pth of facebookresearch/mae, `{'model': state_dict}` or bare;
    encoder-only (mae_pretrain_vit_*.pth), with the decoder (mae_visualize_vit_*.pth, *_full.pth)
    or fine-tuned (fc_norm/head);
  * timm: a MAE ViT state dict (.pth or .safetensors) in timm's names, the official encoder's;
  * hf: a transformers ViTMAEForPreTraining / ViTMAEModel directory (config.json and
    model.safetensors or pytorch_model.bin; separate query/key/value).
SRC a mae_jax workdir, DST a file (official, timm) or directory (hf) in the `--to` format.

Every format goes through one intermediate, the official code's state dict in numpy
(`official_to_params` / `params_to_official` map it to and from mae_jax's parameter tree;
`hf_to_official` / `official_to_hf` rename Hugging Face's keys). What the weights do not say
(attention heads, norm_pix_loss) comes from a config beside them or from a flag.
"""

import argparse
import difflib
import json
import os
import re
import sys
from typing import Optional

import numpy as np

from mae_jax import checkpointing
from mae_jax.layers import LN_EPS
from mae_jax.model import sincos_2d

FORMATS = ("official", "timm", "hf")


class ConvertError(ValueError):
  """Weights that cannot be converted; the message says what is wrong and what to do."""


# The paper's (and timm's) heads per width: the weights give widths and depths, not heads.
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 16, 768: 12, 1024: 16, 1280: 16}

# One block, official (timm) name -> Hugging Face name (transformers 4's names, which the hub's
# checkpoints carry and transformers 5 still loads); qkv is split into query, key and value.
BLOCK_HF = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
QKV_HF = ("attention.attention.query", "attention.attention.key", "attention.attention.value")
# transformers 5 keeps the weights under new names; read both.
HF5_TO_HF4 = [(r"^(vit\.)?layers\.", r"\1encoder.layer."), (r"^decoder\.decoder_encoder\.layer\.", "decoder.decoder_layers."),
              (r"attention\.q_proj", "attention.attention.query"), (r"attention\.k_proj", "attention.attention.key"),
              (r"attention\.v_proj", "attention.attention.value"), (r"attention\.o_proj", "attention.output.dense"),
              (r"mlp\.fc1", "intermediate.dense"), (r"mlp\.fc2", "output.dense")]


# ----------------------------------------------------------------------------
# Official state dict <-> mae_jax parameters.
# ----------------------------------------------------------------------------
def _dense(sd, name):
  return {"kernel": sd[name + ".weight"].T, "bias": sd[name + ".bias"]}


def _norm(sd, name):
  return {"scale": sd[name + ".weight"], "bias": sd[name + ".bias"]}


def _block(sd, prefix):
  return {"norm1": _norm(sd, prefix + "norm1"), "norm2": _norm(sd, prefix + "norm2"),
          "attn": {"qkv": _dense(sd, prefix + "attn.qkv"), "proj": _dense(sd, prefix + "attn.proj")},
          "fc1": _dense(sd, prefix + "mlp.fc1"), "fc2": _dense(sd, prefix + "mlp.fc2")}


def _depth(sd, prefix):
  ids = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
  if ids != set(range(len(ids))):
    raise ConvertError(f"the blocks {prefix}* are numbered {sorted(ids)}, not 0 to {len(ids) - 1}")
  return len(ids)


def _is_sincos(pos, grid) -> bool:
  fixed = sincos_2d(pos.shape[-1], grid, cls_token=True)
  return pos.shape[1:] == fixed.shape and np.allclose(pos[0], fixed, atol=1e-4)


def describe_official(sd: dict) -> dict:
  """The model shape a state dict in the official names holds: patch size, grid, widths, depths,
  what parts it has ('decoder', 'head'), as far as the weights tell."""
  need(sd, ["patch_embed.proj.weight", "cls_token", "pos_embed"])
  width, channels, p, _ = sd["patch_embed.proj.weight"].shape
  if channels != 3:
    raise ConvertError(f"patch_embed.proj.weight {sd['patch_embed.proj.weight'].shape} takes {channels} "
                       "channels; mae_jax models take RGB images (3)")
  patches = sd["pos_embed"].shape[1] - 1
  side = int(round(patches ** 0.5))
  if side * side != patches:
    raise ConvertError(f"pos_embed {sd['pos_embed'].shape} holds {patches} patches, not a square grid")
  shape = {"patch_size": p, "image_size": side * p, "encoder_width": width,
           "encoder_depth": _depth(sd, "blocks."),
           "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / width if "blocks.0.mlp.fc1.weight" in sd else 4.0,
           "decoder": "decoder_embed.weight" in sd, "head": "head.weight" in sd,
           "fc_norm": "fc_norm.weight" in sd}
  if shape["decoder"]:
    shape["decoder_width"] = sd["decoder_embed.weight"].shape[0]
    shape["decoder_depth"] = _depth(sd, "decoder_blocks.")
  if shape["head"]:
    shape["num_classes"] = sd["head.weight"].shape[0]
  return shape


def official_to_params(sd: dict) -> dict:
  """mae_jax parameters (numpy, unrolled layers) of an official state dict: 'encoder', with
  'decoder' when it has one, with 'fc_norm' / 'head' when fine-tuned.

  A position embedding that is the fixed sin-cos one is dropped (mae_jax computes it); a learned
  one (fine-tuned) becomes the encoder's 'pos_embed', its cls row included."""
  shape = describe_official(sd)
  p, width, grid = shape["patch_size"], shape["encoder_width"], (shape["image_size"] // shape["patch_size"],) * 2
  check_keys(sd, expected_official_shapes(shape))
  w = sd["patch_embed.proj.weight"]  # (D, C, p, p) -> (p * p * C, D): mae_jax flattens patches (p, p, C)
  enc = {"patch_embed": {"kernel": w.transpose(2, 3, 1, 0).reshape(p * p * 3, width),
                         "bias": sd["patch_embed.proj.bias"]},
         "cls_token": sd["cls_token"]}
  pos = sd["pos_embed"]
  if not _is_sincos(pos, grid):
    enc["pos_embed"] = pos
  for i in range(shape["encoder_depth"]):
    enc[f"block{i}"] = _block(sd, f"blocks.{i}.")
  if "norm.weight" in sd:
    enc["norm"] = _norm(sd, "norm")
  params = {"encoder": enc}
  if shape["decoder"]:
    if not _is_sincos(sd["decoder_pos_embed"], grid):
      raise ConvertError(f"decoder_pos_embed {sd['decoder_pos_embed'].shape} is not the fixed 2D sin-cos "
                         f"embedding of a {grid[0]}x{grid[1]} grid that the MAE decoder uses")
    dec = {"embed": _dense(sd, "decoder_embed"), "mask_token": sd["mask_token"],
           "norm": _norm(sd, "decoder_norm"), "pred": _dense(sd, "decoder_pred")}
    for i in range(shape["decoder_depth"]):
      dec[f"block{i}"] = _block(sd, f"decoder_blocks.{i}.")
    params["decoder"] = dec
  if shape["fc_norm"]:
    params["fc_norm"] = _norm(sd, "fc_norm")
  if shape["head"]:
    params["head"] = _dense(sd, "head")
  return _float32(params)


def _float32(tree):
  if isinstance(tree, dict):
    return {k: _float32(v) for k, v in tree.items()}
  return np.ascontiguousarray(np.asarray(tree, np.float32))


def _t_dense(d, name, out):
  out[name + ".weight"], out[name + ".bias"] = d["kernel"].T, d["bias"]


def _t_norm(d, name, out):
  out[name + ".weight"], out[name + ".bias"] = d["scale"], d["bias"]


def _t_block(b, prefix, out):
  _t_norm(b["norm1"], prefix + "norm1", out)
  _t_dense(b["attn"]["qkv"], prefix + "attn.qkv", out)
  _t_dense(b["attn"]["proj"], prefix + "attn.proj", out)
  _t_norm(b["norm2"], prefix + "norm2", out)
  _t_dense(b["fc1"], prefix + "mlp.fc1", out)
  _t_dense(b["fc2"], prefix + "mlp.fc2", out)


def params_to_official(params: dict, patch_size: int, image_size: int) -> dict:
  """The official state dict (numpy) of mae_jax parameters (unrolled): the inverse of
  `official_to_params`, with the fixed sin-cos position embeddings written out."""
  enc, p = params["encoder"], patch_size
  width = enc["cls_token"].shape[-1]
  grid = (image_size // p,) * 2
  out = {}
  out["cls_token"] = np.asarray(enc["cls_token"])
  if "pos_embed" in enc:  # learned (fine-tuned)
    pos = np.asarray(enc["pos_embed"])
    if pos.shape[1] == grid[0] * grid[1]:  # saved before its cls row was a parameter
      pos = np.concatenate([np.zeros((1, 1, width), np.float32), pos], axis=1)
    out["pos_embed"] = pos
  else:
    out["pos_embed"] = sincos_2d(width, grid, cls_token=True)[None]
  k = np.asarray(enc["patch_embed"]["kernel"])
  out["patch_embed.proj.weight"] = k.reshape(p, p, 3, width).transpose(3, 2, 0, 1)
  out["patch_embed.proj.bias"] = enc["patch_embed"]["bias"]
  for i in range(sum(1 for n in enc if n.startswith("block"))):
    _t_block(enc[f"block{i}"], f"blocks.{i}.", out)
  if "norm" in enc:
    _t_norm(enc["norm"], "norm", out)
  if "decoder" in params:
    dec = params["decoder"]
    out["mask_token"] = np.asarray(dec["mask_token"])
    out["decoder_pos_embed"] = sincos_2d(dec["mask_token"].shape[-1], grid, cls_token=True)[None]
    _t_dense(dec["embed"], "decoder_embed", out)
    for i in range(sum(1 for n in dec if n.startswith("block"))):
      _t_block(dec[f"block{i}"], f"decoder_blocks.{i}.", out)
    _t_norm(dec["norm"], "decoder_norm", out)
    _t_dense(dec["pred"], "decoder_pred", out)
  if "fc_norm" in params:
    _t_norm(params["fc_norm"], "fc_norm", out)
  if "head" in params:
    _t_dense(params["head"], "head", out)
  return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def expected_official_shapes(shape: dict) -> dict:
  """Every key a state dict of this model shape has in the official names, with its shape."""
  p, d, grid_len = shape["patch_size"], shape["encoder_width"], (shape["image_size"] // shape["patch_size"]) ** 2

  def block(prefix, w):
    h = int(w * shape["mlp_ratio"])
    sizes = {"norm1": (w,), "attn.qkv": (3 * w, w), "attn.proj": (w, w), "norm2": (w,),
             "mlp.fc1": (h, w), "mlp.fc2": (w, h)}
    return dense(prefix, sizes)

  def dense(prefix, sizes):  # {name: weight shape} -> weight and bias keys
    return {k: v for n, s in sizes.items() for k, v in ((f"{prefix}{n}.weight", s), (f"{prefix}{n}.bias", s[:1]))}

  out = {"cls_token": (1, 1, d), "pos_embed": (1, grid_len + 1, d), **dense("patch_embed.", {"proj": (d, 3, p, p)})}
  for i in range(shape["encoder_depth"]):
    out.update(block(f"blocks.{i}.", d))
  if not shape["fc_norm"] or not shape["head"]:
    out.update(dense("", {"norm": (d,)}))
  if shape["decoder"]:
    dd = shape["decoder_width"]
    out.update({"mask_token": (1, 1, dd), "decoder_pos_embed": (1, grid_len + 1, dd),
                **dense("decoder_", {"embed": (dd, d), "norm": (dd,), "pred": (p * p * 3, dd)})})
    for i in range(shape["decoder_depth"]):
      out.update(block(f"decoder_blocks.{i}.", dd))
  if shape["fc_norm"]:
    out.update(dense("", {"fc_norm": (d,)}))
  if shape["head"]:
    out.update(dense("", {"head": (shape["num_classes"], d)}))
  return out


def _listed(names: list, among: list, hint: str, most: int = 5) -> str:
  """A handful of `names`, each with its closest match in `among` ('x (hint y)')."""
  def one(name):
    near = difflib.get_close_matches(name, among, n=1, cutoff=0.5)
    return f"{name} ({hint} {near[0]})" if near else name
  return ", ".join(one(n) for n in names[:most]) + (", ..." if len(names) > most else "")


def need(sd: dict, keys) -> None:
  """The keys every MAE ViT state dict has, before anything else is read."""
  missing = [k for k in keys if k not in sd]
  if missing:
    raise ConvertError(f"not a MAE ViT state dict: {len(missing)} key(s) missing: "
                       + _listed(missing, list(sd), "closest present:"))


def check_keys(sd: dict, expected: dict) -> None:
  """Unknown or missing keys, a handful listed with the closest names; then each tensor's shape."""
  unknown = [k for k in sd if k not in expected]
  missing = [k for k in expected if k not in sd]
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: " + _listed(missing, list(sd), "closest present:"))
  if unknown:
    problems.append(f"{len(unknown)} unknown: " + _listed(unknown, list(expected), "expected e.g."))
  if problems:
    raise ConvertError("the state dict's keys are not a MAE ViT's (" + "; ".join(problems) + ")")
  for k, want in expected.items():
    if tuple(sd[k].shape) != want:
      raise ConvertError(f"{k} has shape {tuple(sd[k].shape)}, but a model of these widths "
                         f"(read from patch_embed, pos_embed and the first block) needs {want}")


# ----------------------------------------------------------------------------
# Hugging Face names <-> official names.
# ----------------------------------------------------------------------------
def hf_to_official(sd: dict) -> dict:
  """A ViTMAEForPreTraining / ViTMAEModel state dict (transformers 4 or 5 names) in the official
  names, query/key/value concatenated into qkv."""
  renamed = {}
  for k, v in sd.items():
    for pattern, repl in HF5_TO_HF4:
      k = re.sub(pattern, repl, k)
    renamed[k[len("vit."):] if k.startswith("vit.") else k] = v
  sd, out = renamed, {}
  top = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
         "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
         "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
         "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
         "decoder.mask_token": "mask_token", "decoder.decoder_pos_embed": "decoder_pos_embed"}
  for part in ("embed", "norm", "pred"):
    for t in ("weight", "bias"):
      top[f"decoder.decoder_{part}.{t}"] = f"decoder_{part}.{t}"
  layers = {"encoder.layer.": "blocks.", "decoder.decoder_layers.": "decoder_blocks."}
  block_names = {hf: off for off, hf in BLOCK_HF.items()}
  for k, v in sd.items():
    if k in top:
      out[top[k]] = v
      continue
    m = re.match(r"(encoder\.layer\.|decoder\.decoder_layers\.)(\d+)\.(.+)\.(weight|bias)$", k)
    if m is None:
      out[k] = v  # reported by check_keys with the closest expected names
      continue
    prefix, i, name, t = m.groups()
    new = f"{layers[prefix]}{i}."
    if name in QKV_HF:
      if name == QKV_HF[0]:
        parts = [sd.get(f"{prefix}{i}.{q}.{t}") for q in QKV_HF]
        if any(x is None for x in parts):
          raise ConvertError(f"{k}: the layer's key or value weight is missing")
        out[f"{new}attn.qkv.{t}"] = np.concatenate(parts, axis=0)
      continue
    out[f"{new}{block_names.get(name, name)}.{t}"] = v
  return out


def official_to_hf(sd: dict, encoder_only: bool) -> dict:
  """Official names -> ViTMAEForPreTraining's (ViTMAEModel's with `encoder_only`)."""
  enc = "" if encoder_only else "vit."
  top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
         "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
         "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
         "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
  out = {}
  for k, v in sd.items():
    if k in top:
      out[enc + top[k]] = v
    elif k in ("mask_token", "decoder_pos_embed") or re.match(r"decoder_(embed|norm|pred)\.", k):
      out["decoder." + k] = v
    else:
      m = re.match(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)$", k)
      if m is None:
        raise ConvertError(f"{k} has no place in a Hugging Face ViTMAE model")
      part, i, name, t = m.groups()
      prefix = f"{enc}encoder.layer.{i}." if part == "blocks" else f"decoder.decoder_layers.{i}."
      if name == "attn.qkv":
        for q, x in zip(QKV_HF, np.split(v, 3, axis=0)):
          out[f"{prefix}{q}.{t}"] = np.ascontiguousarray(x)
      else:
        out[f"{prefix}{BLOCK_HF[name]}.{t}"] = v
  return out


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------
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


def write_state_dict(sd: dict, path: str, wrap: bool) -> None:
  if path.endswith(".safetensors"):
    from safetensors.numpy import save_file
    save_file(sd, path, metadata={"format": "pt"})
    return
  torch = _torch()
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}  # a writable copy
  torch.save({"model": tensors} if wrap else tensors, path)


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
  return hf_to_official(sd), {k: v for k, v in facts.items() if v is not None}


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
    raise ConvertError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
  shape = describe_official(sd)
  params = official_to_params(sd)

  def heads(part, flag_value):
    width = shape.get(f"{part}_width")
    value = (flag_value or facts.get(f"{part}_heads") or HEADS_BY_WIDTH.get(width)
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
def export(workdir: str, dst: str, fmt: str) -> int:
  """Writes the newest checkpoint of `workdir` to `dst` in `fmt`; returns the tensors written."""
  params, config, step = checkpointing.restore_params(workdir)
  params = {k: v for k, v in params.items() if k in ("encoder", "decoder", "fc_norm", "head")}
  if checkpointing.has_batch_stats(workdir, step):
    # A linear probe's head reads BatchNorm-normalised features, which no target format's head
    # does: only the (frozen, pretrained) encoder goes out.
    params = {"encoder": params["encoder"]}
    print(f"{workdir} is a linear probe: its head needs the probe's BatchNorm statistics, which "
          "the target formats have no place for; exporting the encoder only")
  sd = params_to_official(params, config["model"]["patch_size"], config["dataset"]["image_size"])
  shape = describe_official(sd)
  if os.path.exists(dst):
    raise ConvertError(f"{dst} exists; give a new path")
  if fmt == "official":
    out = sd
    write_state_dict(out, dst, wrap=True)
  elif fmt == "timm":  # the encoder (and a fine-tuned head): timm's VisionTransformer
    out = {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}
    write_state_dict(out, dst, wrap=False)
  elif fmt == "hf":
    if shape["head"]:
      raise ConvertError("a fine-tuned classifier has no Hugging Face ViTMAE form; export it with "
                         "--to=official or --to=timm")
    out = official_to_hf(sd, encoder_only=not shape["decoder"])
    os.makedirs(dst)
    write_state_dict(out, os.path.join(dst, "model.safetensors"), wrap=False)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(hf_config(config, shape), f, indent=2)
  else:
    raise ConvertError(f"unknown --to={fmt!r}; use one of {', '.join(FORMATS)}")
  return len(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m mae_jax.convert", description=__doc__.split("\n\n")[0])
  p.add_argument("src", help="official/timm .pth or .safetensors, a Hugging Face folder, or a mae_jax workdir")
  p.add_argument("dst", help="a new mae_jax workdir, or (from a workdir) the file/folder to write")
  p.add_argument("--from", dest="src_format", choices=FORMATS, default="", help="SRC's format (detected)")
  p.add_argument("--to", dest="dst_format", choices=FORMATS, default="", help="DST's format, from a workdir")
  p.add_argument("--encoder_heads", type=int, default=0, help="attention heads, where the width does not tell")
  p.add_argument("--decoder_heads", type=int, default=0)
  p.add_argument("--norm_pix_loss", choices=("true", "false"), default=None,
                 help="whether the weights were pretrained with the per-patch normalised target")
  a = p.parse_args(argv)
  try:
    if detect_format(a.src) == "mae_jax":
      if not a.dst_format:
        raise ConvertError("from a mae_jax workdir, say the format to write: --to=official|timm|hf")
      count = export(a.src, a.dst, a.dst_format)
      print(f"wrote {a.dst} ({a.dst_format}, {count} tensors)")
      return 0
    params, config = load_foreign(a.src, a.src_format, a.encoder_heads, a.decoder_heads,
                                  None if a.norm_pix_loss is None else a.norm_pix_loss == "true")
    checkpointing.write_workdir(params, config, a.dst)
    m = config["model"]
    print(f"wrote {a.dst}: {', '.join(config['converted_from']['parts'])} | patch {m['patch_size']}, image "
          f"{config['dataset']['image_size']}, encoder {m['encoder_width']} x {m['encoder_depth']} "
          f"({m['encoder_heads']} heads)" + (f", decoder {m['decoder_width']} x {m['decoder_depth']} "
          f"({m['decoder_heads']} heads)" if "decoder" in params else "")
          + f" | layer_norm_eps {m['layer_norm_eps']:g}, norm_pix_loss "
          + (str(m["norm_pix_loss"]) if "norm_pix_loss" in config["converted_from"]["settings"]
             else "not said (the job's config decides; --norm_pix_loss=true|false to set)"))
    return 0
  except (ConvertError, checkpointing.CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
