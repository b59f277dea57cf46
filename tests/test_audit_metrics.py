"""Audit metrics: ECE, accuracy ratio, prediction flips and fairlearn-named aliases, worked out by hand."""
import csv
import math
import warnings

import numpy as np
import pytest

from fqjax.analysis import metrics, stats
from fqjax.outputs import results


def _logits(probs):
  return np.log(np.asarray(probs, np.float64))


def test_ece_perfectly_calibrated_is_zero():
  # Confidence 0.5 (bin (7/15, 8/15]): 2 of 4 rows right -> acc 0.5 = conf 0.5.
  probs = [[.5, .3, .2]] * 4
  y = np.array([0, 0, 1, 2])
  m = metrics.group_metrics(_logits(probs), y, np.zeros(4, int), 1)
  assert m["ece"] == pytest.approx(0.0, abs=1e-12) and m["groups"]["ece"][0] == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident_by_hand():
  # group 0: confidence 0.9, 1 of 2 right -> |0.5 - 0.9| = 0.4.
  # group 1: one row at 0.9 right (gap 0.1, bin 14) and one at 0.6 wrong (gap 0.6, bin 9):
  #   ECE_1 = 1/2 * 0.1 + 1/2 * 0.6 = 0.35.
  # overall: bin 14 holds 3 rows (2 right, conf 0.9): 3/4 * |2/3 - 0.9| = 0.175; bin 9: 1/4 * 0.6 = 0.15.
  probs = [[.9, .1], [.9, .1], [.9, .1], [.6, .4]]
  y = np.array([0, 1, 0, 1])
  group = np.array([0, 0, 1, 1])
  m = metrics.group_metrics(_logits(probs), y, group, 2)
  np.testing.assert_allclose(m["groups"]["ece"], [0.4, 0.35], rtol=1e-12)
  assert m["ece"] == pytest.approx(0.175 + 0.15, rel=1e-12)


def test_calibration_error_bin_edges():
  # A confidence of exactly 1/15 closes the first bin (intervals are (lo, hi]); 0 also goes to the first.
  conf = np.array([0.0, 1 / 15, 1.0])
  got = metrics.calibration_error(conf, [0, 0, 1], [0, 1, 2], 3, num_bins=15)
  np.testing.assert_allclose(got, [0.0, 1 / 15, 0.0], atol=1e-15)


def test_empty_group_is_nan_without_warnings():
  probs = [[.9, .1], [.2, .8], [.7, .3]]
  y, group = np.array([0, 1, 1]), np.array([0, 0, 2])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    m = metrics.group_metrics(_logits(probs), y, group, 3, group_is_label=False)
    empty = metrics.group_metrics(np.zeros((0, 2)), np.zeros(0, int), np.zeros(0, int), 2)
    flips = metrics.flip_rates([0, 1, 1], [0, 0, 1], group, 3)
    paired = metrics.flip_rates_from_paired_counts(np.zeros((2, 4), int))
  assert math.isnan(m["groups"]["ece"][1]) and math.isfinite(m["groups"]["ece"][0])
  assert math.isnan(flips["groups"][1])
  for key in ("ece", "accuracy_ratio", "accuracy_score_group_max", "accuracy_score_ratio"):
    assert math.isnan(empty[key])
  assert all(math.isnan(v) for v in empty["groups"]["ece"])
  assert math.isnan(paired["overall"]) and all(math.isnan(v) for v in paired["groups"])


def test_accuracy_ratio_by_hand():
  # group accuracies: 0 -> 3/4, 1 -> 1/2, 2 empty (left out): ratio = (1/2) / (3/4) = 2/3.
  probs = [[.8, .2]] * 6
  y = np.array([0, 0, 0, 1, 0, 1])
  group = np.array([0, 0, 0, 0, 1, 1])
  m = metrics.group_metrics(_logits(probs), y, group, 3)
  assert m["accuracy_ratio"] == pytest.approx(2 / 3)
  # Every group at accuracy 0: max is 0, the ratio is undefined.
  m0 = metrics.group_metrics(_logits(probs), np.ones(6, int), group, 3)
  assert math.isnan(m0["accuracy_ratio"])


def test_fairlearn_aliases_equal_fqjax_values():
  rng = np.random.default_rng(0)
  logits, y, group = rng.normal(size=(50, 4)), rng.integers(0, 4, 50), rng.integers(0, 3, 50)
  m = metrics.group_metrics(logits, y, group, 3)
  assert m["accuracy_score_difference"] == m["fairness_violation"]
  assert m["accuracy_score_group_min"] == m["worst_group_accuracy"]
  assert m["accuracy_score_group_max"] == max(m["groups"]["accuracy"])
  assert m["accuracy_score_ratio"] == m["accuracy_ratio"] == pytest.approx(
      min(m["groups"]["accuracy"]) / max(m["groups"]["accuracy"]))


def test_flip_rates_by_hand():
  #        row: 0  1  2  3  4
  pred_fp = [0, 1, 2, 2, 1]
  pred_q = [0, 2, 1, 2, 0]
  group = [0, 0, 0, 1, 1]
  f = metrics.flip_rates(pred_fp, pred_q, group, 3)
  assert f["overall"] == pytest.approx(3 / 5)
  np.testing.assert_allclose(f["groups"][:2], [2 / 3, 1 / 2])
  assert math.isnan(f["groups"][2])
  with pytest.raises(ValueError, match="must all be"):
    metrics.flip_rates([0, 1], [0], [0, 0], 1)
  with pytest.raises(ValueError, match="group ids"):
    metrics.flip_rates([0], [1], [3], 2)


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_flip_rates_from_paired_counts_lower_bound(num_classes):
  rng = np.random.default_rng(num_classes)
  n, g = 400, 3
  y, group = rng.integers(0, num_classes, n), rng.integers(0, g, n)
  pred_fp, pred_q = rng.integers(0, num_classes, n), rng.integers(0, num_classes, n)
  exact = metrics.flip_rates(pred_fp, pred_q, group, g)
  counts = stats.paired_counts(pred_fp == y, pred_q == y, group, g)
  bound = metrics.flip_rates_from_paired_counts(counts)
  assert np.all(np.asarray(bound["groups"]) <= np.asarray(exact["groups"]) + 1e-12)
  assert bound["overall"] <= exact["overall"] + 1e-12
  if num_classes == 2:  # a changed binary prediction always changes correctness
    np.testing.assert_allclose(bound["groups"], exact["groups"], rtol=1e-12)
    assert bound["overall"] == pytest.approx(exact["overall"])
  else:  # wrong -> another wrong class is invisible to the paired tables
    assert bound["overall"] < exact["overall"]
  with pytest.raises(ValueError, match=r"\[G, 4\]"):
    metrics.flip_rates_from_paired_counts(counts[:, :3])


def _results_with(m):
  return {"dataset": {"group_names": ["a", "b"]}, "train": {"per_seed": {"0": {"val": m, "test": m}}}}


def test_csv_has_the_audit_columns(tmp_path):
  probs = [[.9, .1], [.9, .1], [.9, .1], [.6, .4]]
  m = metrics.group_metrics(_logits(probs), np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1]), 2)
  path = str(tmp_path / "results.csv")
  results.write_csv(path, results.csv_rows(_results_with(m)))
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  new = ("ece", "accuracy_score_difference", "accuracy_score_group_min", "accuracy_score_group_max",
         "accuracy_score_ratio")
  assert set(new) <= set(rows[0])
  overall = next(r for r in rows if r["split"] == "test" and r["group"] == "all")
  for key in new:
    assert float(overall[key]) == pytest.approx(m[key])
  row_b = next(r for r in rows if r["split"] == "test" and r["group"] == "1")
  assert float(row_b["ece"]) == pytest.approx(0.35) and row_b["accuracy_score_ratio"] == ""
  # Metrics from before these keys existed: the new columns stay empty.
  old = {k: v for k, v in m.items() if k != "ece" and not k.startswith("accuracy_score_")}
  old["groups"] = {k: v for k, v in m["groups"].items() if k != "ece"}
  rows = results.csv_rows(_results_with(old))
  assert all(r.get(k) is None for r in rows for k in new)


def test_binary_gaps_and_metric_frame_match_fairlearn():
  fairlearn_metrics = pytest.importorskip("fairlearn.metrics")
  from sklearn.metrics import accuracy_score
  rng = np.random.default_rng(1)
  n = 300
  logits, y, group = rng.normal(size=(n, 2)), rng.integers(0, 2, n), rng.integers(0, 3, n)
  pred = logits.argmax(1)
  m = metrics.group_metrics(logits, y, group, 3, group_is_label=False)
  dp = fairlearn_metrics.demographic_parity_difference(y, pred, sensitive_features=group)
  eo = fairlearn_metrics.equalized_odds_difference(y, pred, sensitive_features=group)
  assert m["demographic_parity_gap"] == pytest.approx(dp, abs=1e-12)
  assert m["equalized_odds_gap"] == pytest.approx(eo, abs=1e-12)
  frame = fairlearn_metrics.MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=group)
  assert m["accuracy_score_difference"] == pytest.approx(frame.difference(), abs=1e-12)
  assert m["accuracy_score_group_min"] == pytest.approx(frame.group_min(), abs=1e-12)
  assert m["accuracy_score_group_max"] == pytest.approx(frame.group_max(), abs=1e-12)
  assert m["accuracy_score_ratio"] == pytest.approx(frame.ratio(), abs=1e-12)
  np.testing.assert_allclose(m["groups"]["accuracy"], frame.by_group.to_numpy(), atol=1e-12)
