"""Orbax checkpoints in `workdir/checkpoints/<step>/`: train state, data iterator state, config.

Saving is asynchronous (training goes on while arrays are written); the data iterator's
position is saved per process by grain's handler, so a restored run reads exactly the
batches an uninterrupted run would have read.
"""

import json
import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from mae_jax import config_lib


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of another model."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves every `every_steps` steps and on demand; keeps the last `keep`."""

  def __init__(self, workdir: str, every_steps: int, keep: int):
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, config_dict: dict, force: bool = False) -> bool:
    """Starts an async save when `step` is due (or `force`); returns whether it saved."""
    if not force and step % self.every_steps:
      return False
    if self.manager.latest_step() == step:
      return False
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iter),
                                config=ocp.args.JsonSave(config_dict)),
        force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
    """Restores the train state (into `abstract_state`'s shardings) and the iterator in place."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      data=grain.checkpoint.CheckpointRestore(data_iter)))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def saved_config(workdir: str, step: Optional[int] = None) -> Optional[dict]:
  """The config stored with a checkpoint in `workdir` (the latest, or `step`), or None."""
  root = checkpoint_dir(workdir)
  if not os.path.isdir(root):
    return None
  steps = sorted(int(s) for s in os.listdir(root) if s.isdigit())
  if not steps:
    return None
  path = os.path.join(root, str(step if step is not None else steps[-1]), "config", "metadata")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def restore_params(workdir: str) -> tuple[dict, dict, int]:
  """(parameters as numpy, saved config, step) of the newest checkpoint in `workdir`, read
  without knowing the rest of the train state (the optimizer of another job, say)."""
  saved = saved_config(workdir)
  if saved is None:
    raise CheckpointMismatchError(
        f"no checkpoint found in {checkpoint_dir(workdir)}; pass the workdir of a pretraining run "
        "as --pretrained")
  root = checkpoint_dir(workdir)
  step = max(int(s) for s in os.listdir(root) if s.isdigit())
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(os.path.join(root, str(step), "state"))
  return jax.tree.map(np.asarray, state["params"]), saved, step


def check_compatible(workdir: str, config, flag: str = "--workdir") -> None:
  """Raises CheckpointMismatchError if `workdir` holds a checkpoint of a different model. `flag`
  names the option that gave the folder, so that the message says which option to change."""
  saved = saved_config(workdir)
  if saved is None:
    return
  want = config_lib.model_signature(config)
  have = {k: saved.get("model", {}).get(k) for k in want}
  diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    advice = ("Use a new --workdir, or the config that wrote this checkpoint." if flag == "--workdir" else
              f"Pass the config (and overrides) that run was trained with, or another {flag}.")
    raise CheckpointMismatchError(
        f"{flag}={workdir} holds a checkpoint of a different model ({lines}). {advice}")
