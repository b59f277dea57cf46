"""Per-group metrics, fairness gaps, seed aggregation and bootstrap intervals.

Everything here works on host NumPy arrays of per-sample results, the way
Fairlearn's MetricFrame reads: a metric overall, the same metric per group,
and the differences between groups.

Definitions (G groups, acc_g = accuracy on group g):
  fairness_violation = max_g acc_g - min_g acc_g      (the paper's measure)
  worst_group_accuracy = min_g acc_g
  accuracy_drop_g = acc_g(full precision) - acc_g(model)
  demographic_parity_gap = max_c [max_g P(pred=c | g) - min_g P(pred=c | g)]
  equalized_odds_gap = max_c max(range_g TPR_g(c), range_g FPR_g(c)),
      TPR_g(c) = P(pred=c | y=c, g), FPR_g(c) = P(pred=c | y!=c, g)
  (one-vs-rest per class; for a binary task this is the usual definition).
Groups with no samples are left out of max/min (reported with count 0, NaN accuracy, which
results.json stores as null); a statistic with no group to take it over is NaN. Nothing here
emits a NumPy RuntimeWarning on empty groups: empty slices are masked, not averaged.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np


def _check_inputs(logits, y, group, num_groups):
  logits = np.asarray(logits, np.float64)
  y = np.asarray(y)
  group = np.asarray(group)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [N, C], got shape {logits.shape}.")
  n = logits.shape[0]
  if y.shape != (n,) or group.shape != (n,):
    raise ValueError(f"y and group must be [N={n}], got {y.shape} and {group.shape}.")
  if n and (group.min() < 0 or group.max() >= num_groups):
    raise ValueError(f"group ids must be in [0, {num_groups}), got range [{group.min()}, {group.max()}].")
  return logits, y.astype(np.int64), group.astype(np.int64)


def group_mean(values: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
  """Mean of ``values`` [N] within each group id of ``group`` [N]: [num_groups] float64, NaN for an empty group.

  The one per-group mean of the package (metrics, hardness weights, the explain chain).
  """
  values = np.asarray(values, np.float64)
  group = np.asarray(group, np.int64)
  count = np.bincount(group, minlength=num_groups)
  total = np.bincount(group, weights=values, minlength=num_groups)
  out = np.full(num_groups, np.nan)
  np.divide(total, count, out=out, where=count > 0)
  return out


def spearman(a, b) -> float:
  """Spearman rank correlation (scipy.stats.spearmanr, average ranks for ties) of two 1-D sequences.

  Pairs with a non-finite value are left out; NaN (no warning) when fewer than 2 pairs remain
  or a side is constant. ValueError on mismatched shapes.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(f"spearman needs two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}.")
  keep = np.isfinite(a) & np.isfinite(b)
  a, b = a[keep], b[keep]
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return float("nan")
  from scipy import stats  # scipy comes with scikit-learn; imported here to keep `import fqjax.metrics` light
  return float(stats.spearmanr(a, b).statistic)


def per_sample_loss(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Softmax cross-entropy per sample: logits [N, C], y [N] -> [N] float64."""
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_z = np.log(np.exp(shifted).sum(axis=1))
  return log_z - shifted[np.arange(len(y)), y]


def _range(values: np.ndarray) -> float:
  values = values[np.isfinite(values)]
  return float(values.max() - values.min()) if values.size else float("nan")


def _finite_max(values) -> float:
  """Max over the finite values; NaN (no warning) when there are none."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.max()) if values.size else float("nan")


def _rates(pred, y, group, num_groups, num_classes):
  """P(pred=c | g), TPR_g(c), FPR_g(c) as [G, C] arrays (NaN where undefined)."""
  with np.errstate(invalid="ignore", divide="ignore"):
    dp = np.full((num_groups, num_classes), np.nan)
    tpr = np.full((num_groups, num_classes), np.nan)
    fpr = np.full((num_groups, num_classes), np.nan)
    for g in range(num_groups):
      in_g = group == g
      if not in_g.any():
        continue
      pg, yg = pred[in_g], y[in_g]
      for c in range(num_classes):
        dp[g, c] = np.mean(pg == c)
        pos, neg = yg == c, yg != c
        if pos.any():
          tpr[g, c] = np.mean(pg[pos] == c)
        if neg.any():
          fpr[g, c] = np.mean(pg[neg] == c)
  return dp, tpr, fpr


def group_metrics(logits: np.ndarray, y: np.ndarray, group: np.ndarray, num_groups: int, *,
                  group_is_label: bool = True, reference: Optional[Mapping] = None) -> dict:
  """Overall and per-group accuracy and loss, fairness violation and gaps.

  Args:
    logits: [N, C] float; y: [N] int labels; group: [N] int group ids in [0, G).
    group_is_label: when False (a separate attribute), demographic-parity and
      equalized-odds gaps are added.
    reference: the full-precision model's ``group_metrics`` output; adds
      per-group ``accuracy_drop`` = reference accuracy - this accuracy.

  Returns:
    JSON-ready dict: accuracy, loss, worst_group_accuracy, fairness_violation,
    groups: {"count", "accuracy", "loss", ["accuracy_drop"]} as [G] lists,
    and optionally demographic_parity_gap, equalized_odds_gap.
  """
  logits, y, group = _check_inputs(logits, y, group, num_groups)
  num_classes = logits.shape[1]
  pred = logits.argmax(axis=1)
  correct = (pred == y).astype(np.float64)
  loss = per_sample_loss(logits, y)
  count = np.bincount(group, minlength=num_groups)
  with np.errstate(invalid="ignore", divide="ignore"):
    acc_g = np.bincount(group, weights=correct, minlength=num_groups) / count
    loss_g = np.bincount(group, weights=loss, minlength=num_groups) / count
  present = count > 0
  out = {
      "n": int(len(y)),
      "accuracy": float(correct.mean()) if len(y) else float("nan"),
      "loss": float(loss.mean()) if len(y) else float("nan"),
      "worst_group_accuracy": float(acc_g[present].min()) if present.any() else float("nan"),
      "fairness_violation": _range(acc_g),
      "groups": {"count": count.tolist(), "accuracy": acc_g.tolist(), "loss": loss_g.tolist()},
  }
  if reference is not None:
    ref_acc = np.asarray(reference["groups"]["accuracy"], np.float64)
    out["groups"]["accuracy_drop"] = (ref_acc - acc_g).tolist()
    out["accuracy_drop"] = float(reference["accuracy"] - out["accuracy"])
  if not group_is_label:
    dp, tpr, fpr = _rates(pred, y, group, num_groups, num_classes)
    cols = range(num_classes)
    out["demographic_parity_gap"] = _finite_max([_range(dp[:, c]) for c in cols])
    out["equalized_odds_gap"] = _finite_max([_finite_max([_range(tpr[:, c]), _range(fpr[:, c])]) for c in cols])
  return out


def bootstrap_fairness_violation(correct: np.ndarray, group: np.ndarray, num_groups: int, *,
                                 num_resamples: int = 1000, seed: int = 0,
                                 confidence: float = 0.95) -> dict:
  """Percentile bootstrap interval of the fairness violation.

  Resamples the N test samples with replacement (stratified by group, so every
  group keeps its size and its accuracy stays defined) ``num_resamples`` times.
  correct: [N] bool/0-1; group: [N] int. Returns {"low", "high", "confidence", "num_resamples"}.
  """
  correct = np.asarray(correct, np.float64)
  group = np.asarray(group, np.int64)
  rng = np.random.default_rng(seed)
  accs = []
  for g in range(num_groups):
    c = correct[group == g]
    if c.size == 0:
      continue
    draws = rng.integers(0, c.size, size=(num_resamples, c.size))
    accs.append(c[draws].mean(axis=1))
  if not accs:
    raise ValueError("bootstrap_fairness_violation got no samples.")
  accs = np.stack(accs)  # [G_present, R]
  fv = accs.max(axis=0) - accs.min(axis=0)
  alpha = (1.0 - confidence) / 2.0
  return {"low": float(np.quantile(fv, alpha)), "high": float(np.quantile(fv, 1.0 - alpha)),
          "confidence": confidence, "num_resamples": num_resamples}


def mean_std(values: Sequence[Optional[float]]) -> dict:
  """{"mean", "std", "n"}; std is the sample standard deviation (ddof=1), 0 for one value.

  None, NaN and inf values (a group with no samples in that seed) are left out; n counts the
  values used. With none left: {"mean": NaN, "std": NaN, "n": 0} (null in results.json), no warning.
  """
  arr = np.asarray([v for v in values if v is not None and math.isfinite(float(v))], np.float64)
  if arr.size == 0:
    return {"mean": float("nan"), "std": float("nan"), "n": 0}
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


SUMMARY_SCALARS = ("accuracy", "loss", "worst_group_accuracy", "fairness_violation", "accuracy_drop",
                   "demographic_parity_gap", "equalized_odds_gap")


def summarize_over_seeds(per_seed: Sequence[Mapping]) -> dict:
  """Mean and std over seeds of every scalar metric and every per-group list of ``group_metrics``.

  Per-group entries are mean_std dicts; a group with no samples in any seed gets n = 0 (mean NaN).
  """
  out: dict = {}
  if not per_seed:
    return {"groups": {}}
  for key in SUMMARY_SCALARS:
    if all(key in m for m in per_seed):
      out[key] = mean_std([m[key] for m in per_seed])
  groups: dict = {}
  for key in ("accuracy", "loss", "accuracy_drop"):
    if all(key in m["groups"] for m in per_seed):
      stacked = np.asarray([[np.nan if v is None else v for v in m["groups"][key]] for m in per_seed], np.float64)
      groups[key] = [mean_std(stacked[:, g].tolist()) for g in range(stacked.shape[1])]
  out["groups"] = groups
  return out
