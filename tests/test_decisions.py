"""docs/RULES.md's decision rule on replicates with a known answer, Holm against hand-computed values, and the
groups bootstrap on a null and a planted effect."""
import numpy as np
import pytest

from fqjax.analysis import decisions


def _reps(center, spread, n=2000, seed=0):
  return np.random.default_rng(seed).normal(center, spread, n)


@pytest.mark.parametrize("center,spread,direction,status,why", [
    (0.0, 0.01, 1, "does not hold", "equivalent"),
    (0.3, 0.01, 1, "holds", "claimed direction"),
    (-0.3, 0.01, 1, "does not hold", "opposite direction"),
    (-0.3, 0.01, -1, "holds", "claimed direction"),
    (0.1, 0.2, 1, "inconclusive", "inside the margin and beyond"),
])
def test_one_judgement_decides_by_interval_and_margin(center, spread, direction, status, why):
  fam = decisions.judge_family({"j": {"replicates": _reps(center, spread), "direction": direction, "margin": 0.1,
                                      "point": center}})
  j = fam["judgements"]["j"]
  assert j["status"] == status and why in j["why"]
  assert fam["family_size"] == 1 and j["p_holm"] == pytest.approx(j["p_raw"])  # Holm on one is the raw decision
  assert j["interval"][0] < center < j["interval"][1]
  assert j["detectable"] == pytest.approx((j["interval"][1] - j["interval"][0]) / 2 + 0.1)


def test_holm_matches_hand_computed_values():
  # p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005, 0.01, 0.03, 0.04 -> 0.02, 0.03, 0.06, 0.06 (monotone).
  got = decisions.holm([0.01, 0.04, 0.03, 0.005])
  np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(decisions.holm([0.5, np.nan, 0.9]), [1.0, np.nan, 1.0])  # m = 2, capped at 1
  assert np.isnan(decisions.holm([np.nan])).all()


def test_a_family_can_lose_what_one_judgement_alone_would_win():
  """A judgement just past the raw threshold becomes inconclusive in a family of 20 nulls."""
  edge = _reps(0.1 + 1.8 * 0.05, 0.05, seed=1)  # about p_hold 0.035 alone
  alone = decisions.judge_family({"edge": {"replicates": edge, "direction": 1, "margin": 0.1}})
  assert alone["verdict"] == "holds"
  family = {"edge": {"replicates": edge, "direction": 1, "margin": 0.1},
            **{f"null{i}": {"replicates": _reps(0.0, 0.3, seed=10 + i), "direction": 1, "margin": 0.1}
               for i in range(20)}}
  out = decisions.judge_family(family)
  assert out["judgements"]["edge"]["status"] == "inconclusive" and out["family_size"] == 21
  assert out["verdict"] == "inconclusive" and out["counts"]["inconclusive"] == 21


def test_family_verdicts():
  assert decisions.family_verdict([]) == "not tested"
  assert decisions.family_verdict(["holds", "inconclusive"]) == "holds"
  assert decisions.family_verdict(["holds", "does not hold"]) == "depends"
  assert decisions.family_verdict(["does not hold", "inconclusive"]) == "does not hold"
  assert decisions.family_verdict(["inconclusive"]) == "inconclusive"


def test_not_tested_judgements_are_carried_and_not_counted():
  out = decisions.judge_family({"a": {"replicates": _reps(0.5, 0.01), "direction": 1, "margin": 0.1},
                                "b": {"verdict": "not tested", "why": "no groups"}})
  assert out["family_size"] == 1 and out["judgements"]["b"] == {"verdict": "not tested", "why": "no groups"}


def test_groups_bootstrap_on_a_null_and_a_planted_effect():
  """10 seeds x 12 groups (4 minority). Null: the values do not depend on the side -> not "holds". Planted:
  the minority is larger by 1.0 (noise sd 0.3) -> "holds" with margin 0.1."""
  rng = np.random.default_rng(0)
  minority = np.arange(12) < 4
  null = rng.normal(0, 0.3, (10, 12))
  planted = null + 1.0 * minority
  for values, expected in ((null, {"inconclusive", "does not hold"}), (planted, {"holds"})):
    reps = decisions.group_bootstrap(values, minority, decisions.side_difference, num_resamples=500, seed=0)
    fam = decisions.judge_family({"d": {"replicates": reps, "direction": 1, "margin": 0.1}})
    assert fam["verdict"] in expected
  assert decisions.side_difference(planted, minority) == pytest.approx(
      planted[:, minority].mean() - planted[:, ~minority].mean())


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match="direction"):
    decisions.p_values([0.0], 0, 0.1)
  with pytest.raises(ValueError, match="margin"):
    decisions.p_values([0.0], 1, 0.0)
  with pytest.raises(ValueError, match="no finite bootstrap replicate"):
    decisions.p_values([np.nan], 1, 0.1)
  with pytest.raises(ValueError, match="values must be"):
    decisions.group_bootstrap(np.zeros((2, 3)), [True, False], decisions.side_difference)
