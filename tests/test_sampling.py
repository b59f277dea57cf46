"""Tests for fqjax.training.sampling: counts, replacement rules, determinism and errors."""
import numpy as np
import pytest

from fqjax.training import sampling

# Group sizes 10, 4, 1, 6: a majority, two minorities and a singleton.
SIZES = np.array([10, 4, 1, 6])
GROUP = np.random.default_rng(0).permutation(np.repeat(np.arange(4), SIZES))


def _check(result, group, expected_counts):
  idx = result.indices
  assert idx.dtype == np.int64 and idx.ndim == 1
  assert ((idx >= 0) & (idx < len(group))).all()
  np.testing.assert_array_equal(result.counts, expected_counts)
  # counts must describe what the indices actually hold.
  np.testing.assert_array_equal(np.bincount(group[idx], minlength=len(expected_counts)), expected_counts)


def test_group_counts():
  np.testing.assert_array_equal(sampling.group_counts(GROUP, 5), [10, 4, 1, 6, 0])


def test_undersample_default_is_smallest_group_without_repeats():
  r = sampling.undersample(GROUP, 4, seed=0)
  _check(r, GROUP, [1, 1, 1, 1])
  assert len(np.unique(r.indices)) == len(r.indices)


def test_undersample_target_keeps_smaller_groups_whole():
  r = sampling.undersample(GROUP, 4, seed=0, target=5)
  _check(r, GROUP, [5, 4, 1, 5])
  assert len(np.unique(r.indices)) == len(r.indices)
  for g in (1, 2):  # groups at or below the target are kept entirely
    assert set(np.flatnonzero(GROUP == g)) <= set(r.indices)


def test_oversample_keeps_every_row_and_tops_up():
  r = sampling.oversample(GROUP, 4, seed=0)
  _check(r, GROUP, [10, 10, 10, 10])
  assert set(r.indices) == set(range(len(GROUP)))
  # The majority group (already at the target) is not repeated.
  maj = r.indices[GROUP[r.indices] == 0]
  assert len(np.unique(maj)) == 10
  # The singleton is repeated 10 times.
  np.testing.assert_array_equal(r.indices[GROUP[r.indices] == 2], np.flatnonzero(GROUP == 2).repeat(10))


def test_oversample_target():
  r = sampling.oversample(GROUP, 4, seed=1, target=5)
  _check(r, GROUP, [10, 5, 5, 6])


def test_balanced_replacement_only_for_small_groups():
  r = sampling.balanced(GROUP, 4, seed=0, n_per_group=5)
  _check(r, GROUP, [5, 5, 5, 5])
  for g in (0, 3):  # large enough: drawn without replacement
    rows = r.indices[GROUP[r.indices] == g]
    assert len(np.unique(rows)) == 5
  # Too small: every row of the group appears, then repeats fill the rest.
  assert set(r.indices[GROUP[r.indices] == 1]) == set(np.flatnonzero(GROUP == 1))


def test_balanced_default_is_mean_group_size():
  r = sampling.balanced(GROUP, 4, seed=0)
  _check(r, GROUP, [5, 5, 5, 5])  # floor(21 / 4)


@pytest.mark.parametrize("target,expected", [("median", 5), ("mean", 5), (3, 3)])
def test_fairqat_targets(target, expected):
  # median of (10, 4, 1, 6) = 5, mean = 5.25 -> 5.
  r = sampling.fairqat(GROUP, 4, seed=0, target=target)
  _check(r, GROUP, [expected] * 4)


def test_fairqat_mean_differs_from_median():
  group = np.repeat(np.arange(3), [1, 2, 30])
  assert sampling.fairqat(group, 3, seed=0, target="median").counts.tolist() == [2, 2, 2]
  assert sampling.fairqat(group, 3, seed=0, target="mean").counts.tolist() == [11, 11, 11]


@pytest.mark.parametrize("method", ["undersample", "oversample", "balanced", "fairqat"])
def test_deterministic_and_seed_dependent(method):
  a = sampling.sample_indices(GROUP, 4, method, seed=3)
  b = sampling.sample_indices(GROUP, 4, method, seed=3)
  c = sampling.sample_indices(GROUP, 4, method, seed=4)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not np.array_equal(a.indices, c.indices)


def test_result_is_shuffled_across_groups():
  r = sampling.oversample(GROUP, 4, seed=0)
  # Sorted-by-group output would have exactly 3 group changes.
  assert np.count_nonzero(np.diff(GROUP[r.indices])) > 3


def test_dispatcher_none_and_options():
  r = sampling.sample_indices(GROUP, 4, "none", seed=0)
  np.testing.assert_array_equal(r.indices, np.arange(len(GROUP)))
  np.testing.assert_array_equal(r.counts, SIZES)
  r = sampling.sample_indices(GROUP, 4, "balanced", seed=0, n_per_group=2)
  _check(r, GROUP, [2, 2, 2, 2])


def test_every_method_has_a_sampler():
  assert tuple(sampling._SAMPLERS) == sampling.METHODS
  assert tuple(sampling._STATISTICS) == sampling.TARGET_STATISTICS


@pytest.mark.parametrize("method,target,expected", [
    ("none", None, {}), ("undersample", 3, {"target": 3}), ("oversample", None, {}),
    ("balanced", 4, {"n_per_group": 4}), ("fairqat", "mean", {"target": "mean"})])
def test_target_option_names_the_method_option(method, target, expected):
  options = sampling.target_option(method, target)
  assert options == expected
  sampling.sample_indices(GROUP, 4, method, seed=0, **options)  # accepted by the dispatcher


@pytest.mark.parametrize("call,match", [
    (lambda: sampling.target_option("none", 3), "takes no target"),
    (lambda: sampling.target_option("smote", 3), "Unknown sampling method 'smote'"),
    (lambda: sampling.sample_indices(GROUP, 4, "none", seed=0, target=3), "unknown \\['target'\\]"),
    (lambda: sampling.sample_indices(GROUP, 4, "smote", seed=0), "Unknown sampling method 'smote'"),
    (lambda: sampling.sample_indices(GROUP, 4, "balanced", seed=0, target=3), "unknown \\['target'\\]"),
    (lambda: sampling.undersample(np.array([0, -1, 1]), 2, seed=0), "must be >= 0"),
    (lambda: sampling.undersample(np.array([0, 2]), 2, seed=0), "must be < num_groups=2"),
    (lambda: sampling.undersample(np.array([0, 0, 2]), 3, seed=0), r"group\(s\) \[1\] have no training"),
    (lambda: sampling.oversample(np.array([0, 0, 2]), 3, seed=0, target=4), r"group\(s\) \[1\]"),
    (lambda: sampling.balanced(np.array([0.0, 1.0]), 2, seed=0), "integer group ids"),
    (lambda: sampling.fairqat(GROUP, 4, seed=0, target="mode"), "'median', 'mean'"),
    (lambda: sampling.undersample(GROUP, 4, seed=0, target=0), "target must be an int >= 1"),
    (lambda: sampling.undersample(GROUP, 4, seed=None), "seed must be an int"),
    (lambda: sampling.undersample(np.zeros((2, 2), int), 4, seed=0), "1-D"),
    (lambda: sampling.undersample(np.zeros((0,), int), 4, seed=0), "N = 0"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_undersample_explicit_target_tolerates_empty_group():
  # Nothing has to be drawn from the empty group, so an explicit target is fine.
  group = np.array([0, 0, 0, 2])
  r = sampling.undersample(group, 3, seed=0, target=2)
  _check(r, group, [2, 0, 1])
