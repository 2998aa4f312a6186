"""Where starting weights come from: `--pretrained` as a mae_jax workdir (its newest checkpoint,
or `--pretrained_step`) or as foreign weights (an official MAE `.pth`, a timm file, a Hugging
Face ViTMAE folder; converted in memory by `mae_jax.convert`, nothing written), turned into
parameters, and into the settings they imply for the job's config.

`checkpointing` knows mae_jax workdirs only, `convert` foreign formats only; this module joins
the two for the jobs (pretraining from weights, probe, fine-tune, evaluate, the study's kNN).
"""

from typing import Optional

from mae_jax.io import checkpointing, foreign
from mae_jax.io import metrics as metrics_lib
from mae_jax.io.checkpointing import CheckpointMismatchError

_converted_cache: dict = {}


def _converted(path: str, config=None) -> tuple[dict, dict]:
  """Foreign weights converted in memory, once per process (the last one kept). `config`, the
  job's, gives the attention heads where the weights do not."""
  heads = (config.model.encoder_heads, config.model.decoder_heads) if config is not None else (0, 0)
  if (path, heads) not in _converted_cache:
    _converted_cache.clear()
    _converted_cache[path, heads] = foreign.load_foreign(path, fallback_heads=heads)
  return _converted_cache[path, heads]


def saved_config(pretrained: str, config=None) -> Optional[dict]:
  """The config the weights of `pretrained` were made with (a workdir's, or the one a foreign
  file implies), or None for a folder without a checkpoint."""
  if foreign.is_foreign(pretrained):
    return _converted(pretrained, config)[1]
  return checkpointing.saved_config(pretrained)


def restore(pretrained: str, config=None, step: Optional[int] = None) -> tuple[dict, dict, int]:
  """(parameters as numpy, the config they were made with, step) of `pretrained`: a workdir's
  newest readable checkpoint or checkpoint `step`; foreign weights are step 0."""
  if foreign.is_foreign(pretrained):
    if step not in (None, 0):
      raise CheckpointMismatchError(f"{pretrained} is one set of weights; it has no step {step}")
    params, saved = _converted(pretrained, config)
    return params, saved, 0
  return checkpointing.restore_params(pretrained, step)


def adopt_settings(config, pretrained: str) -> None:
  """Sets in `config.model` what the weights in `pretrained` were trained with and the config
  cannot know: their LayerNorm epsilon (Hugging Face's 1e-12), and norm_pix_loss where a
  converted source said it. A `pretrained` that holds no weights is refused here, before any
  job writes to its workdir."""
  if not foreign.is_foreign(pretrained) and checkpointing.newest_step(pretrained) is None:
    raise CheckpointMismatchError(
        f"--pretrained={pretrained}: no checkpoint found in {checkpointing.checkpoint_dir(pretrained)}; "
        "give a pretraining workdir, an official or timm .pth / .safetensors file, or a Hugging Face "
        "ViTMAE folder (nothing was written)")
  saved = saved_config(pretrained, config)
  if saved is None:
    return
  settings = {"layer_norm_eps": saved["model"]["layer_norm_eps"],
              **saved.get("converted_from", {}).get("settings", {})}
  changed = {k: v for k, v in settings.items() if config.model[k] != v}
  if changed:
    config.model.update(changed)
    metrics_lib.log(f"from {pretrained}: " + ", ".join(f"model.{k}={v}" for k, v in changed.items()))


def load_mae_params(pretrained: str, config, purpose: str, step: Optional[int] = None) -> tuple[dict, int]:
  """(the full MAE parameters, encoder and decoder, step) of `pretrained` (its newest checkpoint,
  or `step`), for `purpose` (reconstruction, pretraining, kNN), checked against the config's
  model; what lacks the decoder is refused with what to use instead."""
  saved = saved_config(pretrained, config)
  source = (saved or {}).get("converted_from")
  if source and "decoder" not in source["parts"]:
    what = "a fine-tuned classifier" if "head" in source["parts"] else "an encoder only"
    raise CheckpointMismatchError(
        f"{source['path']} holds {what} ({', '.join(source['parts'])}), and {purpose} needs the MAE "
        "decoder too: use a checkpoint with the decoder (the official mae_visualize_vit_*.pth or "
        "*_full.pth, or a Hugging Face ViTMAEForPreTraining folder)")
  checkpointing.check_model(saved, config, "--pretrained", pretrained)
  params, _, step = restore(pretrained, config, step)
  if "decoder" not in params:
    raise CheckpointMismatchError(
        f"the checkpoint in {pretrained!r} has no decoder (a probe or fine-tune run?); {purpose} "
        "needs the pretraining workdir")
  return params, step


def load_encoder(pretrained: str, config, step: Optional[int] = None) -> tuple[dict, dict, int]:
  """The encoder parameters of `pretrained` (its newest checkpoint, or `step`), the config they
  were made with and the step; refused when the encoder is not the config's."""
  params, saved, step = restore(pretrained, config, step)
  checkpointing.check_model(saved, config, "--pretrained", pretrained, encoder_only=True)
  return params["encoder"], saved, step
