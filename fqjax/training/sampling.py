"""Group-aware resampling of a training split: pure functions from a seed to index arrays.

Every sampler takes the group id of each training example, ``group: [N]`` int,
and returns a :class:`SampleResult` whose ``indices`` ([M] int64) index into
that split, with ``counts`` ([num_groups] int64) the number of sampled rows per
group. The samplers only decide *which rows*; the pipeline
(:func:`fqjax.data.pipeline.epoch_batches`) shuffles and batches them.

With ``n_g`` the size of group g, each sampler picks a per-group target ``t_g``:

  undersample:  t_g = min(n_g, T),  T = min_g n_g by default   (no row repeats)
  oversample:   t_g = max(n_g, T),  T = max_g n_g by default   (every row kept)
  balanced:     t_g = n,            n = floor(N / G) by default
  fairqat:      t_g = T,            T = median or mean of n_g, or an int

and draws ``t_g`` rows from group g: without replacement when ``t_g <= n_g``;
otherwise every row of the group once plus ``t_g - n_g`` draws with replacement
(so no row of a small group is left out by chance). The result is permuted so
that the rows of one group are not contiguous.

All randomness comes from ``np.random.default_rng(seed)``: the same inputs and
seed give the same indices on every machine.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Union

import numpy as np

from fqjax.choices import SAMPLING_METHODS

Seed = Union[int, np.random.Generator]

METHODS = SAMPLING_METHODS  # the config's choice tuple; _SAMPLERS has the same keys
TARGET_STATISTICS = ("median", "mean")
_STATISTICS = {"median": np.median, "mean": np.mean}  # fairqat's target statistic, keyed as TARGET_STATISTICS


class SampleResult(NamedTuple):
  """The rows to train on.

  Attributes:
    indices: [M] int64, rows of the training split (repeats allowed when oversampling).
    counts: [num_groups] int64, how many of ``indices`` fall in each group.
  """
  indices: np.ndarray
  counts: np.ndarray


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------

def _check_num_groups(num_groups) -> int:
  if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups < 1:
    raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}.")
  return int(num_groups)


def _check_group(group, num_groups: int) -> np.ndarray:
  arr = np.asarray(group)
  if arr.ndim != 1:
    raise ValueError(f"group must be a 1-D array of group ids [N], got shape {arr.shape}.")
  if arr.size == 0:
    raise ValueError("group is empty (N = 0): there is nothing to sample from.")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(
        f"group must hold integer group ids, got dtype {arr.dtype}; "
        "convert with group.astype(np.int32) if the values are whole numbers.")
  lo, hi = int(arr.min()), int(arr.max())
  if lo < 0:
    raise ValueError(f"group ids must be >= 0, got a minimum of {lo}.")
  if hi >= num_groups:
    raise ValueError(
        f"group ids must be < num_groups={num_groups}, got a maximum of {hi}; "
        "pass the number of groups of the dataset (e.g. Splits.num_groups).")
  return arr.astype(np.int64, copy=False)


def _rng(seed: Seed) -> np.random.Generator:
  if isinstance(seed, np.random.Generator):
    return seed
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise ValueError(
        f"seed must be an int (or a np.random.Generator), got {seed!r}; "
        "pass the seed from the config so that runs are reproducible.")
  return np.random.default_rng(int(seed))


def _check_target(target, name: str = "target") -> int:
  if isinstance(target, bool) or not isinstance(target, numbers.Integral) or target < 1:
    raise ValueError(f"{name} must be an int >= 1, got {target!r}.")
  return int(target)


def _require_nonempty(counts: np.ndarray, method: str) -> None:
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    raise ValueError(
        f"{method}: group(s) {empty.tolist()} have no training examples, so they cannot be "
        f"sampled (group sizes: {counts.tolist()}). Drop those groups from the split "
        "or lower num_groups.")


# ----------------------------------------------------------------------------
# Core
# ----------------------------------------------------------------------------

def group_counts(group, num_groups: int) -> np.ndarray:
  """Number of examples per group.

  Args:
    group: [N] int, group id of each example, in [0, num_groups).
    num_groups: G.

  Returns:
    [G] int64.
  """
  num_groups = _check_num_groups(num_groups)
  group = _check_group(group, num_groups)
  return np.bincount(group, minlength=num_groups).astype(np.int64)


def resample_to_counts(group, num_groups: int, targets, seed: Seed) -> SampleResult:
  """Draws exactly ``targets[g]`` rows from each group g.

  Without replacement where ``targets[g] <= n_g``; otherwise all ``n_g`` rows
  once plus ``targets[g] - n_g`` draws with replacement. The other samplers are
  this function with a particular ``targets``.

  Args:
    group: [N] int group ids in [0, num_groups).
    num_groups: G.
    targets: [G] int, rows wanted per group (>= 0; > 0 needs a non-empty group).
    seed: int or np.random.Generator.

  Returns:
    SampleResult with ``counts == targets``.
  """
  num_groups = _check_num_groups(num_groups)
  group = _check_group(group, num_groups)
  targets = np.asarray(targets)
  if targets.shape != (num_groups,) or not np.issubdtype(targets.dtype, np.integer):
    raise ValueError(
        f"targets must be an int array of shape ({num_groups},), got {targets.dtype} {targets.shape}.")
  if (targets < 0).any():
    raise ValueError(f"targets must be >= 0, got {targets.tolist()}.")
  rng = _rng(seed)
  counts = np.bincount(group, minlength=num_groups)
  impossible = np.flatnonzero((counts == 0) & (targets > 0))
  if impossible.size:
    raise ValueError(
        f"group(s) {impossible.tolist()} have no training examples but a target > 0 "
        f"(targets {targets.tolist()}, group sizes {counts.tolist()}). Drop those groups "
        "or give them a target of 0.")
  # A stable sort lists each group's rows in increasing order, so the draw depends only on the seed.
  order = np.argsort(group, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)])
  parts = []
  for g in range(num_groups):
    rows = order[starts[g]:starts[g + 1]]
    t, n = int(targets[g]), rows.size
    if t <= n:
      parts.append(rng.choice(rows, size=t, replace=False))
    else:
      parts.append(rows)
      parts.append(rng.choice(rows, size=t - n, replace=True))
  indices = np.concatenate(parts).astype(np.int64)
  indices = indices[rng.permutation(indices.size)]
  return SampleResult(indices=indices, counts=targets.astype(np.int64))


def undersample(group, num_groups: int, seed: Seed, target: int | None = None) -> SampleResult:
  """Cuts every group larger than ``target`` down to ``target`` rows (no repeats).

  t_g = min(n_g, target); ``target`` defaults to the smallest group's size
  (then every group ends up that size, and an empty group is an error).

  group: [N] int ids in [0, num_groups); returns SampleResult (indices [M] int64, counts [G] int64).
  """
  counts = group_counts(group, num_groups)
  if target is None:
    _require_nonempty(counts, "undersample (target = smallest group)")
    target = int(counts.min())
  target = _check_target(target)
  return resample_to_counts(group, num_groups, np.minimum(counts, target), seed)


def oversample(group, num_groups: int, seed: Seed, target: int | None = None) -> SampleResult:
  """Tops every group smaller than ``target`` up to ``target`` rows, drawing with replacement.

  t_g = max(n_g, target); every original row is kept. ``target`` defaults to
  the largest group's size. Every group must be non-empty.

  group: [N] int ids in [0, num_groups); returns SampleResult (indices [M] int64, counts [G] int64).
  """
  counts = group_counts(group, num_groups)
  _require_nonempty(counts, "oversample")
  target = int(counts.max()) if target is None else _check_target(target)
  return resample_to_counts(group, num_groups, np.maximum(counts, target), seed)


def balanced(group, num_groups: int, seed: Seed, n_per_group: int | None = None) -> SampleResult:
  """Exactly ``n_per_group`` rows from every group.

  Groups with at least that many rows are subsampled without replacement; only
  smaller groups repeat rows. ``n_per_group`` defaults to floor(N / G), which
  keeps the epoch length close to the original.

  group: [N] int ids in [0, num_groups); returns SampleResult (indices [M] int64, counts [G] int64).
  """
  counts = group_counts(group, num_groups)
  _require_nonempty(counts, "balanced")
  if n_per_group is None:
    n_per_group = max(int(counts.sum()) // len(counts), 1)
  n_per_group = _check_target(n_per_group, "n_per_group")
  return resample_to_counts(group, num_groups, np.full(len(counts), n_per_group, np.int64), seed)


def fairqat(group, num_groups: int, seed: Seed, target: Union[str, int] = "median") -> SampleResult:
  """FairQAT's rebalancing: undersample groups above a target, oversample groups below it.

  Every group ends with exactly T rows, T = ``target``: 'median' (default) or
  'mean' of the group sizes (rounded to the nearest int, at least 1), or an int.
  A median target keeps the epoch near its original length while removing most
  of the imbalance, with fewer repeats of minority rows than oversampling to the
  largest group.

  group: [N] int ids in [0, num_groups); returns SampleResult (indices [M] int64, counts [G] int64).
  """
  counts = group_counts(group, num_groups)
  _require_nonempty(counts, "fairqat")
  if isinstance(target, str):
    if target not in _STATISTICS:
      raise ValueError(
          f"fairqat target must be one of {TARGET_STATISTICS} or an int >= 1, got {target!r}.")
    stat = _STATISTICS[target](counts)
    target = max(int(np.rint(stat)), 1)
  target = _check_target(target)
  return resample_to_counts(group, num_groups, np.full(len(counts), target, np.int64), seed)


def all_rows(group, num_groups: int, seed: Seed = None) -> SampleResult:
  """Method 'none': every row once, in order (indices 0..N-1); the seed is not used."""
  counts = group_counts(group, num_groups)
  return SampleResult(indices=np.arange(int(counts.sum()), dtype=np.int64), counts=counts)


# method -> (sampler(group, num_groups, seed, **option), the name of its one option or None)
_SAMPLERS = {
    "none": (all_rows, None),
    "undersample": (undersample, "target"),
    "oversample": (oversample, "target"),
    "balanced": (balanced, "n_per_group"),
    "fairqat": (fairqat, "target"),
}


def _check_method(method: str) -> None:
  if method not in _SAMPLERS:
    raise ValueError(f"Unknown sampling method {method!r}; allowed: {METHODS}.")


def target_option(method: str, target) -> dict:
  """The options of ``sample_indices`` that give ``method`` the target ``target`` (config's sampling_target).

  Returns {} when target is None, else {'target': target}, or {'n_per_group': target} for
  'balanced'. Method 'none' takes no target (ValueError when one is given).
  """
  _check_method(method)
  option = _SAMPLERS[method][1]
  if target is None:
    return {}
  if option is None:
    raise ValueError(f"sampling method {method!r} takes no target, got {target!r}.")
  return {option: target}


def sample_indices(group, num_groups: int, method: str, seed: Seed, **kwargs) -> SampleResult:
  """Dispatches on ``method`` (the config's ``sampling`` field).

  Args:
    group: [N] int group ids in [0, num_groups).
    num_groups: G.
    method: one of 'none' (all rows once, in order), 'undersample', 'oversample',
      'balanced', 'fairqat'.
    seed: int or np.random.Generator.
    **kwargs: the method's own option: ``target`` (undersample, oversample,
      fairqat) or ``n_per_group`` (balanced); see target_option.

  Returns:
    SampleResult: indices [M] int64, counts [G] int64.
  """
  _check_method(method)
  fn, option = _SAMPLERS[method]
  allowed = () if option is None else (option,)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(
        f"sampling method {method!r} takes the options {list(allowed)}, got unknown {unknown}.")
  return fn(group, num_groups, seed, **kwargs)
