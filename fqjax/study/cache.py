"""The cache rule's keys: what an entry of results.json was computed from, as a short hash.

  train key    = hash(schema version, data identity, config.model, config.train, seed)
  stage key    = hash(schema version, STAGE_VERSIONS[stage], the stage's config sections (less the lists
                 of bit-widths and methods, and for explain the PTQ variants after the primary one: their
                 entries are kept one by one), the train key and the digest of the trained variables the
                 entry was computed from)
  data identity = sha256 of the loaded splits (every array and the metadata), so a replaced data
                 file, another split or imbalance setting or another TFDS version changes every key.
fqjax.study.runner reuses an entry only when its stored key equals the key computed here.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional, Sequence

import ml_collections
import numpy as np

from fqjax.errors import StaleModelError
from fqjax.outputs import results
from fqjax.outputs import workdir

# What a stage computes per entry, versioned: bumped when the code adds or changes what an entry holds, so
# entries computed by older code are recomputed instead of reused (ptq / explain 2: issue 12's paired
# counts, link definitions, per-sample gradient norms, the second-order test; mitigate 2: issue 13's step
# budget, grid selection, hardness signal and controls).
STAGE_VERSIONS = {"ptq": 2, "explain": 3, "mitigate": 2}

# Fields left out of a stage's key: their entries are kept one by one (per bit-width, per method).
ENTRY_LISTS = {"ptq": (), "explain": ("bit_widths",), "mitigate": ("bit_widths", "methods")}


def _hash(*parts) -> str:
  text = json.dumps(parts, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _section(config, name: str, drop: Sequence[str] = ()) -> dict:
  d = config[name].to_dict() if isinstance(config[name], ml_collections.ConfigDict) else dict(config[name])
  return {k: v for k, v in d.items() if k not in drop}


def data_identity(splits) -> str:
  """sha256 (16 hex digits) of every split's x, y, group, index and the dataset metadata."""
  h = hashlib.sha256(json.dumps(splits.to_dict(), sort_keys=True, default=str).encode())
  for name, split in splits.items():
    for arr in (split.x, split.y, split.group, split.index):
      arr = np.ascontiguousarray(arr)
      h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
      h.update(arr.reshape(-1).view(np.uint8))
  return h.hexdigest()[:16]


def train_key(config, data_id: str, seed: int) -> str:
  return _hash(results.SCHEMA_VERSION, "train", data_id, _section(config, "model"), _section(config, "train"), seed)


def train_key_parts(config, data_id: str, seed: int) -> dict:
  """What the training key is made of, each hashed on its own (stored beside a training checkpoint), so a
  stale checkpoint can say what changed: {"data", "model", "train config", "seed", "fqjax version"}."""
  return {"data": data_id, "model": _hash(_section(config, "model")), "train config": _hash(_section(config, "train")),
          "seed": str(seed), "fqjax version": str(results.SCHEMA_VERSION)}


def changed_parts(stored: Optional[dict], current: dict) -> list[str]:
  """The names of the parts that differ (all of them unknown: "its inputs")."""
  if not isinstance(stored, dict):
    return []
  return [name for name, value in current.items() if stored.get(name) != value]


def stage_key(config, stage: str, train_entry: Optional[dict], train_entry_key: Optional[str]) -> Optional[str]:
  """The key of a downstream stage's entry for one seed; None when the seed has no trained entry."""
  if train_entry is None or train_entry_key is None:
    return None
  sections = {"ptq": ("ptq", "eval"), "explain": ("explain", "ptq", "eval"), "mitigate": ("mitigate", "ptq", "eval")}
  parts = {name: _section(config, name, ENTRY_LISTS[stage] if name == stage else ("bit_widths", "sweep_mode"))
           for name in sections[stage]}
  if stage == "explain":  # entries are kept per variant (explain.variants.<v>); only the primary one is in per_seed
    parts["ptq"]["variants"] = list(parts["ptq"].get("variants") or ())[:1]
  return _hash(results.SCHEMA_VERSION, stage, STAGE_VERSIONS[stage], parts, train_entry_key,
               train_entry.get("variables_digest"))


def check_trained_model(folder: str, config, data_id: str, seed: int) -> None:
  """Raises StaleModelError when the training checkpoint in ``folder`` was trained under another key than the
  current (config, data, seed) gives, naming the parts that changed; nothing when it matches or has no KEY
  (no finished checkpoint, which the loader reports)."""
  held = workdir.checkpoint_key(folder)
  if held is None or held == train_key(config, data_id, seed):
    return
  changed = changed_parts(workdir.key_parts(folder), train_key_parts(config, data_id, seed)) or ["its inputs"]
  raise StaleModelError(
      f"seed {seed}'s trained model is stale ({', '.join(changed)} changed since it was trained, in {folder}): "
      "run with the train stage included (no --stages, or add train to --stages) to retrain it.")
