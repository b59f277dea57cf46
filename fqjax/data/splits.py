"""Split types (`Split`, `DatasetInfo`, `Splits`) and stratified splitting.

A `Split` holds aligned NumPy arrays:
  x:     [N, H, W, C] (images) or [N, D] (tabular) float32, normalized
  y:     [N] int32 labels in [0, num_classes)
  group: [N] int32 group ids in [0, num_groups)
  index: [N] int64 row of each example in its source split (the TFDS split, the
         user's array, or the whole dataset); `DatasetInfo.source_splits` names
         which source split each of train / val / test indexes into, so two
         splits drawing from the same source can be checked for overlap.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from fqjax.errors import InputError

SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous
class Split:
  """One split of a dataset: aligned arrays x, y, group, index (see module doc)."""
  x: np.ndarray
  y: np.ndarray
  group: np.ndarray
  index: np.ndarray

  def __post_init__(self):
    n = len(self.y)
    for name in ("x", "group", "index"):
      if len(getattr(self, name)) != n:
        raise InputError(
            f"Split arrays must have equal length: y has {n} rows but {name} has "
            f"{len(getattr(self, name))}.")

  def __len__(self) -> int:
    return len(self.y)

  def counts(self, num_groups: int) -> np.ndarray:
    """Examples per group: [num_groups] int64."""
    return np.bincount(self.group, minlength=num_groups).astype(np.int64)

  def take(self, rows: np.ndarray) -> "Split":
    """The sub-split at `rows` ([M] int positions into this split)."""
    rows = np.asarray(rows, dtype=np.int64)
    return Split(x=self.x[rows], y=self.y[rows], group=self.group[rows], index=self.index[rows])


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Metadata of a loaded dataset; `to_dict()` is JSON-ready.

  counts: {split name: [num_groups] list of example counts}.
  normalization: how x was scaled, e.g. {'kind': 'standardize', 'scale': 255,
    'mean': [C], 'std': [C]} meaning x = (raw / scale - mean) / std, with mean/std
    computed on the final (post-imbalance) train split.
  imbalance: what was applied to train ({'kind': 'none'} if nothing).
  source_splits: {split name: source split its `index` refers to}.
  """
  name: str
  num_classes: int
  class_names: Tuple[str, ...]
  num_groups: int
  group_names: Tuple[str, ...]
  group_attribute: str
  label_attribute: str
  group_is_label: bool
  input_shape: Tuple[int, ...]
  counts: Dict[str, list]
  normalization: Dict[str, Any]
  imbalance: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "none"})
  source_splits: Dict[str, str] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["class_names"] = list(self.class_names)
    d["group_names"] = list(self.group_names)
    d["input_shape"] = list(self.input_shape)
    return _jsonable(d)


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """train / val / test `Split`s plus their `DatasetInfo`."""
  train: Split
  val: Split
  test: Split
  info: DatasetInfo

  def __getitem__(self, name: str) -> Split:
    if name not in SPLIT_NAMES:
      raise KeyError(f"Unknown split {name!r}; allowed: {SPLIT_NAMES}.")
    return getattr(self, name)

  def items(self):
    return [(name, getattr(self, name)) for name in SPLIT_NAMES]

  def to_dict(self) -> Dict[str, Any]:
    """Metadata and split sizes (no arrays), JSON-ready."""
    d = self.info.to_dict()
    d["sizes"] = {name: len(split) for name, split in self.items()}
    return d


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


# ----------------------------------------------------------------------------
# Stratified selection
# ----------------------------------------------------------------------------

def spread_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Positions sorted by label with random ties: [N] int64.

  Taking evenly spaced entries of this order draws every label in proportion,
  so a group-stratified pick is also label-stratified within the group.
  """
  return np.lexsort((rng.random(len(y)), y)).astype(np.int64)


def evenly_spaced(n: int, k: int) -> np.ndarray:
  """k distinct positions spread evenly over range(n): [k] int64."""
  if k <= 0:
    return np.zeros((0,), np.int64)
  return np.floor((np.arange(k) + 0.5) * n / k).astype(np.int64)


def _part_sizes(n: int, fractions: Sequence[float]) -> list:
  """Rounded sizes of the carved parts of one group of n; the rest stays in train.

  A part with a positive fraction gets at least one example while train keeps one.
  """
  sizes = [int(round(f * n)) for f in fractions]
  for i, f in enumerate(fractions):
    if f > 0 and sizes[i] == 0 and n - sum(sizes) >= 2:
      sizes[i] = 1
  while sum(sizes) >= n and n > 0 and max(sizes) > 0:
    sizes[int(np.argmax(sizes))] -= 1  # train always keeps at least one example
  return sizes


def stratified_split(group: np.ndarray, y: np.ndarray, fractions: Sequence[float],
                     seed: int) -> Tuple[np.ndarray, ...]:
  """Splits positions [0, N) into a rest part and one part per fraction.

  Args:
    group: [N] int group ids; every group is split in the given proportions
      (each part within one example of fraction * group size).
    y: [N] int labels; within a group, parts also hold labels in proportion.
    fractions: fraction of each group per carved part, sum < 1.
    seed: NumPy seed; the same inputs and seed give the same parts.
  Returns:
    (rest, part_1, ..., part_k): sorted [n_i] int64 position arrays, disjoint and
    covering range(N).
  """
  rng = np.random.default_rng(seed)
  parts = [[] for _ in range(len(fractions) + 1)]
  for g in np.unique(group):
    members = np.flatnonzero(group == g)
    members = members[spread_order(y[members], rng)]
    free = np.ones(len(members), bool)
    for i, size in enumerate(_part_sizes(len(members), fractions)):
      candidates = np.flatnonzero(free)
      chosen = candidates[evenly_spaced(len(candidates), size)]
      free[chosen] = False
      parts[i + 1].append(members[chosen])
    parts[0].append(members[free])
  return tuple(np.sort(np.concatenate(p)) if p else np.zeros((0,), np.int64) for p in parts)


def random_subset(n: int, k: Optional[int], seed: int) -> np.ndarray:
  """Sorted positions of a seeded random subset of size min(k, n) ([k] int64); all if k is None."""
  if k is None or k >= n:
    return np.arange(n, dtype=np.int64)
  return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)


def group_count_dict(splits: Mapping[str, Split], num_groups: int) -> Dict[str, list]:
  """{split name: [num_groups] list of int example counts} (JSON-ready)."""
  return {name: split.counts(num_groups).tolist() for name, split in splits.items()}
