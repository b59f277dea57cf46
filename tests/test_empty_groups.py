"""Groups with no test rows and single-group data: metrics, claims, tables and the report.

Results are built by hand from small logits (no training). A statistic that cannot be
computed must give "not tested" with a reason (never a verdict on NaN), empty groups must
print as "empty" (never "nan"), and nothing may emit a RuntimeWarning.
"""
import json
import math
import os
import re
import warnings

import numpy as np
import pytest

from fqjax.analysis import claims, metrics, stats, tables
from fqjax.analysis import summaries
from fqjax.study import mitigate
from fqjax import report
from fqjax.outputs import results

BITS = (32, 8, 4, 2)
SEEDS = (0, 1)
NUM_CLASSES = 3


def _logits(y, bits, seed):
  """Logits that get worse as bits shrink: the true class's margin shrinks, noise grows."""
  rng = np.random.default_rng(1000 * seed + bits)
  noise = {32: 0.3, 8: 0.5, 4: 1.5, 2: 3.0}[bits]
  z = rng.normal(0.0, noise, (len(y), NUM_CLASSES))
  z[np.arange(len(y)), y] += 1.5
  return z


def _split(test_counts, seed):
  group = np.repeat(np.arange(len(test_counts)), test_counts).astype(np.int64)
  y = np.random.default_rng(seed).integers(0, NUM_CLASSES, len(group))
  return y, group


def _minority(train_counts):
  sizes = np.asarray(train_counts, np.float64)
  small = sizes < 0.5 * np.median(sizes)
  return small if small.any() and not small.all() else None


def _ptq_section(train_counts, test_counts):
  """The ptq schema with each entry's paired counts and the bootstrap intervals made from them."""
  num_groups = len(test_counts)
  per_seed = {}
  for seed in SEEDS:
    y, group = _split(test_counts, seed)
    z_ref = _logits(y, 32, seed)
    ref = metrics.group_metrics(z_ref, y, group, num_groups)
    per_seed[str(seed)] = {}
    for b in BITS:
      z = _logits(y, b, seed)
      m = metrics.group_metrics(z, y, group, num_groups, reference=ref)
      m["groups"]["paired_counts"] = stats.paired_counts(z_ref.argmax(-1) == y, z.argmax(-1) == y, group,
                                                         num_groups).tolist()
      m["size_bytes"] = 100 * b
      m["fairness_violation_ci"] = metrics.bootstrap_fairness_violation(z.argmax(-1) == y, group, num_groups,
                                                                       num_resamples=20, seed=seed)
      per_seed[str(seed)][str(b)] = m
  summary = {str(b): metrics.summarize_over_seeds([per_seed[str(s)][str(b)] for s in SEEDS]) for b in BITS}
  section = {"bit_widths": list(BITS), "a_bits": None, "per_channel": True, "fold_bn": True, "variant": "max/keep",
             "per_seed": per_seed, "summary": summary}
  section["intervals"] = _intervals(section, _minority(train_counts))
  return section


def _intervals(section, minority):
  """What the runner stores: stats.intervals per bit-width from every seed's paired counts."""
  counts = lambda b: np.asarray([section["per_seed"][str(s)][str(b)]["groups"]["paired_counts"] for s in SEEDS])
  return {str(b): stats.intervals(counts(b), minority, num_resamples=200, seed=0) for b in BITS}


def _mitigate_section(test_counts, methods=("ptq", "qat", "fairqat"), bit_widths=(4,)):
  num_groups = len(test_counts)
  per_seed = {}
  for seed in SEEDS:
    y, group = _split(test_counts, seed)
    per_seed[str(seed)] = {}
    for i, method in enumerate(methods):
      per_seed[str(seed)][method] = {}
      for b in bit_widths:
        m = metrics.group_metrics(_logits(y, b, seed + 10 * i), y, group, num_groups)
        m["size_bytes"], m["train_s"], m["steps"] = 100 * b, 1.0 + i, 0 if method == "ptq" else 50
        per_seed[str(seed)][method][str(b)] = m
  section = {"methods": list(methods), "bit_widths": list(bit_widths), "per_seed": per_seed}
  section.update(summaries.summarize_mitigation(per_seed, methods, bit_widths, SEEDS))
  return section


def _explain_section(train_counts, empty_groups, bit_widths=(32, 4, 2)):
  """The documented explain schema; the groups in ``empty_groups`` have null per-group values. Built so that
  every link and curvature statement holds: the small groups lose more, their values fall with group size."""
  sizes = np.asarray(train_counts, np.float64)
  small = (sizes < 0.5 * np.median(sizes)).astype(np.float64)
  blank = lambda v: [None if g in empty_groups else float(x) for g, x in enumerate(v)]
  per_seed = {}
  for seed in SEEDS:
    per_seed[str(seed)] = {}
    for b in bit_widths:
      e = 0.0 if b == 32 else 2.0 ** -b
      weights = {"mean_abs_diff": 0.01 * e, "rel_l2": e, "induced_sparsity": e, "total_sparsity": 2 * e,
                 "size": 100}
      var_fp = 4.0 + sizes / sizes.max()
      var_q = var_fp * (1 - e * (1 + small))
      tp_fp = 0.9 - 0.2 * small
      entry = {
          "weights": {"per_layer": {"Dense_0": weights}, "model": dict(weights)},
          "activations": {"Dense_0": blank(e * (1 + small))},
          "logits": {"abs_shift": blank(e * (1 + small)), "variance": blank(var_q), "variance_fp": blank(var_fp),
                     "variance_change": blank(var_q - var_fp),
                     "definitions": _logit_definitions(e, small, var_fp, var_q, blank)},
          "softmax": {"true_prob": blank(tp_fp - e * small), "true_prob_fp": blank(tp_fp),
                      "true_prob_shift": blank(-e * small), "margin": blank(2 * tp_fp - 1 - e),
                      "margin_fp": blank(2 * tp_fp - 1), "margin_shift": blank(-e * (1 + small))},
          "accuracy": blank(0.9 - 0.1 * small - e), "loss": blank(0.3 + 0.2 * small + e),
          "curvature": _curvature(e, sizes, blank)}
      if b != 32:
        entry["theory"] = {"second_order": blank(e / sizes), "observed_excess_loss": {"train": blank(2 * e / sizes)}}
      per_seed[str(seed)][str(b)] = entry
  return {"bit_widths": list(bit_widths), "group_sizes": [int(c) for c in train_counts], "per_seed": per_seed,
          "curvature_split": "train", "variant": "max/keep"}


def _logit_definitions(e, small, var_fp, var_q, blank):
  """logits.definitions: variances fall and logits move away from the true class more for the minority."""
  change = lambda c, ref: {"change": blank(c), "relative_change": blank(c / ref)}
  variance = {"fp": blank(var_fp), "quantized": blank(var_q), **change(var_q - var_fp, var_fp)}
  return {"variance_over_classes": variance, "variance_over_samples": dict(variance),
          "true_class_variance": dict(variance), "abs_shift": change(e * (1 + small), 2.0 + 0 * small),
          "true_class_shift": change(-e * (1 + small), 3.0 + 0 * small),
          "margin_shift": change(-e * (1 + small), 1.0 + 0 * small)}


def _curvature(e, sizes, blank):
  """Gradient norms and top eigenvalues that fall with group size and grow as bits shrink."""
  grad, top = 10.0 / np.sqrt(sizes) * (1 + e), 50.0 / sizes * (1 + e)
  ms = lambda v: {"mean": blank(v), "std": blank(0 * v)}
  converged = [True] * len(sizes)
  return {"grad_norm": blank(grad), "top_eigenvalue": blank(top), "converged": list(converged),
          "mean_per_sample_grad_norm": blank(2 * grad), "spearman_size_grad_norm": -1.0,
          "spearman_size_top_eigenvalue": -1.0,
          "size_matched": {"size": 5, "repeats": 2, "grad_norm": ms(1.5 * grad), "top_eigenvalue": ms(1.5 * top),
                           "converged": list(converged)}}


def _results(train_counts, test_counts, with_explain=True):
  num_groups = len(train_counts)
  res = {"schema_version": results.SCHEMA_VERSION, "fqjax_version": "test", "created": "now", "updated": "now",
         "config": {"name": "hand_built"}, "seeds": list(SEEDS), "timings": {"ptq": 1.0},
         "dataset": {"name": "hand", "group_attribute": "g", "num_classes": NUM_CLASSES, "num_groups": num_groups,
                     "group_names": [f"g{i}" for i in range(num_groups)],
                     "counts": {"train": list(train_counts), "val": list(test_counts), "test": list(test_counts)}},
         "model": {"name": "mlp", "num_params": 10, "layer_names": ["Dense_0"]},
         "ptq": _ptq_section(train_counts, test_counts), "mitigate": _mitigate_section(test_counts)}
  if with_explain:
    res["explain"] = _explain_section(train_counts, {g for g, c in enumerate(test_counts) if c == 0})
  res["claims"] = claims.check_claims(res)
  return res


def _round_trip(res, tmp_path):
  """What a later run reads back: NaN stored as null."""
  path = os.path.join(str(tmp_path), "rt.json")
  results.write_json(path, res)
  return results.read_json(path)


# Cases: (train counts, test counts).
EMPTY_MAJORITY = ((100, 100, 100, 10), (20, 20, 0, 10))      # a majority group with no test rows
EMPTY_MINORITY = ((100, 100, 100, 10, 12), (20, 20, 20, 0, 6))  # one of two minority groups has none
ONLY_MINORITY_EMPTY = ((100, 100, 100, 10), (20, 20, 20, 0))   # the only minority group has none
SINGLE_GROUP = ((100,), (30,))
NAN = re.compile(r"\bnan\b", re.IGNORECASE)


@pytest.fixture(autouse=True)
def _warnings_are_errors():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    yield


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------

def test_group_metrics_with_an_empty_group_counts_zero_and_uses_present_groups():
  y = np.array([0, 1, 1, 0, 2])
  group = np.array([0, 0, 0, 2, 2])
  logits = np.eye(NUM_CLASSES)[[0, 1, 0, 0, 1]] * 5.0  # group 0: 2/3 correct, group 2: 1/2 correct
  m = metrics.group_metrics(logits, y, group, 3, group_is_label=False)
  assert m["groups"]["count"] == [3, 0, 2]
  assert math.isnan(m["groups"]["accuracy"][1]) and math.isnan(m["groups"]["loss"][1])
  assert m["worst_group_accuracy"] == pytest.approx(0.5)
  assert m["fairness_violation"] == pytest.approx(2 / 3 - 1 / 2)
  assert math.isfinite(m["demographic_parity_gap"]) and math.isfinite(m["equalized_odds_gap"])


def test_group_metrics_with_no_rows_at_all_is_nan_without_warnings():
  m = metrics.group_metrics(np.zeros((0, 3)), np.zeros(0, int), np.zeros(0, int), 2, group_is_label=False)
  assert m["groups"]["count"] == [0, 0]
  for key in ("accuracy", "worst_group_accuracy", "fairness_violation", "demographic_parity_gap",
              "equalized_odds_gap"):
    assert math.isnan(m[key]), key


def test_summaries_of_an_empty_group_have_n_zero():
  assert metrics.mean_std([float("nan"), None]) == {"mean": pytest.approx(float("nan"), nan_ok=True),
                                                    "std": pytest.approx(float("nan"), nan_ok=True), "n": 0}
  assert metrics.mean_std([float("nan"), 0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
  res = _results(*EMPTY_MAJORITY)
  g = res["ptq"]["summary"]["4"]["groups"]["accuracy"]
  assert [x["n"] for x in g] == [2, 2, 0, 2]
  assert math.isnan(g[2]["mean"])
  # The same from values read back from results.json (null instead of NaN).
  per_seed = json.loads(json.dumps(results._clean([res["ptq"]["per_seed"][str(s)]["4"] for s in SEEDS])))
  assert [x["n"] for x in metrics.summarize_over_seeds(per_seed)["groups"]["accuracy"]] == [2, 2, 0, 2]


# ----------------------------------------------------------------------------
# Claims
# ----------------------------------------------------------------------------

DROP = "max/keep | accuracy_drop"
MINORITY_CLAIMS = ("minority_loses_more_accuracy", "logit_variance_drops_more_for_minority",
                   "logits_shift_more_for_minority", "minority_moves_toward_decision_boundary",
                   "minority_gradient_norm_larger", "minority_top_eigenvalue_larger")


def _paired_drops(res, bits):
  """[S, G] accuracy drops from each seed's paired counts (NaN without rows)."""
  counts = np.asarray([res["ptq"]["per_seed"][str(s)][str(bits)]["groups"]["paired_counts"] for s in SEEDS])
  n = counts.sum(-1)
  return np.where(n > 0, (counts[..., 1] - counts[..., 2]) / np.maximum(n, 1), np.nan)


def test_majority_group_without_test_rows_is_left_out_and_named(tmp_path):
  for res in (_results(*EMPTY_MAJORITY), _round_trip(_results(*EMPTY_MAJORITY), tmp_path)):
    c = claims.check_claims(res)
    loses = c["minority_loses_more_accuracy"]["judgements"][DROP]
    assert loses["verdict"] != "not tested" and set(loses["per_bits"]) == {"8", "4", "2"}
    assert loses["groups_without_data"] == [2]
    drops = _paired_drops(res, 4)
    assert loses["per_bits"]["4"]["majority_mean_drop"] == pytest.approx(drops[:, :2].mean())  # groups 0, 1 only
    assert loses["per_bits"]["4"]["minority_mean_drop"] == pytest.approx(drops[:, 3].mean())
    stored = [res["ptq"]["per_seed"][str(s)]["4"]["groups"]["accuracy_drop"][3] for s in SEEDS]
    assert drops[:, 3] == pytest.approx(stored)  # the paired counts give the stored drops
    for v in loses["per_bits"].values():
      assert all(math.isfinite(v[k]) for k in ("minority_mean_drop", "majority_mean_drop", "low", "high"))
    for name in MINORITY_CLAIMS[1:]:
      for key, j in c[name]["judgements"].items():
        assert j["groups_without_data"] == [2], (name, key)
        assert j["verdict"] == "holds", (name, key)  # built so: the minority loses more, falls with size
      assert c[name]["verdict"] == "holds"


def test_minority_group_without_test_rows_is_left_out_of_the_minority_mean(tmp_path):
  res = _round_trip(_results(*EMPTY_MINORITY), tmp_path)
  c = claims.minority_loses_more(res)["judgements"][DROP]
  assert c["minority_groups"] == [3, 4]
  assert c["groups_without_data"] == [3]
  assert c["per_bits"]["2"]["minority_mean_drop"] == pytest.approx(_paired_drops(res, 2)[:, 4].mean())  # group 4


def test_only_minority_group_without_test_rows_is_not_tested_with_the_reason(tmp_path):
  for res in (_results(*ONLY_MINORITY_EMPTY), _round_trip(_results(*ONLY_MINORITY_EMPTY), tmp_path)):
    c = claims.check_claims(res)
    for name in MINORITY_CLAIMS:
      assert c[name]["verdict"] == "not tested", (name, c[name])
      assert "group 3 has no test rows" in c[name]["why"], (name, c[name]["why"])
      for key, j in c[name]["judgements"].items():
        assert j["verdict"] == "not tested" and j["groups_without_data"] == [3], (name, key)
    assert "not tested" not in (c["fairness_violation_grows_as_bits_shrink"]["verdict"],
                                c["fairqat_beats_ptq_and_qat"]["verdict"])


def test_single_group_claims_are_not_tested(tmp_path):
  for res in (_results(*SINGLE_GROUP), _round_trip(_results(*SINGLE_GROUP), tmp_path)):
    c = claims.check_claims(res)
    for name, v in c.items():
      if name == "rules":
        continue
      assert v["verdict"] == "not tested", (name, v)
      assert v["why"], name
    assert "single group" in c["minority_loses_more_accuracy"]["why"]
    fv = c["fairness_violation_grows_as_bits_shrink"]
    assert "fewer than 2 groups have test rows" in fv["why"]
    rho = fv["judgements"]["max/keep | fairness_violation"]["spearman_bits_vs_fairness_violation"]
    assert rho is None or math.isnan(rho)
    assert "fewer than 2 groups have test rows" in c["fairqat_beats_ptq_and_qat"]["why"]
    assert "fewer than 3 groups" in c["second_order_estimate_orders_excess_loss"]["why"]


def test_one_of_two_groups_without_test_rows_leaves_no_fairness_violation(tmp_path):
  res = _round_trip(_results((100, 100), (20, 0)), tmp_path)
  c = claims.check_claims(res)
  for name in ("fairness_violation_grows_as_bits_shrink", "fairqat_beats_ptq_and_qat"):
    assert c[name]["verdict"] == "not tested"
    assert "fewer than 2 groups have test rows (group 1 has no test rows)" in c[name]["why"], c[name]["why"]
  assert "smaller than half the median" in c["minority_loses_more_accuracy"]["why"]


def test_constant_fairness_violation_is_not_tested_without_a_warning():
  res = _results(*EMPTY_MAJORITY, with_explain=False)
  for b in BITS:
    res["ptq"]["summary"][str(b)]["fairness_violation"] = {"mean": 0.1, "std": 0.0, "n": 2}
  c = claims.fairness_violation_grows(res)
  assert c["verdict"] == "not tested" and "Spearman" in c["why"] and "the same at every bit-width" in c["why"]


def test_a_bit_width_without_minority_data_is_skipped_and_named():
  res = _results(*EMPTY_MINORITY, with_explain=False)
  for s in SEEDS:  # at 2 bits the minority group 4 has no rows either (as if its rows were dropped there)
    res["ptq"]["per_seed"][str(s)]["2"]["groups"]["paired_counts"][4] = [0, 0, 0, 0]
  res["ptq"]["intervals"] = _intervals(res["ptq"], _minority(EMPTY_MINORITY[0]))
  c = claims.minority_loses_more(res)["judgements"][DROP]
  assert "2" not in c["per_bits"] and set(c["per_bits"]) == {"8", "4"}
  assert "group 3 has no test rows" in c["not_tested_at"]["2"] and "group 4 has no values" in c["not_tested_at"]["2"]
  assert c["groups_without_data"] == [3, 4]
  assert c["verdict"] != "not tested"


def test_fairness_violation_with_missing_means_is_not_tested():
  res = _results(*EMPTY_MAJORITY, with_explain=False)
  res["ptq"]["summary"]["2"]["accuracy"]["mean"] = 0.34  # chance is 1/3: collapsed, so left out of the trend
  res["ptq"]["summary"]["2"]["fairness_violation"] = {"mean": None, "std": None, "n": 0}
  c = claims.fairness_violation_grows(res)
  assert c["verdict"] != "not tested" and 2 in c["judgements"]["max/keep | fairness_violation"]["collapsed_bits"]
  res["ptq"]["summary"]["8"]["fairness_violation"] = {"mean": None, "std": None, "n": 0}
  c = claims.fairness_violation_grows(res)
  assert c["verdict"] == "not tested" and "8 bits" in c["why"]


def test_fairqat_with_missing_means_is_not_tested():
  res = _results(*EMPTY_MAJORITY, with_explain=False)
  res["mitigate"]["summary"]["fairqat"]["4"]["fairness_violation"] = {"mean": float("nan"), "std": float("nan"),
                                                                       "n": 0}
  c = claims.fairqat_beats_ptq_and_qat(res)
  assert c["verdict"] == "not tested" and "fairqat fairness violation" in c["why"]


# ----------------------------------------------------------------------------
# Tables and report
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", [EMPTY_MAJORITY, EMPTY_MINORITY, SINGLE_GROUP])
def test_text_tables_show_empty_not_nan(case, tmp_path):
  res = _results(*case)
  for r in (res, _round_trip(res, tmp_path)):
    table = tables.ptq_table(r)
    ablation = tables.ablation_table(r["mitigate"])
    text = tables.claims_lines(r)
    for out in (table, ablation, text):
      assert not NAN.search(out), out
    if 0 in case[1]:
      assert "empty" in table
      assert all("empty" in line for line in table.splitlines()[1:])  # one empty cell per bit-width row
  if case is SINGLE_GROUP:
    assert "not tested (" in tables.claims_lines(res)


def test_ablation_table_with_a_method_without_data():
  res = _results(*EMPTY_MAJORITY, with_explain=False)
  m = res["mitigate"]
  for seed in SEEDS:
    entry = m["per_seed"][str(seed)]["qat"]["4"]
    for key in ("accuracy", "worst_group_accuracy", "fairness_violation"):
      entry[key] = float("nan")
  m.update(summaries.summarize_mitigation(m["per_seed"], m["methods"], m["bit_widths"], SEEDS))
  assert m["summary"]["qat"]["4"]["accuracy"]["n"] == 0
  assert m["best"]["4"]["accuracy"] in ("ptq", "fairqat")
  table = tables.ablation_table(m)
  qat_line = next(line for line in table.splitlines() if " qat " in line)
  assert qat_line.count("empty") == 3 and not NAN.search(table)


@pytest.mark.parametrize("case", [EMPTY_MAJORITY, EMPTY_MINORITY, ONLY_MINORITY_EMPTY, SINGLE_GROUP])
def test_report_renders_without_warnings(case, tmp_path):
  res = _round_trip(_results(*case), tmp_path)
  out = report.write_report(str(tmp_path), res)
  with open(out["markdown"]) as f:
    md = f.read()
  assert not NAN.search(md)
  assert out["sections"]["ptq"] == "ok"
  assert "ptq_group_accuracy" in out["figures"]
  if 0 in case[1]:
    assert "empty" in md
  if case is SINGLE_GROUP:
    rows = [line for line in md.splitlines() if line.startswith("| ") and "| **not tested** |" in line]
    assert len(rows) == len(claims.CLAIMS)  # one row per claim in the claims table
