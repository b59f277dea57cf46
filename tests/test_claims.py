"""The claims' verdict logic on constructed results (never on an empirical outcome)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fqjax import claims, metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ms(mean, std=0.0):
  return {"mean": mean, "std": std, "n": 3}


def _base(counts=(100, 100, 100, 10)):
  return {"dataset": {"counts": {"train": list(counts)}}, "seeds": [0, 1]}


def _ptq(fv_by_bits, drops_by_bits=None, std=0.01):
  bits = sorted(fv_by_bits, reverse=True)
  per_seed = {}
  for s in ("0", "1"):
    per_seed[s] = {str(b): {"groups": {"accuracy_drop": (drops_by_bits or {}).get(b, [0.0] * 4)}} for b in bits}
  return {"bit_widths": bits, "summary": {str(b): {"fairness_violation": _ms(fv_by_bits[b], std)} for b in bits},
          "per_seed": per_seed}


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


def test_fairness_violation_grows_verdicts():
  r = _base()
  r["ptq"] = _ptq({32: 0.1, 8: 0.1, 4: 0.2, 2: 0.6})
  c = claims.fairness_violation_grows(r)
  assert c["verdict"] == "holds"
  assert c["spearman_bits_vs_fairness_violation"] < 0
  assert c["increase_lowest_vs_highest_bits"] == pytest.approx(0.5)
  # An increase within the seed noise does not count.
  r["ptq"] = _ptq({32: 0.10, 4: 0.11, 2: 0.12}, std=0.05)
  assert claims.fairness_violation_grows(r)["verdict"] == "does not hold"
  r["ptq"] = _ptq({32: 0.3, 4: 0.2, 2: 0.1})
  assert claims.fairness_violation_grows(r)["verdict"] == "does not hold"
  assert claims.fairness_violation_grows(_base())["verdict"] == "not tested"


def test_minority_loses_more_per_bits():
  r = _base()
  r["ptq"] = _ptq({32: 0.1, 4: 0.2, 2: 0.5}, drops_by_bits={32: [0, 0, 0, 0], 4: [0.0, 0.01, 0.0, 0.2],
                                                             2: [0.3, 0.3, 0.3, 0.1]})
  c = claims.minority_loses_more(r)
  assert c["per_bits"]["4"]["holds"] and not c["per_bits"]["2"]["holds"]
  assert c["per_bits"]["4"]["minority_mean"] == pytest.approx(0.2)
  assert c["per_bits"]["4"]["majority_mean"] == pytest.approx(0.01 / 3)
  assert c["verdict"] == "partly"
  assert c["minority_groups"] == [3]
  assert "32" not in c["per_bits"]  # full precision is not a quantized bit-width


def _explain(values_by_bits, key_path):
  per_seed = {}
  for s in ("0", "1"):
    per_seed[s] = {}
    for b, v in values_by_bits.items():
      node = per_seed[s].setdefault(str(b), {})
      for k in key_path[:-1]:
        node = node.setdefault(k, {})
      node[key_path[-1]] = v
  return {"bit_widths": sorted(values_by_bits, reverse=True), "per_seed": per_seed}


def test_logit_variance_and_curvature_claims():
  r = _base()
  r["explain"] = _explain({32: [0, 0, 0, 0], 4: [-0.1, -0.1, -0.1, -0.5]}, ("logits", "variance_change"))
  assert claims.logit_variance_drops_more(r)["verdict"] == "holds"
  # A smaller rise for the minority is not a drop: the claim is about variance falling.
  r["explain"] = _explain({4: [0.3, 0.3, 0.3, 0.05]}, ("logits", "variance_change"))
  assert claims.logit_variance_drops_more(r)["verdict"] == "does not hold"
  r["explain"] = _explain({32: [1.0, 1.1, 0.9, 3.0], 4: [2.0, 2.1, 1.9, 5.0]}, ("curvature", "grad_norm"))
  c = claims._curvature_claim(r, "grad_norm")
  assert c["verdict"] == "holds"
  assert c["per_bits"]["4"]["spearman_size"] < 0
  # Larger for the minority but not falling with size across the majority groups: Spearman with
  # sizes (100, 100, 100, 10) is still negative, so flip the minority to be smaller instead.
  r["explain"] = _explain({4: [2.0, 2.1, 1.9, 0.5]}, ("curvature", "grad_norm"))
  assert claims._curvature_claim(r, "grad_norm")["verdict"] == "does not hold"
  assert claims._curvature_claim(_base(), "grad_norm")["verdict"] == "not tested"


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
                      "logit_variance_drops_more_for_minority", "minority_gradient_norm_larger",
                      "minority_top_eigenvalue_larger", "fairqat_beats_ptq_and_qat"}
  assert all(v["verdict"] == "not tested" for k, v in out.items() if k != "rules")
  assert "Spearman" in out["rules"]


def test_claims_tables_metrics_and_report_import_no_jax():
  code = ("import sys, fqjax.claims, fqjax.tables, fqjax.metrics, fqjax.report; "
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


def test_minority_threshold_is_half_the_median():
  assert claims.minority_threshold(_base((100, 100, 100, 10))) == 50.0
  assert claims.minority_threshold(_base((50, 40, 45, 30))) == 21.25  # median 42.5
  assert claims.minority_threshold(_base((7,))) is None
  assert claims.minority_mask(_base((50, 40, 45, 30))) is None  # 30 is below the median, not below half of it


def test_unconverged_top_eigenvalues_are_left_out_and_listed():
  """An eigenvalue whose Lanczos run did not converge is not used: here the minority's only value at 4 bits in
  seed 1 is unconverged, so its mean comes from seed 0 alone (3.0, not (3.0 + 100) / 2)."""
  r = _base()
  r["explain"] = _explain({4: [1.0, 1.1, 0.9, 3.0]}, ("curvature", "top_eigenvalue"))
  for s in ("0", "1"):
    r["explain"]["per_seed"][s]["4"]["curvature"]["converged"] = [True, True, True, s == "0"]
  r["explain"]["per_seed"]["1"]["4"]["curvature"]["top_eigenvalue"] = [1.0, 1.1, 0.9, 100.0]
  c = claims._curvature_claim(r, "top_eigenvalue")
  assert c["per_bits"]["4"]["minority_mean"] == pytest.approx(3.0)
  assert c["unconverged_lanczos"] == {"4": {"1": [3]}}
  assert c["verdict"] == "holds"
  assert "unconverged_lanczos" not in claims._curvature_claim(r, "grad_norm")  # gradient norms use no Lanczos
  assert "did not converge is not used" in claims.rules_text()
