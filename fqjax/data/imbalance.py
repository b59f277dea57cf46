"""Controlled group imbalance, applied to the training split only.

Two profiles, both reproducible from a NumPy seed:
  keep_fractions: group g keeps round(f_g * n_g) of its n_g training examples
                  (groups not listed keep all).
  long_tail:      with groups ranked r = 0 (head) .. G-1 (tail), group g keeps
                  n_top * rho^(-r_g / (G - 1)) examples (floored), as in
                  imbalanced CIFAR (Cui et al., 2019, "Class-Balanced Loss Based
                  on Effective Number of Samples"). n_top is the largest head size
                  every group can supply: min_g n_g * rho^(r_g / (G - 1)), so the
                  largest / smallest ratio is rho (up to flooring) even when the
                  groups did not start out equal.
Which examples stay is a label-stratified random pick within each group, so a
shrunken group keeps its label mix. A group that would end up empty is an error.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fqjax.data.splits import Split, evenly_spaced, spread_order
from fqjax.errors import InputError

Fractions = Union[Mapping[Any, float], Sequence[float]]


def _group_id(key, group_names: Sequence[str]) -> int:
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    gid = int(key)
  elif isinstance(key, str) and key in group_names:
    gid = list(group_names).index(key)
  elif isinstance(key, str) and key.lstrip("-").isdigit():
    gid = int(key)
  else:
    raise InputError(
        f"imbalance.keep_fractions has key {key!r}, which is neither a group id nor a group "
        f"name; group names are {list(group_names)} (ids 0..{len(group_names) - 1}).")
  if not 0 <= gid < len(group_names):
    raise InputError(
        f"imbalance.keep_fractions has group id {gid}, but there are {len(group_names)} groups "
        f"(ids 0..{len(group_names) - 1}: {list(group_names)}).")
  return gid


def keep_fraction_vector(keep_fractions: Fractions, group_names: Sequence[str]) -> np.ndarray:
  """[G] float64 keep fraction per group from a mapping (id or name -> f) or a list."""
  num_groups = len(group_names)
  if isinstance(keep_fractions, Mapping) or hasattr(keep_fractions, "items"):
    fractions = np.ones(num_groups)
    for key, value in keep_fractions.items():
      fractions[_group_id(key, group_names)] = value
  else:
    fractions = np.asarray(list(keep_fractions), dtype=np.float64)
    if fractions.shape != (num_groups,):
      raise InputError(
          f"imbalance.keep_fractions is a list of {fractions.size} fractions, but there are "
          f"{num_groups} groups {list(group_names)}; give one per group or a mapping "
          "{group id or name: fraction}.")
  for gid, f in enumerate(fractions):
    if not (np.isfinite(f) and 0.0 < f <= 1.0):
      raise InputError(
          f"imbalance.keep_fractions for group {group_names[gid]!r} (id {gid}) is {f}; "
          "it must be in (0, 1] (1 keeps every example).")
  return fractions


def long_tail_targets(counts: np.ndarray, rho: float,
                      order: Optional[Sequence[int]] = None) -> np.ndarray:
  """Long-tail target sizes ([G] int64) for groups with `counts` ([G]) examples.

  order: group ids from head to tail (default 0..G-1), i.e. rank r_g of group g
  is its position in `order`.
  """
  counts = np.asarray(counts, dtype=np.int64)
  num_groups = len(counts)
  if rho < 1:
    raise InputError(f"imbalance.rho={rho} must be >= 1 (largest / smallest group size).")
  order = list(range(num_groups)) if order is None else [int(g) for g in order]
  if sorted(order) != list(range(num_groups)):
    raise InputError(
        f"imbalance.order={order} must list every group id 0..{num_groups - 1} exactly once, "
        "from head (largest) to tail (smallest).")
  if np.any(counts == 0):
    missing = [int(g) for g in np.flatnonzero(counts == 0)]
    raise InputError(
        f"imbalance.kind='long_tail' needs training examples in every group, but group id(s) "
        f"{missing} have none; drop those groups from the data or use keep_fractions.")
  rank = np.empty(num_groups, np.float64)
  rank[order] = np.arange(num_groups)
  factor = rho ** (-rank / max(num_groups - 1, 1))
  n_top = np.min(counts / factor)
  # The epsilon keeps exact products (e.g. 100 * 0.1) from flooring one below.
  return np.minimum(np.floor(n_top * factor + 1e-9), counts).astype(np.int64)


def subsample_groups(split: Split, targets: np.ndarray, seed: int,
                     group_names: Sequence[str]) -> Split:
  """Keeps targets[g] examples of each group g, chosen label-stratified at random.

  Raises ValueError naming any group that has examples but a target of 0.
  """
  rng = np.random.default_rng(seed)
  counts = split.counts(len(targets))
  empty = [f"{group_names[g]!r} (id {g}, {counts[g]} examples)" for g in range(len(targets))
           if counts[g] > 0 and targets[g] <= 0]
  if empty:
    raise InputError(
        f"Imbalance would leave group(s) {', '.join(empty)} with no training examples; "
        "raise its keep fraction, lower imbalance.rho, or use more data.")
  keep = []
  for g in range(len(targets)):
    members = np.flatnonzero(split.group == g)
    members = members[spread_order(split.y[members], rng)]
    keep.append(members[evenly_spaced(len(members), int(min(targets[g], len(members))))])
  return split.take(np.sort(np.concatenate(keep)) if keep else np.zeros((0,), np.int64))


def _keep_fraction_targets(imbalance, before: np.ndarray,
                           group_names: Sequence[str]) -> Tuple[np.ndarray, Dict[str, Any]]:
  if imbalance.get("keep_fractions") is None:
    raise InputError("imbalance.kind='keep_fractions' needs imbalance.keep_fractions.")
  fractions = keep_fraction_vector(imbalance["keep_fractions"], group_names)
  return np.round(fractions * before).astype(np.int64), {"keep_fractions": fractions.tolist()}


def _long_tail_targets(imbalance, before: np.ndarray,
                       group_names: Sequence[str]) -> Tuple[np.ndarray, Dict[str, Any]]:
  rho = float(imbalance.get("rho"))
  targets = long_tail_targets(before, rho, imbalance.get("order"))
  return targets, {"rho": rho, "order": list(imbalance.get("order") or range(len(group_names)))}


# imbalance.kind -> targets(imbalance, counts before [G] int64, group names) ->
#   (kept examples per group [G] int64, the profile's parameters for the metadata)
_PROFILES = {"keep_fractions": _keep_fraction_targets, "long_tail": _long_tail_targets}


def apply_imbalance(split: Split, imbalance, group_names: Sequence[str],
                    seed: int) -> Tuple[Split, Dict[str, Any]]:
  """Applies `imbalance` (config.data.imbalance or a dict) to a training split.

  Args:
    split: the training Split (group [N] int32 ids in [0, G)).
    imbalance: mapping with 'kind' in {'none', 'keep_fractions', 'long_tail'} and
      'keep_fractions' / 'rho' / 'order' as in the module doc.
    group_names: [G] names; G = number of groups.
    seed: NumPy seed of the random pick.
  Returns:
    (new split, metadata dict with kind, per-group counts before and after, and
    the profile's parameters).
  """
  imbalance = imbalance or {}
  kind = imbalance.get("kind", "none")
  if kind == "none":
    return split, {"kind": "none"}
  if kind not in _PROFILES:
    raise InputError(f"imbalance.kind={kind!r}; allowed: 'none', {', '.join(map(repr, _PROFILES))}.")
  num_groups = len(group_names)
  before = split.counts(num_groups)
  targets, params = _PROFILES[kind](imbalance, before, group_names)
  out = subsample_groups(split, targets, seed, group_names)
  return out, {"kind": kind, **params, "counts_before": before.tolist(),
               "counts_after": out.counts(num_groups).tolist()}
