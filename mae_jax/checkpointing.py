"""Orbax checkpoints in `workdir/checkpoints/<step>/`: train state, data iterator state, config.

Saving is asynchronous (training goes on while arrays are written); the data iterator's
position is saved per process by grain's handler, so a restored run reads exactly the
batches an uninterrupted run would have read.
"""

import contextlib
import gc
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy
from jax.sharding import NamedSharding, PartitionSpec as P

from mae_jax import config_lib
from mae_jax import metrics as metrics_lib
from mae_jax import model as model_lib


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of another model."""


class CheckpointUnreadableError(ValueError):
  """No checkpoint of a workdir can be read."""


UNREADABLE_DIR = "checkpoints_unreadable"


def failure_reason(e: BaseException, limit: int = 300) -> str:
  """The root cause of a failed read, in one line (orbax and tensorstore wrap it several times)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def _quiet_background_failures():
  """Mutes what a failed orbax read leaves behind besides its own exception: its other
  concurrent reads fail in tensorstore's threads and in coroutines nobody awaits any more, and
  print thousands of lines ('Event loop is closed', 'Task exception was never retrieved') that
  say nothing the reported reason does not. The exception of the read itself is unaffected."""
  hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
  asyncio_logger = logging.getLogger("asyncio")
  level = asyncio_logger.level
  sys.excepthook = lambda *a: None
  sys.unraisablehook = threading.excepthook = lambda *a: None
  asyncio_logger.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    # Also after a read that succeeds: stragglers of an earlier failed read are collected here.
    time.sleep(0.2)  # let the remaining reads of a failed restore settle
    gc.collect()     # and their orphaned tasks be collected, here rather than later
    sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
    asyncio_logger.setLevel(level)


def _steps(workdir: str) -> list[int]:
  """The checkpoint steps in `workdir`, newest first."""
  root = checkpoint_dir(workdir)
  if not os.path.isdir(root):
    return []
  return sorted((int(s) for s in os.listdir(root) if s.isdigit()), reverse=True)


def _newest_readable(workdir: str, steps, read) -> tuple[int, Any, list[int]]:
  """(step, read(step), the newer steps that failed) for the first of `steps` (newest first)
  that `read` reads; each failure is logged with its reason. Raises CheckpointUnreadableError
  listing every step when none reads."""
  failures = []
  for step in steps:
    try:
      with _quiet_background_failures():
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
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def is_workdir(path: str) -> bool:
  """Whether `path` is a folder with mae_jax checkpoints (rather than, e.g., a Hugging Face model)."""
  return os.path.isdir(checkpoint_dir(path))


def saved_tree_paths(root: str, step: int) -> Optional[list]:
  """The tree paths of the state saved at `step` under `root` (a workdir's checkpoints/), as
  the metadata orbax writes beside it names them ("('params', 'encoder', ...)"); None when it
  cannot be read (a restore then says what is wrong)."""
  try:
    with open(os.path.join(root, str(step), "state", "_METADATA")) as f:
      return list(json.load(f)["tree_metadata"])
  except (OSError, ValueError, KeyError, TypeError):
    return None


class Checkpointer:
  """Saves every `every_steps` steps and on demand; keeps the last `keep`, and with
  `keep_period` > 0 also every checkpoint of a step divisible by it (saved whether or not
  `every_steps` falls there): the checkpoints a study evaluates along pretraining."""

  def __init__(self, workdir: str, every_steps: int, keep: int, keep_period: int = 0):
    self.every_steps, self.keep_period = every_steps, keep_period
    self.workdir, self.root = os.path.abspath(workdir), checkpoint_dir(workdir)
    policies = [preservation_policy.LatestN(keep)]
    if keep_period > 0:
      policies.append(preservation_policy.EveryNSteps(keep_period))
    self.manager = ocp.CheckpointManager(
        self.root,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=preservation_policy.AnyPreservationPolicy(policies),
            enable_async_checkpointing=True, create=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `save` would write `step`."""
    kept = self.keep_period > 0 and step % self.keep_period == 0
    return (force or kept or step % self.every_steps == 0) and self.manager.latest_step() != step

  def save(self, step: int, state: Any, data_iter: Any, config_dict: dict, force: bool = False) -> bool:
    """Starts an async save when `step` is due (or `force`); returns whether it saved."""
    if not self.due(step, force):
      return False
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iter),
                                config=ocp.args.JsonSave(config_dict)),
        force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
    """Restores the train state (into `abstract_state`'s shardings) and the iterator in place;
    reads the config too, so that a step any of whose parts is damaged fails as a whole.

    A state saved with the other layer layout (scanned vs unrolled blocks) is read in its own
    layout and converted (`model.stack_layers` / `unstack_layers`)."""
    want_scanned = model_lib.is_scanned(abstract_state.params)
    saved_scanned = self._params_scanned(step, default=want_scanned)
    convert = saved_scanned != want_scanned
    target = abstract_state
    if convert:
      to_saved, to_wanted = ((model_lib.stack_layers, model_lib.unstack_layers) if saved_scanned
                             else (model_lib.unstack_layers, model_lib.stack_layers))
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
      os.makedirs(aside, exist_ok=True)
      stamp = time.strftime("%Y%m%d-%H%M%S")
      for step in steps:
        os.replace(os.path.join(self.root, str(step)), os.path.join(aside, f"{step}-{stamp}"))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mae_jax: unreadable checkpoints moved aside")
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def _read_config(workdir: str, step: int) -> dict:
  with open(os.path.join(checkpoint_dir(workdir), str(step), "config", "metadata")) as f:
    return json.load(f)


_converted_cache: dict = {}


def _converted(path: str, config=None) -> tuple[dict, dict]:
  """An official, timm or Hugging Face checkpoint converted in memory, once per process (the
  last one kept). `config`, the job's, gives the attention heads where the weights do not."""
  from mae_jax import convert
  heads = (config.model.encoder_heads, config.model.decoder_heads) if config is not None else (0, 0)
  if (path, heads) not in _converted_cache:
    _converted_cache.clear()
    _converted_cache[path, heads] = convert.load_foreign(path, fallback_heads=heads)
  return _converted_cache[path, heads]


def saved_config(workdir: str, config=None) -> Optional[dict]:
  """The config stored with the newest checkpoint in `workdir` whose config reads, or None.
  `workdir` may also be an official, timm or Hugging Face checkpoint (mae_jax.convert; the job's
  `config` gives the attention heads where its weights do not)."""
  from mae_jax import convert
  if convert.is_foreign(workdir):
    return _converted(workdir, config)[1]
  for step in _steps(workdir):
    try:
      return _read_config(workdir, step)
    except (OSError, ValueError):
      continue  # reported by the restore that falls back past this step
  return None


def restore_params(workdir: str, config=None, step: Optional[int] = None) -> tuple[dict, dict, int]:
  """(parameters as numpy, saved config, step) of the newest readable checkpoint in `workdir`,
  or of checkpoint `step` when given, read without knowing the rest of the train state (the
  optimizer of another job, say). An unreadable newest checkpoint is reported and the one before
  it used; the folder is left as it is. An official, timm or Hugging Face checkpoint is converted
  in memory (step 0; nothing written)."""
  from mae_jax import convert
  if convert.is_foreign(workdir):
    if step not in (None, 0):
      raise CheckpointMismatchError(f"{workdir} is one set of weights; it has no step {step}")
    params, saved = _converted(workdir, config)
    return params, saved, 0
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
    return model_lib.unstack_layers(jax.tree.map(np.asarray, state["params"])), saved

  step, (params, saved), _ = _newest_readable(workdir, steps, read)
  return params, saved, step


def adopt_pretrained_settings(config, pretrained: str) -> None:
  """Sets in `config.model` what the weights in `pretrained` were trained with and the config
  cannot know: their LayerNorm epsilon (Hugging Face's 1e-12), and norm_pix_loss where a
  converted source said it."""
  saved = saved_config(pretrained, config) or {}
  settings = {"layer_norm_eps": saved.get("model", {}).get("layer_norm_eps", model_lib.LN_EPS),
              **saved.get("converted_from", {}).get("settings", {})}
  changed = {k: v for k, v in settings.items() if config.model.get(k) != v}
  if changed:
    config.model.update(changed)
    metrics_lib.log(f"from {pretrained}: " + ", ".join(f"model.{k}={v}" for k, v in changed.items()))


def load_mae_params(pretrained: str, config, purpose: str, step: Optional[int] = None) -> tuple[dict, int]:
  """(the full MAE parameters, encoder and decoder, step) of the newest checkpoint in
  `pretrained` (a workdir, or an official, timm or Hugging Face checkpoint), for `purpose`
  (reconstruction, pretraining), which needs the decoder."""
  saved = saved_config(pretrained, config) or {}
  source = saved.get("converted_from")
  if source and "decoder" not in source["parts"]:
    what = "a fine-tuned classifier" if "head" in source["parts"] else "an encoder only"
    raise CheckpointMismatchError(
        f"{source['path']} holds {what} ({', '.join(source['parts'])}), and {purpose} needs the MAE "
        "decoder too: use a checkpoint with the decoder (the official mae_visualize_vit_*.pth or "
        "*_full.pth, or a Hugging Face ViTMAEForPreTraining folder)")
  check_compatible(pretrained, config, flag="--pretrained")
  params, _, step = restore_params(pretrained, config, step)
  if "decoder" not in params:
    raise CheckpointMismatchError(
        f"the checkpoint in {pretrained!r} has no decoder (a probe or fine-tune run?); {purpose} "
        "needs the pretraining workdir")
  return params, step


def check_compatible(workdir: str, config, flag: str = "--workdir") -> None:
  """Raises CheckpointMismatchError if `workdir` holds a checkpoint of a different model. `flag`
  names the option that gave the folder, so that the message says which option to change."""
  if flag == "--workdir" and os.path.isfile(workdir):
    return  # not a checkpoint: the workdir check says what is wrong with it
  saved = saved_config(workdir, config)
  if saved is None:
    return
  if flag == "--workdir" and "converted_from" in saved:
    raise CheckpointMismatchError(
        f"{workdir} holds weights converted by mae_jax.convert, not a training run to resume; start "
        f"from them with --pretrained={workdir} and a new --workdir")
  want = config_lib.model_signature(config)
  have = {k: saved.get("model", {}).get(k) for k in want}
  diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
    advice = ("Use a new --workdir, or the config that wrote this checkpoint." if flag == "--workdir" else
              f"Pass the config (and overrides) that run was trained with, or another {flag}.")
    raise CheckpointMismatchError(
        f"{flag}={workdir} holds a checkpoint of a different model ({lines}). {advice}")
