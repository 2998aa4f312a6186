"""Weights by name from the Hugging Face Hub: `hf://facebook/vit-mae-base` (transformers'
ViTMAE) or `timm/vit_base_patch16_224.mae` (timm's MAE encoder), fetched into huggingface_hub's
cache on first use and read from it afterwards (also offline: HF_HUB_OFFLINE=1)."""

import json
import os

from mae_jax.errors import CheckpointMismatchError

PREFIX = "hf://"
WEIGHT_FILES = ["config.json", "*.safetensors", "pytorch_model.bin"]


def is_hub_id(name: str) -> bool:
  """Whether `name` names weights on the Hub rather than a local path: `hf://ORG/NAME`, or
  `timm/NAME` where no such local path exists."""
  return name.startswith(PREFIX) or (name.startswith("timm/") and not os.path.exists(name))


def fetch(name: str) -> str:
  """The local path of the weights `name` names (a folder for transformers' models, the
  .safetensors file of timm's), from the cache or downloaded into it."""
  repo = name[len(PREFIX):] if name.startswith(PREFIX) else name
  try:
    import huggingface_hub
    from huggingface_hub import errors as hub_errors
  except ImportError:
    raise CheckpointMismatchError(f"{name}: weights by Hub id need huggingface_hub: pip install "
                                  "huggingface_hub") from None
  try:
    folder = huggingface_hub.snapshot_download(repo, allow_patterns=WEIGHT_FILES)
  except hub_errors.LocalEntryNotFoundError:
    raise CheckpointMismatchError(
        f"{name}: not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) and the Hub "
        f"cannot be reached (offline, or HF_HUB_OFFLINE=1). Fetch it once where there is internet "
        f"(huggingface-cli download {repo}), or give a local path; nothing was written") from None
  except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError):
    raise CheckpointMismatchError(f"{name}: no such model on the Hugging Face Hub (or it is private: "
                                  "huggingface-cli login); nothing was written") from None
  config_path = os.path.join(folder, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)
    if "architecture" in config and os.path.exists(os.path.join(folder, "model.safetensors")):
      return os.path.join(folder, "model.safetensors")  # timm's repos: its state dict, its names
  return folder


def resolve(pretrained: str) -> str:
  """`pretrained` as a local path: a Hub id fetched, anything else as it is."""
  return fetch(pretrained) if is_hub_id(pretrained) else pretrained
