"""An opt-in Weights & Biases writer: `--config.wandb_project=NAME` (and `wandb_entity`), with
`pip install -e ".[wandb]"` and `wandb login` (or WANDB_MODE=offline, then `wandb sync`).

The W&B run's id is derived from the workdir, so the same command after a stop continues the same
W&B run (W&B drops, with a warning, the few steps a resumed run logs again: those past its
checkpoint, identical by construction). Scalars go as they go to metrics.jsonl, reconstruction
figures as images.
"""

import hashlib
import os

import numpy as np

from mae_jax.errors import ConfigError
from mae_jax.runtime import paths


def run_id(workdir: str) -> str:
  """A W&B run id fixed by the workdir's absolute path."""
  return hashlib.sha1(paths.absolute(workdir).encode()).hexdigest()[:16]


class WandbWriter:
  """Logs to W&B (process 0 only: the caller decides)."""

  def __init__(self, config, workdir: str):
    try:
      import wandb
    except ImportError:
      raise ConfigError("config.wandb_project is set but wandb is not installed: pip install -e \".[wandb]\"") from None
    self._wandb = wandb
    local = not paths.is_remote(workdir)
    if local:
      os.makedirs(workdir, exist_ok=True)
    name = os.path.basename(str(workdir).rstrip("/"))
    self.run = wandb.init(project=config.wandb_project, entity=config.wandb_entity, name=name,
                          id=run_id(workdir), resume="allow", dir=workdir if local else None,
                          config=config.to_dict())

  def write(self, step: int, scalars: dict, images: dict) -> None:
    row = dict(scalars)
    row.update({k: self._wandb.Image(np.asarray(v)) for k, v in images.items()})
    self.run.log(row, step=int(step))

  def close(self) -> None:
    self.run.finish()
