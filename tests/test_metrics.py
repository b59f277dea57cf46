"""Tests for fqjax.analysis.metrics against hand-computed confusion examples (expected numbers worked out below)."""
import math

import numpy as np
import pytest

from fqjax.analysis import metrics

LN2 = math.log(2.0)


def _logits_from_probs(probs, shifts=None):
  """Logits whose softmax is ``probs``; ``shifts`` adds a per-row constant (softmax ignores it)."""
  logits = np.log(np.asarray(probs, np.float64))
  if shifts is not None:
    logits = logits + np.asarray(shifts, np.float64)[:, None]
  return logits


# Six samples, three classes, three groups (group 2 has no samples).
#   sample  probs               y  pred  correct  loss = -ln p[y]   group
#   0       [.5, .25, .25]      0  0     yes      ln 2              0
#   1       [.5, .25, .25]      1  0     no       ln 4              0
#   2       [.25, .5, .25]      1  1     yes      ln 2              0
#   3       [.25, .25, .5]      2  2     yes      ln 2              0   (logits shifted by +7)
#   4       [.25, .25, .5]      0  2     no       ln 4              1   (logits shifted by -3)
#   5       [.5, .25, .25]      0  0     yes      ln 2              1
_PROBS = [[.5, .25, .25], [.5, .25, .25], [.25, .5, .25], [.25, .25, .5], [.25, .25, .5], [.5, .25, .25]]
_SHIFTS = [0.0, 0.0, 0.0, 7.0, -3.0, 0.0]
_Y = np.array([0, 1, 1, 2, 0, 0])
_GROUP = np.array([0, 0, 0, 0, 1, 1])


def test_group_metrics_hand_computed_confusion():
  m = metrics.group_metrics(_logits_from_probs(_PROBS, _SHIFTS), _Y, _GROUP, 3)
  # group 0: 3 of 4 correct; group 1: 1 of 2; group 2: empty.
  assert m["n"] == 6
  assert m["groups"]["count"] == [4, 2, 0]
  np.testing.assert_allclose(m["groups"]["accuracy"][:2], [0.75, 0.5])
  assert math.isnan(m["groups"]["accuracy"][2]) and math.isnan(m["groups"]["loss"][2])
  # losses: group 0 = (3 ln2 + 2 ln2) / 4, group 1 = (2 ln2 + ln2) / 2, overall = 8 ln2 / 6.
  np.testing.assert_allclose(m["groups"]["loss"][:2], [5 * LN2 / 4, 1.5 * LN2], rtol=1e-12)
  np.testing.assert_allclose(m["loss"], 8 * LN2 / 6, rtol=1e-12)
  assert m["accuracy"] == pytest.approx(4 / 6)
  # The empty group is left out of max / min.
  assert m["worst_group_accuracy"] == pytest.approx(0.5)
  assert m["fairness_violation"] == pytest.approx(0.25)
  # A label-defined group gets no DP / EO gaps and no drop without a reference.
  for key in ("demographic_parity_gap", "equalized_odds_gap", "accuracy_drop"):
    assert key not in m
  assert "accuracy_drop" not in m["groups"]


def test_group_metrics_accuracy_drop_against_reference():
  # Reference: a perfect model (every group at accuracy 1; group 2 still empty).
  perfect = np.eye(3)[_Y] * 10.0
  ref = metrics.group_metrics(perfect, _Y, _GROUP, 3)
  assert ref["groups"]["accuracy"][:2] == [1.0, 1.0] and ref["fairness_violation"] == 0.0
  m = metrics.group_metrics(_logits_from_probs(_PROBS), _Y, _GROUP, 3, reference=ref)
  drop = m["groups"]["accuracy_drop"]
  np.testing.assert_allclose(drop[:2], [0.25, 0.5])
  assert math.isnan(drop[2])
  assert m["accuracy_drop"] == pytest.approx(1 - 4 / 6)
  # The drop is reference minus model: a model better than its reference has a negative drop.
  worse_ref = {"accuracy": 0.5, "groups": {"accuracy": [0.5, 0.0, float("nan")]}}
  m2 = metrics.group_metrics(_logits_from_probs(_PROBS), _Y, _GROUP, 3, reference=worse_ref)
  np.testing.assert_allclose(m2["groups"]["accuracy_drop"][:2], [-0.25, -0.5])
  assert m2["accuracy_drop"] == pytest.approx(0.5 - 4 / 6)


def _binary_logits(pred):
  return np.eye(2)[np.asarray(pred)] * 4.0 - 2.0


# Binary task, group a separate attribute.
# Example A:
#   g0: y = [1, 1, 0, 0, 0], pred = [1, 0, 0, 0, 0] -> P(pred=1) = 1/5, TPR = 1/2, FPR = 0
#   g1: y = [1, 0, 0, 0],    pred = [1, 1, 0, 0]    -> P(pred=1) = 1/2, TPR = 1,   FPR = 1/3
#   DP gap = 1/2 - 1/5 = 3/10; EO gap = max(|1 - 1/2|, |1/3 - 0|) = 1/2 (the TPR side).
#   accuracies: g0 4/5, g1 3/4.
# Example B:
#   g0: y = [1, 1, 0, 0], pred = [1, 1, 0, 0] -> P(pred=1) = 1/2, TPR = 1,   FPR = 0
#   g1: y = [1, 1, 0, 0], pred = [1, 0, 1, 1] -> P(pred=1) = 3/4, TPR = 1/2, FPR = 1
#   DP gap = 1/4; EO gap = max(1/2, 1) = 1 (the FPR side).  accuracies: g0 1, g1 1/4.
@pytest.mark.parametrize("y,pred,group,dp,eo,acc", [
    ([1, 1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 1, 0, 0], [0] * 5 + [1] * 4, 3 / 10, 1 / 2, [4 / 5, 3 / 4]),
    ([1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0, 1, 1], [0] * 4 + [1] * 4, 1 / 4, 1.0, [1.0, 1 / 4]),
], ids=["tpr_side", "fpr_side"])
def test_demographic_parity_and_equalized_odds_hand_computed(y, pred, group, dp, eo, acc):
  m = metrics.group_metrics(_binary_logits(pred), np.array(y), np.array(group), 2, group_is_label=False)
  assert m["demographic_parity_gap"] == pytest.approx(dp)
  assert m["equalized_odds_gap"] == pytest.approx(eo)
  np.testing.assert_allclose(m["groups"]["accuracy"], acc)
  assert m["fairness_violation"] == pytest.approx(abs(acc[0] - acc[1]))
  assert m["worst_group_accuracy"] == pytest.approx(min(acc))


def test_parity_gaps_zero_when_groups_behave_alike():
  # Both groups: y = [1, 0], pred = [1, 0] -> identical rates, no gap.
  y, pred, group = np.array([1, 0, 1, 0]), np.array([1, 0, 1, 0]), np.array([0, 0, 1, 1])
  m = metrics.group_metrics(_binary_logits(pred), y, group, 2, group_is_label=False)
  assert m["demographic_parity_gap"] == 0.0 and m["equalized_odds_gap"] == 0.0


def test_group_metrics_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"group ids must be in \[0, 2\)"):
    metrics.group_metrics(np.zeros((3, 2)), np.zeros(3, int), np.array([0, 1, 2]), 2)
  with pytest.raises(ValueError, match=r"logits must be \[N, C\]"):
    metrics.group_metrics(np.zeros(3), np.zeros(3, int), np.zeros(3, int), 1)
  with pytest.raises(ValueError, match=r"y and group must be \[N=3\]"):
    metrics.group_metrics(np.zeros((3, 2)), np.zeros(2, int), np.zeros(3, int), 1)


def test_per_sample_loss_is_shift_invariant_and_stable():
  logits = np.array([[1000.0, 0.0], [0.0, 0.0]])
  np.testing.assert_allclose(metrics.per_sample_loss(logits, np.array([1, 0])), [1000.0, LN2], rtol=1e-12)


# ----------------------------------------------------------------------------
# Bootstrap and seed aggregation
# ----------------------------------------------------------------------------

def test_bootstrap_constant_groups_give_a_point_interval():
  # Group 0 always right, group 1 always wrong: every resample has violation exactly 1.
  correct = np.array([1] * 6 + [0] * 4)
  group = np.array([0] * 6 + [1] * 4)
  ci = metrics.bootstrap_fairness_violation(correct, group, 2, num_resamples=200, seed=3)
  assert ci == {"low": 1.0, "high": 1.0, "confidence": 0.95, "num_resamples": 200}


def test_bootstrap_interval_contains_point_estimate_and_is_seeded():
  # Point estimate: group 0 at 0.9 (9 of 10), group 1 at 0.4 (8 of 20) -> violation 0.5.
  correct = np.array([1] * 9 + [0] + [1] * 8 + [0] * 12)
  group = np.array([0] * 10 + [1] * 20)
  point = 0.9 - 0.4
  ci = metrics.bootstrap_fairness_violation(correct, group, 2, num_resamples=500, seed=0)
  assert ci["low"] < point < ci["high"]
  assert 0.0 <= ci["low"] and ci["high"] <= 1.0
  assert ci == metrics.bootstrap_fairness_violation(correct, group, 2, num_resamples=500, seed=0)
  other = metrics.bootstrap_fairness_violation(correct, group, 2, num_resamples=500, seed=1)
  assert (other["low"], other["high"]) != (ci["low"], ci["high"])
  # A wider confidence level gives an interval at least as wide.
  wide = metrics.bootstrap_fairness_violation(correct, group, 2, num_resamples=500, seed=0, confidence=0.99)
  assert wide["low"] <= ci["low"] and wide["high"] >= ci["high"]
  # An empty group is skipped (not a NaN interval).
  ci3 = metrics.bootstrap_fairness_violation(correct, group, 3, num_resamples=500, seed=0)
  assert ci3["low"] == ci["low"] and ci3["high"] == ci["high"]


def test_bootstrap_with_no_samples_raises():
  with pytest.raises(ValueError, match="no samples"):
    metrics.bootstrap_fairness_violation(np.zeros(0), np.zeros(0, int), 2)


def _seed_metrics(acc, fv, group_acc, drop=None):
  m = {"accuracy": acc, "loss": 1.0, "worst_group_accuracy": min(group_acc), "fairness_violation": fv,
       "groups": {"accuracy": group_acc, "loss": [0.5, 0.5]}}
  if drop is not None:
    m["groups"]["accuracy_drop"] = drop
    m["accuracy_drop"] = drop[0]
  return m


def test_summarize_over_seeds_mean_and_sample_std():
  per_seed = [_seed_metrics(0.7, 1.0, [0.5, 1.0], drop=[0.0, 0.1]),
              _seed_metrics(0.8, 2.0, [0.6, 1.0], drop=[0.1, 0.1]),
              _seed_metrics(0.9, 4.0, [0.7, 1.0])]  # no drop in the third seed
  s = metrics.summarize_over_seeds(per_seed)
  # accuracy 0.7, 0.8, 0.9: mean 0.8, std sqrt((0.01 + 0 + 0.01) / 2) = 0.1.
  assert s["accuracy"]["mean"] == pytest.approx(0.8) and s["accuracy"]["std"] == pytest.approx(0.1)
  assert s["accuracy"]["n"] == 3
  # fairness violation 1, 2, 4: mean 7/3, variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3.
  assert s["fairness_violation"]["mean"] == pytest.approx(7 / 3)
  assert s["fairness_violation"]["std"] == pytest.approx(math.sqrt(7 / 3))
  assert s["loss"] == {"mean": 1.0, "std": 0.0, "n": 3}
  # Per group: group 0 accuracy 0.5, 0.6, 0.7 -> mean 0.6, std 0.1; group 1 constant.
  assert s["groups"]["accuracy"][0]["mean"] == pytest.approx(0.6)
  assert s["groups"]["accuracy"][0]["std"] == pytest.approx(0.1)
  assert s["groups"]["accuracy"][1] == {"mean": 1.0, "std": 0.0, "n": 3}
  # A metric missing from one seed is not summarized (not averaged over fewer seeds).
  assert "accuracy_drop" not in s and "accuracy_drop" not in s["groups"]
  assert "demographic_parity_gap" not in s


def test_mean_std_skips_nan_and_none_and_handles_one_value():
  assert metrics.mean_std([2.0, float("nan"), None, 4.0]) == {"mean": 3.0, "std": pytest.approx(math.sqrt(2)),
                                                                "n": 2}
  assert metrics.mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
  empty = metrics.mean_std([float("nan")])
  assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["std"])


def test_bootstrap_matches_scipy_stats_bootstrap():
  """The docstring's claim: scipy.stats.bootstrap with one sample per group and the same Generator agrees."""
  from scipy import stats
  correct = np.array([1] * 9 + [0] + [1] * 8 + [0] * 12 + [1, 0, 0])
  group = np.array([0] * 10 + [1] * 20 + [2] * 3)
  ours = metrics.bootstrap_fairness_violation(correct, group, 4, num_resamples=300, seed=5, confidence=0.9)
  samples = [correct[group == g].astype(np.float64) for g in range(3)]

  def fv(*groups, axis=-1):
    accs = np.stack([g.mean(axis=axis) for g in groups])
    return accs.max(axis=0) - accs.min(axis=0)

  ref = stats.bootstrap(samples, fv, n_resamples=300, confidence_level=0.9, method="percentile", paired=False,
                        vectorized=True, rng=np.random.default_rng(5)).confidence_interval
  assert (ours["low"], ours["high"]) == pytest.approx((ref.low, ref.high), abs=1e-12)
  # What scipy refuses and this function handles: a group with a single test row.
  one = metrics.bootstrap_fairness_violation(np.array([1, 0, 1, 1]), np.array([0, 1, 1, 1]), 2, num_resamples=50)
  assert 0.0 <= one["low"] <= one["high"] <= 1.0


def test_group_mean_and_finite_mean():
  np.testing.assert_allclose(metrics.group_mean([1.0, 3.0, 5.0, 2.0], [0, 0, 2, 2], 3)[[0, 2]], [2.0, 3.5])
  assert math.isnan(metrics.group_mean([1.0], [0], 2)[1])
  vals = np.array([[1.0, np.nan, np.inf], [3.0, np.nan, 2.0]])
  np.testing.assert_allclose(metrics.finite_mean(vals, axis=0), [2.0, np.nan, 2.0])
  assert float(metrics.finite_mean(vals)) == 2.0  # (1 + 3 + 2) / 3
  assert math.isnan(float(metrics.finite_mean([])))


def test_summarize_over_seeds_size_and_bootstrap_interval():
  runs = [{**_seed_metrics(0.7, 0.1, [0.5, 1.0]), "size_bytes": 512,
           "fairness_violation_ci": {"low": 0.05, "high": 0.2}},
          {**_seed_metrics(0.8, 0.2, [0.6, 1.0]), "size_bytes": 512,
           "fairness_violation_ci": {"low": 0.15, "high": 0.3}}]
  s = metrics.summarize_over_seeds(runs)
  assert s["size_bytes"] == {"mean": 512.0, "std": 0.0, "n": 2}
  assert s["fairness_violation_ci"]["low"]["mean"] == pytest.approx(0.1)
  assert s["fairness_violation_ci"]["high"]["mean"] == pytest.approx(0.25)
  del runs[1]["fairness_violation_ci"]  # not in every seed: not summarized
  assert "fairness_violation_ci" not in metrics.summarize_over_seeds(runs)
