"""The model card (README.md) of a Hugging Face export, and publishing the export to the Hub.

The card states what the weights are (shape), how they were trained (the recipe, from the
workdir's config) and what they scored (the workdir's last pretraining loss, and the results.json
of probing, fine-tuning or evaluation runs given with --results).
"""

import json
from typing import Sequence

from mae_jax.errors import ConvertError
from mae_jax.io import metrics
from mae_jax.runtime import paths


def _result_line(path: str) -> str:
  try:
    r = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise ConvertError(f"--results={path}: not a results.json of mae_jax.probe, finetune or evaluate ({e})") from None
  m = r.get("metrics", {})
  if "top1" in m:
    labels = r.get("labels") or {}
    subset = f", {labels['examples']:,} labelled images" if labels.get("examples") else ""
    return (f"| {r.get('mode', 'classification')} ({r['config']['dataset']['name']}{subset}) | "
            f"top-1 {m['top1']:.2f}%, top-5 {m.get('top5', float('nan')):.2f}% |")
  shown = {k: m[k] for k in ("masked_mse_pixel", "psnr", "ssim", "knn_top1") if k in m}
  return f"| evaluation | {', '.join(f'{k} {v:.4g}' for k, v in shown.items())} |"


def card(config: dict, shape: dict, workdir: str, step: int, results: Sequence[str] = (),
         repo: str = "REPO") -> str:
  """The README.md of an export of `workdir` (checkpoint `step`), to be published as `repo`."""
  m, d, o = config["model"], config["dataset"], config.get("optimizer", {})
  arch = "ViTMAEForPreTraining" if shape["decoder"] else "ViTMAEModel"
  lines = ["---", "library_name: transformers", "pipeline_tag: image-feature-extraction",
           "tags: [vit-mae, masked-autoencoder, mae_jax]", "---", "",
           f"# MAE ViT, patch {m['patch_size']}, {d['image_size']} px: {d['name']}", "",
           f"Masked-autoencoder weights pretrained with mae_jax and exported as transformers' `{arch}` "
           "(`mae_jax.convert --to=hf`).", "",
           "| | |", "| --- | --- |",
           f"| encoder | {m['encoder_width']} wide x {m['encoder_depth']} blocks, {m['encoder_heads']} heads, "
           f"patch {m['patch_size']}, image {d['image_size']} px |"]
  if shape["decoder"]:
    lines.append(f"| decoder | {m['decoder_width']} wide x {m['decoder_depth']} blocks, {m['decoder_heads']} heads |")
  converted = config.get("converted_from")
  if converted:
    lines.append(f"| source | converted from {converted.get('format')} weights ({converted.get('path')}) |")
  else:
    lines += [f"| data | {d['name']} ({d.get('source')}) |",
              f"| recipe | mask ratio {m['mask_ratio']}, norm_pix_loss {m['norm_pix_loss']}, batch "
              f"{config.get('batch_size')}, {config.get('num_epochs')} epochs (warm-up {config.get('warmup_epochs')}), "
              f"base lr {o.get('base_lr')}, weight decay {o.get('weight_decay')} |",
              f"| checkpoint | step {step} |"]
  last = metrics.last_row(workdir)
  if last is not None:
    lines.append(f"| last pretraining loss | {last['loss']:.4f} at step {last['step']} |")
  if results:
    lines += ["", "## Results", "", "| run | result |", "| --- | --- |"] + [_result_line(p) for p in results]
  lines += ["", "## Use", "", "```python", "from transformers import " + arch,
            f"model = {arch}.from_pretrained(\"{repo}\")", "```", "",
            f"The same weights load back into mae_jax with `--pretrained=hf://{repo}`.", ""]
  return "\n".join(lines)


def push(folder: str, repo: str, private: bool = False) -> str:
  """Uploads the export `folder` to the Hub model repository `repo` (created if needed); returns
  its URL. Needs a token: `huggingface-cli login` or HF_TOKEN."""
  import huggingface_hub
  api = huggingface_hub.HfApi()
  try:
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model",
                      commit_message="mae_jax.convert --to=hf --push")
  except Exception as e:  # offline, no token, no permission: huggingface_hub raises many kinds
    raise ConvertError(
        f"could not publish {folder} to the Hub repository {repo} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
        f"The export is complete in {folder}; log in (huggingface-cli login, or HF_TOKEN) where the Hub "
        f"can be reached and run: huggingface-cli upload {repo} {folder}") from None
  return f"https://huggingface.co/{repo}"
