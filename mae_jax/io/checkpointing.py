"""Orbax checkpoints in `workdir/checkpoints/<step>/`: train state, data iterator state, config.

Saving is asynchronous (training goes on while arrays are written); the data iterator's
position is saved per process by grain's handler, so a restored run reads exactly the
batches an uninterrupted run would have read.
"""

import contextlib
import json
import os
import time
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mae_jax import config_lib
from mae_jax.errors import CheckpointMismatchError, CheckpointUnreadableError
from mae_jax.io import metrics as metrics_lib
from mae_jax.io.checkpoint_noise import (
  TMP_MARK,
  failure_reason,
  quiet_background_failures,
  quiet_storage_fault_noise,
)
from mae_jax.models import layer_stack
from mae_jax.runtime import durable, paths

UNREADABLE_DIR = "checkpoints_unreadable"
# What orbax writes last into a step on an object store (where it does not rename a temporary folder).
COMMIT_MARK = "commit_success.txt"


def newest_step(workdir: str) -> Optional[int]:
  """The newest complete checkpoint step in `workdir` (a folder renamed into place), or None."""
  steps = _steps(workdir)
  return steps[0] if steps else None


def _steps(workdir: str) -> list[int]:
  """The checkpoint steps in `workdir`, newest first."""
  root = checkpoint_dir(workdir)
  if not paths.isdir(root):
    return []
  steps = (int(s) for s in paths.listdir(root) if s.isdigit())
  if paths.is_remote(root):  # on a bucket orbax writes in place and marks a step complete last
    steps = (s for s in steps if paths.exists(os.path.join(root, str(s), COMMIT_MARK)))
  return sorted(steps, reverse=True)


def _newest_readable(workdir: str, steps, read) -> tuple[int, Any, list[int]]:
  """(step, read(step), the newer steps that failed) for the first of `steps` (newest first)
  that `read` reads; each failure is logged with its reason. Raises CheckpointUnreadableError
  listing every step when none reads."""
  failures = []
  for step in steps:
    try:
      with quiet_background_failures():
        return step, read(step), [s for s, _ in failures]
    except Exception as e:  # orbax, tensorstore, json and OS errors alike
      failures.append((step, failure_reason(e)))
      metrics_lib.log(f"checkpoint {checkpoint_dir(workdir)}/{step} is unreadable ({failures[-1][1]}); "
                      "trying the one before it")
  listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
  raise CheckpointUnreadableError(
      f"no checkpoint in {checkpoint_dir(workdir)} can be read ({listed}). Replace the folder with "
      "a readable copy, or move it away to start over")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(paths.absolute(workdir), "checkpoints")


def is_workdir(path: str) -> bool:
  """Whether `path` is a folder with mae_jax checkpoints (rather than, e.g., a Hugging Face model)."""
  return paths.isdir(checkpoint_dir(path))


def saved_tree_paths(root: str, step: int) -> Optional[list]:
  """The tree paths of the state saved at `step` under `root` (a workdir's checkpoints/), as
  the metadata orbax writes beside it names them ("('params', 'encoder', ...)"); None when it
  cannot be read (a restore then says what is wrong)."""
  try:
    return list(json.loads(paths.read_text(os.path.join(root, str(step), "state", "_METADATA")))["tree_metadata"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


# A save that cannot progress (a stalled network file system) fails after this long.
SAVE_TIMEOUT_S = 1200


class Checkpointer:
  """Saves every `every_steps` steps and on demand; keeps the last `keep`, and with
  `keep_period` > 0 also every checkpoint of a step divisible by it (saved whether or not
  `every_steps` falls there): the checkpoints a study evaluates along pretraining.

  Durable: orbax writes a step in the background into a temporary folder and renames it into
  place; then (`settle`) every file and folder of it, and the rename, are flushed to the disk
  (runtime/durable.py). Only then is the step reported saved and are older steps deleted, so that a
  power cut never leaves fewer readable checkpoints than were reported. Temporary folders of a
  save that failed or was killed are removed when the next run starts."""

  def __init__(self, workdir: str, every_steps: int, keep: int, keep_period: int = 0):
    self.every_steps, self.keep, self.keep_period = every_steps, keep, keep_period
    self.workdir, self.root = paths.absolute(workdir), checkpoint_dir(workdir)
    quiet_storage_fault_noise()
    self._remove_unfinished()
    self.manager = ocp.CheckpointManager(
        self.root,
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True, create=True,
            # A folder that cannot be created fails the save at once rather than after a wait.
            async_options=ocp.AsyncOptions(timeout_secs=SAVE_TIMEOUT_S,
                                           create_directories_asynchronously=False)),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
    )
    self._unsettled: Optional[int] = None  # a step orbax writes, not yet on the disk
    self.saved_step: Optional[int] = self.manager.latest_step()  # the newest durable step

  def _remove_unfinished(self) -> None:
    """Removes the temporary folders of saves that did not finish (a full disk, a kill)."""
    if jax.process_index() == 0 and paths.isdir(self.root):
      left = sorted(e for e in paths.listdir(self.root) if TMP_MARK in e or (
          paths.is_remote(self.root) and e.isdigit() and not paths.exists(os.path.join(self.root, e, COMMIT_MARK))))
      for entry in left:
        with contextlib.suppress(OSError):
          paths.rmtree(os.path.join(self.root, entry))
      if left and not paths.is_remote(self.root):
        durable.fsync_dir(self.root)
        metrics_lib.log(f"removed {len(left)} unfinished checkpoint folder(s) in {self.root} "
                        f"({', '.join(left)}): saves that did not complete")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mae_jax: unfinished checkpoints removed")

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `save` would write `step`."""
    kept = self.keep_period > 0 and step % self.keep_period == 0
    return (force or kept or step % self.every_steps == 0) and self.manager.latest_step() != step

  def save(self, step: int, state: Any, data_iter: Any, config_dict: dict, force: bool = False) -> bool:
    """Starts an async save when `step` is due (or `force`), once the previous one is durable;
    returns whether it started."""
    if not self.due(step, force):
      return False
    self.settle()
    started = self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iter),
                                config=ocp.args.JsonSave(config_dict)),
        force=True)
    if started:
      self._unsettled = step
    return started

  def poll(self) -> None:
    """Settles a save that has finished writing (one process: a check that does not wait)."""
    if self._unsettled is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
      self.settle()

  def settle(self) -> None:
    """Waits for the save in progress, makes it durable (fsync of its files and folders and of
    the rename), reports it saved, then deletes the steps the retention no longer keeps."""
    if self._unsettled is None:
      return
    step, self._unsettled = self._unsettled, None
    self.manager.wait_until_finished()  # raises what failed the background write
    path = os.path.join(self.root, str(step))
    if not paths.is_remote(path):
      durable.sync_tree(path)  # every process: its own files and the rest
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"mae_jax: checkpoint {step} durable")
    self.saved_step = step
    metrics_lib.log(f"checkpoint {step} saved in {self.root}")
    expired = self.expired(self.manager.all_steps(), step)
    for old in expired:
      self.manager.delete(old)
    if expired and not paths.is_remote(self.root) and jax.process_index() == 0:
      durable.fsync_dir(self.root)

  def expired(self, steps, newest: int) -> list[int]:
    """The steps the retention deletes once `newest` is durable: all but the last `keep` (the
    newest among them) and, with `keep_period`, the multiples of it; none newer than `newest`."""
    older = sorted((s for s in steps if s <= newest), reverse=True)
    return sorted(s for s in older[self.keep:]
                  if not (self.keep_period > 0 and s % self.keep_period == 0))

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
    """Restores the train state (into `abstract_state`'s shardings) and the iterator in place;
    reads the config too, so that a step any of whose parts is damaged fails as a whole.

    A state saved with the other layer layout (scanned vs unrolled blocks) is read in its own
    layout and converted (`layer_stack.stack_layers` / `unstack_layers`)."""
    want_scanned = layer_stack.is_scanned(abstract_state.params)
    saved_scanned = self._params_scanned(step, default=want_scanned)
    convert = saved_scanned != want_scanned
    target = abstract_state
    if convert:
      to_saved, to_wanted = ((layer_stack.stack_layers, layer_stack.unstack_layers) if saved_scanned
                             else (layer_stack.unstack_layers, layer_stack.stack_layers))
      replicated = NamedSharding(jax.tree.leaves(abstract_state)[0].sharding.mesh, P())
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                            to_saved(abstract_state))
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                      data=grain.checkpoint.CheckpointRestore(data_iter),
                                      config=ocp.args.JsonRestore()))
    state = restored["state"]
    if convert:
      state = jax.device_put(to_wanted(state), jax.tree.map(lambda a: a.sharding, abstract_state))
      metrics_lib.log(f"checkpoint {step}: converted its {'scanned' if saved_scanned else 'unrolled'} "
                      f"layers to the config's {'scanned' if want_scanned else 'unrolled'} layout")
    return state

  def _params_scanned(self, step: int, default: bool) -> bool:
    """Whether the parameters saved at `step` hold scanned (stacked) layers, from the tree
    metadata orbax writes beside them (`default` when it cannot be read: the restore then reports
    what is wrong)."""
    paths = saved_tree_paths(self.root, step)
    if paths is None:
      return default
    return any(p.startswith("('params',") and "'blocks'" in p for p in paths)

  def restore_latest(self, abstract_state: Any, data_iter: Any) -> tuple[Optional[int], Any]:
    """(step, state) of the newest checkpoint that restores (the iterator set in place), or
    (None, None) when there is none.

    An unreadable checkpoint (a truncated or missing file) is reported with its reason and the
    next older one tried. Once one restores, the unreadable newer ones are moved to
    `workdir/checkpoints_unreadable/` (kept for inspection, out of the way of new saves). When
    none restores, CheckpointUnreadableError lists each, and nothing is moved.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None, None
    step, state, unreadable = _newest_readable(
        self.workdir, steps, lambda s: self.restore(s, abstract_state, data_iter))
    if unreadable:
      self._move_aside(unreadable)
      metrics_lib.log(f"restored step {step}; the unreadable newer checkpoints are in "
                      f"{os.path.join(self.workdir, UNREADABLE_DIR)}")
    return step, state

  def _move_aside(self, steps) -> None:
    if jax.process_index() == 0:
      aside = os.path.join(self.workdir, UNREADABLE_DIR)
      paths.makedirs(aside)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        paths.rename(os.path.join(self.root, str(step)), os.path.join(aside, f"{step}-{stamp}"))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mae_jax: unreadable checkpoints moved aside")
    self.manager.reload()

  def wait(self):
    """Returns once the save in progress, if any, is durable (raises what failed it)."""
    self.settle()

  def close(self):
    try:
      self.settle()
    finally:
      self.manager.close()

  def abandon(self) -> None:
    """After a failure: stops without raising what the save in progress may raise too."""
    self._unsettled = None
    with contextlib.suppress(Exception), quiet_background_failures():
      self.manager.close()


def _read_config(workdir: str, step: int) -> dict:
  text = paths.read_text(os.path.join(checkpoint_dir(workdir), str(step), "config", "metadata"))
  return config_lib.upgrade(json.loads(text))


def saved_config(workdir: str) -> Optional[dict]:
  """The config stored with the newest checkpoint in `workdir` whose config reads (upgraded to
  today's fields, `config_lib.upgrade`), or None."""
  for step in _steps(workdir):
    try:
      return _read_config(workdir, step)
    except (OSError, ValueError):
      continue  # reported by the restore that falls back past this step
  return None


def restore_params(workdir: str, step: Optional[int] = None) -> tuple[dict, dict, int]:
  """(parameters as numpy, saved config, step) of the newest readable checkpoint in `workdir`,
  or of checkpoint `step` when given, read without knowing the rest of the train state (the
  optimizer of another job, say). An unreadable newest checkpoint is reported and the one before
  it used; the folder is left as it is. Scanned layers come back unrolled."""
  steps = _steps(workdir)
  if not steps:
    raise CheckpointMismatchError(
        f"no checkpoint found in {checkpoint_dir(workdir)}; pass the workdir of a pretraining run "
        "as --pretrained")
  if step is not None:
    if step not in steps:
      raise CheckpointMismatchError(
          f"{checkpoint_dir(workdir)} has no checkpoint of step {step}; it keeps steps "
          f"{', '.join(map(str, sorted(steps)))} (pretrain with --config.keep_checkpoint_every_epochs=N "
          "to keep more)")
    steps = [step]

  def read(step):
    saved = _read_config(workdir, step)
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.join(checkpoint_dir(workdir), str(step), "state"))
    # Scanned pretraining layers come back unrolled: the layout every consumer builds.
    return layer_stack.unstack_layers(jax.tree.map(np.asarray, state["params"])), saved

  step, (params, saved), _ = _newest_readable(workdir, steps, read)
  return params, saved, step


def check_model(saved: Optional[dict], config, flag: str, path: str, encoder_only: bool = False) -> None:
  """Raises CheckpointMismatchError if the `saved` config (of the folder or file `path` that
  option `flag` gave) describes a different model than `config` (a different encoder, with
  `encoder_only`), naming the fields."""
  if saved is None:
    return
  want = config_lib.model_signature(config, encoder_only)
  have = {k: saved["model"][k] for k in want}
  diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    advice = ("Use a new --workdir, or the config that wrote this checkpoint." if flag == "--workdir" else
              f"Pass the config (and overrides) that run was trained with, or another {flag}.")
    part = "encoder" if encoder_only else "model"
    raise CheckpointMismatchError(f"{flag}={path} holds a checkpoint of a different {part} ({lines}). {advice}")


def check_compatible(workdir: str, config) -> None:
  """Raises CheckpointMismatchError if `workdir` (a job's --workdir) holds a checkpoint of a
  different model, or weights written by mae_jax.convert (a start, not a run to resume)."""
  if paths.isfile(workdir):
    return  # not a checkpoint: the workdir check says what is wrong with it
  saved = saved_config(workdir)
  if saved is not None and "converted_from" in saved:
    raise CheckpointMismatchError(
        f"{workdir} holds weights converted by mae_jax.convert, not a training run to resume; start "
        f"from them with --pretrained={workdir} and a new --workdir")
  check_model(saved, config, "--workdir", workdir)


def write_workdir(params: dict, config: dict, workdir: str) -> None:
  """A workdir holding `params` as the step-0 checkpoint, as `restore_params` reads it; built
  under a temporary name and renamed into place when complete and on the disk (runtime/durable.py).
  An existing workdir whose checkpoints read is refused; one that does not read (an interrupted
  write of an earlier version) is replaced."""
  if paths.exists(checkpoint_dir(workdir)):
    try:
      with quiet_background_failures():
        restore_params(workdir)
    except Exception as e:  # any failure to read: an incomplete folder
      metrics_lib.log(f"{workdir} holds checkpoints that cannot be read ({failure_reason(e)}): an "
                      "interrupted write left them; replacing the folder")
      paths.rmtree(workdir)
    else:
      raise CheckpointMismatchError(f"{workdir} holds checkpoints already; give a new folder")
  with durable.replacing(workdir) as tmp:
    step = os.path.join(checkpoint_dir(tmp), "0")
    os.makedirs(os.path.join(step, "config"), exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(step, "state"), {"params": params, "step": np.int32(0)})
    with open(os.path.join(step, "config", "metadata"), "w") as f:
      json.dump(config, f)


def has_batch_stats(workdir: str, step: int) -> bool:
  """Whether the checkpoint holds BatchNorm statistics: a linear probe's."""
  tree_paths = saved_tree_paths(checkpoint_dir(workdir), step) or []
  return any("'batch_stats'" in p for p in tree_paths)
