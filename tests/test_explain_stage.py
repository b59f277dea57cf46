"""The explain stage end to end on a tiny run: forward chain and curvature per group, CSV rows, claims."""
import csv

import numpy as np
import pytest

from fqjax import results, runner


@pytest.fixture(scope="module")
def run(tiny_study):
  return tiny_study["workdir"], tiny_study["results"]


def test_explain_section(run):
  workdir, res = run
  e = res["explain"]
  assert e["bit_widths"] == [32, 2] and e["curvature_split"] == "train"
  assert e["missing_seeds"] == [] and sorted(e["per_seed"]) == ["0", "1"]
  assert e["group_sizes"] == res["dataset"]["counts"]["train"]
  for bits in ("32", "2"):
    entry = e["per_seed"]["0"][bits]
    curv = entry["curvature"]
    assert len(curv["grad_norm"]) == 3 and all(v > 0 for v in curv["grad_norm"])
    assert np.asarray(curv["top_k_eigenvalues"]).shape == (3, 3)
    top = np.asarray(curv["top_k_eigenvalues"])
    assert np.all(np.diff(top, axis=1) <= 1e-6)  # descending
    np.testing.assert_allclose(curv["top_eigenvalue"], top[:, 0])
    assert len(curv["trace"]) == 3
    assert -1.0 <= curv["spearman_size_grad_norm"] <= 1.0
    sm = curv["size_matched"]  # one repeat of every group cut to the smallest group's training size
    assert sm["size"] == min(res["dataset"]["counts"]["train"]) and len(sm["grad_norm"]["mean"]) == 3
    # The forward chain's per-group accuracy equals the PTQ stage's at the same bits (same model, data).
    np.testing.assert_allclose(entry["accuracy"], res["ptq"]["per_seed"]["0"][bits]["groups"]["accuracy"])
  fp = e["per_seed"]["0"]["32"]
  assert fp["weights"]["model"]["rel_l2"] == 0.0
  np.testing.assert_allclose(fp["logits"]["abs_shift"], 0.0, atol=1e-6)
  assert e["per_seed"]["0"]["2"]["weights"]["model"]["induced_sparsity"] > 0.0
  results.validate(res)


def test_claims_use_explain(run):
  _, res = run
  for name in ("logit_variance_drops_more_for_minority", "minority_gradient_norm_larger",
               "minority_top_eigenvalue_larger"):
    assert res["claims"][name]["verdict"] in ("holds", "partly", "does not hold")


def test_csv_has_explain_rows(run):
  workdir, _ = run
  with open(f"{workdir}/results.csv") as f:
    rows = [r for r in csv.DictReader(f) if r["variant"] == "explain"]
  assert len(rows) == 2 * 2 * 3  # seeds x bit-widths x groups
  assert all(r["grad_norm"] and r["logit_variance"] and r["margin"] for r in rows)


def test_explain_skips_when_done(run, tiny_study_copy, tiny_config):
  _, res = run
  again = runner.run(tiny_config(), tiny_study_copy, ["explain"], progress=False)
  assert again["last_run"]["stages"]["explain"] == "skipped"
  assert again["explain"]["per_seed"] == res["explain"]["per_seed"]


def test_explain_drops_a_bit_width_no_longer_configured_and_keeps_the_rest(run, tiny_study_copy, tiny_config):
  _, res = run
  c = tiny_config()
  c.explain.bit_widths = (2,)
  fewer = runner.run(c, tiny_study_copy, ["explain"], progress=False)
  assert fewer["last_run"]["stages"]["explain"] == "skipped"  # nothing to compute: the entries are reused
  for seed in ("0", "1"):
    assert sorted(fewer["explain"]["per_seed"][seed]) == ["2"]
    assert fewer["explain"]["per_seed"][seed]["2"] == res["explain"]["per_seed"][seed]["2"]
