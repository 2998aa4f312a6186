"""Linear probing and fine-tuning: one job with two recipes (`config.probe`, `config.finetune`),
trained by the shared `trainer.fit` and measured by `trainer.evaluate`.

Without a pretrained workdir, fine-tuning trains the same encoder from scratch (the baseline
every seed compares against), and probing measures a randomly initialised encoder.
"""

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from mae_jax import config_lib
from mae_jax.data import augment, device_resample, pipeline, sources
from mae_jax.io import metrics as metrics_lib
from mae_jax.io import weights
from mae_jax.io import workdir as workdir_lib
from mae_jax.models import classifier
from mae_jax.models.attention_backends import describe
from mae_jax.runtime import durable, paths
from mae_jax.runtime.parallel import Mesh
from mae_jax.train import optim
from mae_jax.train.loop import (
  Hook,
  Task,
  TrainState,
  accumulate,
  apply_update,
  evaluate,
  fit,
  jit_task,
  new_train_state,
  plan,
)

MODES = ("probe", "finetune")


def create_train_state(tx, seed: int, variables: dict) -> TrainState:
  """Pure: the optimizer state for `variables` (params + e.g. batch_stats) and the base key."""
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"} or None
  return new_train_state(params, tx, jax.random.fold_in(jax.random.PRNGKey(seed), 1), model_state)


def classify_step(state: TrainState, batch: dict, *, model, tx, mean, std, num_classes: int,
                  label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0,
                  random_erasing: float = 0.0, micro_batches: int = 1, interpolation: str = "bicubic"):
  """One optimizer update: device-side mixup/cutmix/erasing, cross-entropy on soft targets. With
  `micro_batches` K > 1 the gradients of the K micro-batches of `batch` (leaves (K, m, ...)) are
  averaged inside the step (`trainer.accumulate`; BatchNorm statistics pass from one to the next).
  Micro-batch k draws its random numbers from fold_in(rng, K * step + k)."""
  mutable = list(state.model_state) if state.model_state else False

  def grads_of(params, k, micro, model_state):
    key = jax.random.fold_in(state.rng, micro_batches * state.step + k)
    k_mix, k_erase, k_drop = jax.random.split(key, 3)
    images = pipeline.normalize(device_resample.train_images(micro, interpolation), mean, std)
    images = augment.random_erasing(k_erase, images, random_erasing)  # per image, then mixed (timm)
    targets = augment.one_hot(micro["label"], num_classes, label_smoothing)
    images, targets = augment.mixup_cutmix(k_mix, images, targets, mixup, cutmix)

    def loss_fn(params):
      out = model.apply({"params": params, **(model_state or {})}, images, train=True,
                        rngs={"dropout": k_drop}, mutable=mutable)
      logits, new_model_state = out if mutable else (out, model_state)
      return optax.softmax_cross_entropy(logits, targets).mean(), (logits, new_model_state)

    (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    top1 = jnp.mean(jnp.argmax(logits, -1) == micro["label"])  # on the (mixed) training images
    return ({"loss": loss, "train_top1": top1}, grads), model_state

  (metrics, grads), new_model_state = accumulate(grads_of, state.params, batch, micro_batches,
                                                 state.model_state)
  return apply_update(state, grads, metrics, tx, model_state=new_model_state)


def eval_step(state: TrainState, batch: dict, *, model, mean, std) -> dict:
  """Sums over the valid rows: count, top-1 and top-5 hits, cross-entropy."""
  images = pipeline.normalize(batch["image"], mean, std)
  logits = model.apply({"params": state.params, **(state.model_state or {})}, images, train=False)
  labels, valid = batch["label"], batch["valid"]
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"count": valid.sum(), "top1": ((jnp.argmax(logits, -1) == labels) * valid).sum(),
          "top5": (top5 * valid).sum(), "loss": (loss * valid).sum()}


def accuracy(sums: dict) -> dict:
  n = max(sums["count"], 1.0)
  return {"top1": 100.0 * sums["top1"] / n, "top5": 100.0 * sums["top5"] / n,
          "loss": sums["loss"] / n, "examples": int(sums["count"])}


def micro_batches(config, mode: str) -> int:
  """The micro-batches of one update: a probe does not accumulate."""
  return 1 if mode == "probe" else config.finetune.grad_accum_steps


def train_augment(config, mode: str) -> pipeline.TrainAugment:
  """The train transform of probing or fine-tuning (fine-tuning adds RandAugment where set)."""
  return pipeline.train_augment(config.dataset, config[mode], randaug=mode == "finetune")


def model_from_config(config, mode: str, num_classes: int):
  section = config[mode]
  probe = mode == "probe"
  return classifier.classifier_from_config(
      config, num_classes, probe=probe, drop_path=0.0 if probe else section.drop_path,
      global_pool=section.global_pool)


def init_function(config, model):
  """() -> the classifier's initial variables (params and e.g. batch_stats)."""
  size = config.dataset.image_size
  return lambda: model.init(jax.random.PRNGKey(config.seed), jnp.zeros((1, size, size, 3)), train=False)


def task(config, mode: str, model, tx, variables: dict, num_classes: int, hooks=()) -> Task:
  """Probing or fine-tuning as the training loop runs it: the state from `variables` (params and
  e.g. batch_stats), the step bound to the section's recipe, the batch fields."""
  section = config[mode]
  aug = {} if mode == "probe" else dict(label_smoothing=section.label_smoothing, mixup=section.mixup,
                                        cutmix=section.cutmix, random_erasing=section.random_erasing)
  step = functools.partial(classify_step, model=model, tx=tx, mean=tuple(config.dataset.mean),
                           std=tuple(config.dataset.std), num_classes=num_classes,
                           micro_batches=micro_batches(config, mode),
                           interpolation=config.dataset.interpolation, **aug)
  return Task(summary=describe(model), init_state=functools.partial(create_train_state, tx, config.seed),
              init_args=(variables,), train_step=step, batch_fields=("image", "label"), hooks=hooks)


def sharded_step(config, mesh: Mesh, mode: str, num_classes: int, schedule: optax.Schedule):
  """The probe's or fine-tuning's step as `run` compiles it, for use outside it (mae_jax.compile):
  (jitted step, abstract state, state shardings), from abstract weights (nothing computed)."""
  model = model_from_config(config, mode, num_classes)
  variables = jax.eval_shape(init_function(config, model))
  tx = optim.classification_optimizer(config[mode], schedule, variables["params"], config.model.encoder_depth,
                                      mode == "probe")
  return jit_task(task(config, mode, model, tx, variables, num_classes), mesh,
                  fsdp=config.sharding.fsdp, micro_batches=micro_batches(config, mode))


@workdir_lib.holding_workdir
def run(config, workdir: str, pretrained: Optional[str], mode: str,
        pretrained_step: Optional[int] = None) -> dict:
  """Probes or fine-tunes (or resumes doing so) in `workdir` the encoder of `pretrained` (its
  newest checkpoint, or `pretrained_step`); writes and returns results.json."""
  assert mode in MODES
  probe = mode == "probe"
  section = config[mode]
  mesh = Mesh()
  train_source, test_source = sources.labelled_sources(config.dataset)
  n_classes = sources.num_classes(config.dataset, train_source)
  model = model_from_config(config, mode, n_classes)
  variables = jax.device_get(jax.jit(init_function(config, model))())

  source_info = None
  if pretrained:
    encoder, saved, step = weights.load_encoder(pretrained, config, pretrained_step)
    p_old = saved["model"]["patch_size"]
    old_grid = (saved["dataset"]["image_size"] // p_old,) * 2
    variables = {**variables, "params": classifier.merge_pretrained(
        variables["params"], encoder, old_grid, model.grid)}
    source_info = {"workdir": paths.absolute(pretrained), "step": step}
    metrics_lib.log(f"encoder from {pretrained} (step {step})")
  else:
    metrics_lib.log("no --pretrained: " + ("probing a randomly initialised encoder" if probe
                                           else "training from scratch (the baseline)"))

  accum = micro_batches(config, mode)
  steps = plan(len(train_source), batch_size=section.batch_size, num_epochs=section.num_epochs,
               warmup_epochs=section.warmup_epochs, base_lr=section.base_lr, min_lr=section.min_lr,
               max_steps=config.max_steps)
  tx = optim.classification_optimizer(section, steps.schedule, variables["params"], config.model.encoder_depth, probe)

  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  evaluate_fn = jax.jit(functools.partial(eval_step, model=model, mean=mean, std=std))
  eval_batch = config_lib.eval_batch_size(config)
  last_eval = {}

  def eval_hook(step, state):
    last_eval.update(accuracy(evaluate(config, mesh, evaluate_fn, state, test_source, eval_batch)))
    last_eval["step"] = step
    return {"test_top1": last_eval["top1"], "test_top5": last_eval["top5"]}

  job = task(config, mode, model, tx, variables, n_classes,
             hooks=[Hook(max(1, steps.epochs(section.eval_every_epochs)), eval_hook)])
  state = fit(config, workdir, job, train_source, mesh=mesh, total_steps=steps.total_steps,
              batch_size=section.batch_size, micro_batches=accum, lr_fn=steps.schedule,
              augment=train_augment(config, mode),
              log_every=section.log_every_steps, checkpoint_every=section.checkpoint_every_steps)
  if last_eval.get("step") != int(state.step):  # e.g. a finished run started again
    eval_hook(int(state.step), state)
  results = {"mode": mode, "metrics": {k: v for k, v in last_eval.items() if k != "step"},
             "step": int(state.step), "pretrained": source_info,
             "from_scratch": pretrained is None, "labels": sources.subset_info(train_source),
             "config": config.to_dict()}
  if jax.process_index() == 0:
    durable.write_json(os.path.join(workdir, "results.json"), results)
  metrics_lib.log(f"{mode}: test top-1 {last_eval['top1']:.2f}%, top-5 {last_eval['top5']:.2f}% "
                  f"on {last_eval['examples']:,} images -> {workdir}/results.json")
  return results
