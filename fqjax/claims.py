"""Checks the paper's findings against a run's results, with the numbers behind every verdict.

Verdicts: "holds", "partly" (holds at some bit-widths, not all), "does not hold",
"not tested" (the stage that provides the data did not run, or no group is a minority).

Minority groups are those whose training-set size is below half the median group size
(dataset.counts.train); the rest are the majority. (Below the median itself would split a
balanced-but-noisy set of groups in two; half the median picks the groups that are small.) Per-group values are averaged
within minority and majority, then over seeds. The rules are fixed here, never
tuned to a run:
  fairness_violation_grows_as_bits_shrink: Spearman(bits, mean FV) < 0 over the PTQ sweep
      and FV(lowest bits) - FV(32 or highest bits) > the std over seeds at the lowest bits.
  minority_loses_more_accuracy: per quantized bit-width, mean accuracy drop (vs full
      precision) of minority > majority.
  logit_variance_drops_more_for_minority: per bit-width, the minority's mean change of logit
      variance is negative (a drop) and below the majority's (a larger drop).
  minority_gradient_norm_larger / minority_top_eigenvalue_larger: per bit-width, minority mean >
      majority mean and Spearman(group size, value) < 0 (falls with group size).
  fairqat_beats_ptq_and_qat: per target bit-width, FV(fairqat) < FV(ptq) and FV(fairqat) < FV(qat)
      (means over seeds), and accuracy(qat) - accuracy(fairqat) <= std of qat's accuracy over seeds.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from fqjax.explain.curvature import spearman  # one rank correlation for the whole package

FULL = 32


def minority_mask(results: Mapping) -> Optional[np.ndarray]:
  counts = np.asarray(results["dataset"]["counts"]["train"], np.float64)
  minority = counts < 0.5 * np.median(counts)
  if not minority.any() or minority.all():
    return None
  return minority


def _verdict(flags: Sequence[bool]) -> str:
  if not flags:
    return "not tested"
  if all(flags):
    return "holds"
  return "partly" if any(flags) else "does not hold"


def _not_tested(why: str) -> dict:
  return {"verdict": "not tested", "why": why}


def _split_means(per_seed_values: Sequence[Sequence[float]], minority: np.ndarray) -> tuple[float, float]:
  """Mean over seeds of (minority mean, majority mean) of per-group values."""
  vals = np.asarray(per_seed_values, np.float64)  # [S, G]
  return float(np.nanmean(vals[:, minority])), float(np.nanmean(vals[:, ~minority]))


def fairness_violation_grows(results: Mapping) -> dict:
  if "ptq" not in results:
    return _not_tested("the ptq stage did not run")
  bits = sorted(int(b) for b in results["ptq"]["bit_widths"])
  if len(bits) < 2:
    return _not_tested("the PTQ sweep has one bit-width")
  summary = results["ptq"]["summary"]
  fv = {b: summary[str(b)]["fairness_violation"] for b in bits}
  rho = spearman(bits, [fv[b]["mean"] for b in bits])
  low, high = bits[0], bits[-1]
  gap = fv[low]["mean"] - fv[high]["mean"]
  holds = bool(rho < 0 and gap > fv[low]["std"])
  return {"verdict": "holds" if holds else "does not hold",
          "spearman_bits_vs_fairness_violation": rho,
          "fairness_violation": {str(b): fv[b] for b in bits},
          "increase_lowest_vs_highest_bits": gap, "std_at_lowest_bits": fv[low]["std"]}


def _per_bits_claim(results: Mapping, bits_list: Sequence[int], values_at: Callable[[str, int], Optional[list]],
                    compare: Callable[[float, float, float], bool], use_size_correlation: bool = False) -> dict:
  minority = minority_mask(results)
  if minority is None:
    return _not_tested("no group is smaller than half the median group size")
  sizes = results["dataset"]["counts"]["train"]
  per_bits, flags = {}, []
  for b in bits_list:
    per_seed = [values_at(str(s), b) for s in results["seeds"]]
    if any(v is None for v in per_seed):
      continue
    mino, majo = _split_means(per_seed, minority)
    group_mean = np.nanmean(np.asarray(per_seed, np.float64), axis=0)
    rho = spearman(sizes, group_mean)
    ok = bool(compare(mino, majo, rho))
    per_bits[str(b)] = {"minority_mean": mino, "majority_mean": majo, "holds": ok,
                        **({"spearman_size": rho} if use_size_correlation else {})}
    flags.append(ok)
  if not flags:
    return _not_tested("no per-group values for these bit-widths")
  return {"verdict": _verdict(flags), "per_bits": per_bits,
          "minority_groups": [int(i) for i in np.flatnonzero(minority)]}


def minority_loses_more(results: Mapping) -> dict:
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
  if "explain" not in results:
    return _not_tested("the explain stage did not run")
  return _per_bits_claim(results, _explain_bits(results), _explain_values(results, ("logits", "variance_change")),
                         lambda mino, majo, rho: mino < 0 and mino < majo)


def _curvature_claim(results: Mapping, key: str) -> dict:
  if "explain" not in results:
    return _not_tested("the explain stage did not run")
  bits = [int(b) for b in results["explain"]["bit_widths"]]
  return _per_bits_claim(results, bits, _explain_values(results, ("curvature", key)),
                         lambda mino, majo, rho: mino > majo and rho < 0, use_size_correlation=True)


def fairqat_beats_ptq_and_qat(results: Mapping) -> dict:
  m = results.get("mitigate")
  if m is None:
    return _not_tested("the mitigate stage did not run")
  if "summary" not in m:
    return _not_tested("the mitigate stage has not finished")
  if not {"fairqat", "ptq", "qat"} <= set(m["methods"]):
    return _not_tested("the ablation needs the methods ptq, qat and fairqat")
  per_bits, flags = {}, []
  for b in m["bit_widths"]:
    s = {k: m["summary"][k][str(b)] for k in ("fairqat", "ptq", "qat")}
    fv = {k: s[k]["fairness_violation"]["mean"] for k in s}
    acc_loss = s["qat"]["accuracy"]["mean"] - s["fairqat"]["accuracy"]["mean"]
    ok = bool(fv["fairqat"] < fv["ptq"] and fv["fairqat"] < fv["qat"] and acc_loss <= s["qat"]["accuracy"]["std"])
    per_bits[str(b)] = {"fairness_violation": fv, "accuracy_loss_vs_qat": acc_loss,
                        "qat_accuracy_std": s["qat"]["accuracy"]["std"], "holds": ok}
    flags.append(ok)
  return {"verdict": _verdict(flags), "per_bits": per_bits}


def check_claims(results: Mapping) -> dict:
  """The ``claims`` section of results.json."""
  return {
      "rules": __doc__.split("The rules are fixed here, never\ntuned to a run:\n")[-1].strip(),
      "fairness_violation_grows_as_bits_shrink": fairness_violation_grows(results),
      "minority_loses_more_accuracy": minority_loses_more(results),
      "logit_variance_drops_more_for_minority": logit_variance_drops_more(results),
      "minority_gradient_norm_larger": _curvature_claim(results, "grad_norm"),
      "minority_top_eigenvalue_larger": _curvature_claim(results, "top_eigenvalue"),
      "fairqat_beats_ptq_and_qat": fairqat_beats_ptq_and_qat(results),
  }
