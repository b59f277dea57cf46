"""The machinery behind fqjax.analysis.claims: minority groups, per-bit comparisons, collapse, and combining judgements.

A judgement is one claim tested on one PTQ variant with one definition (and statistic): a dict
{"verdict", "variant", "definition", "statistic", "per_bits", ...}. ``combine`` turns a claim's
judgements into its verdict: their common verdict when they agree, else "depends". No JAX.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from fqjax.analysis import stats
from fqjax.analysis.metrics import finite_mean, spearman

FULL = 32
MINORITY_FRACTION = 0.5
DEFAULT_COLLAPSE_FRACTION = 0.5


def verdict_over_bits(flags: Sequence[bool]) -> str:
  if not flags:
    return "not tested"
  if all(flags):
    return "holds"
  return "partly" if any(flags) else "does not hold"


def interval_status(lo: float, hi: float) -> str:
  """One bit-width's status from a 95% interval [lo, hi] of a difference that the claim says is > 0."""
  return "holds" if lo > 0 else "does not hold" if hi <= 0 else "inconclusive"


def verdict_from_statuses(statuses: Sequence[str]) -> str:
  """Over bit-widths, from per-bit statuses (holds / does not hold / inconclusive, not applicable ones left out):
  holds when all hold, partly when some do, does not hold when none does and one does not hold, else inconclusive."""
  held = statuses.count("holds")
  if held:
    return "holds" if held == len(statuses) else "partly"
  return "does not hold" if "does not hold" in statuses else "inconclusive"


def not_tested(why: str, **numbers) -> dict:
  return {"verdict": "not tested", "why": why, **numbers}


INCOMPLETE = "incomplete_stages"  # key of the claims' view of results: {stage: its missing seeds}


def stage_absent_why(results: Mapping, stage: str) -> str:
  """Why a claim resting on ``stage`` is not tested: the stage never ran, or it lacks some configured seeds."""
  missing = (results.get(INCOMPLETE) or {}).get(stage)
  if missing:
    return f"the {stage} stage has no results yet for seeds {missing} (rerun with that stage)"
  return f"the {stage} stage did not run"


def as_float(x: Any) -> float:
  """A number, or NaN for null / a missing or non-numeric value (results.json stores NaN as null)."""
  try:
    return float("nan") if x is None else float(x)
  except (TypeError, ValueError):
    return float("nan")


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


def _groups_text(ids: Sequence[int]) -> str:
  ids = [int(i) for i in ids]
  return ("group " if len(ids) == 1 else "groups ") + ", ".join(str(i) for i in ids)


def test_counts(results: Mapping) -> Optional[list]:
  counts = results.get("dataset", {}).get("counts", {})
  test = counts.get("test") if isinstance(counts, Mapping) else None
  return test if isinstance(test, list) else None


def have_no_data(results: Mapping, ids: Sequence[int]) -> str:
  """'groups 3, 5 have no test rows' (and '..., group 4 has no values' for those with test rows but no value)."""
  test = test_counts(results)
  no_rows = [int(i) for i in ids if test is not None and i < len(test) and not test[i]]
  no_values = [int(i) for i in ids if int(i) not in no_rows]
  parts = [f"{_groups_text(g)} {'has' if len(g) == 1 else 'have'} no {what}"
           for g, what in ((no_rows, "test rows"), (no_values, "values")) if g]
  return ", ".join(parts)


def too_few_groups_why(results: Mapping) -> Optional[str]:
  """Why the fairness violation (max - min over groups with test rows) means nothing here, or None."""
  test = test_counts(results)
  if test is None or sum(1 for c in test if c) >= 2:
    return None
  empty = [i for i, c in enumerate(test) if not c]
  return ("fewer than 2 groups have test rows" + (f" ({have_no_data(results, empty)})" if empty else "")
          + ", so the fairness violation is 0 by definition")


def no_minority_why(results: Mapping) -> str:
  """Why no minority / majority comparison can be made (single group, or none below half the median)."""
  counts = results.get("dataset", {}).get("counts", {}).get("train") or []
  if len(counts) < 2:
    return "the data has a single group, so there is no minority to compare with a majority"
  return "no group is smaller than half the median group size"


def join_reasons(reasons: Mapping[str, str]) -> str:
  """One reason when every bit-width has the same one, else 'b-bit: reason; ...'."""
  unique = list(dict.fromkeys(reasons.values()))
  if len(unique) == 1:
    return f"at {', '.join(reasons)} bits: {unique[0]}"
  return "; ".join(f"{b}-bit: {why}" for b, why in reasons.items())


# ----------------------------------------------------------------------------
# Variants, collapse and the claims config
# ----------------------------------------------------------------------------

def holders(section: Mapping, results: Mapping) -> dict:
  """{variant name: the part of a ptq / explain section holding its "per_seed" (and summaries)}.

  The primary variant's entries are the section itself; the others are section["variants"][v].
  """
  primary = section.get("variant") or (((results.get("config") or {}).get("ptq") or {}).get("variants")
                                       or ["max/keep"])[0]
  return {primary: section, **{v: h for v, h in (section.get("variants") or {}).items() if isinstance(h, Mapping)}}


def claims_config(results: Mapping) -> dict:
  """config.claims as stored in results (defaults where absent)."""
  c = (results.get("config") or {}).get("claims") or {}
  return {"collapse_fraction": as_float(c.get("collapse_fraction", DEFAULT_COLLAPSE_FRACTION)),
          "equivalence_margin": c.get("equivalence_margin")}


def equivalence_margin(results: Mapping) -> float:
  """config.claims.equivalence_margin, or one test example of the median group (stats.default_equivalence_margin)."""
  margin = claims_config(results)["equivalence_margin"]
  if margin is not None:
    return float(margin)
  try:
    return float(stats.default_equivalence_margin(test_counts(results) or []))
  except ValueError:
    return float("nan")


def collapsed_bits(results: Mapping, variant: str) -> Optional[list[int]]:
  """The quantized bit-widths at which ``variant`` collapsed (GENERAL_RULES), from the ptq summary; None when
  unknown (no ptq summary for the variant or no full-precision accuracy)."""
  section = results.get("ptq")
  if not isinstance(section, Mapping):
    return None
  holder = holders(section, results).get(variant)
  summary = (holder or {}).get("summary")
  if not isinstance(summary, Mapping):
    return None
  mean = lambda b: as_float(((summary.get(str(b)) or {}).get("accuracy") or {}).get("mean"))
  fp = mean(FULL)
  if not math.isfinite(fp):
    fp = as_float((((results.get("train") or {}).get("summary") or {}).get("accuracy") or {}).get("mean"))
  classes = int((results.get("dataset") or {}).get("num_classes") or 0)
  if not math.isfinite(fp) or classes < 2:
    return None
  fraction = claims_config(results)["collapse_fraction"]
  return sorted(int(b) for b in section.get("bit_widths", []) if int(b) < FULL and math.isfinite(mean(b))
                and stats.is_collapsed(mean(b), fp, classes, fraction))


# ----------------------------------------------------------------------------
# Minority against majority, per bit-width
# ----------------------------------------------------------------------------

def per_bits(results: Mapping, bits_list: Sequence[int], values_at: Callable[[str, int], Optional[list]],
             compare: Callable[[float, float, float], bool], use_size_correlation: bool = False) -> dict:
  """Minority vs majority per bit-width on per-group values ([G] per seed from ``values_at(seed, bits)``).
  Groups without data (NaN / null in every seed) are left out of the means and listed in
  "groups_without_data"; a bit-width whose minority or majority mean (or size correlation) cannot be
  computed is listed in "not_tested_at" and takes no part in the verdict."""
  minority = minority_mask(results)
  if minority is None:
    return not_tested(no_minority_why(results))
  sizes = np.asarray(results["dataset"]["counts"]["train"], np.float64)
  out_bits, flags, skipped, without = {}, [], {}, set()
  for b in bits_list:
    vals = seed_matrix(results, values_at, b, minority.shape[0])
    if isinstance(vals, str):
      skipped[str(b)] = vals
      continue
    empty = ~np.isfinite(vals).any(axis=0)  # groups without data at this bit-width
    without.update(int(g) for g in np.flatnonzero(empty))
    mino, majo = float(finite_mean(vals[:, minority])), float(finite_mean(vals[:, ~minority]))
    rho = spearman(sizes, finite_mean(vals, axis=0)) if use_size_correlation else float("nan")
    reasons = []
    if not math.isfinite(mino):
      reasons.append(f"no minority group has data ({have_no_data(results, np.flatnonzero(minority & empty))})")
    if not math.isfinite(majo):
      reasons.append(f"no majority group has data ({have_no_data(results, np.flatnonzero(~minority & empty))})")
    if use_size_correlation and not math.isfinite(rho):
      reasons.append("Spearman(group size, value) is undefined (fewer than 2 groups with data, or constant values)")
    if reasons:
      skipped[str(b)] = "; ".join(reasons)
      continue
    ok = bool(compare(mino, majo, rho))
    out_bits[str(b)] = {"minority_mean": mino, "majority_mean": majo, "holds": ok,
                        **({"spearman_size": rho} if use_size_correlation else {})}
    flags.append(ok)
  extra = {"groups_without_data": sorted(without)} if without else {}
  if not flags:
    why = join_reasons(skipped) if skipped else "no quantized bit-width to compare"
    if set(skipped.values()) == {"no per-group values at this bit-width"}:
      why = "no per-group values for these bit-widths"
    return not_tested(why, **extra, **({"not_tested_at": skipped} if skipped else {}))
  if skipped:
    extra["not_tested_at"] = skipped
  return {"verdict": verdict_over_bits(flags), "per_bits": out_bits,
          "minority_groups": [int(i) for i in np.flatnonzero(minority)], **extra}


def seed_matrix(results: Mapping, values_at: Callable, b: int, num_groups: int):
  """[S, G] float64 of every configured seed at ``b``, or a string saying why there are none."""
  per_seed = [values_at(str(s), b) for s in results["seeds"]]
  if any(v is None for v in per_seed):
    return "no per-group values at this bit-width"
  try:
    vals = np.asarray([[np.nan if v is None else v for v in row] for row in per_seed], np.float64)
  except (TypeError, ValueError):
    vals = np.zeros((0,))
  if vals.ndim != 2 or vals.shape[1] != num_groups:
    return f"the per-group values are not one per group ({num_groups} groups)"
  return vals


def path_values(per_seed: Mapping, path: Sequence[str]) -> Callable[[str, int], Optional[list]]:
  """values_at(seed, bits) = per_seed[seed][bits][path...], or None where any key is missing."""
  def get(seed: str, bits: int):
    node = per_seed.get(seed, {}).get(str(bits))
    for key in path:
      if not isinstance(node, Mapping) or key not in node:
        return None
      node = node[key]
    return node

  return get


def change_from_fp(values_at: Callable[[str, int], Optional[list]]) -> Callable[[str, int], Optional[list]]:
  """values_at(seed, b) - values_at(seed, 32), per group (None where either is missing; NaN stays NaN)."""
  def get(seed: str, bits: int):
    v, ref = values_at(seed, bits), values_at(seed, FULL)
    if v is None or ref is None or len(v) != len(ref):
      return None
    return [None if a is None or r is None else as_float(a) - as_float(r) for a, r in zip(v, ref)]

  return get


# ----------------------------------------------------------------------------
# Judgements into a claim's verdict
# ----------------------------------------------------------------------------

def judged(variant: str, definition: str, statistic: str, result: Mapping,
           collapsed: Optional[Sequence[int]] = None) -> dict:
  """A judgement: ``result`` (a per_bits dict or a not_tested one) named by variant, definition, statistic,
  with collapsed bit-widths flagged in per_bits."""
  out = {"variant": variant, "definition": definition, "statistic": statistic, **result}
  if collapsed is not None:
    out["collapsed_bits"] = list(collapsed)
    for b, entry in (out.get("per_bits") or {}).items():
      if isinstance(entry, dict) and int(b) in collapsed:
        entry["collapsed"] = True
  return out


def combine(judgements: Sequence[Mapping], **extra) -> dict:
  """A claim's verdict from its judgements: the common verdict of those tested, else "depends" with
  "by_verdict": {verdict: ["<variant> | <definition>", ...]}. All untested: "not tested" with their reasons."""
  named = {f"{j['variant']} | {j['definition']}": dict(j) for j in judgements}
  tested = {name: j for name, j in named.items() if j["verdict"] != "not tested"}
  if not tested:
    reasons = list(dict.fromkeys(j.get("why", "") for j in named.values()))
    return {"verdict": "not tested", "why": reasons[0] if len(reasons) == 1 else "; ".join(
        f"{name}: {j.get('why', '')}" for name, j in named.items()), "judgements": named, **extra}
  verdicts = list(dict.fromkeys(j["verdict"] for j in tested.values()))
  out = {"verdict": verdicts[0] if len(verdicts) == 1 else "depends"}
  if len(verdicts) > 1:
    out["by_verdict"] = {v: [name for name, j in tested.items() if j["verdict"] == v] for v in verdicts}
  return {**out, "judgements": named, **extra}
