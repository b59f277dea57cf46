"""Devices, meshes and multi-host setup. Nothing else in fqjax knows about devices."""
from __future__ import annotations

import jax


def maybe_initialize_distributed(dcfg) -> bool:
  """Calls jax.distributed.initialize() when config.distributed.initialize is set.

  With no address / process count / id given, JAX detects them from the
  cluster environment (TPU pod slices, SLURM, Open MPI). Returns whether it ran.
  """
  if not dcfg.initialize:
    return False
  kwargs = {k: dcfg[k] for k in ("coordinator_address", "num_processes", "process_id") if dcfg[k] is not None}
  jax.distributed.initialize(**kwargs)
  return True
