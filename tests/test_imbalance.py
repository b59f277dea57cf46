"""Controlled imbalance of the training split: keep fractions and long tail."""
import numpy as np
import pytest

import fqjax.data as data
from fqjax.data import imbalance as imb
from fqjax.data.splits import Split


def _cfg(kind="none", seed=0, **imbalance):
  cfg = data.default_data_config()
  cfg.seed = seed
  cfg.imbalance.kind = kind
  for key, value in imbalance.items():
    cfg.imbalance[key] = value
  return cfg


@pytest.fixture(scope="module")
def balanced():
  return data.load(_cfg())


def test_keep_fractions_honoured_within_one_and_only_on_train(balanced):
  s = data.load(_cfg("keep_fractions", keep_fractions={3: 0.2, 8: 0.1}))
  before = np.array(balanced.info.counts["train"])
  after = np.array(s.info.counts["train"])
  fractions = np.ones(10)
  fractions[[3, 8]] = [0.2, 0.1]
  assert np.abs(after - fractions * before).max() <= 1.0
  np.testing.assert_array_equal(after[fractions == 1], before[fractions == 1])
  assert s.info.imbalance["counts_before"] == before.tolist()
  assert s.info.imbalance["counts_after"] == after.tolist() == np.bincount(s.train.group).tolist()
  # Train loses examples; val and test are untouched.
  assert set(s.train.index) < set(balanced.train.index)
  for name in ("val", "test"):
    np.testing.assert_array_equal(s[name].index, balanced[name].index)
  # Standardization uses the imbalanced train split.
  assert abs(float(s.train.x.mean())) < 1e-5


def test_keep_fractions_reproducible_and_seeded():
  cfg = dict(keep_fractions={3: 0.3})
  a = data.load(_cfg("keep_fractions", **cfg))
  b = data.load(_cfg("keep_fractions", **cfg))
  np.testing.assert_array_equal(a.train.index, b.train.index)
  # Another seed gives another pick.
  c = data.load(_cfg("keep_fractions", seed=1, **cfg))
  assert not np.array_equal(a.train.index[a.train.group == 3], c.train.index[c.train.group == 3])


def test_keep_fractions_by_name_and_list_agree():
  names = [str(d) for d in range(10)]
  by_name = imb.keep_fraction_vector({"3": 0.5}, names)
  as_list = imb.keep_fraction_vector([1, 1, 1, 0.5, 1, 1, 1, 1, 1, 1], names)
  np.testing.assert_array_equal(by_name, as_list)
  named = imb.keep_fraction_vector({"dark": 0.25}, ["light", "dark"])
  np.testing.assert_array_equal(named, [1.0, 0.25])


@pytest.mark.parametrize("fractions, match", [
    ({"purple": 0.5}, r"key 'purple'.*\['light', 'dark'\]"),
    ({5: 0.5}, "group id 5, but there are 2 groups"),
    ({1: 0.0}, r"'dark' \(id 1\) is 0.0; it must be in \(0, 1\]"),
    ({0: 1.5}, "must be in"),
    ([0.5], "list of 1 fractions, but there are 2 groups"),
])
def test_keep_fraction_errors(fractions, match):
  with pytest.raises(ValueError, match=match):
    imb.keep_fraction_vector(fractions, ["light", "dark"])


def test_group_that_would_be_empty_is_named():
  with pytest.raises(ValueError, match=r"group\(s\) '7' \(id 7, \d+ examples\)"):
    data.load(_cfg("keep_fractions", keep_fractions={7: 0.001}))


def test_long_tail_targets_hand_computed():
  np.testing.assert_array_equal(imb.long_tail_targets([100, 100, 100], 4.0), [100, 50, 25])
  # Unequal starting sizes: the head is capped so every target is reachable.
  np.testing.assert_array_equal(imb.long_tail_targets([50, 100, 100], 4.0), [50, 25, 12])
  np.testing.assert_array_equal(imb.long_tail_targets([100, 100, 100], 4.0, order=[2, 0, 1]),
                                [50, 25, 100])
  np.testing.assert_array_equal(imb.long_tail_targets([7, 9], 1.0), [7, 7])


@pytest.mark.parametrize("counts, rho, order, match", [
    ([10, 10], 0.5, None, "rho=0.5 must be >= 1"),
    ([10, 10, 10], 2.0, [0, 0, 1], "order"),
    ([10, 0, 10], 2.0, None, r"group id\(s\) \[1\] have none"),
])
def test_long_tail_errors(counts, rho, order, match):
  with pytest.raises(ValueError, match=match):
    imb.long_tail_targets(counts, rho, order)


def test_long_tail_on_digits():
  s = data.load(_cfg("long_tail", rho=10.0))
  before = np.array(s.info.imbalance["counts_before"])
  after = np.array(s.info.counts["train"])
  np.testing.assert_array_equal(after, imb.long_tail_targets(before, 10.0))
  assert after[0] == after.max() and after[9] == after.min()
  np.testing.assert_allclose(after[0] / after[9], 10.0, rtol=0.1)
  assert np.all(np.diff(after) <= 0)


def test_subsample_keeps_label_mix_within_group():
  n = 200
  group = np.repeat([0, 1], n // 2)
  y = np.tile([0, 1, 2, 3], n // 4)
  split = Split(x=np.zeros((n, 2), np.float32), y=y.astype(np.int32),
                group=group.astype(np.int32), index=np.arange(n))
  out = imb.subsample_groups(split, np.array([100, 20]), seed=0, group_names=["a", "b"])
  assert np.bincount(out.group).tolist() == [100, 20]
  assert np.bincount(out.y[out.group == 1]).tolist() == [5, 5, 5, 5]


def test_apply_imbalance_none_is_identity(balanced):
  out, meta = imb.apply_imbalance(balanced.train, {"kind": "none"}, balanced.info.group_names, 0)
  assert out is balanced.train and meta == {"kind": "none"}
  with pytest.raises(ValueError, match="imbalance.kind='halve'; allowed: 'none', 'keep_fractions', 'long_tail'"):
    imb.apply_imbalance(balanced.train, {"kind": "halve"}, balanced.info.group_names, 0)
  assert ("none",) + tuple(imb._PROFILES) == data.options.IMBALANCE_KINDS


def test_apply_imbalance_metadata(balanced):
  names = balanced.info.group_names
  before = balanced.train.counts(len(names)).tolist()
  out, meta = imb.apply_imbalance(balanced.train, {"kind": "keep_fractions", "keep_fractions": {1: 0.5}}, names, 0)
  assert list(meta) == ["kind", "keep_fractions", "counts_before", "counts_after"]
  assert meta["counts_before"] == before and meta["counts_after"] == out.counts(len(names)).tolist()
  assert meta["keep_fractions"][1] == 0.5
  out, meta = imb.apply_imbalance(balanced.train, {"kind": "long_tail", "rho": 4.0}, names, 0)
  assert list(meta) == ["kind", "rho", "order", "counts_before", "counts_after"]
  assert meta["rho"] == 4.0 and meta["order"] == list(range(len(names)))
  counts = out.counts(len(names))
  assert counts.max() / counts.min() == pytest.approx(4.0, rel=0.1)


def test_config_validation_of_imbalance():
  with pytest.raises(ValueError, match="imbalance.keep_fractions"):
    data.validate_data_config(_cfg("keep_fractions"))
  with pytest.raises(ValueError, match=r"imbalance.rho=0.5"):
    data.validate_data_config(_cfg("long_tail", rho=0.5))
