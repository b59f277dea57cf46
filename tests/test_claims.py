"""The claims' verdict logic on constructed results (never on an empirical outcome), rule by rule (claims.RULES)."""
import copy
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from fqjax.analysis import claims, metrics, stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIMARY, OTHER = "max/keep", "mse/recalibrate"
SEEDS = ("0", "1")
TRAIN = (100, 100, 100, 10)  # group 3 is the minority
TEST = (200, 200, 200, 50)   # default equivalence margin 1 / 200
MINORITY = np.array([False, False, False, True])
FV, DROP, SECOND = (f"{PRIMARY} | {d}" for d in ("fairness_violation", "accuracy_drop", "second_order_estimate"))


@pytest.fixture(autouse=True)
def _warnings_are_errors():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


def _ms(mean, std=0.0):
  return {"mean": mean, "std": std, "n": 2}


def _base(counts=TRAIN):
  test = TEST if counts == TRAIN else counts
  return {"dataset": {"counts": {"train": list(counts), "test": list(test)}, "num_classes": 10},
          "seeds": [0, 1], "config": {"ptq": {"variants": [PRIMARY, OTHER]}}}


def _ptq(fv_by_bits, std=0.01, accuracy=None, intervals=None):
  """A ptq variant's entries: summary FV (std over seeds ``std``) and accuracy (0.9 unless given) per bit-width."""
  bits = sorted(fv_by_bits, reverse=True)
  summary = {str(b): {"fairness_violation": _ms(fv_by_bits[b], std), "accuracy": _ms((accuracy or {}).get(b, 0.9))}
             for b in bits}
  return {"variant": PRIMARY, "bit_widths": bits, "summary": summary, "per_seed": {s: {} for s in SEEDS},
          **({"intervals": intervals} if intervals is not None else {})}


def _with_variant(section, other):
  """``section`` (the primary variant) holding ``other``'s entries as the variant OTHER."""
  section["variants"] = {OTHER: {k: other[k] for k in ("summary", "per_seed", "intervals") if k in other}}
  return section


def test_spearman_with_ties_and_constant():
  assert claims.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert claims.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Ties get average ranks: a ranks [0, 1.5, 1.5, 3], b ranks [0, 1, 2, 3].
  ra, rb = np.array([0, 1.5, 1.5, 3]), np.array([0, 1, 2, 3])
  assert claims.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
  assert math.isnan(claims.spearman([1, 1, 1], [1, 2, 3]))


def test_minority_is_below_half_the_median():
  np.testing.assert_array_equal(claims.minority_mask(_base((100, 100, 100, 10))), [False, False, False, True])
  assert claims.minority_mask(_base((50, 50, 50, 50))) is None
  # Slightly smaller groups (115 vs 123) are not a minority; 17 is.
  np.testing.assert_array_equal(claims.minority_mask(_base((115, 123, 115, 17, 123))),
                                [False, False, False, True, False])
  assert claims.minority_threshold(_base((100, 100, 100, 10))) == 50.0
  assert claims.minority_threshold(_base((50, 40, 45, 30))) == 21.25  # median 42.5
  assert claims.minority_threshold(_base((7,))) is None
  assert claims.minority_mask(_base((50, 40, 45, 30))) is None  # 30 is below the median, not below half of it


# --- Fairness-violation trend, variants and collapse ---

def test_fairness_violation_grows_verdicts():
  r = _base()
  r["ptq"] = _ptq({32: 0.1, 8: 0.1, 4: 0.2, 2: 0.6})
  c = claims.fairness_violation_grows(r)
  assert c["verdict"] == "holds" and set(c["judgements"]) == {FV}
  j = c["judgements"][FV]
  assert j["spearman_bits_vs_fairness_violation"] < 0
  assert j["increase_lowest_vs_highest_bits"] == pytest.approx(0.5)
  assert j["bits_used"] == [2, 4, 8, 32] and j["collapsed_bits"] == []
  # An increase within the seed noise does not count.
  r["ptq"] = _ptq({32: 0.10, 4: 0.11, 2: 0.12}, std=0.05)
  assert claims.fairness_violation_grows(r)["verdict"] == "does not hold"
  r["ptq"] = _ptq({32: 0.3, 4: 0.2, 2: 0.1})
  assert claims.fairness_violation_grows(r)["verdict"] == "does not hold"
  assert claims.fairness_violation_grows(_base())["verdict"] == "not tested"


def test_variants_that_disagree_give_depends_with_the_judgements_by_verdict():
  r = _base()
  r["ptq"] = _with_variant(_ptq({32: 0.1, 4: 0.2, 2: 0.6}), _ptq({32: 0.3, 4: 0.2, 2: 0.1}))
  c = claims.fairness_violation_grows(r)
  assert c["verdict"] == "depends"
  assert c["by_verdict"] == {"holds": [FV], "does not hold": [f"{OTHER} | fairness_violation"]}
  assert c["judgements"][FV]["variant"] == PRIMARY and c["judgements"][FV]["statistic"]
  # A judgement that is not tested takes no part in the agreement.
  r["ptq"]["variants"][OTHER]["summary"]["2"]["fairness_violation"] = _ms(None, None)
  c = claims.fairness_violation_grows(r)
  assert c["verdict"] == "holds" and "by_verdict" not in c
  assert c["judgements"][f"{OTHER} | fairness_violation"]["verdict"] == "not tested"
  # All of them untested: not tested, with the reason.
  r["ptq"]["summary"]["2"]["fairness_violation"] = _ms(None, None)
  c = claims.fairness_violation_grows(r)
  assert c["verdict"] == "not tested" and "2 bits" in c["why"]


def test_a_trend_that_rests_on_a_collapsed_bit_width_does_not_hold():
  """Chance is 0.1 (10 classes), so with 0.9 at full precision the midpoint is 0.5: 0.15 at 2 bits collapsed."""
  fv = {32: 0.1, 8: 0.11, 4: 0.1, 2: 0.6}
  r = _base()
  r["ptq"] = _ptq(fv)  # the same FV without the collapse: the trend holds
  assert claims.fairness_violation_grows(r)["verdict"] == "holds"
  r["ptq"] = _ptq(fv, accuracy={2: 0.15})
  assert claims.collapsed_bits(r, PRIMARY) == [2]
  j = claims.fairness_violation_grows(r)["judgements"][FV]
  assert j["verdict"] == "does not hold" and j["collapsed_bits"] == [2] and j["bits_used"] == [4, 8, 32]
  assert j["spearman_bits_vs_fairness_violation"] == pytest.approx(0.0)
  # config.claims.collapse_fraction sets the threshold: 0.1 + 0.05 * 0.8 = 0.14 < 0.15.
  r["config"]["claims"] = {"collapse_fraction": 0.05}
  assert claims.collapsed_bits(r, PRIMARY) == []
  assert claims.fairness_violation_grows(r)["verdict"] == "holds"
  # Every quantized bit-width collapsed: one bit-width is left, so there is no trend to test.
  r["config"]["claims"] = {}
  r["ptq"] = _ptq(fv, accuracy={8: 0.2, 4: 0.2, 2: 0.15})
  j = claims.fairness_violation_grows(r)["judgements"][FV]
  assert j["verdict"] == "not tested" and "collapsed" in j["why"]


# --- Minority loses more accuracy: paired bootstrap intervals and the equivalence margin ---

def _paired(lost):
  """[G, 4] paired counts of hand-made outcomes: the fp model is right on 90% of each group's test examples,
  the quantized one on the same ones but lost[g] of them."""
  fp, q, group = [], [], []
  for g, (n, k) in enumerate(zip(TEST, lost)):
    right = int(0.9 * n)
    fp += [True] * right + [False] * (n - right)
    q += [True] * (right - k) + [False] * (n - right + k)
    group += [g] * n
  return stats.paired_counts(fp, q, group, len(TEST))


def _intervals(lost_by_bits):
  """What the runner stores: stats.intervals per bit-width from both seeds' paired counts."""
  return {str(b): stats.intervals(np.stack([_paired(lost)] * 2), MINORITY, num_resamples=300, seed=0)
          for b, lost in lost_by_bits.items()}


HOLDS = (0, 0, 0, 20)        # minority drop 0.4, majority 0: interval well above 0
STRADDLES = (16, 16, 16, 5)  # 0.1 vs 0.08: D = 0.02, interval across 0
FAILS = (40, 40, 40, 0)      # 0 vs 0.2: interval below 0
NONE = (0, 0, 0, 0)          # no drop: within the margin


def _drop_claim(lost_by_bits, config=None, accuracy=None):
  r = _base()
  bits = [32, *lost_by_bits]
  r["ptq"] = _ptq({b: 0.1 for b in bits}, accuracy=accuracy, intervals=_intervals({32: NONE, **lost_by_bits}))
  r["config"]["claims"] = config or {}
  return r, claims.minority_loses_more(r)


def test_accuracy_statuses_per_bit_width_follow_the_interval():
  r, c = _drop_claim({8: NONE, 4: HOLDS, 2: STRADDLES})
  j = c["judgements"][DROP]
  assert c["verdict"] == j["verdict"] == "partly"
  assert {b: e["status"] for b, e in j["per_bits"].items()} == {"8": "not applicable", "4": "holds",
                                                               "2": "inconclusive"}
  iv = r["ptq"]["intervals"]["4"]["drop_difference"]
  assert (j["per_bits"]["4"]["low"], j["per_bits"]["4"]["high"]) == (iv["low"], iv["high"]) and iv["low"] > 0
  assert j["per_bits"]["4"]["minority_mean_drop"] == pytest.approx(0.4)
  assert j["per_bits"]["4"]["majority_mean_drop"] == pytest.approx(0.0)
  low, high = j["per_bits"]["2"]["low"], j["per_bits"]["2"]["high"]
  assert low < 0 < high and j["per_bits"]["2"]["difference"] == pytest.approx(0.02)
  assert c["equivalence_margin"] == j["equivalence_margin"] == pytest.approx(1 / 200)
  assert j["minority_groups"] == [3] and "32" not in j["per_bits"]  # full precision is not quantized
  _, c = _drop_claim({4: FAILS})
  assert c["judgements"][DROP]["per_bits"]["4"]["high"] <= 0
  assert c["verdict"] == "does not hold"


@pytest.mark.parametrize("lost_by_bits, verdict", [
    ({4: HOLDS, 2: HOLDS}, "holds"),
    ({8: NONE, 4: HOLDS}, "holds"),  # a bit-width within the margin is not applicable, not a failure
    ({4: HOLDS, 2: FAILS}, "partly"),
    ({4: STRADDLES, 2: NONE}, "inconclusive"),
    ({4: STRADDLES, 2: FAILS}, "does not hold"),
    ({4: NONE, 2: NONE}, "not applicable"),
])
def test_accuracy_verdict_over_bit_widths(lost_by_bits, verdict):
  assert _drop_claim(lost_by_bits)[1]["verdict"] == verdict


def test_equivalence_margin_from_the_config_and_collapse_flags():
  _, c = _drop_claim({4: HOLDS, 2: FAILS}, config={"equivalence_margin": 0.3})
  j = c["judgements"][DROP]
  assert c["equivalence_margin"] == 0.3 and j["per_bits"]["2"]["status"] == "not applicable"  # 0.2 <= 0.3
  assert j["verdict"] == "holds"
  _, c = _drop_claim({4: HOLDS, 2: HOLDS}, accuracy={2: 0.15})
  j = c["judgements"][DROP]
  assert j["collapsed_bits"] == [2] and j["per_bits"]["2"]["collapsed"] and "collapsed" not in j["per_bits"]["4"]
  assert j["verdict"] == "holds"  # flagged, not left out: only trend verdicts drop collapsed bit-widths


def test_accuracy_variants_that_disagree_and_missing_intervals():
  r, _ = _drop_claim({4: HOLDS})
  r["ptq"] = _with_variant(r["ptq"], _ptq({32: 0.1, 4: 0.1}, intervals=_intervals({4: FAILS})))
  c = claims.minority_loses_more(r)
  assert c["verdict"] == "depends"
  assert c["by_verdict"] == {"holds": [DROP], "does not hold": [f"{OTHER} | accuracy_drop"]}
  del r["ptq"]["variants"][OTHER]["intervals"]
  c = claims.minority_loses_more(r)
  assert c["verdict"] == "holds"
  assert "bootstrap_resamples" in c["judgements"][f"{OTHER} | accuracy_drop"]["why"]
  assert claims.minority_loses_more(_base((50, 50, 50, 50)))["verdict"] == "not tested"  # no minority


# --- The forward chain's links: every definition, change and relative change ---

def _explain(entry_by_bits):
  """An explain section whose per_seed[s][b] is a copy of ``entry_by_bits[b]`` for both seeds."""
  per_seed = {s: {str(b): copy.deepcopy(e) for b, e in entry_by_bits.items()} for s in SEEDS}
  return {"variant": PRIMARY, "bit_widths": sorted(entry_by_bits, reverse=True), "curvature_split": "train",
          "per_seed": per_seed}


LINKS = {  # claim: (values that satisfy it, values that do not)
    "logit_variance_drops_more_for_minority": ([-0.1, -0.1, -0.1, -0.5], [0.3, 0.3, 0.3, 0.05]),  # a rise
    "logits_shift_more_for_minority": ([0.1, 0.1, 0.1, 0.5], [0.5, 0.5, 0.5, 0.1]),
    "minority_moves_toward_decision_boundary": ([-0.1, -0.1, -0.1, -0.5], [-0.5, -0.5, -0.5, -0.1]),  # smaller
}


@pytest.mark.parametrize("claim", sorted(LINKS))
def test_link_claims_judge_every_definition_and_change_kind(claim):
  good, bad = LINKS[claim]
  definitions = claims.LINK_DEFINITIONS[claim][0]
  names = [f"{PRIMARY} | {d} ({k})" for d in definitions for k in ("change", "relative_change")]
  entry = {"logits": {"definitions": {d: {"change": good, "relative_change": good} for d in definitions}}}
  r = _base()
  r["explain"] = _explain({32: entry, 4: entry})
  c = claims.CLAIMS[claim](r)
  assert c["verdict"] == "holds" and sorted(c["judgements"]) == sorted(names)
  j = c["judgements"][names[0]]
  assert j["per_bits"]["4"]["minority_mean"] == pytest.approx(good[3]) and set(j["per_bits"]) == {"4"}
  # One definition's relative change disagrees: the claim depends, naming it.
  r["explain"]["per_seed"]["1"]["4"]["logits"]["definitions"][definitions[-1]]["relative_change"] = bad
  r["explain"]["per_seed"]["0"]["4"]["logits"]["definitions"][definitions[-1]]["relative_change"] = bad
  c = claims.CLAIMS[claim](r)
  assert c["verdict"] == "depends"
  assert c["by_verdict"] == {"holds": names[:-1], "does not hold": names[-1:]}
  # A definition without values is not tested and left out (the claim is untested once none is left).
  for s in SEEDS:
    del r["explain"]["per_seed"][s]["4"]["logits"]["definitions"][definitions[-1]]
  c = claims.CLAIMS[claim](r)
  assert c["verdict"] == ("holds" if len(definitions) > 1 else "not tested")
  assert c["judgements"][names[-1]]["verdict"] == "not tested"
  assert claims.CLAIMS[claim](_base())["verdict"] == "not tested"


# --- Curvature: at bits and change from full precision ---

_curvature = lambda **values: {"curvature": values}  # noqa: E731

def test_curvature_at_bits_and_change_from_fp_judged_separately():
  r = _base()
  r["explain"] = _explain({32: _curvature(grad_norm=[1.0, 1.1, 0.9, 3.0]),
                           4: _curvature(grad_norm=[2.0, 2.1, 1.9, 5.0])})
  c = claims.CLAIMS["minority_gradient_norm_larger"](r)
  at, change = (f"{PRIMARY} | norm_of_mean_gradient ({s})" for s in ("at_bits", "change_from_fp"))
  assert c["verdict"] == "holds"
  assert set(c["judgements"][at]["per_bits"]) == {"32", "4"} and set(c["judgements"][change]["per_bits"]) == {"4"}
  assert c["judgements"][at]["per_bits"]["4"]["spearman_size"] < 0
  assert c["judgements"][change]["per_bits"]["4"]["minority_mean"] == pytest.approx(2.0)
  assert c["judgements"][f"{PRIMARY} | size_matched (at_bits)"]["verdict"] == "not tested"  # no values
  # Larger for the minority at every bit-width, but its change is the smallest: depends.
  for s in SEEDS:
    r["explain"]["per_seed"][s]["4"]["curvature"]["grad_norm"] = [2.0, 2.1, 1.9, 3.5]
  c = claims.CLAIMS["minority_gradient_norm_larger"](r)
  assert c["verdict"] == "depends" and c["by_verdict"] == {"holds": [at], "does not hold": [change]}
  # No full-precision entry: the change from it is not tested.
  r["explain"] = _explain({4: _curvature(grad_norm=[2.0, 2.1, 1.9, 5.0])})
  c = claims.CLAIMS["minority_gradient_norm_larger"](r)
  assert c["verdict"] == "holds" and "full-precision" in c["judgements"][change]["why"]
  assert c["judgements"][change]["verdict"] == "not tested"


def test_curvature_needs_the_value_to_fall_with_group_size():
  """Larger for the minority (3.5 > 2.5) but rising with size over the others: Spearman 0.4 > 0."""
  r = _base((100, 200, 300, 400, 10))
  r["explain"] = _explain({4: _curvature(mean_per_sample_grad_norm=[1.0, 2.0, 3.0, 4.0, 3.5])})
  j = claims.CLAIMS["minority_gradient_norm_larger"](r)["judgements"][f"{PRIMARY} | mean_per_sample_norm (at_bits)"]
  assert j["per_bits"]["4"]["minority_mean"] > j["per_bits"]["4"]["majority_mean"]
  assert j["per_bits"]["4"]["spearman_size"] == pytest.approx(0.4) and j["verdict"] == "does not hold"
  assert claims.CLAIMS["minority_gradient_norm_larger"](_base())["verdict"] == "not tested"


def test_every_curvature_definition_is_judged():
  """Larger for the minority at every bit-width, but its change from full precision is the smallest."""
  grad, top = ([1.0, 1.1, 0.9, 3.0], [2.0, 2.2, 1.8, 3.5]), ([5.0, 5.5, 4.5, 9.0], [10.0, 11.0, 9.0, 12.0])
  ms = lambda v: {"mean": v, "std": [0.0] * 4}
  entry = lambda i: _curvature(grad_norm=grad[i], mean_per_sample_grad_norm=grad[i], top_eigenvalue=top[i],
                               converged=[True] * 4, size_matched={"grad_norm": ms(grad[i]),
                                                                   "top_eigenvalue": ms(top[i]),
                                                                   "converged": [True] * 4})
  r = _base()
  r["explain"] = _explain({32: entry(0), 4: entry(1)})
  for claim, definitions in (("minority_gradient_norm_larger", ("norm_of_mean_gradient", "size_matched",
                                                                 "mean_per_sample_norm")),
                             ("minority_top_eigenvalue_larger", ("top_eigenvalue", "size_matched"))):
    c = claims.CLAIMS[claim](r)
    assert set(c["judgements"]) == {f"{PRIMARY} | {d} ({s})" for d in definitions
                                    for s in ("at_bits", "change_from_fp")}
    assert c["verdict"] == "depends", claim
    assert c["by_verdict"] == {"holds": [f"{PRIMARY} | {d} (at_bits)" for d in definitions],
                               "does not hold": [f"{PRIMARY} | {d} (change_from_fp)" for d in definitions]}


def test_unconverged_top_eigenvalues_are_left_out_and_listed():
  """An eigenvalue whose Lanczos run did not converge is not used: here the minority's only value at 4 bits in
  seed 1 is unconverged, so its mean comes from seed 0 alone (3.0, not (3.0 + 100) / 2)."""
  r = _base()
  r["explain"] = _explain({4: _curvature(top_eigenvalue=[1.0, 1.1, 0.9, 3.0])})
  for s in SEEDS:
    r["explain"]["per_seed"][s]["4"]["curvature"]["converged"] = [True, True, True, s == "0"]
  r["explain"]["per_seed"]["1"]["4"]["curvature"]["top_eigenvalue"] = [1.0, 1.1, 0.9, 100.0]
  c = claims.CLAIMS["minority_top_eigenvalue_larger"](r)
  j = c["judgements"][f"{PRIMARY} | top_eigenvalue (at_bits)"]
  assert j["per_bits"]["4"]["minority_mean"] == pytest.approx(3.0)
  assert j["unconverged_lanczos"] == {"4": {"1": [3]}}
  assert c["verdict"] == "holds"
  grad = claims.CLAIMS["minority_gradient_norm_larger"](r)
  assert all("unconverged_lanczos" not in j for j in grad["judgements"].values())  # no Lanczos there
  assert "did not converge is not used" in claims.rules_text()


def test_a_change_from_an_unconverged_eigenvalue_is_left_out():
  """Seed 1's full-precision minority eigenvalue did not converge: its change (100 - 0.5) is not used."""
  r = _base()
  sm = lambda top, ok: {"top_eigenvalue": {"mean": top, "std": [0.0] * 4}, "converged": ok}
  r["explain"] = _explain({32: _curvature(size_matched=sm([1.0, 1.0, 1.0, 1.0], [True] * 4)),
                           4: _curvature(size_matched=sm([2.0, 2.0, 2.0, 4.0], [True] * 4))})
  r["explain"]["per_seed"]["1"]["32"]["curvature"]["size_matched"] = sm([1.0, 1.0, 1.0, 0.5], [True] * 3 + [False])
  r["explain"]["per_seed"]["1"]["4"]["curvature"]["size_matched"]["top_eigenvalue"]["mean"][3] = 100.0
  j = claims.CLAIMS["minority_top_eigenvalue_larger"](r)["judgements"][f"{PRIMARY} | size_matched (change_from_fp)"]
  assert j["per_bits"]["4"]["minority_mean"] == pytest.approx(3.0)  # seed 0 alone: 4 - 1
  assert j["unconverged_lanczos"]["32"] == {"1": [3]}


# --- The second-order estimate ---

def _theory(predicted, observed, on_test=None):
  return {"theory": {"second_order": predicted, "observed_excess_loss": {"train": observed, "test": on_test}}}


def test_second_order_estimate_orders_the_excess_loss():
  r = _base((100, 80, 60, 40, 10))
  pred, obs = [0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0]
  r["explain"] = _explain({32: {}, 4: _theory(pred, obs, on_test=obs[::-1])})
  c = claims.second_order_orders_excess_loss(r)
  j = c["judgements"][SECOND]
  assert c["verdict"] == "holds" and j["observed_on"] == "train"
  assert j["per_bits"]["4"]["spearman"] == pytest.approx(1.0)
  assert j["per_bits"]["4"]["p_value"] == pytest.approx(1 / 120)  # exact: 1 ordering of 5! is as good
  assert set(j["per_bits"]) == {"4"}
  r["explain"]["curvature_split"] = "test"  # the observed loss on another split, reversed
  j = claims.second_order_orders_excess_loss(r)["judgements"][SECOND]
  assert j["verdict"] == "does not hold" and j["per_bits"]["4"]["spearman"] == pytest.approx(-1.0)


def test_second_order_needs_a_significant_permutation_p_value():
  """Three groups in the right order: Spearman 1, but 1 of the 3! orderings is as good (p = 1/6 >= 0.05)."""
  r = _base((100, 50, 10))
  r["explain"] = _explain({4: _theory([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])})
  j = claims.second_order_orders_excess_loss(r)["judgements"][SECOND]
  assert j["per_bits"]["4"]["spearman"] == pytest.approx(1.0)
  assert j["per_bits"]["4"]["p_value"] == pytest.approx(1 / 6)
  assert j["verdict"] == "does not hold"


def test_second_order_with_fewer_than_three_groups_is_not_tested():
  r = _base((100, 10))
  r["explain"] = _explain({4: _theory([0.1, 0.2], [1.0, 2.0])})
  c = claims.second_order_orders_excess_loss(r)
  assert c["verdict"] == "not tested" and "fewer than 3 groups" in c["why"]
  assert claims.second_order_orders_excess_loss(_base())["verdict"] == "not tested"


# --- FairQAT ablation, the whole claims section, the rules ---

def _mitigate(fv, acc, acc_std):
  summary = {m: {"4": {"fairness_violation": _ms(fv[m]), "accuracy": _ms(acc[m], acc_std[m])}}
             for m in ("ptq", "qat", "fairqat")}
  return {"methods": ["ptq", "qat", "fairqat"], "bit_widths": [4], "summary": summary}


def test_fairqat_claim():
  r = _base()
  r["mitigate"] = _mitigate({"ptq": 0.4, "qat": 0.3, "fairqat": 0.2}, {"ptq": 0.8, "qat": 0.9, "fairqat": 0.89},
                            {"ptq": 0.0, "qat": 0.02, "fairqat": 0.01})
  assert claims.fairqat_beats_ptq_and_qat(r)["verdict"] == "holds"
  # Loses more than one std of QAT's accuracy: does not hold even with a lower violation.
  r["mitigate"] = _mitigate({"ptq": 0.4, "qat": 0.3, "fairqat": 0.2}, {"ptq": 0.8, "qat": 0.9, "fairqat": 0.85},
                            {"ptq": 0.0, "qat": 0.02, "fairqat": 0.01})
  c = claims.fairqat_beats_ptq_and_qat(r)
  assert c["verdict"] == "does not hold"
  assert c["per_bits"]["4"]["accuracy_loss_vs_qat"] == pytest.approx(0.05)
  r["mitigate"]["methods"] = ["ptq", "fairqat"]
  assert claims.fairqat_beats_ptq_and_qat(r)["verdict"] == "not tested"
  unfinished = {"methods": ["ptq", "qat", "fairqat"], "bit_widths": [4], "per_seed": {}}
  assert claims.fairqat_beats_ptq_and_qat({**r, "mitigate": unfinished})["verdict"] == "not tested"


def test_check_claims_has_every_claim_and_rules():
  out = claims.check_claims(_base())
  assert set(out) == {"rules", "fairness_violation_grows_as_bits_shrink", "minority_loses_more_accuracy",
                      "logit_variance_drops_more_for_minority", "logits_shift_more_for_minority",
                      "minority_moves_toward_decision_boundary", "minority_gradient_norm_larger",
                      "minority_top_eigenvalue_larger", "second_order_estimate_orders_excess_loss",
                      "fairqat_beats_ptq_and_qat", "fairqat_beats_each_control",
                      "fair_allocation_beats_group_blind"}
  assert all(v["verdict"] == "not tested" and v["why"] for k, v in out.items() if k != "rules")
  assert "Spearman" in out["rules"]


def test_claims_tables_metrics_and_report_import_no_jax():
  code = ("import sys, fqjax.analysis.claims, fqjax.analysis.tables, fqjax.analysis.metrics, fqjax.report; "
          "bad = [m for m in sys.modules if m == 'jax' or m.startswith('jax.')]; assert not bad, bad[:5]")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
  assert out.returncode == 0, out.stderr
  assert claims.spearman is metrics.spearman  # one rank correlation for the package


def test_rules_are_a_constant_copied_into_the_results(monkeypatch):
  assert set(claims.RULES) == set(claims.CLAIMS)
  out = claims.check_claims(_base())
  assert set(out) == {"rules", *claims.RULES}
  lines = out["rules"].splitlines()
  assert lines == [*claims.GENERAL_RULES, *(f"{name}: {rule}" for name, rule in claims.RULES.items())]
  assert "below half the median group size" in lines[0]
  monkeypatch.setattr(claims, "__doc__", None)  # never parsed out of the docstring
  assert claims.check_claims(_base())["rules"] == out["rules"]
