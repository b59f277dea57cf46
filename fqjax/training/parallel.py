"""Devices, meshes, shardings and multi-host setup. Nothing else in fqjax knows about devices.

Data parallelism: one mesh axis "data" over every device of every process.
Batches are sharded on their leading axis, parameters and optimizer state are
replicated; jit's SPMD partitioner turns the gradient (and BatchNorm's batch
mean/variance) into all-reduces, so a sharded step computes what one device
computes on the whole batch. Host arrays become global arrays with
``jax.make_array_from_callback``: every process holds the same host data (the
loaders are deterministic from the seed) and supplies the shards its devices own.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fqjax.errors import InputError

DATA_AXIS = "data"


def maybe_initialize_distributed(dcfg) -> bool:
  """Calls jax.distributed.initialize() when config.distributed.initialize is set.

  With no address / process count / id given, JAX detects them from the
  cluster environment (TPU pod slices, SLURM, Open MPI). Returns whether it ran.
  """
  if not dcfg.initialize:
    return False
  kwargs = {k: dcfg[k] for k in ("coordinator_address", "num_processes", "process_id") if dcfg[k] is not None}
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:  # no cluster to detect, or a coordinator that cannot be reached
    raise InputError(f"config.distributed.initialize=True, but jax.distributed.initialize({kwargs}) failed ({e}). "
                     "Outside a detected cluster (TPU pod, SLURM, Open MPI) give --config.distributed."
                     "coordinator_address=HOST:PORT, num_processes and process_id, or set "
                     "--config.distributed.initialize=False for one process.") from e
  return True


def data_mesh(num_devices: Optional[int] = None) -> Mesh:
  """A 1-D mesh named "data" over the first ``num_devices`` devices (default: all, all processes)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise InputError(f"config.parallel.num_devices is invalid: got {num_devices}; allowed: 1..{len(devices)} (the "
                       f"devices visible: {[str(d) for d in devices]}), or None for all of them.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the "data" axis, other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_divisible(batch_size: int, mesh: Mesh, field: str) -> None:
  n = mesh.size
  if batch_size % n:
    raise ValueError(f"{field}={batch_size} must be a multiple of the {n} devices of the data-parallel mesh; "
                     f"use e.g. {field}={max(n, batch_size // n * n)}.")


def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array with ``sharding`` from a host array that every process holds in full."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_tree(tree: Any, sharding: NamedSharding) -> Any:
  """Every leaf of a host (or single-device) pytree as a global array with ``sharding``."""
  return jax.tree_util.tree_map(lambda a: global_array(np.asarray(a), sharding), tree)


def describe() -> str:
  return (f"backend {jax.default_backend()}, {jax.device_count()} device(s) ({jax.local_device_count()} local, "
          f"process {jax.process_index()} of {jax.process_count()}): {[str(d) for d in jax.local_devices()]}")


def to_host(tree: Any) -> Any:
  """jax.device_get that also works on global arrays spanning other processes' devices (gathers them)."""
  from jax.experimental import multihost_utils

  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.device_get(a)
  return jax.tree_util.tree_map(one, tree)


def sync_processes(name: str) -> None:
  """A barrier across all processes (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
