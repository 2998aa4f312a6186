"""Measure a pretrained MAE:
`python -m mae_jax.evaluate --config=configs/cifar10_vit_t.py --pretrained=runs/cifar10 --workdir=runs/cifar10_eval`.

On the test split, at the configured mask ratio (fixed masks from the seed):
  * masked-patch MSE in the loss's units (normalised pixels, per-patch normalised with
    norm_pix_loss) and in [0, 1] pixels;
  * PSNR and SSIM (Gaussian 11x11, sigma 1.5, as Wang et al. and scikit-image's
    gaussian_weights=True) of the reconstruction with the visible patches pasted back;
  * the masked high-frequency error of the STL-10 curriculum study: mean |Laplacian(pred) -
    Laplacian(target)| over the masked pixels, on [0, 1] images, kernel [[0,1,0],[1,-4,1],[0,1,0]];
  * LPIPS with AlexNet and VGG16 where their weight files are given (`mae_jax.lpips`);
  * a kNN classifier (k=20, cosine, votes weighted by exp(sim / 0.07)) on frozen encoder features.
Writes `results.json`, a figure grid, and the numbers to metrics.jsonl / TensorBoard.
"""

import sys

from mae_jax import cli
from mae_jax.evaluators.evaluate import run


def _job(config, workdir, pretrained, pretrained_step):
  return run(config, workdir, pretrained, pretrained_step)


if __name__ == "__main__":
  cli.define_job_flags(pretrained_required=True)
  sys.exit(cli.run_app(cli.job_main(_job, "evaluate")))
