"""The explain stage end to end on a tiny run: forward chain and curvature per group, CSV rows, claims."""
import csv

import numpy as np
import pytest

from fqjax import results, runner
from fqjax.config import base_config


def _config():
  c = base_config()
  c.seeds = (0,)
  c.data.name = "synthetic"
  c.data.synthetic.group_sizes = (160, 60, 20)
  c.data.synthetic.noise = (1.0, 1.2, 1.5)
  c.data.synthetic.shift = (0.0, 0.5, 1.0)
  c.model.name = "mlp"
  c.model.kwargs.hidden = (16,)
  c.train.epochs = 2
  c.train.batch_size = 32
  c.ptq.bit_widths = (32, 4, 2)
  c.eval.bootstrap_resamples = 0
  c.explain.top_k = 3
  c.explain.trace_probes = 4
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("explain"))
  return workdir, runner.run(_config(), workdir, ["train", "ptq", "explain"], progress=False)


def test_explain_section(run):
  workdir, res = run
  e = res["explain"]
  assert e["bit_widths"] == [32, 4, 2] and e["curvature_split"] == "train"
  assert e["group_sizes"] == res["dataset"]["counts"]["train"]
  for bits in ("32", "4", "2"):
    entry = e["per_seed"]["0"][bits]
    curv = entry["curvature"]
    assert len(curv["grad_norm"]) == 3 and all(v > 0 for v in curv["grad_norm"])
    assert np.asarray(curv["top_k_eigenvalues"]).shape == (3, 3)
    top = np.asarray(curv["top_k_eigenvalues"])
    assert np.all(np.diff(top, axis=1) <= 1e-6)  # descending
    np.testing.assert_allclose(curv["top_eigenvalue"], top[:, 0])
    assert len(curv["trace"]) == 3
    assert -1.0 <= curv["spearman_size_grad_norm"] <= 1.0
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
  assert len(rows) == 3 * 3  # bit-widths x groups
  assert all(r["grad_norm"] and r["logit_variance"] and r["margin"] for r in rows)


def test_explain_skips_when_done(run):
  workdir, res = run
  again = runner.run(_config(), workdir, ["explain"], progress=False)
  assert again["explain"]["per_seed"] == res["explain"]["per_seed"]
  assert again["timings"]["explain"] == res["timings"]["explain"]
