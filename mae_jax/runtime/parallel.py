"""Devices: one 1-D `data` mesh over all devices of all processes. The batch is sharded along it;
the train state is replicated, or with FSDP each large tensor is split along it too."""

import functools
import os

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Joins a multi-process run. With no arguments JAX detects SLURM, Open MPI and Cloud TPU VMs.

  On CPU (tests, or a cluster without accelerators) the processes talk through gloo.
  """
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


# Tensors of fewer elements stay replicated under FSDP: splitting them saves little memory and
# costs a gather each (big_vision's rule uses the same kind of floor).
FSDP_MIN_ELEMENTS = 2**14


def fsdp_spec(shape: tuple, devices: int, stacked: bool = False) -> P:
  """Where FSDP splits a tensor of `shape` over `devices`: along its largest dimension divisible
  by the device count (the first of equal ones); replicated when small or when none divides.
  `stacked`: the leading axis stacks scanned layers (`nn.scan`), so it is never split and the
  size floor applies to one layer's slice, as it would to the unrolled layer's own tensor."""
  if stacked:
    return P(None, *fsdp_spec(shape[1:], devices))
  if devices <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_ELEMENTS:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % devices == 0:
      return P(*[("data" if d == dim else None) for d in range(len(shape))])
  return P()


def _in_scanned_layers(path) -> bool:
  """Whether a state leaf sits under `blocks`, the scanned layers' stacked parameters (or their
  optimizer moments, which mirror them)."""
  return any(getattr(key, "key", None) == "blocks" for key in path)


def batch_sharded(x):
  """`x` with its rows (leading axis) split over the devices, when traced by
  `Mesh.jit_train_step`;
  unchanged otherwise (no mesh, inside `shard_map`, or rows that do not divide evenly).

  Under FSDP a layer's weights are split along the same device axis as the batch, and the
  partitioner may meet the two either way: gather the weights, or gather the batch and keep the
  weights split. Inside scanned layers it chose the batch (ViT-H, 8 devices: 376 GiB of
  collectives per update per device against 59 GiB), so the blocks pin their activations here."""
  mesh = jax.sharding.get_abstract_mesh()
  axis_types = dict(zip(mesh.axis_names, mesh.axis_types))
  if (axis_types.get("data") != jax.sharding.AxisType.Auto or not x.ndim
      or x.shape[0] % mesh.shape["data"]):
    return x
  return jax.lax.with_sharding_constraint(x, P("data"))


class Mesh:
  """The data-parallel mesh and the shardings the trainers use."""

  def __init__(self, devices=None):
    """Over `devices` (default: all devices of all processes; mae_jax.compile passes a TPU or
    GPU topology's devices to compile for hardware that is not here)."""
    # Auto axes: the compiler propagates shardings from the inputs (GSPMD), no annotations needed.
    if devices is None:
      self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                                axis_types=(jax.sharding.AxisType.Auto,))
    else:
      self.mesh = jax.sharding.Mesh(np.array(devices), ("data",),
                                    axis_types=(jax.sharding.AxisType.Auto,))
    self.batch = NamedSharding(self.mesh, P("data"))
    self.replicated = NamedSharding(self.mesh, P())

  def state_shardings(self, abstract_state, fsdp: bool):
    """Shardings of a train state (a pytree of arrays or ShapeDtypeStructs): every leaf
    replicated, or with `fsdp` split by `fsdp_spec` (parameters and the optimizer moments alike)."""
    if not fsdp:
      return jax.tree.map(lambda _: self.replicated, abstract_state)
    n = self.mesh.size
    return jax.tree_util.tree_map_with_path(
        lambda path, a: NamedSharding(self.mesh, fsdp_spec(a.shape, n, _in_scanned_layers(path))),
        abstract_state)

  def abstract_state(self, init, *args, fsdp: bool):
    """(abstract train state, its shardings) of `init(*args)`, without computing it: shapes and
    dtypes as ShapeDtypeStructs carrying the shardings of `state_shardings` (what a compile
    ahead of time or a checkpoint restore takes)."""
    abstract = jax.eval_shape(init, *args)
    shardings = self.state_shardings(abstract, fsdp)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings), shardings

  def jit_train_step(self, fn, state_sharding, micro_batches: int = 1):
    """`fn(state, batch) -> (state, metrics)` compiled as every training loop runs it: the state
    in `state_sharding` and donated, the batch as `put_batch` lays it out, the metrics replicated;
    traced with this mesh's axes in view, so that `batch_sharded` applies."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
        return fn(*args, **kwargs)
    return jax.jit(traced, in_shardings=(state_sharding, self.batch_sharding(micro_batches)),
                   out_shardings=(state_sharding, self.replicated), donate_argnums=(0,))

  def batch_sharding(self, micro_batches: int = 1) -> NamedSharding:
    """How `put_batch` lays a batch out: rows split over the devices; with K > 1 micro-batches,
    leaves (K, micro-batch, ...) with each micro-batch's rows split over the devices."""
    return self.batch if micro_batches == 1 else NamedSharding(self.mesh, P(None, "data"))

  def put_batch(self, local_batch: dict, micro_batches: int = 1) -> dict:
    """This process's rows (numpy) -> global arrays sharded along the batch axis. With K > 1,
    each process's rows are cut into K consecutive micro-batches, stacked on a leading axis: the
    micro-batches an accumulating step takes one after the other."""
    sharding = self.batch_sharding(micro_batches)

    def put(x):
      x = np.asarray(x)
      if micro_batches > 1:
        x = x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])
      return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(put, local_batch)

  def replicate(self, tree):
    """A host pytree (the same on every process) -> arrays replicated on every device."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)
