"""fairqat_beats_each_control (claims.RULES) on constructed results: paired per-seed t-intervals per control."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from fqjax.analysis import claims
from fqjax.analysis.claims_mitigate import CONTROLS, fairqat_beats_each_control

FAIRQAT_FV = (0.10, 0.14, 0.12, 0.11)  # per seed


def _results(fv_by_method, bit_widths=(4,), seeds=None):
  """Results whose mitigate.per_seed holds ``fv_by_method``: {method: per-seed FV list (or {bits: list})}."""
  first = next(iter(fv_by_method.values()))
  n = len(next(iter(first.values()))) if isinstance(first, dict) else len(first)
  seeds = list(range(n)) if seeds is None else seeds
  per_seed = {}
  for i, s in enumerate(seeds):
    per_seed[str(s)] = {}
    for method, fv in fv_by_method.items():
      by_bits = fv if isinstance(fv, dict) else {b: fv for b in bit_widths}
      per_seed[str(s)][method] = {str(b): {"fairness_violation": by_bits[b][i]} for b in bit_widths}
  return {"dataset": {"counts": {"train": [100, 100, 10], "test": [50, 50, 20]}}, "seeds": seeds,
          "mitigate": {"methods": list(fv_by_method), "bit_widths": list(bit_widths), "summary": {},
                       "per_seed": per_seed}}


def _plus(values, deltas):
  return [v + d for v, d in zip(values, deltas)]


def test_holds_when_every_seed_of_the_control_is_worse_by_a_margin():
  """Control FV above fairqat's by ~0.2 in every seed: the interval's low end > 0, the judgement holds."""
  r = _results({"qat": _plus(FAIRQAT_FV, (0.20, 0.21, 0.19, 0.22)), "fairqat": list(FAIRQAT_FV)})
  c = fairqat_beats_each_control(r)
  assert c["verdict"] == "holds"
  j = c["judgements"]["mitigate | qat"]
  bit = j["per_bits"]["4"]
  assert bit["status"] == "holds" and bit["holds"] is True and bit["low"] > 0
  assert bit["per_seed"] == pytest.approx([0.20, 0.21, 0.19, 0.22])
  assert bit["difference"] == pytest.approx(0.205)


def test_does_not_hold_when_the_interval_is_below_zero():
  """The control is fairer than fairqat in every seed: the high end <= 0, does not hold."""
  r = _results({"qat": _plus(FAIRQAT_FV, (-0.20, -0.21, -0.19, -0.22)), "fairqat": list(FAIRQAT_FV)})
  c = fairqat_beats_each_control(r)
  assert c["verdict"] == "does not hold"
  bit = c["judgements"]["mitigate | qat"]["per_bits"]["4"]
  assert bit["high"] <= 0 and bit["status"] == "does not hold" and bit["holds"] is False


def test_inconclusive_when_the_interval_straddles_zero():
  """Differences of both signs: the interval contains 0 even though the mean difference is positive."""
  r = _results({"qat": _plus(FAIRQAT_FV, (0.10, -0.05, 0.08, -0.04)), "fairqat": list(FAIRQAT_FV)})
  c = fairqat_beats_each_control(r)
  bit = c["judgements"]["mitigate | qat"]["per_bits"]["4"]
  assert bit["difference"] > 0 and bit["low"] < 0 < bit["high"]
  assert bit["status"] == "inconclusive" and c["verdict"] == "inconclusive"


def test_half_width_is_the_t_interval_by_hand():
  """low/high = mean -+ t.ppf(0.975, S-1) * sd(ddof=1) / sqrt(S) of the paired differences (not a z-interval)."""
  diffs = [0.05, 0.12, 0.02, 0.09]
  r = _results({"mp_qat": _plus(FAIRQAT_FV, diffs), "fairqat": list(FAIRQAT_FV)})
  bit = fairqat_beats_each_control(r)["judgements"]["mitigate | mp_qat"]["per_bits"]["4"]
  d = np.asarray(diffs)
  half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
  assert bit["difference"] == pytest.approx(d.mean())
  assert bit["low"] == pytest.approx(d.mean() - half)
  assert bit["high"] == pytest.approx(d.mean() + half)
  assert (bit["high"] - bit["low"]) / 2 > 1.96 * d.std(ddof=1) / math.sqrt(len(d))  # wider than the normal one


def test_depends_when_controls_disagree():
  """One judgement per control; qat holds, ptq does not: the claim "depends" and lists each under its verdict."""
  r = _results({"ptq": _plus(FAIRQAT_FV, (-0.2, -0.21, -0.19, -0.2)),
                "qat": _plus(FAIRQAT_FV, (0.2, 0.21, 0.19, 0.2)), "fairqat": list(FAIRQAT_FV)})
  c = fairqat_beats_each_control(r)
  assert set(c["judgements"]) == {"mitigate | ptq", "mitigate | qat"}
  assert c["verdict"] == "depends"
  assert c["by_verdict"] == {"does not hold": ["mitigate | ptq"], "holds": ["mitigate | qat"]}
  for name, j in c["judgements"].items():
    assert j["statistic"].startswith("FV(control) - FV(fairqat)")


def test_verdict_over_bit_widths_is_partly():
  """Holds at 4 bits, inconclusive at 2: the judgement's verdict over bit-widths is "partly"."""
  qat = {4: _plus(FAIRQAT_FV, (0.2, 0.21, 0.19, 0.2)), 2: _plus(FAIRQAT_FV, (0.1, -0.1, 0.05, -0.06))}
  r = _results({"qat": qat, "fairqat": {4: list(FAIRQAT_FV), 2: list(FAIRQAT_FV)}}, bit_widths=(4, 2))
  j = fairqat_beats_each_control(r)["judgements"]["mitigate | qat"]
  assert j["per_bits"]["4"]["status"] == "holds" and j["per_bits"]["2"]["status"] == "inconclusive"
  assert j["verdict"] == "partly"


def test_a_seed_without_a_value_skips_that_bit_width():
  """A missing (null) FV in one seed makes that bit-width untested, named in not_tested_at."""
  qat = {4: _plus(FAIRQAT_FV, (0.2, 0.21, 0.19, 0.2)), 2: [0.3, None, 0.3, 0.3]}
  r = _results({"qat": qat, "fairqat": {4: list(FAIRQAT_FV), 2: list(FAIRQAT_FV)}}, bit_widths=(4, 2))
  j = fairqat_beats_each_control(r)["judgements"]["mitigate | qat"]
  assert list(j["per_bits"]) == ["4"] and "2" in j["not_tested_at"] and j["verdict"] == "holds"


def test_one_seed_is_not_tested():
  """A paired interval over seeds needs S >= 2: one seed leaves every control untested."""
  r = _results({"qat": [0.5], "fairqat": [0.1]})
  c = fairqat_beats_each_control(r)
  assert c["verdict"] == "not tested" and "2 seeds" in c["why"]


def test_not_tested_without_the_mitigate_section_or_fairqat():
  """No mitigate stage, an unfinished one (no summary), or no fairqat / no control: not tested."""
  r = _results({"qat": _plus(FAIRQAT_FV, (0.2,) * 4), "fairqat": list(FAIRQAT_FV)})
  assert fairqat_beats_each_control({k: v for k, v in r.items() if k != "mitigate"})["verdict"] == "not tested"
  unfinished = {k: v for k, v in r["mitigate"].items() if k != "summary"}
  c = fairqat_beats_each_control({**r, "mitigate": unfinished})
  assert c["verdict"] == "not tested" and "not finished" in c["why"]
  no_fairqat = {**r["mitigate"], "methods": ["qat"]}
  c = fairqat_beats_each_control({**r, "mitigate": no_fairqat})
  assert c["verdict"] == "not tested" and "fairqat" in c["why"]
  only_fairqat = {**r["mitigate"], "methods": ["fairqat", "lsq_qat"]}  # lsq_qat is not a control
  assert fairqat_beats_each_control({**r, "mitigate": only_fairqat})["verdict"] == "not tested"


def test_only_controls_listed_in_methods_are_judged():
  """Entries of a method that is not in mitigate.methods (or is not a control) get no judgement."""
  r = _results({"ptq": _plus(FAIRQAT_FV, (-0.2,) * 4), "qat": _plus(FAIRQAT_FV, (0.2, 0.21, 0.19, 0.2)),
                "lsq_qat": _plus(FAIRQAT_FV, (0.2,) * 4), "fairqat": list(FAIRQAT_FV)})
  r["mitigate"]["methods"] = ["qat", "lsq_qat", "fairqat"]  # ptq's entries stay in per_seed
  c = fairqat_beats_each_control(r)
  assert set(c["judgements"]) == {"mitigate | qat"} and c["verdict"] == "holds"
  assert "lsq_qat" not in CONTROLS and set(CONTROLS) >= {"ptq", "qat", "qat_equal_size", "fair_ft"}


def test_registered_in_check_claims():
  """The claim runs in claims.check_claims and its rule text states the statistic and the t quantile."""
  r = _results({"fair_ft": _plus(FAIRQAT_FV, (0.2, 0.21, 0.19, 0.2)), "fairqat": list(FAIRQAT_FV)})
  out = claims.check_claims(r)
  assert out["fairqat_beats_each_control"]["verdict"] == "holds"
  assert "mitigate | fair_ft" in out["fairqat_beats_each_control"]["judgements"]
  rule = claims.RULES["fairqat_beats_each_control"]
  assert "t(0.975, S-1)" in rule and "FV(control) - FV(fairqat)" in rule
