"""The mitigation claims of fqjax.analysis.claims (rules in fqjax.analysis.claims.RULES): FairQAT against PTQ and QAT on the
summaries, and against each control method with paired intervals over seeds. No JAX.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from fqjax.analysis.judgements import (as_float, combine, interval_status, join_reasons, judged, not_tested,
                                      stage_absent_why, too_few_groups_why,
                              verdict_from_statuses, verdict_over_bits)


def fairqat_beats_ptq_and_qat(results: Mapping) -> dict:
  """RULES["fairqat_beats_ptq_and_qat"] per target bit-width on mitigate.summary (means and stds over seeds):
  holds at b iff FV(fairqat) < FV(ptq), FV(fairqat) < FV(qat) and acc(qat) - acc(fairqat) <= std(acc(qat))."""
  m = results.get("mitigate")
  if m is None:
    return not_tested(stage_absent_why(results, "mitigate"))
  if "summary" not in m:
    return not_tested("the mitigate stage has not finished")
  if not {"fairqat", "ptq", "qat"} <= set(m["methods"]):
    return not_tested("the ablation needs the methods ptq, qat and fairqat")
  few = too_few_groups_why(results)
  if few:
    return not_tested(few)
  per_bits, flags, skipped = {}, [], {}
  for b in m["bit_widths"]:
    s = {k: (m["summary"].get(k) or {}).get(str(b)) or {} for k in ("fairqat", "ptq", "qat")}
    stat = lambda k, key, part="mean": as_float((s[k].get(key) or {}).get(part))
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
    return not_tested(join_reasons(skipped) if skipped else "the ablation has no target bit-width",
                       **({"not_tested_at": skipped} if skipped else {}))
  return {"verdict": verdict_over_bits(flags), "per_bits": per_bits, **({"not_tested_at": skipped} if skipped else {})}


CONTROLS = ("ptq", "qat", "mp_qat", "qat_equal_size", "sampling_qat", "weighted_qat", "fair_ft")
CONTROL_STATISTIC = "FV(control) - FV(fairqat) per seed, 95% paired t-interval over seeds"


def fairqat_beats_each_control(results: Mapping) -> dict:
  """RULES["fairqat_beats_each_control"]: one judgement per control method the ablation ran."""
  pairs = {c: (c, "fairqat") for c in CONTROLS}
  return _paired_claim(results, pairs, CONTROL_STATISTIC, "the ablation needs fairqat and at least one control method")


ALLOCATION_PAIRS = {"ptq": ("blind_alloc", "fair_alloc"), "qat": ("blind_alloc_qat", "fair_alloc_qat")}
ALLOCATION_STATISTIC = "FV(group-blind) - FV(fairness-aware allocation) per seed, 95% paired t-interval over seeds"


def fair_allocation_beats_group_blind(results: Mapping) -> dict:
  """RULES["fair_allocation_beats_group_blind"]: one judgement per (group-blind, fairness-aware) pair run."""
  return _paired_claim(results, ALLOCATION_PAIRS, ALLOCATION_STATISTIC,
                       "the ablation needs blind_alloc and fair_alloc (or their _qat versions)")


def _paired_claim(results: Mapping, pairs: Mapping, statistic: str, missing_why: str) -> dict:
  """One judgement per {name: (control, method)} pair whose two methods the ablation ran (``_paired_fv``)."""
  m = results.get("mitigate")
  if m is None:
    return not_tested(stage_absent_why(results, "mitigate"))
  if "summary" not in m:
    return not_tested("the mitigate stage has not finished")
  pairs = {name: pair for name, pair in pairs.items() if set(pair) <= set(m["methods"])}
  if not pairs:
    return not_tested(missing_why)
  few = too_few_groups_why(results)
  if few:
    return not_tested(few)
  return combine([judged("mitigate", name, statistic, _paired_fv(results, m, *pair)) for name, pair in pairs.items()])


def _paired_fv(results: Mapping, m: Mapping, control: str, method: str) -> dict:
  """Per target bit-width: the per-seed FV(control) - FV(method) and its 95% t-interval over seeds."""
  seeds = [str(s) for s in results["seeds"]]
  if len(seeds) < 2:
    return not_tested("a paired interval over seeds needs at least 2 seeds")
  from scipy import stats as scipy_stats  # scipy comes with scikit-learn
  out, statuses, skipped = {}, [], {}
  for b in m["bit_widths"]:
    fv = lambda method: np.asarray([as_float(((m["per_seed"].get(s) or {}).get(method) or {}).get(str(b), {})
                                             .get("fairness_violation")) for s in seeds])
    diff = fv(control) - fv(method)
    if not np.isfinite(diff).all():
      skipped[str(b)] = "a seed has no fairness violation for one of the two methods"
      continue
    half = float(scipy_stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)))
    mean = float(diff.mean())
    lo, hi = mean - half, mean + half
    status = interval_status(lo, hi)
    statuses.append(status)
    out[str(b)] = {"difference": mean, "low": lo, "high": hi, "status": status, "holds": status == "holds",
                   "per_seed": diff.tolist()}
  extra = {"not_tested_at": skipped} if skipped else {}
  if not statuses:
    return not_tested("no target bit-width has both methods' fairness violation in every seed", **extra)
  return {"verdict": verdict_from_statuses(statuses), "per_bits": out, **extra}
