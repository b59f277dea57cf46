"""The explain stage end to end on a tiny run: forward chain and curvature per group, CSV rows, claims."""
import csv

import numpy as np
import pytest

from fqjax.outputs import results
from fqjax.study import runner


def test_explain_section(tiny_run):
  workdir, res = tiny_run
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
    assert len(sm["converged"]) == 3 and all(isinstance(c, bool) for c in sm["converged"])
    # Mean of per-sample norms >= norm of the mean gradient (triangle inequality), per group.
    assert all(m >= n * (1 - 1e-5) for m, n in zip(curv["mean_per_sample_grad_norm"], curv["grad_norm"]))
    definitions = entry["logits"]["definitions"]
    assert set(definitions) == {"variance_over_classes", "variance_over_samples", "true_class_variance",
                                "abs_shift", "true_class_shift", "margin_shift"}
    np.testing.assert_allclose(definitions["variance_over_classes"]["change"], entry["logits"]["variance_change"])
    # The forward chain's per-group accuracy equals the PTQ stage's at the same bits (same model, data).
    np.testing.assert_allclose(entry["accuracy"], res["ptq"]["per_seed"]["0"][bits]["groups"]["accuracy"])
  fp = e["per_seed"]["0"]["32"]
  assert fp["weights"]["model"]["rel_l2"] == 0.0
  np.testing.assert_allclose(fp["logits"]["abs_shift"], 0.0, atol=1e-6)
  assert e["per_seed"]["0"]["2"]["weights"]["model"]["induced_sparsity"] > 0.0
  assert "theory" not in fp  # nothing is quantized at 32 bits
  theory = e["per_seed"]["0"]["2"]["theory"]
  assert theory["d_norm"] > 0 and theory["batchnorm"] == "trained statistics"
  np.testing.assert_allclose(theory["second_order"], np.add(theory["first_order"],
                                                             0.5 * np.asarray(theory["curvature_term"])))
  assert set(theory["observed_excess_loss"]) == {"train", "test"}
  # The summary over seeds: means, the bound from the full-precision top eigenvalue, correlations per split.
  table = e["theory"]["2"]
  g = np.asarray([e["per_seed"][s]["2"]["theory"]["grad_norm"] for s in ("0", "1")])
  lam = np.asarray([e["per_seed"][s]["32"]["curvature"]["top_eigenvalue"] for s in ("0", "1")])
  d = np.asarray([e["per_seed"][s]["2"]["theory"]["d_norm"] for s in ("0", "1")])[:, None]
  if all(all(e["per_seed"][s]["32"]["curvature"]["converged"]) for s in ("0", "1")):
    np.testing.assert_allclose(table["bound"], np.mean(g * d + 0.5 * lam * d * d, axis=0), rtol=1e-6)
  assert set(table["correlations"]) == {"train", "test"}
  results.validate(res)


def test_claims_use_explain(tiny_run):
  _, res = tiny_run
  for name in ("logit_variance_drops_more_for_minority", "logits_shift_more_for_minority",
               "minority_moves_toward_decision_boundary", "minority_gradient_norm_larger",
               "minority_top_eigenvalue_larger", "second_order_estimate_orders_excess_loss"):
    claim = res["claims"][name]
    assert claim["verdict"] in ("holds", "partly", "does not hold", "depends"), (name, claim)
    assert all(name.startswith("max/keep | ") for name in claim["judgements"])


def test_csv_has_explain_rows(tiny_run):
  workdir, _ = tiny_run
  with open(f"{workdir}/results.csv") as f:
    rows = [r for r in csv.DictReader(f) if r["variant"] == "explain"]
  assert len(rows) == 2 * 2 * 3  # seeds x bit-widths x groups
  assert all(r["grad_norm"] and r["logit_variance"] and r["margin"] for r in rows)


def test_explain_skips_when_done(tiny_run, tiny_study_copy, tiny_config):
  _, res = tiny_run
  again = runner.run(tiny_config(), tiny_study_copy, ["explain"], progress=False)
  assert again["last_run"]["stages"]["explain"] == "skipped"
  assert again["explain"]["per_seed"] == res["explain"]["per_seed"]


def test_explain_drops_a_bit_width_no_longer_configured_and_keeps_the_rest(tiny_run, tiny_study_copy, tiny_config):
  _, res = tiny_run
  c = tiny_config()
  c.explain.bit_widths = (2,)
  fewer = runner.run(c, tiny_study_copy, ["explain"], progress=False)
  assert fewer["last_run"]["stages"]["explain"] == "skipped"  # nothing to compute: the entries are reused
  for seed in ("0", "1"):
    assert sorted(fewer["explain"]["per_seed"][seed]) == ["2"]
    assert fewer["explain"]["per_seed"][seed]["2"] == res["explain"]["per_seed"][seed]["2"]


def test_another_bit_width_traces_and_compiles_nothing_new(tiny_study):
  """After one quantized entry, an entry at another bit-width reuses every program: bits and weights are traced
  arguments, group batch shapes repeat, and the Lanczos basis stays at its first size (20 products, 21 rows)."""
  import jax

  from studies import tiny_study_config
  from fqjax.study import explain_stage
  config = tiny_study_config()
  config.explain.lanczos_max_iters = 20
  config.explain.density_bits = (32,)
  r = runner._open(config, tiny_study["workdir"], False, False)
  explain_stage.explain_entry(r.trained_seed(0), config, 4)
  events = []
  listener = lambda event, duration, **kw: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    entry = explain_stage.explain_entry(r.trained_seed(0), config, 3)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert entry["curvature"]["num_hvps"] and "theory" in entry
  new = [e for e in events if e.startswith("/jax/core/compile/")]
  assert new == [], f"the 3-bit entry traced or compiled again: {new}"
