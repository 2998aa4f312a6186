"""Devices: one 1-D `data` mesh over all devices of all processes; batch sharded, state replicated."""

import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


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


class Mesh:
  """The data-parallel mesh and the two shardings the trainers use."""

  def __init__(self):
    # Auto axes: the compiler propagates shardings from the inputs (GSPMD), no annotations needed.
    self.mesh = jax.make_mesh((jax.device_count(),), ("data",),
                              axis_types=(jax.sharding.AxisType.Auto,))
    self.batch = NamedSharding(self.mesh, P("data"))
    self.replicated = NamedSharding(self.mesh, P())

  def put_batch(self, local_batch: dict) -> dict:
    """This process's rows (numpy) -> global arrays sharded along the batch axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.batch, np.asarray(x)),
                        local_batch)

  def replicate(self, tree):
    """A host pytree (the same on every process) -> arrays replicated on every device."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)
