"""tools/targets.py: target names are checked; the TPU memory table is what XLA:TPU allows
(compiled on this CPU-only machine with libtpu, which the dev extra installs)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import errors
from mae_jax.tools import targets


def _libtpu():
  pytest.importorskip("libtpu", reason="libtpu is not installed (pip install \"jax[tpu]\")")
  return targets.get("tpu:v5e:2x2")


def test_target_names_are_checked():
  for bad in ("tpu", "gpu:a100x8", "cpu:x", "tpu:"):
    with pytest.raises(errors.TargetError, match="--target="):
      targets.prepare(bad) if bad.startswith("cpu") else targets.get(bad)
  assert targets.parse("tpu:v5p:4x4x4") == ("tpu", "v5p:4x4x4")


def test_the_tpu_memory_table_is_what_xla_tpu_allows():
  _libtpu()  # libtpu loaded as mae_jax.compile loads it
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P
  topology = {"TPU v4": "v4:2x2x1", "TPU v5 lite": "v5e:2x2", "TPU v5": "v5p:2x2x1",
              "TPU v6 lite": "v6e:2x2", "TPU7x": "tpu7x:2x2x1"}
  assert set(topology) == set(targets.TPU_AVAILABLE_BYTES)
  for kind, name in topology.items():
    devices = topologies.get_topology_desc(name, "tpu").devices
    mesh = Mesh(np.array(devices), ("data",))
    x = jax.ShapeDtypeStruct((len(devices) * 2**20, 2**20), jnp.int8, sharding=NamedSharding(mesh, P("data")))
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as e:  # 1 TiB a device
      jax.jit(lambda a: a + 1).lower(x).compile()
    available = float(re.search(r"available HBM \(([\d.]+)G\)", str(e.value)).group(1))
    assert devices[0].device_kind == kind and available * 2**30 == targets.TPU_AVAILABLE_BYTES[kind]
