"""MAE pretraining: the train state, the pure train step, and the job that `main` runs."""

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax import errors
from mae_jax.data import device_resample, pipeline, sources
from mae_jax.evaluators import figures, knn
from mae_jax.io import checkpointing, weights
from mae_jax.io import metrics as metrics_lib
from mae_jax.io import workdir as workdir_lib
from mae_jax.models import extra_losses, masking
from mae_jax.models.attention_backends import describe
from mae_jax.models.layer_stack import stack_layers, unstack_layers
from mae_jax.models.mae import MAE, mae_from_config
from mae_jax.runtime import durable, paths
from mae_jax.runtime.parallel import Mesh
from mae_jax.train import optim
from mae_jax.train.loop import (
  Hook,
  StepPlan,
  Task,
  TrainState,
  accumulate,
  accumulate_per_device,
  apply_update,
  fit,
  jit_task,
  new_train_state,
  plan,
)


def init_params(model: MAE, key) -> dict:
  """Fresh parameters of `model` (traced with a one-image batch of zeros)."""
  h, w = model.image_size
  return model.init(key, jnp.zeros((1, h, w, model.channels)), jnp.zeros((1, model.num_patches)))["params"]


def create_train_state(model: MAE, tx: optax.GradientTransformation, seed: int,
                       params=None) -> TrainState:
  """Pure: initial parameters (or the given ones: --pretrained), optimizer state and the base
  PRNG key."""
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  if params is None:
    params = init_params(model, init_key)
  return new_train_state(params, tx, train_key)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What a pretraining update needs besides the state and the batch; built once from the
  config (`from_config`), static under jit."""
  model: MAE
  tx: optax.GradientTransformation
  mean: tuple = (0.5, 0.5, 0.5)       # the dataset's normalisation
  std: tuple = (0.5, 0.5, 0.5)
  mask_sampling: str = "random"      # 'random' and 'grid' drawn here; 'block' comes with the batch
  micro_batches: int = 1             # K: the batch arrives as K micro-batches, accumulated here
  interpolation: str = "bicubic"     # of crops the step resamples (dataset.resize_on='device')
  mesh: Optional[Mesh] = None
  fsdp: bool = False
  per_device_accumulation: bool = False  # see from_config

  @classmethod
  def from_config(cls, config, model: MAE, tx, mesh: Optional[Mesh]) -> "StepSpec":
    micro_batches, fsdp = config.grad_accum_steps, bool(config.sharding.fsdp)
    # With a replicated state each device accumulates its own rows of the micro-batches and the
    # gradients are all-reduced once per update, which needs a loss that is a mean of per-row
    # terms. An extra loss that couples the rows (models/extra_losses.py), and FSDP, whose state
    # is split anyway, accumulate the micro-batches whole, as the global batch: the same update,
    # more collectives.
    per_device = (micro_batches > 1 and mesh is not None and not fsdp
                  and not extra_losses.couple_rows(model.extra_losses))
    return cls(model, tx, tuple(config.dataset.mean), tuple(config.dataset.std),
               config.model.mask_sampling, micro_batches, config.dataset.interpolation, mesh, fsdp, per_device)


def pretrain_step(state: TrainState, batch: dict, spec: StepSpec, mask_ratio: Optional[float] = None):
  """One optimizer update: fresh masking noise (or the batch's block masks), loss, gradients,
  AdamW. `mask_ratio`, when given, is this step's (curriculum masking) ratio in place of the model's.

  With `spec.micro_batches` K > 1 the batch arrives as K micro-batches (leaves (K, m, ...))
  whose gradients are averaged inside this one step (`trainer.accumulate`). The masking noise of
  micro-batch i is drawn from fold_in(rng, K * step + i), the key a run without accumulation
  would use for it. Crops sent on canvases (dataset.resize_on='device') are resampled first
  (`device_resample.train_images`)."""
  model, micro_batches = spec.model, spec.micro_batches
  if mask_ratio is not None:
    model = model.clone(mask_ratio=mask_ratio)
  if "mask_noise" in batch:  # block masks, drawn by the data pipeline
    noise = batch["mask_noise"]
  else:
    m = batch["image"].shape[-4]
    key = lambda i: jax.random.fold_in(state.rng, micro_batches * state.step + i)  # micro-batch i's key
    if spec.mask_sampling == "grid":
      draw = lambda i: masking.grid_noise(key(i), m, model.grid)
    else:
      draw = lambda i: masking.random_noise(key(i), m, model.num_patches)
    noise = jax.vmap(draw)(jnp.arange(micro_batches)) if micro_batches > 1 else draw(0)

  def grads_of(params, _, micro, carry):
    images = pipeline.normalize(device_resample.train_images(micro, spec.interpolation), spec.mean, spec.std)

    def loss_fn(params):
      (loss, _, _), sown = model.apply({"params": params}, images, micro["noise"], mutable=["losses"])
      return loss, {name: v[0] for name, v in sown["losses"].items()}

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = {"loss": loss}
    if len(parts) > 1:  # extra loss terms: log each
      metrics.update({f"loss_{name}": v for name, v in parts.items()})
    return (metrics, grads), carry

  micro = {**{f: batch[f] for f in ("image", device_resample.CROP_FIELD) if f in batch}, "noise": noise}
  if spec.per_device_accumulation:
    (metrics, grads), _ = accumulate_per_device(grads_of, state.params, micro, micro_batches, spec.mesh)
  else:
    shardings = spec.mesh.state_shardings(state.params, spec.fsdp) if spec.mesh is not None else None
    (metrics, grads), _ = accumulate(grads_of, state.params, micro, micro_batches, grad_shardings=shardings)
  new_state, metrics = apply_update(state, grads, metrics, spec.tx)
  if mask_ratio is not None:
    metrics["mask_ratio"] = jnp.float32(mask_ratio)
  return new_state, metrics


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """What pretraining builds from a config before its loop runs."""
  model: MAE
  tx: optax.GradientTransformation
  plan: StepPlan
  train_source: Any
  eval_split: str


def build(config) -> Pretraining:
  """Everything pretraining needs from a config: model, optimizer, step plan, sources."""
  pretrain_split, eval_split = sources.resolved_splits(config.dataset)
  train_source = sources.make_source(config.dataset, pretrain_split)
  steps = plan(len(train_source), batch_size=config.batch_size, num_epochs=config.num_epochs,
               warmup_epochs=config.warmup_epochs, base_lr=config.optimizer.base_lr,
               min_lr=config.optimizer.min_lr, max_steps=config.max_steps)
  return Pretraining(model=mae_from_config(config.model, config.dataset.image_size),
                     tx=optim.pretraining_optimizer(config.optimizer, steps.schedule), plan=steps,
                     train_source=train_source, eval_split=eval_split)


def task(config, model: MAE, tx, mesh: Mesh, *, step_plan: Optional[StepPlan] = None, init_args=(),
         hooks=()) -> Task:
  """Pretraining as the training loop runs it: its state, its step bound to the config's
  `StepSpec`, the batch fields, and (curriculum masking, given `step_plan`) each step's ratio."""
  m = config.model
  step_settings = None
  if m.curriculum_start_ratio is not None and step_plan is not None:  # in compiled buckets of ratios
    step_settings = lambda step: {"mask_ratio": masking.curriculum_ratio(
        step, step_plan.updates_per_epoch, m.curriculum_start_ratio, m.mask_ratio, m.curriculum_epochs,
        m.curriculum_shape, m.curriculum_bucket)}
  return Task(
      summary=describe(model),
      step_settings=step_settings,
      init_state=functools.partial(create_train_state, model, tx, config.seed),
      init_args=init_args,
      train_step=functools.partial(pretrain_step, spec=StepSpec.from_config(config, model, tx, mesh)),
      batch_fields=("image", "mask_noise") if m.mask_sampling == "block" else ("image",),
      hooks=hooks,
  )


def sharded_step(config, mesh: Mesh, schedule: optax.Schedule):
  """The pretraining step as `fit` compiles it, for use outside the trainer (benchmarks, tests):
  (jitted step, init function, abstract state, state shardings), the state replicated or split
  as `config.sharding.fsdp` says; the step takes the batch as `mesh.put_batch` lays it out."""
  model = mae_from_config(config.model, config.dataset.image_size)
  job = task(config, model, optim.pretraining_optimizer(config.optimizer, schedule), mesh)
  step, abstract, shardings = jit_task(job, mesh, fsdp=config.sharding.fsdp,
                                       micro_batches=config.grad_accum_steps)
  return step, job.init_state, abstract, shardings


def summary(job_dir: str) -> dict:
  """The last logged training loss, and its terms: `final_mse` is the reconstruction term alone,
  comparable across runs whose total loss adds the Laplacian or uniformity terms."""
  last = metrics_lib.last_row(job_dir)
  if last is None:
    raise errors.UserError(f"{job_dir}: no metrics.jsonl row with a loss; the run logged no step")
  out = {"final_loss": last["loss"], "final_mse": last.get("loss_mse", last["loss"])}
  out.update({f"final_{k}": v for k, v in last.items() if k.startswith("loss_") and k != "loss_mse"})
  return {**out, "steps": last["step"]}


def figure_hook(config, workdir: str, model: MAE, mesh: Mesh, eval_source) -> Hook:
  """Every `figure_every_steps`: the same validation images under the same masks, as a PNG in
  workdir/figures and an image in TensorBoard ('reconstruction')."""
  n = min(config.num_figure_images, len(eval_source))
  indices = np.linspace(0, len(eval_source) - 1, n).round().astype(int)
  images = pipeline.load_images(eval_source, indices, config.dataset.image_size, config.dataset.interpolation)
  noise = masking.fixed_noise(config.model.mask_sampling, config.seed + 1, n, model.grid, model.mask_ratio)
  images, noise = mesh.replicate(images), mesh.replicate(noise)
  panels = jax.jit(functools.partial(figures.reconstruction_panels, model,
                                     mean=tuple(config.dataset.mean), std=tuple(config.dataset.std)),
                   out_shardings=mesh.replicated)

  def save(step, state):
    cols = jax.device_get(panels(state.params, images, noise))
    if jax.process_index() == 0:
      path = os.path.join(workdir, "figures", f"reconstruction_{step:08d}.png")
      return {"reconstruction": figures.save_grid(path, cols, figures.PANEL_TITLES)}

  return Hook(config.figure_every_steps, save)


def knn_hook(config, mesh: Mesh) -> Hook:
  """Every `evaluate.knn_every_steps`: kNN top-1 of the current encoder's frozen features."""
  memory, queries = sources.labelled_sources(config.dataset)
  return Hook(config.evaluate.knn_every_steps, lambda step, state: {
      "knn_top1": knn.knn_eval(config, mesh, unstack_layers(state.params["encoder"]), memory, queries)})


def starting_params(config, model: MAE, pretrained: str, step: Optional[int] = None) -> dict:
  """The weights of `pretrained` (a workdir, its newest checkpoint or `step`, or a converted
  checkpoint with the decoder) in the model's layer layout, checked against its shapes."""
  params, step = weights.load_mae_params(pretrained, config, "pretraining", step)
  params = {k: params[k] for k in ("encoder", "decoder")}
  if model.scan_layers:
    params = stack_layers(params)
  want = jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0))
  if jax.tree.map(np.shape, params) != jax.tree.map(lambda a: a.shape, want):
    raise errors.CheckpointMismatchError(
        f"the weights in {pretrained} do not fit this config's model (its mask-token ablation or "
        "image size?); pretrain from them with the config they were made with")
  metrics_lib.log(f"starting from the weights of {pretrained} (step {step})")
  return params


@workdir_lib.holding_workdir
def run(config, workdir: str, pretrained: Optional[str] = None,
        pretrained_step: Optional[int] = None) -> TrainState:
  """Pretrains (or resumes) the MAE described by `config` in `workdir`; a new run starts from
  the weights of `pretrained` when given (its optimizer state and step start afresh)."""
  mesh = Mesh()
  job = build(config)
  model, tx = job.model, job.tx
  resuming = checkpointing.saved_config(workdir) is not None
  init_args = ((starting_params(config, model, pretrained, pretrained_step),)
               if pretrained and not resuming else ())
  if pretrained and resuming:
    metrics_lib.log(f"--pretrained={pretrained} not used: {workdir} has a run to resume")
  if jax.process_index() == 0:
    paths.makedirs(workdir)
    durable.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  eval_source = sources.make_source(config.dataset, job.eval_split)
  hooks = [figure_hook(config, workdir, model, mesh, eval_source)]
  if config.evaluate.knn_every_steps > 0:
    hooks.append(knn_hook(config, mesh))
  augment = [pipeline.train_augment(config.dataset)]
  if config.model.mask_sampling == "block":
    augment.append(pipeline.BlockMaskNoise(model.grid, model.mask_ratio))
  pretraining = task(config, model, tx, mesh, step_plan=job.plan, init_args=init_args, hooks=hooks)
  state = fit(config, workdir, pretraining, job.train_source, mesh=mesh, total_steps=job.plan.total_steps,
              batch_size=config.batch_size, micro_batches=config.grad_accum_steps,
              lr_fn=job.plan.schedule, augment=augment, log_every=config.log_every_steps,
              checkpoint_every=config.checkpoint_every_steps,
              keep_every=config.keep_checkpoint_every_epochs * job.plan.updates_per_epoch)
  metrics_lib.log(f"done: {job.plan.total_steps} steps; checkpoints in {workdir}/checkpoints, "
                  f"figures in {workdir}/figures")
  return state
