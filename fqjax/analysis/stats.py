"""Statistics behind fqjax's verdicts on post-training quantization (PTQ) accuracy.

Setting: S seeds (trained models), G groups, group g has n_g test examples (the same test set for
every seed). Per seed and bit-width we know, per test example, whether the full-precision (fp) model
and the quantized (q) model are correct. The sufficient statistic per (seed, group) is the paired
2x2 table, stored as 4 cells in the order of ``CELLS``:

  both_right = #(fp right, q right)      fp_only    = #(fp right, q wrong)
  quantized_only = #(fp wrong, q right)  both_wrong = #(fp wrong, q wrong)

  accuracy_fp = (both_right + fp_only) / n_g
  accuracy_q  = (both_right + quantized_only) / n_g
  drop        = accuracy_fp - accuracy_q = (fp_only - quantized_only) / n_g

Uncertainty comes from a hierarchical paired bootstrap (seeds, then test examples within a group,
keeping each example's (fp, q) pair), summarised by percentile intervals. Also here: a collapse
rule (accuracy near chance), the default equivalence margin, and a Spearman permutation test.

Pure NumPy (and scipy for ranks): no JAX, so claims, tables and the report can import it cheaply.
Undefined quantities (groups without rows, empty sides) are NaN, never a crash or a RuntimeWarning.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import numpy as np
from scipy.stats import rankdata

CELLS = ("both_right", "fp_only", "quantized_only", "both_wrong")

_TIE_TOL = 1e-12  # float noise must not flip a permuted rho equal to the observed one
_EXACT_MAX_N = 8  # 8! = 40320 orderings: cheap to enumerate


# --------------------------------------------------------------------------- paired tables


def _as_binary(x, name):
  x = np.asarray(x)
  if x.dtype != bool and not np.all((x == 0) | (x == 1)):
    raise ValueError(f"{name} must be bool or 0/1, got values {np.unique(x)[:5].tolist()}.")
  return x.astype(bool)


def paired_counts(correct_fp, correct_q, group, num_groups: int) -> np.ndarray:
  """Paired 2x2 tables per group.

  Args:
    correct_fp: [N] bool or 0/1, the full-precision model is right on the example.
    correct_q: [N] bool or 0/1, the quantized model is right on the example.
    group: [N] int, group id of each example, in [0, num_groups).
    num_groups: G >= 1.

  Returns:
    [G, 4] int64, cells in the order of ``CELLS``; a group without rows is a row of zeros.
  """
  if int(num_groups) != num_groups or num_groups < 1:
    raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
  num_groups = int(num_groups)
  correct_fp, correct_q, group = (np.asarray(a) for a in (correct_fp, correct_q, group))
  if correct_fp.ndim != 1 or correct_q.shape != correct_fp.shape or group.shape != correct_fp.shape:
    raise ValueError("correct_fp, correct_q and group must all be [N], got shapes "
                     f"{correct_fp.shape}, {correct_q.shape} and {group.shape}.")
  fp = _as_binary(correct_fp, "correct_fp")
  q = _as_binary(correct_q, "correct_q")
  if group.size and not np.issubdtype(group.dtype, np.integer):
    raise ValueError(f"group must hold integer ids, got dtype {group.dtype}.")
  if group.size and (group.min() < 0 or group.max() >= num_groups):
    raise ValueError(f"group ids must be in [0, {num_groups}), got min {group.min()} "
                     f"and max {group.max()}.")
  # Cell index follows CELLS: fp wrong adds 2, q wrong adds 1.
  cell = 2 * (~fp).astype(np.int64) + (~q).astype(np.int64)
  flat = group.astype(np.int64) * 4 + cell
  return np.bincount(flat, minlength=4 * num_groups).reshape(num_groups, 4).astype(np.int64)


def _check_counts(counts) -> np.ndarray:
  counts = np.asarray(counts)
  if counts.ndim != 3 or counts.shape[-1] != 4 or counts.shape[0] < 1 or counts.shape[1] < 1:
    raise ValueError(f"counts must be [S>=1, G>=1, 4], got shape {counts.shape}.")
  if counts.size and not np.all(np.isfinite(counts)):
    raise ValueError("counts must be finite.")
  if np.any(counts < 0) or np.any(counts != np.round(counts)):
    raise ValueError("counts must be non-negative integers.")
  return counts.astype(np.int64)


def _accuracies(counts: np.ndarray):
  """Per-(seed, group) accuracies from [..., 4] counts: (accuracy_fp, accuracy_q, drop), NaN where n=0."""
  n = counts.sum(-1)
  safe = np.where(n > 0, n, 1)  # NaN through where, not through 0/0 (no warning)
  acc_fp = np.where(n > 0, (counts[..., 0] + counts[..., 1]) / safe, np.nan)
  acc_q = np.where(n > 0, (counts[..., 0] + counts[..., 2]) / safe, np.nan)
  return acc_fp, acc_q, acc_fp - acc_q


# --------------------------------------------------------------------------- bootstrap


def _ratio(num, den):
  """num / den with 0 where den == 0 (the binomial then has no trials anyway)."""
  return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def bootstrap(counts, *, num_resamples: int = 1000, seed: int = 0) -> dict:
  """Hierarchical paired bootstrap of per-group accuracies.

  Replicate r: draw S seed indices with replacement; for each drawn seed and group g draw
  multinomial(n_g, table / n_g) (resampling test examples of g with their (fp, q) pairs); compute
  accuracy_fp, accuracy_q and drop per group; average over the S drawn seeds.

  Vectorized exactly: a seed drawn k times contributes the sum of k independent
  multinomial(n, p) draws, which is one multinomial(k * n, p) draw divided by n. That multinomial is
  drawn as a chain of binomials: fp right ~ Bin(kn, p0 + p1), then both_right | fp right and
  quantized_only | fp wrong.

  Args:
    counts: [S, G, 4] non-negative ints, paired tables in the order of ``CELLS``.
    num_resamples: R >= 1.
    seed: seed of np.random.default_rng (the result is deterministic given it).

  Returns:
    {"accuracy_fp", "accuracy_q", "drop"}: each [R, G] float64; a column is NaN when the group has
    no rows in a drawn seed (always NaN for a group with n_g = 0 in every seed).
  """
  counts = _check_counts(counts)
  if int(num_resamples) != num_resamples or num_resamples < 1:
    raise ValueError(f"num_resamples must be a positive int, got {num_resamples!r}.")
  num_seeds = counts.shape[0]
  rng = np.random.default_rng(seed)
  # How often each seed is drawn: the same law as S indices drawn with replacement.
  times = rng.multinomial(num_seeds, np.full(num_seeds, 1.0 / num_seeds), size=int(num_resamples))
  n = counts.sum(-1)  # [S, G]
  p = counts / np.where(n > 0, n, 1)[..., None]  # [S, G, 4]
  trials = times[:, :, None] * n[None]  # [R, S, G]
  # Chain probabilities per (seed, group), [S, G] each; clipped against float round-off.
  p_fp = np.clip(p[..., 0] + p[..., 1], 0.0, 1.0)
  chain = [np.clip(a, 0.0, 1.0) for a in (p_fp, _ratio(p[..., 0], p_fp), _ratio(p[..., 2], 1.0 - p_fp))]
  live = trials > 0  # draw only where there is something to draw (about 1/3 of seeds are not drawn)
  k = trials[live]
  p_fp, p_both, p_qonly = (np.broadcast_to(a, trials.shape)[live] for a in chain)
  fp_right = rng.binomial(k, p_fp)
  both_right = rng.binomial(fp_right, p_both)
  q_only = rng.binomial(k - fp_right, p_qonly)
  safe_n = np.where(n > 0, n, 1).astype(np.float64)
  # A drawn seed without rows for g makes that replicate's g undefined.
  empty_drawn = ((times[:, :, None] > 0) & (n[None] == 0)).any(1)  # [R, G]
  out = {}
  for name, cnt in (("accuracy_fp", fp_right), ("accuracy_q", both_right + q_only)):
    per_seed = np.zeros(trials.shape, np.float64)
    per_seed[live] = cnt
    acc = (per_seed / safe_n[None]).sum(1) / num_seeds  # [R, G]
    out[name] = np.where(empty_drawn, np.nan, acc)
  out["drop"] = out["accuracy_fp"] - out["accuracy_q"]
  return out


# --------------------------------------------------------------------------- intervals


def _interval(point, reps, level):
  """Percentile interval of reps [R, ...] where point is finite; NaN elsewhere (no warnings)."""
  point = np.asarray(point, np.float64)
  reps = np.asarray(reps, np.float64)
  low = np.full(point.shape, np.nan)
  high = np.full(point.shape, np.nan)
  alpha = (1.0 - level) / 2.0
  ok = np.isfinite(point) & np.all(np.isfinite(reps), axis=0)
  if np.any(ok):
    q = np.quantile(reps[:, ok], [alpha, 1.0 - alpha], axis=0)
    low[ok], high[ok] = q[0], q[1]
  return point, low, high


def _as_dict(point, low, high, scalar=False):
  if scalar:
    return {"mean": float(point), "low": float(low), "high": float(high)}
  return {"mean": point.tolist(), "low": low.tolist(), "high": high.tolist()}


def _masked_mean(x, mask):
  """Mean of x [..., G] over the groups in mask [G]; NaN (no warning) when mask selects none."""
  if not np.any(mask):
    return np.full(np.shape(x)[:-1], np.nan)
  return np.asarray(x)[..., mask].mean(-1)


def intervals(counts, minority: Optional[Sequence[bool]] = None, *, num_resamples: int = 1000,
              seed: int = 0, level: float = 0.95) -> dict:
  """Point estimates and bootstrap percentile intervals for the PTQ verdicts.

  Point estimates come from the original counts: per group, the mean over seeds. Intervals are the
  ((1 - level)/2, (1 + level)/2) percentiles of ``bootstrap`` replicates.

  Args:
    counts: [S, G, 4] paired tables (see ``paired_counts``).
    minority: optional [G] bool mask of minority groups.
    num_resamples, seed: passed to ``bootstrap``.
    level: interval coverage, in (0, 1).

  Returns (JSON-ready lists and floats; NaN stays float nan):
    group_accuracy: {"mean", "low", "high"} each [G], quantized accuracy.
    group_accuracy_drop: {"mean", "low", "high"} each [G], accuracy_fp - accuracy_q.
    worst_group_accuracy: {"mean", "low", "high"} floats, min over groups with rows (per
      replicate: min over the same groups).
    drop_difference: {"mean", "low", "high"} floats, mean drop over minority groups minus mean drop
      over majority groups (groups with rows only; NaN if a side has none); only when minority given.
    level, num_resamples.
  """
  counts = _check_counts(counts)
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level!r}.")
  num_groups = counts.shape[1]
  if minority is not None:
    minority = np.asarray(minority)
    if minority.shape != (num_groups,) or minority.dtype != bool:
      raise ValueError(f"minority must be a [G={num_groups}] bool mask, got shape "
                       f"{minority.shape} and dtype {minority.dtype}.")
  _, acc_q, drop = _accuracies(counts)  # [S, G]
  has_rows = np.all(counts.sum(-1) > 0, axis=0)  # [G]; a seed without rows leaves g undefined
  point_q = np.where(has_rows, np.where(has_rows, acc_q, 0.0).mean(0), np.nan)
  point_drop = np.where(has_rows, np.where(has_rows, drop, 0.0).mean(0), np.nan)
  reps = bootstrap(counts, num_resamples=num_resamples, seed=seed)
  out = {
      "group_accuracy": _as_dict(*_interval(point_q, reps["accuracy_q"], level)),
      "group_accuracy_drop": _as_dict(*_interval(point_drop, reps["drop"], level)),
  }
  if np.any(has_rows):
    worst_point = point_q[has_rows].min()
    worst_reps = reps["accuracy_q"][:, has_rows].min(1)
  else:
    worst_point, worst_reps = np.nan, np.full(int(num_resamples), np.nan)
  out["worst_group_accuracy"] = _as_dict(*_interval(worst_point, worst_reps, level), scalar=True)
  if minority is not None:
    diff_point = (_masked_mean(point_drop, minority & has_rows)
                  - _masked_mean(point_drop, ~minority & has_rows))
    diff_reps = (_masked_mean(reps["drop"], minority & has_rows)
                 - _masked_mean(reps["drop"], ~minority & has_rows))
    out["drop_difference"] = _as_dict(*_interval(diff_point, diff_reps, level), scalar=True)
  out["level"] = float(level)
  out["num_resamples"] = int(num_resamples)
  return out


# --------------------------------------------------------------------------- collapse and margin


def collapse_threshold(full_precision_accuracy: float, num_classes: int,
                       fraction: float = 0.5) -> float:
  """Accuracy below which a quantized model counts as collapsed.

  threshold = chance + fraction * (full_precision_accuracy - chance), chance = 1 / num_classes:
  the model kept less than ``fraction`` of its above-chance accuracy.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
  if int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
  chance = 1.0 / num_classes
  return float(chance + fraction * (full_precision_accuracy - chance))


def is_collapsed(accuracy: float, full_precision_accuracy: float, num_classes: int,
                 fraction: float = 0.5) -> bool:
  """True when accuracy < ``collapse_threshold``; False for a NaN accuracy (no evidence)."""
  threshold = collapse_threshold(full_precision_accuracy, num_classes, fraction)
  return bool(accuracy < threshold)


def default_equivalence_margin(test_counts) -> float:
  """1 / median of the nonzero test group sizes: one test example of the median group.

  Args:
    test_counts: [G] test examples per group (zeros ignored).
  """
  sizes = np.asarray(test_counts, np.float64).ravel()
  sizes = sizes[np.isfinite(sizes) & (sizes > 0)]
  if sizes.size == 0:
    raise ValueError(f"default_equivalence_margin needs a nonzero group size, got {test_counts!r}.")
  return float(1.0 / np.median(sizes))


# --------------------------------------------------------------------------- Spearman test


def spearman_permutation_test(x, y, *, seed: int = 0, num_permutations: int = 10000):
  """Spearman rank correlation and its one-sided permutation p-value P(rho_perm >= rho_obs).

  rho = Pearson correlation of average ranks (ties share their mean rank), over pairs where both x
  and y are finite. The null permutes y against x: exact over all n! orderings when n <= 8
  (p = #{rho_perm >= rho_obs} / n!), else Monte Carlo with num_permutations seeded permutations
  (p = (1 + #{rho_perm >= rho_obs}) / (1 + M)). ">=" allows 1e-12 of float noise.

  Args:
    x, y: [n] numbers.
  Returns:
    (rho, p_greater) floats; (nan, nan) for fewer than 3 finite pairs or a constant side.
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 1 or x.shape != y.shape:
    raise ValueError(f"x and y must both be [n], got shapes {x.shape} and {y.shape}.")
  if int(num_permutations) != num_permutations or num_permutations < 1:
    raise ValueError(f"num_permutations must be a positive int, got {num_permutations!r}.")
  keep = np.isfinite(x) & np.isfinite(y)
  x, y = x[keep], y[keep]
  n = x.size
  if n < 3:
    return math.nan, math.nan
  rx = rankdata(x) - (n + 1) / 2.0  # centred average ranks
  ry = rankdata(y) - (n + 1) / 2.0
  denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
  if denom == 0.0:
    return math.nan, math.nan
  rho = float(rx @ ry) / denom
  if n <= _EXACT_MAX_N:
    perms = np.array(list(itertools.permutations(range(n))), np.int64)  # [n!, n]
    null = ry[perms] @ rx / denom
    p = float(np.mean(null >= rho - _TIE_TOL))
  else:
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.broadcast_to(ry, (int(num_permutations), n)), axis=1)
    null = shuffled @ rx / denom
    p = float((1 + np.sum(null >= rho - _TIE_TOL)) / (1 + int(num_permutations)))
  return rho, p
