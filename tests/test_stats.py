"""Tests for fqjax.analysis.stats: paired tables, the hierarchical paired bootstrap, intervals, collapse rule,
equivalence margin and the Spearman permutation test. Pure NumPy, fast."""
import itertools
import json
import math
import time
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from fqjax.analysis import stats


def _table(n, acc_fp, acc_q, both_right):
  """[4] paired table with given n, #fp right, #q right and #both right (all counts)."""
  cells = [both_right, acc_fp - both_right, acc_q - both_right, n - acc_fp - acc_q + both_right]
  assert min(cells) >= 0
  return np.array(cells, np.int64)


def _counts(tables):
  """[S][G] lists of tables -> [S, G, 4] int64."""
  return np.array(tables, np.int64)


# --------------------------------------------------------------------------- paired_counts


def test_cells_constant():
  assert stats.CELLS == ("both_right", "fp_only", "quantized_only", "both_wrong")


def test_paired_counts_by_hand():
  fp = np.array([1, 1, 0, 0, 1, 1, 0, 1], bool)
  q = np.array([1, 0, 1, 0, 1, 1, 0, 0], int)
  group = np.array([0, 0, 0, 0, 2, 2, 2, 2])
  got = stats.paired_counts(fp, q, group, 3)
  want = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [2, 1, 0, 1]])
  assert got.dtype == np.int64 and got.shape == (3, 4)
  np.testing.assert_array_equal(got, want)


def test_paired_counts_empty_input():
  got = stats.paired_counts(np.zeros(0, bool), np.zeros(0, bool), np.zeros(0, int), 2)
  np.testing.assert_array_equal(got, np.zeros((2, 4)))


@pytest.mark.parametrize("fp, q, group, num_groups, match", [
    ([1, 0], [1], [0, 0], 1, r"\(2,\), \(1,\) and \(2,\)"),
    ([1, 0], [1, 0], [0, 3], 2, r"\[0, 2\).*max 3"),
    ([1, 0], [1, 0], [-1, 0], 2, r"min -1"),
    ([1, 2], [1, 0], [0, 0], 1, "correct_fp"),
    ([1, 0], [1, 0], [0.5, 0.0], 1, "integer"),
    ([1, 0], [1, 0], [0, 0], 0, "num_groups"),
])
def test_paired_counts_bad_input(fp, q, group, num_groups, match):
  with pytest.raises(ValueError, match=match):
    stats.paired_counts(np.array(fp), np.array(q), np.array(group), num_groups)


# --------------------------------------------------------------------------- bootstrap


def _naive_bootstrap(counts, num_resamples, seed):
  """Reference: resample seeds, then actual example indices within each group (rng.choice)."""
  rng = np.random.default_rng(seed)
  num_seeds, num_groups, _ = counts.shape
  examples = {}  # (s, g) -> ([n] fp right, [n] q right)
  for s, g in itertools.product(range(num_seeds), range(num_groups)):
    cells = np.repeat(np.arange(4), counts[s, g])
    examples[s, g] = (cells < 2, (cells == 0) | (cells == 2))
  drop = np.zeros((num_resamples, num_groups))
  acc_q = np.zeros((num_resamples, num_groups))
  for r in range(num_resamples):
    for s in rng.integers(0, num_seeds, num_seeds):
      for g in range(num_groups):
        fp, q = examples[s, g]
        idx = rng.choice(fp.size, fp.size)
        drop[r, g] += (fp[idx].mean() - q[idx].mean()) / num_seeds
        acc_q[r, g] += q[idx].mean() / num_seeds
  return drop, acc_q


def test_bootstrap_matches_naive_reference_in_distribution():
  # Group 0: seeds disagree (drops 0, .1, .2), so seed resampling matters. Group 1: identical seeds,
  # so all its spread comes from resampling examples.
  g1 = _table(60, 48, 42, 40)
  counts = _counts([[_table(80, 64, 64, 60), g1],
                    [_table(80, 64, 56, 54), g1],
                    [_table(80, 64, 48, 46), g1]])
  num = 4000
  ref_drop, ref_q = _naive_bootstrap(counts, num, seed=1)
  got = stats.bootstrap(counts, num_resamples=num, seed=0)
  for ref, fast in ((ref_drop, got["drop"]), (ref_q, got["accuracy_q"])):
    sd_ref, sd_fast = ref.std(0), fast.std(0)
    # A std over 4000 replicates is within ~1% of its limit, the difference of two within ~1.5%:
    # 6% is ~4 sigma. Unpaired draws (+50%), no seed resampling (-60%) fail it.
    np.testing.assert_allclose(sd_fast, sd_ref, rtol=0.06)
    assert np.all(np.abs(fast.mean(0) - ref.mean(0)) < 0.1 * sd_ref)
  # Sanity that the check has teeth: seeds resampling dominates group 0's spread.
  assert got["drop"][:, 0].std() > 1.5 * got["drop"][:, 1].std()


def test_bootstrap_shapes_dtypes_and_identity():
  counts = _counts([[_table(50, 40, 30, 28), _table(20, 10, 12, 9)]] * 2)
  got = stats.bootstrap(counts, num_resamples=7, seed=0)
  assert set(got) == {"accuracy_fp", "accuracy_q", "drop"}
  for v in got.values():
    assert v.shape == (7, 2) and v.dtype == np.float64
  np.testing.assert_allclose(got["drop"], got["accuracy_fp"] - got["accuracy_q"])


def test_bootstrap_is_vectorized():
  rng = np.random.default_rng(0)
  n = rng.integers(20, 300, size=50)
  counts = np.stack([np.stack([rng.multinomial(k, [0.8, 0.05, 0.02, 0.13]) for k in n])
                     for _ in range(5)])
  stats.bootstrap(counts, num_resamples=10)
  start = time.perf_counter()
  stats.bootstrap(counts, num_resamples=1000)
  # Well under 0.1 s when idle; the bound leaves room for a loaded test machine but not for a Python loop.
  assert time.perf_counter() - start < 1.0


def test_bootstrap_deterministic_given_seed():
  counts = _counts([[_table(50, 40, 30, 28)], [_table(50, 35, 33, 30)]])
  a = stats.bootstrap(counts, num_resamples=50, seed=3)
  b = stats.bootstrap(counts, num_resamples=50, seed=3)
  c = stats.bootstrap(counts, num_resamples=50, seed=4)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["drop"], c["drop"])
  assert stats.intervals(counts, seed=3) == stats.intervals(counts, seed=3)


@pytest.mark.parametrize("counts, match", [
    (np.zeros((2, 4)), "shape"),
    (np.zeros((1, 2, 3)), "shape"),
    (-np.ones((1, 1, 4)), "non-negative"),
    (np.full((1, 1, 4), 0.5), "integers"),
])
def test_bootstrap_bad_counts(counts, match):
  with pytest.raises(ValueError, match=match):
    stats.bootstrap(counts)


# --------------------------------------------------------------------------- intervals


def test_intervals_contain_point_and_shrink_with_more_examples():
  base = _counts([[_table(40, 32, 28, 26), _table(20, 14, 10, 9)],
                  [_table(40, 30, 27, 25), _table(20, 15, 12, 11)]])
  small = stats.intervals(base)
  large = stats.intervals(base * 25)
  for key in ("group_accuracy", "group_accuracy_drop"):
    for res in (small, large):
      lo, mid, hi = (np.array(res[key][k]) for k in ("low", "mean", "high"))
      assert np.all(lo <= mid) and np.all(mid <= hi)
    width = lambda r: np.array(r[key]["high"]) - np.array(r[key]["low"])  # noqa: E731
    assert np.all(width(large) < 0.6 * width(small))
  # Point estimates: mean over seeds of the original tables.
  np.testing.assert_allclose(small["group_accuracy"]["mean"], [(28 / 40 + 27 / 40) / 2, 11 / 20])
  np.testing.assert_allclose(small["group_accuracy_drop"]["mean"],
                             [(4 / 40 + 3 / 40) / 2, (4 / 20 + 3 / 20) / 2])
  assert small["level"] == 0.95 and small["num_resamples"] == 1000
  assert "drop_difference" not in small
  json.dumps(small)  # plain lists and floats


def test_intervals_are_bootstrap_percentiles():
  counts = _counts([[_table(60, 50, 44, 42), _table(30, 20, 15, 12)]] * 2)
  boot = stats.bootstrap(counts, num_resamples=500, seed=5)
  for level in (0.95, 0.5):
    res = stats.intervals(counts, num_resamples=500, seed=5, level=level)
    lo, hi = np.quantile(boot["drop"], [(1 - level) / 2, (1 + level) / 2], axis=0)
    np.testing.assert_allclose(res["group_accuracy_drop"]["low"], lo)
    np.testing.assert_allclose(res["group_accuracy_drop"]["high"], hi)
    assert res["level"] == level


def test_worst_group_accuracy():
  counts = _counts([[_table(200, 190, 180, 178), _table(200, 150, 120, 110),
                     _table(200, 180, 160, 158)]] * 3)
  res = stats.intervals(counts)
  worst = res["worst_group_accuracy"]
  assert worst["mean"] == pytest.approx(120 / 200)
  assert worst["mean"] == pytest.approx(min(res["group_accuracy"]["mean"]))
  assert worst["low"] <= worst["mean"] <= worst["high"]
  assert worst["high"] < res["group_accuracy"]["low"][2]  # group 1 is clearly the worst


def test_drop_difference_planted_and_null():
  # Minority groups drop 0.5, majority groups 0.0.
  maj = _table(100, 90, 90, 88)
  mino = _table(100, 90, 40, 38)
  seeds = [[maj, maj, mino], [maj, maj, _table(100, 88, 40, 37)], [maj, maj, mino]]
  minority = np.array([False, False, True])
  planted = stats.intervals(_counts(seeds), minority)["drop_difference"]
  assert planted["mean"] == pytest.approx((0.5 + 0.48 + 0.5) / 3)
  assert 0.0 < planted["low"] <= planted["mean"] <= planted["high"]
  # Null: every group has the same table.
  same = _table(100, 85, 80, 75)
  null = stats.intervals(_counts([[same] * 3] * 3), minority)["drop_difference"]
  assert null["mean"] == pytest.approx(0.0)
  assert null["low"] < 0.0 < null["high"]


def test_single_seed():
  counts = _counts([[_table(100, 80, 70, 65), _table(50, 40, 20, 18)]])
  res = stats.intervals(counts, np.array([False, True]))
  np.testing.assert_allclose(res["group_accuracy"]["mean"], [0.7, 0.4])
  np.testing.assert_allclose(res["group_accuracy_drop"]["mean"], [0.1, 0.4])
  assert res["drop_difference"]["low"] > 0.0
  assert np.all(np.array(res["group_accuracy"]["high"]) > np.array(res["group_accuracy"]["low"]))


def test_group_without_rows_is_nan_without_warning():
  empty = np.zeros(4, np.int64)
  tab = _table(50, 40, 35, 33)
  counts = _counts([[tab, empty, tab], [tab, empty, tab]])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    boot = stats.bootstrap(counts, num_resamples=20)
    res = stats.intervals(counts, np.array([False, True, False]))
    only_empty_minority = stats.intervals(counts, np.array([False, True, False]))["drop_difference"]
    no_rows = stats.intervals(np.zeros((2, 2, 4), np.int64), np.array([True, False]))
  assert np.all(np.isnan(boot["drop"][:, 1])) and np.all(np.isfinite(boot["drop"][:, [0, 2]]))
  for key in ("group_accuracy", "group_accuracy_drop"):
    for k in ("mean", "low", "high"):
      assert math.isnan(res[key][k][1]) and not math.isnan(res[key][k][0])
  assert res["worst_group_accuracy"]["mean"] == pytest.approx(35 / 50)
  assert all(math.isnan(v) for v in only_empty_minority.values())
  # An empty majority group is left out of the majority mean, not turned into NaN.
  with_empty_majority = stats.intervals(counts, np.array([True, False, False]))["drop_difference"]
  assert with_empty_majority["mean"] == pytest.approx(0.0)
  assert all(math.isfinite(v) for v in with_empty_majority.values())
  assert all(math.isnan(v) for v in no_rows["worst_group_accuracy"].values())
  assert all(math.isnan(v) for v in no_rows["drop_difference"].values())


def test_intervals_bad_input():
  counts = _counts([[_table(10, 5, 5, 5)] * 2])
  with pytest.raises(ValueError, match="minority"):
    stats.intervals(counts, np.array([True, False, True]))
  with pytest.raises(ValueError, match="minority"):
    stats.intervals(counts, np.array([1, 0]))
  with pytest.raises(ValueError, match="level"):
    stats.intervals(counts, level=1.0)
  with pytest.raises(ValueError, match="num_resamples"):
    stats.intervals(counts, num_resamples=0)


# --------------------------------------------------------------------------- collapse and margin


def test_collapse_threshold_and_is_collapsed():
  assert stats.collapse_threshold(0.9, 10) == pytest.approx(0.5)
  assert stats.collapse_threshold(0.9, 2, fraction=0.25) == pytest.approx(0.5 + 0.25 * 0.4)
  assert stats.is_collapsed(0.49, 0.9, 10)
  assert not stats.is_collapsed(0.51, 0.9, 10)
  assert not stats.is_collapsed(0.5, 0.9, 10)  # strict
  assert not stats.is_collapsed(float("nan"), 0.9, 10)
  for bad in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match="fraction"):
      stats.is_collapsed(0.5, 0.9, 10, fraction=bad)
  with pytest.raises(ValueError, match="num_classes"):
    stats.collapse_threshold(0.9, 0)


def test_default_equivalence_margin():
  assert stats.default_equivalence_margin([100, 0, 50, 200]) == pytest.approx(1 / 100)
  assert stats.default_equivalence_margin(np.array([10, 30])) == pytest.approx(1 / 20)
  with pytest.raises(ValueError, match="nonzero"):
    stats.default_equivalence_margin([0, 0])
  with pytest.raises(ValueError, match="nonzero"):
    stats.default_equivalence_margin([])


# --------------------------------------------------------------------------- Spearman test


def test_spearman_exact_perfect_order():
  rho, p = stats.spearman_permutation_test([1, 2, 3, 4], [10, 20, 30, 40])
  assert rho == pytest.approx(1.0)
  assert p == pytest.approx(1 / 24)
  rho, p = stats.spearman_permutation_test([1, 2, 3, 4], [40, 30, 20, 10])
  assert rho == pytest.approx(-1.0) and p == pytest.approx(1.0)


def test_spearman_rho_matches_scipy_with_ties_and_nonfinite():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, 15).astype(float)
  y = x + rng.integers(0, 4, 15)
  x[3], y[7] = np.nan, np.inf
  rho, p = stats.spearman_permutation_test(x, y, num_permutations=2000)
  keep = np.isfinite(x) & np.isfinite(y)
  assert rho == pytest.approx(sps.spearmanr(x[keep], y[keep]).statistic, abs=1e-12)
  assert 0 < p < 0.05  # strongly positively related
  # Monte Carlo rule: a perfect order over 12 points is never matched by chance.
  _, p_mc = stats.spearman_permutation_test(np.arange(12), np.arange(12) ** 2, num_permutations=999)
  assert p_mc == pytest.approx(1 / 1000)


def test_spearman_exact_p_with_ties_matches_brute_force():
  x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 4.0])
  y = np.array([1.0, 1.0, 2.0, 4.0, 3.0, 6.0])
  rho, p = stats.spearman_permutation_test(x, y)
  null = [sps.spearmanr(x, y[list(perm)]).statistic for perm in itertools.permutations(range(6))]
  assert p == pytest.approx(np.mean(np.array(null) >= rho - 1e-9))
  assert 0 < p < 1


def test_spearman_undefined_and_bad_input():
  assert all(math.isnan(v) for v in stats.spearman_permutation_test([1, 2], [3, 4]))
  assert all(math.isnan(v) for v in stats.spearman_permutation_test([1, 2, np.nan], [3, 4, 5]))
  assert all(math.isnan(v) for v in stats.spearman_permutation_test([1, 1, 1, 1], [1, 2, 3, 4]))
  with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
    stats.spearman_permutation_test([1, 2, 3], [1, 2])
