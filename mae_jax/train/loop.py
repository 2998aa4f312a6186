"""The one training loop: sharding, stepping, logging, periodic hooks, checkpoints, resume, signals.

A job (pretraining; later probing and fine-tuning) describes itself as a `Task`: a pure
`init_state()`, a pure `train_step(state, batch) -> (state, metrics)` and periodic hooks.
`fit` does the rest the same way for all of them.
"""

import dataclasses
import functools
import signal
from typing import Any, Callable, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from mae_jax import errors
from mae_jax.data import device_resample, pipeline
from mae_jax.errors import LoaderError, NonFiniteError, StopRequested, UserError
from mae_jax.io import checkpointing
from mae_jax.io import metrics as metrics_lib
from mae_jax.runtime import durable
from mae_jax.runtime.parallel import Mesh
from mae_jax.runtime.progress import PassProgress
from mae_jax.train import optim
from mae_jax.train.device_feed import DeviceFeed
from mae_jax.train.step_profiler import StepProfiler


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # optimizer updates taken (one per train_step call)
  params: Any
  opt_state: Any
  rng: jax.Array           # base key; the key of step s is fold_in(rng, s), so resuming needs no key state
  model_state: Any = None  # mutable model collections (e.g. BatchNorm statistics), if any


@dataclasses.dataclass
class Hook:
  """Called as fn(step, state) every `every_steps` steps and after the last step; a dict it
  returns is written to the metrics log (scalars, printed too) and TensorBoard ((H, W, 3) uint8
  arrays go to its image tab)."""
  every_steps: int
  fn: Callable[[int, TrainState], Optional[dict]]


@dataclasses.dataclass
class Task:
  init_state: Callable[[], TrainState]
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  batch_fields: Sequence[str]          # loader fields sent to the devices
  hooks: Sequence[Hook] = ()
  init_args: tuple = ()                # arguments of init_state (e.g. pretrained weights)
  # step -> static keyword arguments of train_step at that step (one compilation per distinct
  # set), e.g. {'mask_ratio': the bucketed ratio of curriculum masking}. None: no such arguments.
  step_settings: Optional[Callable[[int], dict]] = None
  summary: str = ""                    # appended to the first log line (e.g. the attention used)


def jit_task(task: Task, mesh: Mesh, *, fsdp: bool, micro_batches: int):
  """A task's train step as `fit` compiles it (at its default step settings), for use outside
  `fit` (mae_jax.compile, benchmarks, tests): (jitted step, abstract state, state shardings)."""
  abstract, shardings = mesh.abstract_state(task.init_state, *task.init_args, fsdp=fsdp)
  return mesh.jit_train_step(task.train_step, shardings, micro_batches), abstract, shardings


def new_train_state(params, tx, rng: jax.Array, model_state=None) -> TrainState:
  """Step 0 of a job: its parameters, their optimizer state, the base key."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                    model_state=model_state)


def apply_update(state: TrainState, grads, metrics: dict, tx, model_state=None):
  """How every job's step ends: the optimizer update, the gradients' global norm, and the
  non-finite guard (`skip_if_nonfinite`). `model_state`: the step's new mutable collections
  (BatchNorm statistics), if the model has any. Returns (state, metrics + grad_norm, nonfinite)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, model_state=model_state)
  grad_norm = optax.tree.norm(grads)
  new_state, nonfinite = skip_if_nonfinite(state, new_state, metrics["loss"], grad_norm)
  return new_state, {**metrics, "grad_norm": grad_norm, "nonfinite": nonfinite}


def skip_if_nonfinite(state: TrainState, new_state: TrainState, loss, grad_norm):
  """`new_state`, or where the loss or the gradient norm is not finite, `state` with only the step
  advanced (the update skipped: nothing non-finite enters the state, so none can be saved).
  Returns (state, 1.0 where skipped else 0.0) for the step's metrics as 'nonfinite'."""
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  guarded = new_state.replace(params=keep(new_state.params, state.params),
                              opt_state=keep(new_state.opt_state, state.opt_state),
                              model_state=keep(new_state.model_state, state.model_state))
  return guarded, 1.0 - finite.astype(jnp.float32)


def accumulate(fn, params, batch, micro_batches: int, carry=None, grad_shardings=None):
  """Gradient accumulation inside one step: the mean over K micro-batches of `fn(params, k, micro,
  carry) -> ((metrics, grads), carry)`, where `batch` holds the K micro-batches stacked along the
  leading axis of every leaf. `lax.scan` runs them one after the other, so one micro-batch's
  activations are in memory; `carry` (e.g. BatchNorm statistics) passes from one to the next.
  `grad_shardings` keeps the gradient sum in the parameters' layout (FSDP: each device sums only
  its shard, the micro-batch's gradients reduce-scattered into it).
  With K = 1, `batch` is the one micro-batch itself and `fn` is called once with k = 0.
  Returns ((mean metrics, mean grads), carry)."""
  if micro_batches == 1:
    return fn(params, 0, batch, carry)
  constrain = ((lambda t: jax.lax.with_sharding_constraint(t, grad_shardings)) if grad_shardings
               else (lambda t: t))

  def body(state, xs):
    total, carry = state
    (metrics, grads), carry = fn(params, xs[0], xs[1], carry)
    return (constrain(jax.tree.map(jnp.add, total, grads)), carry), metrics

  zeros = constrain(jax.tree.map(jnp.zeros_like, params))
  (total, carry), metrics = jax.lax.scan(body, (zeros, carry), (jnp.arange(micro_batches), batch))
  return (jax.tree.map(lambda m: m.mean(0), metrics),
          jax.tree.map(lambda t: t / micro_batches, total)), carry


def accumulate_per_device(fn, params, batch, micro_batches: int, mesh: Mesh):
  """`accumulate` with one cross-device reduction of the gradients per update instead of one per
  micro-batch, for a replicated train state: each device sums the gradients of its own rows over
  all K micro-batches (`shard_map`), then one all-reduce combines the devices' sums. (Under FSDP
  this would hold full-size gradient sums and gathered parameters on every device, the memory
  FSDP exists to save; there `accumulate` reduce-scatters each micro-batch into the shards.)

  Only for a loss that is a mean of per-example terms (nothing couples the rows of a batch), so
  that the mean of the devices' means is the mean over the whole micro-batch; `fn` must carry
  nothing. `batch` leaves are (K, micro-batch, ...) split along the micro-batch."""
  def local(params, batch):
    (metrics, grads), _ = accumulate(fn, params, batch, micro_batches)
    return jax.lax.pmean((metrics, grads), "data")

  # check_vma=False: the gradients of the (replicated) parameters stay this device's own until
  # the pmean; with the check on, JAX would insert a reduction into every micro-batch's backward.
  return jax.shard_map(local, mesh=mesh.mesh, in_specs=(P(), P(None, "data")), out_specs=P(),
                       check_vma=False)(params, batch), None


class _SignalFlag:
  """Turns SIGTERM, SIGHUP (the terminal closed) and the first Ctrl-C into a flag the loop checks;
  a second Ctrl-C interrupts."""

  def __init__(self):
    self.signum = 0
    self._old = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
      try:
        self._old[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread: no signal handling
        pass
    return self

  def _handle(self, signum, frame):
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    metrics_lib.log(f"signal {signum} received: saving a checkpoint and stopping (Ctrl-C again to abort)")

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  if num_examples < global_batch:
    raise errors.DataError(f"the dataset has {num_examples} examples, fewer than one global batch "
                         f"({global_batch}); lower batch_size")
  return num_examples // global_batch


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """A job's schedule in steps, as pretraining and classification both make it."""
  updates_per_epoch: int
  total_updates: int     # num_epochs of updates: the lr schedule's length
  total_steps: int       # what this run takes: total_updates, or config.max_steps when smaller
  schedule: Callable     # lr per update: linear warmup, then half-cycle cosine to min_lr

  def epochs(self, n: float) -> int:
    """`n` epochs in updates."""
    return int(n * self.updates_per_epoch)


def plan(num_examples: int, *, batch_size: int, num_epochs: int, warmup_epochs: float, base_lr: float,
         min_lr: float, max_steps: int) -> StepPlan:
  """The step plan of a job (pretraining, a probe, fine-tuning): epochs of `num_examples` in
  global batches, the lr `base_lr * batch_size / 256` warmed up and decayed over all of them;
  `max_steps` > 0 cuts the run short, the schedule unchanged."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  total = num_epochs * per_epoch
  schedule = optim.warmup_cosine(optim.peak_lr(base_lr, batch_size), min_lr, warmup_epochs * per_epoch,
                                 total)
  return StepPlan(per_epoch, total, min(total, max_steps) if max_steps > 0 else total, schedule)


def fit(config, workdir: str, task: Task, train_source, *, mesh: Mesh, total_steps: int,
        batch_size: int, micro_batches: int, lr_fn: Callable[[int], float], augment,
        log_every: int, checkpoint_every: int, keep_every: int = 0) -> TrainState:
  """Runs (or resumes) `task` to `total_steps` optimizer updates of `batch_size` global examples,
  each handed to the step as `micro_batches` micro-batches (`Mesh.put_batch`).

  `augment` is the train transform, one or a list; a metrics row every `log_every` steps, a
  checkpoint every `checkpoint_every`; with `keep_every` > 0 the checkpoints of every multiple of
  that step are saved and kept. `config` gives the rest: the seed, the data set, the sharding,
  how many checkpoints to keep.
  """
  loader = pipeline.make_loader(config.dataset, train_source, train=True,
                            global_batch_size=batch_size // micro_batches, seed=config.seed,
                            augment=augment)
  augments = augment if isinstance(augment, (list, tuple)) else [augment]
  on_device = any(a.resize_on_device for a in augments if isinstance(a, pipeline.TrainAugment))
  fields = (*task.batch_fields, device_resample.CROP_FIELD)  # crops: dataset.resize_on='device'
  data_iter = DeviceFeed(iter(loader), lambda local: mesh.put_batch(
      {k: local[k] for k in fields if k in local}, micro_batches), depth=2, group=micro_batches)
  ckpt = checkpointing.Checkpointer(workdir, checkpoint_every,
                                    config.keep_checkpoints, keep_every)
  config_dict = config.to_dict()

  abstract, state_sharding = mesh.abstract_state(task.init_state, *task.init_args,
                                                 fsdp=config.sharding.fsdp)
  start, state = ckpt.restore_latest(abstract, data_iter)
  if start is not None:
    metrics_lib.log(f"resumed from {checkpointing.checkpoint_dir(workdir)}/{start}")
  else:
    start = 0
    state = jax.jit(task.init_state, out_shardings=state_sharding)(*task.init_args)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  metrics_lib.log(f"{n_params:,} parameters | {jax.device_count()} devices, {jax.process_count()} "
                  f"processes{', state sharded (FSDP)' if config.sharding.fsdp else ''} | "
                  f"{len(train_source):,} training examples | batch {batch_size}"
                  + (f" = {micro_batches} x {batch_size // micro_batches}" if micro_batches > 1 else "")
                  + f" | steps {start}->{total_steps}" + (f" | {task.summary}" if task.summary else "")
                  + (" | train crops resampled on the device" if on_device else ""))

  profiler = StepProfiler(workdir, config.profile_start_step, config.profile_num_steps)
  metrics_lib.log("compiling the train step; the first step waits for it (seconds on a CPU, a "
                  "minute or more for a large model on an accelerator)")
  compiled = {}  # the step's static settings -> jitted train step

  def train_step(state, batch, step):
    settings = task.step_settings(step) if task.step_settings else {}
    key = tuple(sorted(settings.items()))
    if key not in compiled:
      fn = functools.partial(task.train_step, **settings)
      compiled[key] = mesh.jit_train_step(fn, state_sharding, micro_batches)
    return compiled[key](state, batch)

  writer = metrics_lib.MetricWriter(workdir, keep_row=lambda s: s <= start, purge_step=start + 1,
                                    wandb_config=config)
  progress = metrics_lib.Progress(total_steps, start)
  pending = []  # per-step metrics still on device; fetched once per log interval
  nonfinite = []  # (step, that step's 'nonfinite' flag on device) since the last check
  skipped = 0   # updates skipped as non-finite (config.skip_nonfinite)
  step = start

  def check_finite():
    """Fetches the pending non-finite flags: raises NonFiniteError at the first (unless skipping),
    else counts them. Called at log steps and before every checkpoint save."""
    nonlocal nonfinite, skipped
    if not nonfinite:
      return
    values = jax.device_get([f for _, f in nonfinite])
    bad = [s for (s, _), v in zip(nonfinite, values) if v > 0]
    nonfinite = []
    if bad and not config.skip_nonfinite:
      ckpt.wait()
      last = ckpt.latest_step()
      where = (f"the last good checkpoint is step {last} in {checkpointing.checkpoint_dir(workdir)}, "
               "where the same command resumes" if last is not None else "no checkpoint was written")
      raise NonFiniteError(
          f"step {bad[0]}: the loss or the gradient is not finite; the run stopped and {where}. "
          "Lower the learning rate (or raise warmup_epochs), or set --config.skip_nonfinite=True "
          "to skip such updates")
    skipped += len(bad)

  def save(step, force=False):
    check_finite()
    writer.sync()  # the metrics rows up to this step reach the disk before the checkpoint does
    ckpt.save(step, state, data_iter, config_dict, force=force)

  def stop_after_loader_failure(e: LoaderError, step: int):
    """Saves the step reached (the loader position of the batch it would take next) and raises
    one line saying where the same command resumes."""
    save(step, force=True)
    ckpt.wait()
    return LoaderError(f"step {step}: {e}; checkpoint {step} saved in {checkpointing.checkpoint_dir(workdir)}: "
                       "run the same command to resume with the same data order")

  try:
    with _SignalFlag() as flag:
      while step < total_steps:
        try:
          batch = next(data_iter)
        except LoaderError as e:
          raise stop_after_loader_failure(e, step) from e
        profiler.before(step + 1)
        with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):  # named steps in a trace
          state, step_metrics = train_step(state, batch, step)
        profiler.after(step + 1, state)
        del batch  # on the CPU it may share the loader's memory, which is freed with it
        loader_failure = None
        try:
          data_iter.fill(total_steps - step - 1)  # the next batches go to the devices while this step runs
        except LoaderError as e:
          loader_failure = e  # after this step's bookkeeping: it ran
        step += 1
        nonfinite.append((step, step_metrics.pop("nonfinite")))
        pending.append(step_metrics)
        last = step == total_steps
        if step % log_every == 0 or last:
          check_finite()
          fetched = jax.device_get(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *pending))
          means = {k: float(fetched[k]) for k in sorted(fetched, key=lambda k: (k != "loss", k))}
          if skipped:  # the mean over a skipped step's non-finite loss is not a number: say why
            means["skipped_nonfinite"] = float(skipped)
          pending = []
          rate = progress.rate(step)
          extra = {"lr": float(lr_fn(step)) if lr_fn else None}
          extra = {k: v for k, v in extra.items() if v is not None}
          epoch = step * batch_size / len(train_source)
          writer.write(step, {**means, **extra, "epoch": epoch, "images_per_s": rate * batch_size})
          metrics_lib.log(progress.line(step, epoch, rate, batch_size, **means, **extra))
          ckpt.poll()  # a save that finished writing: flushed to the disk and reported
        for hook in task.hooks:
          if step % hook.every_steps == 0 or last:
            hook_metrics = hook.fn(step, state)
            if hook_metrics:
              writer.write(step, hook_metrics)  # scalars, and images (figures) for TensorBoard
              scalars = {k: v for k, v in hook_metrics.items() if np.ndim(v) == 0}
              if scalars:
                metrics_lib.log(f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        if loader_failure is not None:
          raise stop_after_loader_failure(loader_failure, step) from loader_failure
        if ckpt.due(step, force=last):
          save(step, force=last)
        if _stop_requested(flag, step, log_every):
          save(step, force=True)
          ckpt.wait()
          raise StopRequested(flag.signum or signal.SIGTERM, step)
  except BaseException as e:
    # What failed may fail the save in progress as well (a full disk): that save is given up
    # quietly (its temporary folder is removed at the next start) and the first error is raised,
    # a storage fault as one line naming the last checkpoint that is on the disk.
    profiler.stop()
    data_iter.close()
    ckpt.abandon()
    writer.close(quiet=True)
    cause = None
    if isinstance(e, Exception) and not isinstance(e, (errors.FaultError, UserError)):
      cause = errors.storage_cause(e)
      if cause is None:  # a failed save may surface as a consequence (a temporary folder gone)
        probe = durable.storage_fault(checkpointing.checkpoint_dir(workdir))
        cause = errors.storage_cause(probe) if probe is not None else None
    if cause:
      raise errors.StorageError(errors.storage_fault_message(
          cause, ckpt.saved_step, checkpointing.checkpoint_dir(workdir))) from e
    raise
  profiler.stop()
  data_iter.close()  # batches fetched for steps that will not run
  ckpt.close()
  writer.close()
  return state


def _stop_requested(flag: _SignalFlag, step: int, sync_every: int) -> bool:
  """Single process: the flag. Several: agree (at log steps) so that all save the same step."""
  if jax.process_count() == 1:
    return bool(flag.signum)
  if step % sync_every:
    return False
  return bool(multihost_utils.process_allgather(np.int32(flag.signum)).max())


def evaluate(config, mesh: Mesh, eval_step: Callable, state, source, global_batch: int,
             fields: Sequence[str] = ("image", "label")) -> dict:
  """One ordered pass over `source`: sums the per-batch sums `eval_step(state, batch)` returns.

  Batches are padded to one static shape; `batch['valid']` marks the real rows, which
  `eval_step` must weigh by. Sums stay on device until the end.
  """
  totals = None
  progress = PassProgress("evaluation", len(source))
  for i, local in enumerate(pipeline.eval_batches(config.dataset, source, global_batch, fields)):
    batch = mesh.put_batch(local)
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    progress.update(min((i + 1) * global_batch, len(source)))
  return {k: float(v) for k, v in jax.device_get(totals).items()}
