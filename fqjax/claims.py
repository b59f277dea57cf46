"""Checks the paper's findings against a run's results, with the numbers behind every verdict.

Verdicts: "holds", "partly" (holds at some bit-widths, not all), "does not hold",
"not tested" (the stage that provides the data did not run, no group is a minority, or the
statistic behind the verdict cannot be computed; "why" says which).

The rules are data, fixed here and never tuned to a run: ``GENERAL_RULES`` (who is a minority,
how values are averaged, when a claim is not tested) and ``RULES`` (claim name -> its test);
``check_claims`` copies them into results.json as ``claims.rules`` (``rules_text()``). Minority
groups: train count n_g < MINORITY_FRACTION * median_g n_g (half the median: below the median
itself would split a balanced-but-noisy set of groups in two; half the median picks the groups
that are small). No JAX: Spearman and the finite means come from fqjax.metrics.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from fqjax.metrics import finite_mean, spearman  # noqa: F401  (spearman kept at fqjax.claims.spearman)

FULL = 32
MINORITY_FRACTION = 0.5

GENERAL_RULES = (
    "Minority groups are those whose training-set size is below half the median group size "
    "(dataset.counts.train); the rest are the majority.",
    "Per-group values are averaged over seeds, then within minority and majority.",
    "Every claim is judged separately for each PTQ variant (config.ptq.variants: '<weight scale rule>/<BatchNorm "
    "mode>') and each definition it lists; a judgement is named '<variant> | <definition>' and names the statistic "
    "it rests on. The claim's verdict is the judgements' common verdict when they agree (judgements that are "
    "\"not tested\" left out), else \"depends\", listing the judgements under each verdict.",
    "Over bit-widths, a judgement holds when every judged bit-width holds, partly when some do, and does not hold "
    "when none does.",
    "Collapse: a quantized bit-width of a variant has collapsed when its mean test accuracy over seeds is below "
    "chance + config.claims.collapse_fraction * (full-precision accuracy - chance), chance = 1 / number of classes "
    "(default fraction 0.5: the midpoint). Collapsed bit-widths are flagged (\"collapsed_bits\") in every "
    "judgement and left out of trend verdicts (fairness_violation_grows_as_bits_shrink).",
    "A statistic that cannot be computed (a group with no test rows, a single group, a constant sequence) gives "
    "\"not tested\" at that bit-width, never a verdict on a missing number; groups without data are left out of "
    "the minority / majority means and named in \"groups_without_data\".",
)
RULES = {
    "fairness_violation_grows_as_bits_shrink":
        "Statistic: the mean over seeds of the test fairness violation FV (max - min group accuracy) at each "
        "bit-width of the PTQ sweep, collapsed bit-widths left out. Holds when Spearman(bits, FV) < 0 and "
        "FV(lowest kept bits) - FV(highest bits) > the std over seeds of FV at the lowest kept bits; not tested "
        "with fewer than two bit-widths kept.",
    "minority_loses_more_accuracy":
        "Statistic: D = minority mean minus majority mean of the test accuracy drop (full precision minus "
        "quantized), with its 95% hierarchical paired bootstrap interval (seeds resampled, then each group's test "
        "examples, each keeping its full-precision and quantized outcome together; config.eval.bootstrap_resamples "
        "resamples). Per quantized bit-width: \"not applicable\" when neither the minority's nor the majority's "
        "mean drop exceeds the equivalence margin (config.claims.equivalence_margin; default one test example of "
        "the median group, 1 / median test-group size); otherwise holds when the interval's lower end > 0, does "
        "not hold when its upper end <= 0, and is inconclusive otherwise. Over bit-widths: holds when every "
        "applicable bit-width holds, partly when some do, inconclusive when none holds and none does not hold, "
        "does not hold otherwise; \"not applicable\" when no bit-width is.",
    "logit_variance_drops_more_for_minority":
        "Definitions: variance_over_classes (each sample's logits over the classes, averaged over the group), "
        "variance_over_samples (each class logit over the group's samples, averaged over classes) and "
        "true_class_variance (the true-class logit over the group's samples); each as change (quantized - full "
        "precision) and relative_change (change / full-precision value). Per quantized bit-width: the minority "
        "mean is negative (a drop) and below the majority mean (a larger drop).",
    "logits_shift_more_for_minority":
        "Definition: abs_shift (mean over samples and classes of |z_q - z_fp|), as change and relative_change "
        "(/ mean |z_fp|). Per quantized bit-width: minority mean > majority mean.",
    "minority_moves_toward_decision_boundary":
        "Definitions: true_class_shift (mean of z_q[y] - z_fp[y]) and margin_shift (the logit margin z_y - "
        "max_{c != y} z_c, quantized minus full precision), as change and relative_change (/ mean |full-precision "
        "value|). Per quantized bit-width: the minority mean is negative and below the majority mean.",
    "minority_gradient_norm_larger":
        "Definitions: norm_of_mean_gradient (||grad L_g|| over all the group's curvature-split rows), size_matched "
        "(the same with every group subsampled to the smallest group's size, mean over repeats) and "
        "mean_per_sample_norm (the mean over the group's rows of ||grad l_i||); each at_bits (the value at every "
        "explain bit-width, full precision included) and change_from_fp (value minus the full-precision value, at "
        "every quantized bit-width). Per bit-width: minority mean > majority mean and Spearman(training group "
        "size, per-group mean) < 0 (falls with group size).",
    "minority_top_eigenvalue_larger":
        "Definitions: top_eigenvalue (Lanczos on all the group's curvature-split rows) and size_matched "
        "(subsampled as for the gradient norm), each at_bits and change_from_fp. Per bit-width: minority mean > "
        "majority mean and Spearman(training group size, per-group mean) < 0. An eigenvalue whose Lanczos run "
        "did not converge is not used, nor a change computed from one (listed in unconverged_lanczos as "
        "{bits: {seed: [groups]}}).",
    "second_order_estimate_orders_excess_loss":
        "Statistic: Spearman over groups between the second-order estimate g_a.d + 1/2 d.H_a.d (g_a, H_a: gradient "
        "and Hessian of group a's mean curvature-split loss at the full-precision weights; d = quantized minus "
        "full-precision weights; BatchNorm statistics as trained) and the observed excess loss L_a(theta + d) - "
        "L_a(theta) on the same rows, per-group means over seeds. Per quantized bit-width: holds when Spearman > 0 "
        "with a one-sided permutation p < 0.05 (exact up to 8 groups, else 10000 seeded permutations).",
    "fairqat_beats_ptq_and_qat":
        "per target bit-width, FV(fairqat) < FV(ptq) and FV(fairqat) < FV(qat) (means over seeds), and "
        "accuracy(qat) - accuracy(fairqat) <= std of qat's accuracy over seeds.",
}


def rules_text() -> str:
  """GENERAL_RULES, then one line 'claim_name: rule' per entry of RULES (the ``claims.rules`` string)."""
  return "\n".join([*GENERAL_RULES, *(f"{name}: {rule}" for name, rule in RULES.items())])


def minority_threshold(results: Mapping) -> Optional[float]:
  """MINORITY_FRACTION * median of dataset.counts.train ([G] ints), or None for fewer than 2 groups."""
  counts = np.asarray(results["dataset"]["counts"]["train"], np.float64)
  if counts.ndim != 1 or counts.size < 2:
    return None
  return float(MINORITY_FRACTION * np.median(counts))


def minority_mask(results: Mapping) -> Optional[np.ndarray]:
  """[G] bool, True where counts.train[g] < minority_threshold; None with no minority or all minority."""
  threshold = minority_threshold(results)
  if threshold is None:
    return None
  minority = np.asarray(results["dataset"]["counts"]["train"], np.float64) < threshold
  if not minority.any() or minority.all():
    return None
  return minority


def _verdict(flags: Sequence[bool]) -> str:
  if not flags:
    return "not tested"
  if all(flags):
    return "holds"
  return "partly" if any(flags) else "does not hold"


def _not_tested(why: str, **numbers) -> dict:
  return {"verdict": "not tested", "why": why, **numbers}


def _float(x: Any) -> float:
  """A number, or NaN for null / a missing or non-numeric value (results.json stores NaN as null)."""
  try:
    return float("nan") if x is None else float(x)
  except (TypeError, ValueError):
    return float("nan")


def _groups_text(ids: Sequence[int]) -> str:
  ids = [int(i) for i in ids]
  return ("group " if len(ids) == 1 else "groups ") + ", ".join(str(i) for i in ids)


def _test_counts(results: Mapping) -> Optional[list]:
  counts = results.get("dataset", {}).get("counts", {})
  test = counts.get("test") if isinstance(counts, Mapping) else None
  return test if isinstance(test, list) else None


def _have_no_data(results: Mapping, ids: Sequence[int]) -> str:
  """'groups 3, 5 have no test rows' (and '..., group 4 has no values' for those with test rows but no value)."""
  test = _test_counts(results)
  no_rows = [int(i) for i in ids if test is not None and i < len(test) and not test[i]]
  no_values = [int(i) for i in ids if int(i) not in no_rows]
  parts = [f"{_groups_text(g)} {'has' if len(g) == 1 else 'have'} no {what}"
           for g, what in ((no_rows, "test rows"), (no_values, "values")) if g]
  return ", ".join(parts)


def _too_few_groups_why(results: Mapping) -> Optional[str]:
  """Why the fairness violation (max - min over groups with test rows) means nothing here, or None."""
  test = _test_counts(results)
  if test is None or sum(1 for c in test if c) >= 2:
    return None
  empty = [i for i, c in enumerate(test) if not c]
  return ("fewer than 2 groups have test rows" + (f" ({_have_no_data(results, empty)})" if empty else "")
          + ", so the fairness violation is 0 by definition")


def _no_minority_why(results: Mapping) -> str:
  """Why no minority / majority comparison can be made (single group, or none below half the median)."""
  counts = results.get("dataset", {}).get("counts", {}).get("train") or []
  if len(counts) < 2:
    return "the data has a single group, so there is no minority to compare with a majority"
  return "no group is smaller than half the median group size"


def _join_reasons(reasons: Mapping[str, str]) -> str:
  """One reason when every bit-width has the same one, else 'b-bit: reason; ...'."""
  unique = list(dict.fromkeys(reasons.values()))
  if len(unique) == 1:
    return f"at {', '.join(reasons)} bits: {unique[0]}"
  return "; ".join(f"{b}-bit: {why}" for b, why in reasons.items())


def fairness_violation_grows(results: Mapping) -> dict:
  """RULES["fairness_violation_grows_as_bits_shrink"] on ptq.summary: bits b_1 < ... < b_B, FV_b = mean over
  seeds. Holds iff rho = Spearman(b, FV_b) < 0 and FV_{b_1} - FV_{b_B} > std over seeds of FV at b_1."""
  if "ptq" not in results:
    return _not_tested("the ptq stage did not run")
  bits = sorted(int(b) for b in results["ptq"]["bit_widths"])
  if len(bits) < 2:
    return _not_tested("the PTQ sweep has one bit-width")
  summary = results["ptq"].get("summary") or {}
  fv = {b: (summary.get(str(b)) or {}).get("fairness_violation") or {} for b in bits}
  means = [_float(fv[b].get("mean")) for b in bits]
  numbers = {"fairness_violation": {str(b): fv[b] for b in bits}}
  missing = [str(b) for b, m in zip(bits, means) if not math.isfinite(m)]
  if missing:
    return _not_tested(f"the fairness violation has no value at {', '.join(missing)} bits (no seed has a group "
                       "with test rows there)", **numbers)
  rho = spearman(bits, means)  # NaN, without a warning, for a constant sequence
  low = bits[0]
  gap = means[0] - means[-1]
  std_low = _float(fv[low].get("std"))
  numbers = {"spearman_bits_vs_fairness_violation": rho, **numbers,
             "increase_lowest_vs_highest_bits": gap, "std_at_lowest_bits": std_low}
  few = _too_few_groups_why(results)
  if few:
    return _not_tested(few + " at every bit-width", **numbers)
  if not math.isfinite(rho):
    return _not_tested("Spearman(bits, fairness violation) is undefined: the fairness violation is the same at "
                       "every bit-width", **numbers)
  if not math.isfinite(std_low):
    return _not_tested(f"the std over seeds of the fairness violation at {low} bits is missing", **numbers)
  holds = bool(rho < 0 and gap > std_low)
  return {"verdict": "holds" if holds else "does not hold", **numbers}


def _per_bits_claim(results: Mapping, bits_list: Sequence[int], values_at: Callable[[str, int], Optional[list]],
                    compare: Callable[[float, float, float], bool], use_size_correlation: bool = False) -> dict:
  """Minority vs majority per bit-width. Groups without data (no test rows: NaN / null values in
  every seed) are left out of the means and listed in "groups_without_data"; a bit-width whose
  minority or majority mean (or size correlation) cannot be computed is listed in "not_tested_at"
  and takes no part in the verdict."""
  minority = minority_mask(results)
  if minority is None:
    return _not_tested(_no_minority_why(results))
  sizes = np.asarray(results["dataset"]["counts"]["train"], np.float64)
  per_bits, flags, skipped, without = {}, [], {}, set()
  for b in bits_list:
    per_seed = [values_at(str(s), b) for s in results["seeds"]]
    if any(v is None for v in per_seed):
      skipped[str(b)] = "no per-group values at this bit-width"
      continue
    try:
      vals = np.asarray([[np.nan if v is None else v for v in row] for row in per_seed], np.float64)  # [S, G]
    except (TypeError, ValueError):
      vals = np.zeros((0,))
    if vals.ndim != 2 or vals.shape[1] != minority.shape[0]:
      skipped[str(b)] = f"the per-group values are not one per group ({minority.shape[0]} groups)"
      continue
    empty = ~np.isfinite(vals).any(axis=0)  # groups without data at this bit-width
    without.update(int(g) for g in np.flatnonzero(empty))
    mino, majo = float(finite_mean(vals[:, minority])), float(finite_mean(vals[:, ~minority]))
    rho = spearman(sizes, finite_mean(vals, axis=0)) if use_size_correlation else float("nan")
    reasons = []
    if not math.isfinite(mino):
      reasons.append(f"no minority group has data ({_have_no_data(results, np.flatnonzero(minority & empty))})")
    if not math.isfinite(majo):
      reasons.append(f"no majority group has data ({_have_no_data(results, np.flatnonzero(~minority & empty))})")
    if use_size_correlation and not math.isfinite(rho):
      reasons.append("Spearman(group size, value) is undefined (fewer than 2 groups with data, or constant values)")
    if reasons:
      skipped[str(b)] = "; ".join(reasons)
      continue
    ok = bool(compare(mino, majo, rho))
    per_bits[str(b)] = {"minority_mean": mino, "majority_mean": majo, "holds": ok,
                        **({"spearman_size": rho} if use_size_correlation else {})}
    flags.append(ok)
  extra = {}
  if without:
    extra["groups_without_data"] = sorted(without)
  if not flags:
    why = _join_reasons(skipped) if skipped else "no quantized bit-width to compare"
    if set(skipped.values()) == {"no per-group values at this bit-width"}:
      why = "no per-group values for these bit-widths"
    return _not_tested(why, **extra, **({"not_tested_at": skipped} if skipped else {}))
  if skipped:
    extra["not_tested_at"] = skipped
  return {"verdict": _verdict(flags), "per_bits": per_bits,
          "minority_groups": [int(i) for i in np.flatnonzero(minority)], **extra}


def minority_loses_more(results: Mapping) -> dict:
  """RULES["minority_loses_more_accuracy"] per quantized bit-width b < 32, on ptq.per_seed[s][b].groups.accuracy_drop
  ([G] per seed): holds at b iff mean over (seeds, minority groups) > mean over (seeds, majority groups)."""
  if "ptq" not in results:
    return _not_tested("the ptq stage did not run")
  bits = [int(b) for b in results["ptq"]["bit_widths"] if int(b) < FULL]
  per_seed = results["ptq"]["per_seed"]
  return _per_bits_claim(results, bits, lambda s, b: per_seed[s][str(b)]["groups"].get("accuracy_drop"),
                         lambda mino, majo, rho: mino > majo)


def _explain_values(results: Mapping, path: Sequence[str]) -> Callable[[str, int], Optional[list]]:
  per_seed = results["explain"]["per_seed"]

  def get(seed: str, bits: int):
    node = per_seed.get(seed, {}).get(str(bits))
    for key in path:
      if not isinstance(node, Mapping) or key not in node:
        return None
      node = node[key]
    return node

  return get


def _explain_bits(results: Mapping) -> list[int]:
  return [int(b) for b in results["explain"]["bit_widths"] if int(b) < FULL]


def logit_variance_drops_more(results: Mapping) -> dict:
  """RULES["logit_variance_drops_more_for_minority"] per quantized bit-width on explain logits.variance_change
  ([G] per seed): holds at b iff minority mean < 0 and minority mean < majority mean."""
  if "explain" not in results:
    return _not_tested("the explain stage did not run")
  return _per_bits_claim(results, _explain_bits(results), _explain_values(results, ("logits", "variance_change")),
                         lambda mino, majo, rho: mino < 0 and mino < majo)


def _curvature_claim(results: Mapping, key: str) -> dict:
  """RULES["minority_<key>_larger"] per bit-width on explain curvature[key] ([G] per seed): holds at b iff
  minority mean > majority mean and Spearman(train counts, per-group mean over seeds) < 0. Top eigenvalues
  of unconverged Lanczos runs (curvature.converged False) count as missing."""
  if "explain" not in results:
    return _not_tested("the explain stage did not run")
  bits = [int(b) for b in results["explain"]["bit_widths"]]
  values, unconverged = _explain_values(results, ("curvature", key)), {}
  if key == "top_eigenvalue":
    values, unconverged = _converged_only(values, _explain_values(results, ("curvature", "converged")))
  out = _per_bits_claim(results, bits, values, lambda mino, majo, rho: mino > majo and rho < 0,
                        use_size_correlation=True)
  if unconverged:
    out["unconverged_lanczos"] = unconverged
  return out


def _converged_only(values: Callable, converged: Callable) -> tuple[Callable, dict]:
  """values_at with the entries of unconverged Lanczos runs replaced by None; and the dict of what was dropped."""
  dropped: dict = {}

  def get(seed: str, bits: int):
    v, ok = values(seed, bits), converged(seed, bits)
    if v is None or not isinstance(ok, list):
      return v
    bad = [g for g, c in enumerate(ok) if c is False]
    if bad:
      dropped.setdefault(str(bits), {})[seed] = bad
    return [None if g in bad else x for g, x in enumerate(v)]

  return get, dropped


def fairqat_beats_ptq_and_qat(results: Mapping) -> dict:
  """RULES["fairqat_beats_ptq_and_qat"] per target bit-width on mitigate.summary (means and stds over seeds):
  holds at b iff FV(fairqat) < FV(ptq), FV(fairqat) < FV(qat) and acc(qat) - acc(fairqat) <= std(acc(qat))."""
  m = results.get("mitigate")
  if m is None:
    return _not_tested("the mitigate stage did not run")
  if "summary" not in m:
    return _not_tested("the mitigate stage has not finished")
  if not {"fairqat", "ptq", "qat"} <= set(m["methods"]):
    return _not_tested("the ablation needs the methods ptq, qat and fairqat")
  few = _too_few_groups_why(results)
  if few:
    return _not_tested(few)
  per_bits, flags, skipped = {}, [], {}
  for b in m["bit_widths"]:
    s = {k: (m["summary"].get(k) or {}).get(str(b)) or {} for k in ("fairqat", "ptq", "qat")}
    stat = lambda k, key, part="mean": _float((s[k].get(key) or {}).get(part))
    fv = {k: stat(k, "fairness_violation") for k in s}
    acc_loss = stat("qat", "accuracy") - stat("fairqat", "accuracy")
    qat_std = stat("qat", "accuracy", "std")
    missing = [f"{k} fairness violation" for k in s if not math.isfinite(fv[k])]
    missing += [f"{k} accuracy" for k in ("qat", "fairqat") if not math.isfinite(stat(k, "accuracy"))]
    if not missing and not math.isfinite(qat_std):
      missing.append("std of qat accuracy")
    if missing:
      skipped[str(b)] = "no value for " + ", ".join(missing) + " (no seed has test rows for it)"
      continue
    ok = bool(fv["fairqat"] < fv["ptq"] and fv["fairqat"] < fv["qat"] and acc_loss <= qat_std)
    per_bits[str(b)] = {"fairness_violation": fv, "accuracy_loss_vs_qat": acc_loss,
                        "qat_accuracy_std": qat_std, "holds": ok}
    flags.append(ok)
  if not flags:
    return _not_tested(_join_reasons(skipped) if skipped else "the ablation has no target bit-width",
                       **({"not_tested_at": skipped} if skipped else {}))
  return {"verdict": _verdict(flags), "per_bits": per_bits, **({"not_tested_at": skipped} if skipped else {})}


CLAIMS: dict[str, Callable[[Mapping], dict]] = {
    "fairness_violation_grows_as_bits_shrink": fairness_violation_grows,
    "minority_loses_more_accuracy": minority_loses_more,
    "logit_variance_drops_more_for_minority": logit_variance_drops_more,
    "minority_gradient_norm_larger": lambda results: _curvature_claim(results, "grad_norm"),
    "minority_top_eigenvalue_larger": lambda results: _curvature_claim(results, "top_eigenvalue"),
    "fairqat_beats_ptq_and_qat": fairqat_beats_ptq_and_qat,
}


def check_claims(results: Mapping) -> dict:
  """The ``claims`` section of results.json: {"rules": rules_text(), claim name: verdict dict}."""
  return {"rules": rules_text(), **{name: check(results) for name, check in CLAIMS.items()}}
