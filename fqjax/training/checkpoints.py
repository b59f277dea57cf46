"""Training checkpoints: an orbax CheckpointManager per run, one step folder per epoch holding the state and a
JSON meta, and a sha256 digest of the arrays written with them and checked on every restore.

``state`` is anything with step, params, batch_stats and opt_state (fqjax.training.train.TrainState).
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from fqjax.errors import CorruptFileError



def checkpoint_manager(directory: str, max_to_keep: int = 2, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  return ocp.CheckpointManager(directory, options=options)


def finished_epochs(directory: str) -> Optional[int]:
  """The latest committed epoch in an orbax checkpoint folder (from its step folders), None if none."""
  if not os.path.isdir(directory):
    return None
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()]
  return max(steps) if steps else None


def _state_tree(state: Any) -> dict:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


def tree_digest(tree) -> str:
  """sha256 over every leaf's dtype, shape and bytes (in tree order): detects silently damaged arrays."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{arr.dtype}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _digested(tree: dict) -> dict:
  # "step" is left out: it is saved from an int32 array but restored as a Python int.
  return {k: v for k, v in tree.items() if k != "step"}


def save_checkpoint(mngr: ocp.CheckpointManager, epoch: int, state: Any, meta: dict) -> None:
  """Saves state and meta (JSON) at ``epoch``; meta gets the state's ``digest``, checked on restore."""
  tree = _state_tree(state)
  meta = {**meta, "digest": tree_digest(_digested(tree))}
  mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))


CHECKPOINT_RECOVERY = ("Nothing was changed. Delete that folder and rerun launch.py with the same --config and "
                       "--workdir and the stage that wrote it in --stages (no --stages runs every stage; a training "
                       "checkpoint needs the train stage, e.g. --stages=train,ptq, and without --force: only that "
                       "seed is retrained, resuming from the previous epoch's checkpoint if one is left).")


def restore_checkpoint(mngr: ocp.CheckpointManager, state: Any, epoch: Optional[int] = None):
  """(state, meta) from checkpoint ``epoch`` (default: latest) or None when there is none.

  Raises CorruptFileError naming the step folder when it cannot be read or its arrays do
  not match the digest written with them.
  """
  epoch = mngr.latest_step() if epoch is None else epoch
  if epoch is None:
    return None
  step_dir = os.path.join(str(mngr.directory), str(epoch))
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
  try:
    restored = mngr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                           meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax / TensorStore raise many types; all mean "this checkpoint is unreadable"
    raise CorruptFileError(step_dir, f"the checkpoint of epoch {epoch} cannot be read ({type(e).__name__})",
                           CHECKPOINT_RECOVERY) from e
  tree, meta = restored["state"], restored["meta"]
  if not isinstance(meta, dict) or "epoch" not in meta:
    raise CorruptFileError(step_dir, f"the checkpoint of epoch {epoch} has no valid metadata", CHECKPOINT_RECOVERY)
  if meta.get("digest") is not None and meta["digest"] != tree_digest(_digested(tree)):
    raise CorruptFileError(step_dir, f"the arrays of the epoch-{epoch} checkpoint do not match the digest saved "
                           "with them (the files were damaged after writing)", CHECKPOINT_RECOVERY)
  state = state.replace(step=tree["step"], params=tree["params"], batch_stats=tree["batch_stats"],
                        opt_state=tree["opt_state"])
  return state, meta
