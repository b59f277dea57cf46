"""Checks the paper's findings against a run's results, with the numbers behind every verdict.

Each claim is judged per PTQ variant and per definition (fqjax.analysis.judgements); the claim's verdict is
the judgements' common verdict, or "depends" when they disagree. Verdicts: "holds", "partly" (at
some bit-widths, not all), "does not hold", "inconclusive" and "not applicable" (accuracy claim
only), "depends", "not tested" (the stage that provides the data did not run, no group is a
minority, or the statistic cannot be computed; "why" says which).

The rules are data, fixed here and never tuned to a run: ``GENERAL_RULES`` and ``RULES`` (claim
name -> its test), written before the numbers they judge; ``check_claims`` copies them into
results.json as ``claims.rules`` (``rules_text()``). No JAX.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import numpy as np

from fqjax.analysis import stats
from fqjax.analysis.judgements import (INCOMPLETE, FULL, MINORITY_FRACTION, stage_absent_why, as_float, change_from_fp, collapsed_bits, combine,  # noqa: F401
                              equivalence_margin, have_no_data, holders, interval_status, judged, minority_mask,
                              minority_threshold, no_minority_why, join_reasons, not_tested, path_values, per_bits,
                              seed_matrix,
                              too_few_groups_why, verdict_from_statuses, verdict_over_bits)
from fqjax.analysis.claims_mitigate import (fair_allocation_beats_group_blind, fairqat_beats_each_control,
                                    fairqat_beats_ptq_and_qat)
from fqjax.analysis.metrics import finite_mean, pearson, spearman  # noqa: F401  (spearman kept at fqjax.analysis.claims.spearman)

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
    "fairqat_beats_each_control":
        "One judgement per control method run in the ablation (ptq, qat, mp_qat, qat_equal_size, sampling_qat, "
        "weighted_qat, fair_ft; all at the same optimizer steps, settings chosen on validation). Statistic: the "
        "per-seed paired difference FV(control) - FV(fairqat) on test, with a 95% t-interval over seeds (mean +- "
        "t(0.975, S-1) * sd / sqrt(S); needs S >= 2). Per target bit-width: holds when the interval's lower end "
        "> 0, does not hold when its upper end <= 0, inconclusive otherwise; over bit-widths as for "
        "minority_loses_more_accuracy.",
    "fair_allocation_beats_group_blind":
        "Per-layer bits chosen from per-group second-order sensitivities (minimize the worst group's predicted "
        "excess loss, fqjax.study.allocate) against the same allocation on the whole training loss (group-blind), at the "
        "same byte budget (config.mitigate.alloc_budget). One judgement per pair run in the ablation: ptq "
        "(fair_alloc vs blind_alloc) and qat (fair_alloc_qat vs blind_alloc_qat). Statistic: the per-seed paired "
        "difference FV(group-blind) - FV(fairness-aware) on test, with a 95% t-interval over seeds; per target "
        "bit-width and over bit-widths as for fairqat_beats_each_control.",
}


def rules_text() -> str:
  """GENERAL_RULES, then one line 'claim_name: rule' per entry of RULES (the ``claims.rules`` string)."""
  return "\n".join([*GENERAL_RULES, *(f"{name}: {rule}" for name, rule in RULES.items())])


def _quantized(bits: Sequence) -> list[int]:
  return sorted((int(b) for b in bits if int(b) < FULL), reverse=True)


# ----------------------------------------------------------------------------
# PTQ accuracy: the fairness-violation trend and the minority's larger drop
# ----------------------------------------------------------------------------

def fairness_violation_grows(results: Mapping) -> dict:
  """RULES["fairness_violation_grows_as_bits_shrink"], one judgement per PTQ variant."""
  if "ptq" not in results:
    return not_tested(stage_absent_why(results, "ptq"))
  section = results["ptq"]
  return combine([judged(v, "fairness_violation", "Spearman(bits, mean FV over seeds), collapsed bits left out",
                         _fv_trend(results, section, h, collapsed_bits(results, v)), collapsed_bits(results, v))
                  for v, h in holders(section, results).items()])


def _fv_trend(results: Mapping, section: Mapping, holder: Mapping, collapsed) -> dict:
  """bits b_1 < ... < b_B (collapsed ones out), FV_b = mean over seeds: holds iff Spearman(b, FV_b) < 0 and
  FV_{b_1} - FV_{b_B} > std over seeds of FV at b_1."""
  every = sorted(int(b) for b in section["bit_widths"])
  bits = [b for b in every if b not in (collapsed or [])]
  if len(bits) < 2:
    return not_tested("fewer than two bit-widths are left once the collapsed ones are out" if len(every) > 1
                      else "the PTQ sweep has one bit-width")
  summary = holder.get("summary") or {}
  fv = {b: (summary.get(str(b)) or {}).get("fairness_violation") or {} for b in bits}
  means = [as_float(fv[b].get("mean")) for b in bits]
  numbers = {"fairness_violation": {str(b): fv[b] for b in bits}}
  missing = [str(b) for b, m in zip(bits, means) if not math.isfinite(m)]
  if missing:
    return not_tested(f"the fairness violation has no value at {', '.join(missing)} bits (no seed has a group "
                      "with test rows there)", **numbers)
  rho = spearman(bits, means)  # NaN, without a warning, for a constant sequence
  gap, std_low = means[0] - means[-1], as_float(fv[bits[0]].get("std"))
  numbers = {"spearman_bits_vs_fairness_violation": rho, **numbers, "bits_used": bits,
             "increase_lowest_vs_highest_bits": gap, "std_at_lowest_bits": std_low}
  few = too_few_groups_why(results)
  if few:
    return not_tested(few + " at every bit-width", **numbers)
  if not math.isfinite(rho):
    return not_tested("Spearman(bits, fairness violation) is undefined: the fairness violation is the same at "
                      "every bit-width", **numbers)
  if not math.isfinite(std_low):
    return not_tested(f"the std over seeds of the fairness violation at {bits[0]} bits is missing", **numbers)
  return {"verdict": "holds" if rho < 0 and gap > std_low else "does not hold", **numbers}


DROP_STATISTIC = ("D = minority mean - majority mean accuracy drop, 95% hierarchical paired bootstrap interval, "
                  "equivalence margin")


def minority_loses_more(results: Mapping) -> dict:
  """RULES["minority_loses_more_accuracy"], one judgement per PTQ variant, on its ptq intervals."""
  if "ptq" not in results:
    return not_tested(stage_absent_why(results, "ptq"))
  minority = minority_mask(results)
  if minority is None:
    return not_tested(no_minority_why(results))
  section, margin = results["ptq"], equivalence_margin(results)
  return combine([judged(v, "accuracy_drop", DROP_STATISTIC, _drop_difference(results, section, h, minority, margin),
                         collapsed_bits(results, v)) for v, h in holders(section, results).items()],
                 equivalence_margin=margin)


def _drop_difference(results: Mapping, section: Mapping, holder: Mapping, minority: np.ndarray,
                     margin: float) -> dict:
  intervals = holder.get("intervals")
  if not isinstance(intervals, Mapping) or not intervals:
    return not_tested("no bootstrap intervals: config.eval.bootstrap_resamples is 0, or the ptq entries predate "
                      "them (rerun the ptq stage with --force)")
  if not math.isfinite(margin):
    return not_tested("the equivalence margin is undefined (no group has test rows)")
  out, statuses, skipped, without = {}, [], {}, set()
  for b in _quantized(section["bit_widths"]):
    iv = intervals.get(str(b)) or {}
    drops = np.asarray([as_float(x) for x in ((iv.get("group_accuracy_drop") or {}).get("mean") or [])])
    d = iv.get("drop_difference") or {}
    mean, lo, hi = (as_float(d.get(k)) for k in ("mean", "low", "high"))
    if drops.shape == minority.shape:  # groups without data are named (GENERAL_RULES)
      without.update(int(g) for g in np.flatnonzero(~np.isfinite(drops)))
    if drops.shape != minority.shape or not all(map(math.isfinite, (mean, lo, hi))):
      skipped[str(b)] = _no_interval_why(results, minority, drops)
      continue
    mino, majo = float(finite_mean(drops[minority])), float(finite_mean(drops[~minority]))
    if max(mino, majo) <= margin:
      status = "not applicable"
    else:
      status = interval_status(lo, hi)
      statuses.append(status)
    out[str(b)] = {"minority_mean_drop": mino, "majority_mean_drop": majo, "difference": mean, "low": lo,
                   "high": hi, "status": status, "holds": status == "holds"}
  extra = {"equivalence_margin": margin, **({"not_tested_at": skipped} if skipped else {}),
           **({"groups_without_data": sorted(without)} if without else {})}
  if not out:
    return not_tested(join_reasons(skipped) if skipped else "no quantized bit-width has an interval", **extra)
  if not statuses:
    return {"verdict": "not applicable", "why": f"no group loses more than the equivalence margin ({margin:.3g}) "
            "at any bit-width", "per_bits": out, **extra}
  return {"verdict": verdict_from_statuses(statuses), "per_bits": out,
          "minority_groups": [int(i) for i in np.flatnonzero(minority)],
          **extra}


def _no_interval_why(results: Mapping, minority: np.ndarray, drops: np.ndarray) -> str:
  """Why a bit-width has no interval of the drop difference, naming the side without data."""
  if drops.shape != minority.shape:
    return "no bootstrap interval at this bit-width"
  empty = ~np.isfinite(drops)
  sides = [f"no {side} group has data ({have_no_data(results, np.flatnonzero(mask & empty))})"
           for side, mask in (("minority", minority), ("majority", ~minority)) if empty[mask].all()]
  return "; ".join(sides) or "no bootstrap interval of the drop difference"


# ----------------------------------------------------------------------------
# The forward chain's links, several definitions each
# ----------------------------------------------------------------------------

_drops_more = lambda mino, majo, rho: mino < 0 and mino < majo
LINK_DEFINITIONS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "logit_variance_drops_more_for_minority":
        (("variance_over_classes", "variance_over_samples", "true_class_variance"), _drops_more),
    "logits_shift_more_for_minority": (("abs_shift",), lambda mino, majo, rho: mino > majo),
    "minority_moves_toward_decision_boundary": (("true_class_shift", "margin_shift"), _drops_more),
}


def _link_claim(results: Mapping, claim: str) -> dict:
  """RULES[claim] on explain logits.definitions, one judgement per (variant, definition, change kind)."""
  if "explain" not in results:
    return not_tested(stage_absent_why(results, "explain"))
  definitions, compare = LINK_DEFINITIONS[claim]
  section = results["explain"]
  bits = _quantized(section["bit_widths"])
  judgements = []
  for v, h in holders(section, results).items():
    collapsed = collapsed_bits(results, v)
    for d in definitions:
      for kind in ("change", "relative_change"):
        values = path_values(h.get("per_seed") or {}, ("logits", "definitions", d, kind))
        judgements.append(judged(v, f"{d} ({kind})", f"minority vs majority mean of logits.definitions.{d}.{kind}",
                                 per_bits(results, bits, values, compare), collapsed))
  return combine(judgements)


# ----------------------------------------------------------------------------
# Curvature: gradient norms and top eigenvalues, several definitions, at bits and as change from FP
# ----------------------------------------------------------------------------

CURVATURE_DEFINITIONS = {
    "grad_norm": {"norm_of_mean_gradient": (("curvature", "grad_norm"), None),
                  "size_matched": (("curvature", "size_matched", "grad_norm", "mean"), None),
                  "mean_per_sample_norm": (("curvature", "mean_per_sample_grad_norm"), None)},
    "top_eigenvalue": {"top_eigenvalue": (("curvature", "top_eigenvalue"), ("curvature", "converged")),
                       "size_matched": (("curvature", "size_matched", "top_eigenvalue", "mean"),
                                        ("curvature", "size_matched", "converged"))},
}


def _curvature_claim(results: Mapping, key: str) -> dict:
  """RULES["minority_<key>_larger"]: per (variant, definition, statement) minority mean > majority mean and
  Spearman(train counts, per-group mean over seeds) < 0; unconverged Lanczos values count as missing."""
  if "explain" not in results:
    return not_tested(stage_absent_why(results, "explain"))
  section = results["explain"]
  every = sorted((int(b) for b in section["bit_widths"]), reverse=True)
  compare = lambda mino, majo, rho: mino > majo and rho < 0
  judgements = []
  for v, h in holders(section, results).items():
    collapsed, per_seed = collapsed_bits(results, v), h.get("per_seed") or {}
    for d, (path, converged_path) in CURVATURE_DEFINITIONS[key].items():
      values, dropped = path_values(per_seed, path), {}
      if converged_path:
        values, dropped = _converged_only(values, path_values(per_seed, converged_path))
      for statement in ("at_bits", "change_from_fp"):
        if statement == "at_bits":
          result = per_bits(results, every, values, compare, use_size_correlation=True)
        elif FULL not in every:
          result = not_tested("explain has no full-precision entry to take the change from")
        else:
          result = per_bits(results, _quantized(every), change_from_fp(values), compare, use_size_correlation=True)
        if dropped:
          result["unconverged_lanczos"] = dropped
        judgements.append(judged(v, f"{d} ({statement})", "minority vs majority mean; Spearman(group size, "
                                 f"mean) of {'.'.join(path)}", result, collapsed))
  return combine(judgements)


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


# ----------------------------------------------------------------------------
# The second-order test of the theory
# ----------------------------------------------------------------------------

def second_order_orders_excess_loss(results: Mapping) -> dict:
  """RULES["second_order_estimate_orders_excess_loss"], one judgement per variant."""
  if "explain" not in results:
    return not_tested(stage_absent_why(results, "explain"))
  section = results["explain"]
  return combine([judged(v, "second_order_estimate", "Spearman over groups, one-sided permutation p < 0.05",
                         _theory_per_bits(results, section, h), collapsed_bits(results, v))
                  for v, h in holders(section, results).items()])


def _theory_per_bits(results: Mapping, section: Mapping, holder: Mapping) -> dict:
  per_seed, split = holder.get("per_seed") or {}, section.get("curvature_split", "train")
  num_groups = len(results["dataset"]["counts"]["train"])
  out, flags, skipped = {}, [], {}
  for b in _quantized(section["bit_widths"]):
    pred = seed_matrix(results, path_values(per_seed, ("theory", "second_order")), b, num_groups)
    obs = seed_matrix(results, path_values(per_seed, ("theory", "observed_excess_loss", split)), b, num_groups)
    if isinstance(pred, str) or isinstance(obs, str):
      skipped[str(b)] = pred if isinstance(pred, str) else obs
      continue
    pred_mean, obs_mean = finite_mean(pred, axis=0), finite_mean(obs, axis=0)
    rho, p = stats.spearman_permutation_test(pred_mean, obs_mean, seed=0)
    if not (math.isfinite(rho) and math.isfinite(p)):
      skipped[str(b)] = "Spearman is undefined (fewer than 3 groups with values, or constant values)"
      continue
    ok = bool(rho > 0 and p < 0.05)
    out[str(b)] = {"spearman": rho, "p_value": p, "holds": ok,
                   "pearson": pearson(pred_mean, obs_mean), "predicted_mean": pred_mean.tolist(),
                   "observed_mean": obs_mean.tolist()}
    flags.append(ok)
  extra = {"observed_on": split, **({"not_tested_at": skipped} if skipped else {})}
  if not flags:
    return not_tested(f"no second-order results ({'; '.join(dict.fromkeys(skipped.values())) or 'no quantized bits'})",
                      **extra)
  return {"verdict": verdict_over_bits(flags), "per_bits": out, **extra}


CLAIMS: dict[str, Callable[[Mapping], dict]] = {
    "fairness_violation_grows_as_bits_shrink": fairness_violation_grows,
    "minority_loses_more_accuracy": minority_loses_more,
    **{claim: (lambda results, claim=claim: _link_claim(results, claim)) for claim in LINK_DEFINITIONS},
    "minority_gradient_norm_larger": lambda results: _curvature_claim(results, "grad_norm"),
    "minority_top_eigenvalue_larger": lambda results: _curvature_claim(results, "top_eigenvalue"),
    "second_order_estimate_orders_excess_loss": second_order_orders_excess_loss,
    "fairqat_beats_ptq_and_qat": fairqat_beats_ptq_and_qat,
    "fairqat_beats_each_control": fairqat_beats_each_control,
    "fair_allocation_beats_group_blind": fair_allocation_beats_group_blind,
}


def check_claims(results: Mapping) -> dict:
  """The ``claims`` section of results.json: {"rules": rules_text(), claim name: verdict dict}.

  A stage section that lacks configured seeds (its "missing_seeds", set by fqjax.analysis.summaries) is not
  judged: the claims resting on it are "not tested" and say which seeds it lacks.
  """
  view = {k: v for k, v in results.items() if not (isinstance(v, Mapping) and v.get("missing_seeds"))}
  view[INCOMPLETE] = {k: list(v["missing_seeds"]) for k, v in results.items()
                      if isinstance(v, Mapping) and v.get("missing_seeds")}
  return {"rules": rules_text(), **{name: check(view) for name, check in CLAIMS.items()}}
