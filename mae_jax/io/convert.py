"""Weights in and out: the official MAE, timm and Hugging Face checkpoints <-> mae_jax
workdirs (`python -m mae_jax.convert`).

Every format goes through one intermediate, the official code's state dict in numpy
(`official_to_params` / `params_to_official` map it to and from mae_jax's parameter tree;
`hf_to_official` / `official_to_hf` rename Hugging Face's keys)."""

import difflib
import re

import numpy as np

from mae_jax.errors import ConvertError
from mae_jax.models import masking
from mae_jax.models.mae import sincos_2d

FORMATS = ("official", "timm", "hf")


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
  grid = masking.patch_grid(image_size, p)
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