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
  accuracy_ratio = min_g acc_g / max_g acc_g
  ece = sum_b |B_b|/n |acc(B_b) - conf(B_b)|, 15 equal-width bins of the max softmax probability
  flip rate = fraction of rows whose predicted class changes (Hooker et al. 2020, "Characterising Bias
      in Compressed Models"); from paired correct/incorrect counts only the correctness flips, a lower bound.
fairlearn's names are added as aliases (MetricFrame(metrics=accuracy_score, ...)): accuracy_score_difference
(.difference() = max - min = fairness_violation), accuracy_score_group_min (.group_min() =
worst_group_accuracy), accuracy_score_group_max (.group_max()), accuracy_score_ratio (.ratio() = min / max).
Groups with no samples are left out of max/min (reported with count 0, NaN accuracy, which
results.json stores as null); a statistic with no group to take it over is NaN. Nothing here
emits a NumPy RuntimeWarning on empty groups: empty slices are masked, not averaged.

Also here, as the one copy for the package: ``group_mean`` (per-group mean), ``finite_mean`` (mean
of the finite entries), ``spearman`` (scipy.stats.spearmanr). No JAX: claims, tables and the report
import this module.
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


def finite_mean(values, axis: Optional[int] = None):
  """Mean of the finite entries of ``values`` (any shape) over ``axis`` (None: all).

  mean = sum_{finite v} v / #finite, NaN where no entry is finite (an empty group, a missing seed);
  no RuntimeWarning. Returns a float64 array (0-d for axis=None).
  """
  values = np.asarray(values, np.float64)
  finite = np.isfinite(values)
  n = finite.sum(axis=axis)
  total = np.where(finite, values, 0.0).sum(axis=axis)
  return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _finite_pairs(a, b, name: str):
  """(a, b) as float64 with the pairs holding a non-finite value left out; None when fewer than 2 pairs remain
  or a side is constant. ValueError unless both are 1-D of equal length."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(f"{name} needs two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}.")
  keep = np.isfinite(a) & np.isfinite(b)
  a, b = a[keep], b[keep]
  if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
    return None
  return a, b


def spearman(a, b) -> float:
  """Spearman rank correlation (scipy.stats.spearmanr, average ranks for ties) of two 1-D sequences.

  Pairs with a non-finite value are left out; NaN (no warning) when fewer than 2 pairs remain
  or a side is constant. ValueError on mismatched shapes.
  """
  pairs = _finite_pairs(a, b, "spearman")
  if pairs is None:
    return float("nan")
  a, b = pairs
  from scipy import stats  # scipy comes with scikit-learn; imported here to keep `import fqjax.analysis.metrics` light
  return float(stats.spearmanr(a, b).statistic)


def pearson(a, b) -> float:
  """Pearson correlation of two 1-D sequences over the pairs with finite values; NaN (no warning) for fewer
  than 2 pairs or a constant side. ValueError on mismatched shapes."""
  pairs = _finite_pairs(a, b, "pearson")
  if pairs is None:
    return float("nan")
  a, b = (v - v.mean() for v in pairs)
  return float(np.clip(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)), -1.0, 1.0))


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


def _finite_min(values) -> float:
  """Min over the finite values; NaN (no warning) when there are none."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.min()) if values.size else float("nan")


def max_softmax(logits: np.ndarray) -> np.ndarray:
  """Confidence max_c softmax(logits)_c per row: logits [N, C] -> [N] float64 in [1/C, 1].

  With z = logits - max(logits) the top entry is exp(0) = 1, so the max probability is 1 / sum_c exp(z_c).
  """
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=1, keepdims=True)
  return 1.0 / np.exp(shifted).sum(axis=1)


def calibration_error(confidence, correct, group, num_groups: int, num_bins: int = 15) -> np.ndarray:
  """Expected calibration error (ECE, Guo et al. 2017) per group: [num_groups] float64, NaN for an empty group.

  confidence: [N] float in [0, 1] (the max softmax probability); correct: [N] bool / 0-1; group: [N] int.
  Bins are the equal-width intervals B_b = ((b-1)/num_bins, b/num_bins], b = 1..num_bins (a confidence of
  exactly 0 goes to the first). Per group g over its n_g rows:
    ECE_g = sum_b |B_b,g| / n_g * |acc(B_b,g) - conf(B_b,g)| = (1/n_g) sum_b |sum_{i in B_b,g} (correct_i - conf_i)|
  (the two forms agree: a bin's weight times its mean gap is its summed gap; empty bins add 0).
  """
  confidence = np.asarray(confidence, np.float64)
  gap = np.asarray(correct, np.float64) - confidence
  group = np.asarray(group, np.int64)
  bins = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
  summed = np.bincount(group * num_bins + bins, weights=gap, minlength=num_groups * num_bins)
  total = np.abs(summed.reshape(num_groups, num_bins)).sum(axis=1)
  count = np.bincount(group, minlength=num_groups)
  out = np.full(num_groups, np.nan)
  np.divide(total, count, out=out, where=count > 0)
  return out


def _ratio(values) -> float:
  """min / max over the finite values (fairlearn's MetricFrame.ratio()); NaN when none or max == 0."""
  hi = _finite_max(values)
  return _finite_min(values) / hi if hi > 0 else float("nan")  # NaN > 0 is False: no group -> NaN


def _rates(pred, y, group, num_groups, num_classes):
  """P(pred=c | g), TPR_g(c) = P(pred=c | y=c, g), FPR_g(c) = P(pred=c | y!=c, g) as [G, C] float64 arrays.

  pred, y, group: [N] int. NaN where the conditioning set is empty.
  """
  dp = np.full((num_groups, num_classes), np.nan)
  tpr, fpr = dp.copy(), dp.copy()
  for c in range(num_classes):
    hit, pos = (pred == c).astype(np.float64), y == c
    dp[:, c] = group_mean(hit, group, num_groups)
    tpr[:, c] = group_mean(hit[pos], group[pos], num_groups)
    fpr[:, c] = group_mean(hit[~pos], group[~pos], num_groups)
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

  The DP / EO gaps are fqjax's own multiclass definition (one-vs-rest, worst class; module docstring).
  fairlearn's demographic_parity_difference / equalized_odds_difference take binary predictions. For
  C = 2 both classes give the same ranges (P(pred=0|g) = 1 - P(pred=1|g), TPR_g(0) = 1 - FPR_g(1)), so
  the gaps reduce to range_g P(pred=1|g) and max(range_g TPR_g, range_g FPR_g) with class 1 positive:
  fairlearn's values (its default agg="worst_case").

  Returns:
    JSON-ready dict: accuracy, loss, worst_group_accuracy, fairness_violation, accuracy_ratio, ece,
    the fairlearn aliases accuracy_score_{difference, group_min, group_max, ratio},
    groups: {"count", "accuracy", "loss", "ece", ["accuracy_drop"]} as [G] lists,
    and optionally demographic_parity_gap, equalized_odds_gap.
  """
  logits, y, group = _check_inputs(logits, y, group, num_groups)
  num_classes = logits.shape[1]
  pred = logits.argmax(axis=1)
  correct = (pred == y).astype(np.float64)
  loss = per_sample_loss(logits, y)
  count = np.bincount(group, minlength=num_groups)
  acc_g, loss_g = group_mean(correct, group, num_groups), group_mean(loss, group, num_groups)
  present = count > 0
  conf = max_softmax(logits)
  ece_g = calibration_error(conf, correct, group, num_groups)
  out = {
      "n": int(len(y)),
      "accuracy": float(correct.mean()) if len(y) else float("nan"),
      "loss": float(loss.mean()) if len(y) else float("nan"),
      "worst_group_accuracy": float(acc_g[present].min()) if present.any() else float("nan"),
      "fairness_violation": _range(acc_g),
      "accuracy_ratio": _ratio(acc_g),
      "ece": float(calibration_error(conf, correct, np.zeros_like(group), 1)[0]),
      "groups": {"count": count.tolist(), "accuracy": acc_g.tolist(), "loss": loss_g.tolist(),
                 "ece": ece_g.tolist()},
  }
  # fairlearn's MetricFrame vocabulary, so auditors find the numbers under the names they know.
  out["accuracy_score_difference"] = out["fairness_violation"]
  out["accuracy_score_group_min"] = out["worst_group_accuracy"]
  out["accuracy_score_group_max"] = _finite_max(acc_g)
  out["accuracy_score_ratio"] = out["accuracy_ratio"]
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


def _flip_dict(flips: np.ndarray, count: np.ndarray) -> dict:
  groups = np.full(count.shape, np.nan)
  np.divide(flips, count, out=groups, where=count > 0)
  total = int(count.sum())
  return {"overall": float(flips.sum() / total) if total else float("nan"), "groups": groups.tolist()}


def flip_rates(pred_fp, pred_q, group, num_groups: int) -> dict:
  """Prediction flips (Hooker et al. 2020): the fraction of rows whose predicted class changes.

  pred_fp, pred_q: [N] int predicted classes of the reference (full-precision) and compressed models;
  group: [N] int in [0, num_groups). flip_g = #{i in g: pred_fp_i != pred_q_i} / n_g.
  Returns {"overall": float, "groups": [G] floats}; NaN for an empty group (or N = 0), no warning.
  """
  pred_fp, pred_q, group = (np.asarray(a) for a in (pred_fp, pred_q, group))
  if pred_fp.ndim != 1 or pred_q.shape != pred_fp.shape or group.shape != pred_fp.shape:
    raise ValueError(f"pred_fp, pred_q and group must all be [N], got shapes {pred_fp.shape}, {pred_q.shape} "
                     f"and {group.shape}.")
  group = group.astype(np.int64)
  if group.size and (group.min() < 0 or group.max() >= num_groups):
    raise ValueError(f"group ids must be in [0, {num_groups}), got range [{group.min()}, {group.max()}].")
  flips = np.bincount(group, weights=(pred_fp != pred_q).astype(np.float64), minlength=num_groups)
  return _flip_dict(flips, np.bincount(group, minlength=num_groups).astype(np.float64))


def flip_rates_from_paired_counts(counts) -> dict:
  """Correctness flips per group from the PTQ stage's paired tables (groups.paired_counts).

  counts: [G, 4] ints in the order of fqjax.analysis.stats.CELLS (both_right, fp_only, quantized_only, both_wrong).
  flip_g = (fp_only + quantized_only) / n_g: the rows where exactly one model is right. These tables keep
  only right / wrong, so a wrong prediction changing to another wrong class is not seen: this is a lower
  bound on ``flip_rates`` (equal to it for 2 classes, where a changed prediction always changes correctness).
  Returns {"overall": float, "groups": [G] floats}; NaN for an empty group, no warning.
  """
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 2 or counts.shape[1] != 4:
    raise ValueError(f"counts must be [G, 4] (fqjax.analysis.stats.CELLS), got shape {counts.shape}.")
  return _flip_dict(counts[:, 1] + counts[:, 2], counts.sum(axis=1))


def bootstrap_fairness_violation(correct: np.ndarray, group: np.ndarray, num_groups: int, *,
                                 num_resamples: int = 1000, seed: int = 0,
                                 confidence: float = 0.95) -> dict:
  """Percentile bootstrap interval of the fairness violation, stratified by group.

  correct: [N] bool / 0-1; group: [N] int in [0, num_groups). For r = 1..R (R = ``num_resamples``)
  every non-empty group g is resampled with replacement to its own size n_g (so its accuracy stays
  defined): acc_g^r = mean of n_g draws from correct[group == g], FV^r = max_g acc_g^r - min_g acc_g^r.
  The interval is the (alpha, 1 - alpha) quantiles of FV^1..FV^R (linear interpolation, numpy's
  default), alpha = (1 - confidence) / 2. Draws come from ``np.random.default_rng(seed)``, one
  [R, n_g] integer array per group in group order.

  Why not scipy.stats.bootstrap: called with one sample per group (``paired=False``,
  ``method="percentile"``, the same Generator) it gives the same interval (tests check this), but it
  refuses a sample with fewer than 2 observations, and a group with one test row is a real case here.

  Returns {"low", "high", "confidence", "num_resamples"}. ValueError when there is no sample at all.
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
                   "demographic_parity_gap", "equalized_odds_gap", "size_bytes", "ece", "accuracy_ratio",
                   "flip_rate")


def summarize_over_seeds(per_seed: Sequence[Mapping]) -> dict:
  """Mean and std over seeds (``mean_std``) of every scalar metric and every per-group list of ``group_metrics``.

  per_seed: S metric dicts of one variant (one per seed). A key is summarized only when every seed
  has it: SUMMARY_SCALARS (size_bytes, ece, accuracy_ratio, flip_rate too), "fairness_violation_ci" as
  {"low": mean_std, "high": mean_std}, and groups.{accuracy, loss, accuracy_drop, ece, flip_rate} as [G] lists
  of mean_std dicts (a group with no samples in any seed gets n = 0, mean NaN).
  """
  out: dict = {}
  if not per_seed:
    return {"groups": {}}
  for key in SUMMARY_SCALARS:
    if all(key in m for m in per_seed):
      out[key] = mean_std([m[key] for m in per_seed])
  if all(isinstance(m.get("fairness_violation_ci"), Mapping) for m in per_seed):
    out["fairness_violation_ci"] = {side: mean_std([m["fairness_violation_ci"].get(side) for m in per_seed])
                                    for side in ("low", "high")}
  groups: dict = {}
  for key in ("accuracy", "loss", "accuracy_drop", "ece", "flip_rate"):
    if all(key in m["groups"] for m in per_seed):
      stacked = np.asarray([[np.nan if v is None else v for v in m["groups"][key]] for m in per_seed], np.float64)
      groups[key] = [mean_std(stacked[:, g].tolist()) for g in range(stacked.shape[1])]
  out["groups"] = groups
  return out


def bound(grad_norm, d_norm, top_eigenvalue) -> np.ndarray:
  """Theorem 1's bound (fqjax.explain.theory) ||g_a|| ||d|| + 1/2 lambda_max(H_a) ||d||^2, elementwise.

  grad_norm [G], top_eigenvalue [G] (e.g. ``group_top_eigenvalues(...)["eigenvalues"][:, 0]``),
  d_norm a scalar (or [G]); returns [G] float64, NaN where an input is NaN.
  """
  g = np.asarray(grad_norm, np.float64)
  d = np.asarray(d_norm, np.float64)
  return g * d + 0.5 * np.asarray(top_eigenvalue, np.float64) * d * d


def correlations(predicted, observed) -> dict:
  """How well a per-group prediction (bound, second-order estimate) ranks the observed excess loss E_a (fqjax.explain.theory).

  predicted, observed: [G]; pairs with a non-finite value are left out.
  Returns {"spearman": float, "pearson": float}, each NaN for < 2 pairs or a constant side.
  Raises ValueError unless both are 1-D of equal length.
  """
  a, b = np.asarray(predicted, np.float64), np.asarray(observed, np.float64)
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(f"correlations needs two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}.")
  return {"spearman": spearman(a, b), "pearson": pearson(a, b)}
