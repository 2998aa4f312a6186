"""Weights in and out: the official MAE, timm and Hugging Face checkpoints <-> mae_jax workdirs.

  python -m mae_jax.convert SRC DST [--from=official|timm|hf] [--to=official|timm|hf]
  python -m mae_jax.convert WORKDIR DST --to=hf --push=ORG/NAME [--results=R.json ...]

SRC a PyTorch checkpoint, DST a new mae_jax workdir (usable at once as --pretrained=DST):
  * official: `torch.load`-able .pth of facebookresearch/mae, `{'model': state_dict}` or bare;
    encoder-only (mae_pretrain_vit_*.pth), with the decoder (mae_visualize_vit_*.pth, *_full.pth)
    or fine-tuned (fc_norm/head);
  * timm: a MAE ViT state dict (.pth or .safetensors) in timm's names, the official encoder's;
  * hf: a transformers ViTMAEForPreTraining / ViTMAEModel directory (config.json and
    model.safetensors or pytorch_model.bin; separate query/key/value);
  * a Hub id: hf://facebook/vit-mae-base (transformers) or timm/vit_base_patch16_224.mae (timm),
    fetched into huggingface_hub's cache on first use (offline afterwards).
SRC a mae_jax workdir, DST a file (official, timm) or directory (hf) in the `--to` format; a
Hugging Face directory comes with a model card (README.md: shape, recipe, results), and `--push`
publishes it to the Hub (`huggingface-cli login` first).

Every format goes through one intermediate, the official code's state dict in numpy
(`official_to_params` / `params_to_official` map it to and from mae_jax's parameter tree;
`hf_to_official` / `official_to_hf` rename Hugging Face's keys). What the weights do not say
(attention heads, norm_pix_loss) comes from a config beside them or from a flag.
"""

import argparse
import os
import signal
import sys

from mae_jax import errors
from mae_jax.errors import CheckpointMismatchError, ConvertError
from mae_jax.runtime import host


def main(argv=None) -> int:
  if not os.environ.get("JAX_PLATFORMS") and not host.accelerator_attached():
    # Converting needs no accelerator: installed plugins (libtpu, CUDA) would each try to start,
    # print why they cannot, and install signal handlers of their own.
    host.run_jax_on_cpu()
  from mae_jax.io.convert import FORMATS  # after the platform is chosen: it imports JAX

  p = argparse.ArgumentParser(prog="python -m mae_jax.convert", description=__doc__.split("\n\n")[0])
  p.add_argument("src", help="official/timm .pth or .safetensors, a Hugging Face folder, or a mae_jax workdir")
  p.add_argument("dst", help="a new mae_jax workdir, or (from a workdir) the file/folder to write")
  p.add_argument("--from", dest="src_format", choices=FORMATS, default="", help="SRC's format (detected)")
  p.add_argument("--to", dest="dst_format", choices=FORMATS, default="", help="DST's format, from a workdir")
  p.add_argument("--encoder_heads", type=int, default=0, help="attention heads, where the width does not tell")
  p.add_argument("--decoder_heads", type=int, default=0)
  p.add_argument("--norm_pix_loss", choices=("true", "false"), default=None,
                 help="whether the weights were pretrained with the per-patch normalised target")
  p.add_argument("--push", default="", metavar="ORG/NAME",
                 help="with --to=hf: publish DST to this Hugging Face Hub model repository")
  p.add_argument("--private", action="store_true", help="with --push: create the repository private")
  p.add_argument("--results", action="append", default=[], metavar="RESULTS_JSON",
                 help="results.json of a probe, fine-tune or evaluate run, for the model card (repeatable)")
  a = p.parse_args(argv)

  def stop(signum, frame):  # SIGTERM, SIGHUP: end through Python, so the temporary copy is removed
    raise SystemExit(128 + signum)
  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
  try:
    return _convert(a)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _convert(a) -> int:
  from mae_jax.io import checkpointing, hub
  from mae_jax.io.foreign import detect_format, export, load_foreign
  try:
    a.src = hub.resolve(a.src)  # a Hub id: from huggingface_hub's cache
    if detect_format(a.src) == "mae_jax":
      if not a.dst_format:
        raise ConvertError("from a mae_jax workdir, say the format to write: --to=official|timm|hf")
      if a.push and a.dst_format != "hf":
        raise ConvertError("--push publishes a Hugging Face folder: add --to=hf")
      count = export(a.src, a.dst, a.dst_format, a.results, a.push or None)
      print(f"wrote {a.dst} ({a.dst_format}, {count} tensors)")
      if a.push:
        from mae_jax.io import model_card
        print(f"published {a.dst} to {model_card.push(a.dst, a.push, a.private)}")
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
  except (ConvertError, CheckpointMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except Exception as e:
    cause = errors.storage_cause(e, written=a.dst)
    if cause is None:
      raise
    print(f"error: storage fault ({cause}) writing {a.dst}: nothing was written under that name. "
          "Free space or repair the file system, then run the same command", file=sys.stderr)
    return errors.StorageError.exit_code


if __name__ == "__main__":
  sys.exit(main())
