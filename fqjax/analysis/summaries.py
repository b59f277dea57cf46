"""Summaries over seeds beyond means: which seeds a stage still lacks, the PTQ bootstrap intervals and the
theory test's table.

Pure NumPy on the per-seed entries of results.json; the runner stores the outputs beside each
variant's "summary" (ptq: "intervals"; explain: "theory"), only when every configured seed has its entry.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from fqjax.analysis import claims, metrics, stats
from fqjax.outputs import results as results_lib
from fqjax.analysis.metrics import finite_mean

FULL = 32


def summarize_sections(results: dict, seeds: Sequence[int], bootstrap_resamples: int) -> list[str]:
  """Stores, in place, the summaries of every complete stage section of ``results`` over exactly ``seeds``
  ("summary", mitigate's "best", ptq's "intervals", explain's "theory"; stale ones are removed first) and
  each section's "missing_seeds"; returns the stages with missing seeds (which get no summary)."""
  incomplete = []
  for stage in results_lib.STAGE_SECTIONS:
    section = results.get(stage)
    if section is None:
      continue
    results_lib.drop_derived(section)
    section["missing_seeds"] = missing_seeds(section, stage, seeds)
    if section["missing_seeds"]:
      incomplete.append(stage)
      continue
    per_seed = section["per_seed"]
    if stage == "train":
      section["summary"] = metrics.summarize_over_seeds([per_seed[str(s)]["test"] for s in seeds])
    elif stage == "ptq":
      minority = claims.minority_mask(results)
      for entry in [section, *section.get("variants", {}).values()]:
        entry["summary"] = {str(b): metrics.summarize_over_seeds([entry["per_seed"][str(s)][str(b)] for s in seeds])
                            for b in section["bit_widths"]}
        if bootstrap_resamples:
          entry["intervals"] = ptq_intervals(entry, section["bit_widths"], seeds, minority, bootstrap_resamples)
    elif stage == "explain":
      for entry in [section, *section.get("variants", {}).values()]:
        entry["theory"] = theory_table(entry, section["bit_widths"], seeds, section)
    elif stage == "mitigate":
      section.update(summarize_mitigation(per_seed, section["methods"], section["bit_widths"], seeds))
  return incomplete


def missing_seeds(section: Mapping, stage: str, seeds: Sequence[int]) -> list[int]:
  """The configured ``seeds`` without a complete entry in a stage's ``section`` of results.json (every
  bit-width, of every variant for explain; every method and bit-width for mitigate)."""
  per_seed = section.get("per_seed", {})
  bits = section.get("bit_widths", [])
  if stage == "explain":
    holders = [per_seed, *(v.get("per_seed", {}) for v in section.get("variants", {}).values())]
    return [s for s in seeds if any(str(b) not in h.get(str(s), {}) for b in bits for h in holders)]
  if stage == "mitigate":
    return [s for s in seeds if any(str(b) not in per_seed.get(str(s), {}).get(mth, {})
                                    for mth in section.get("methods", []) for b in bits)]
  if stage == "ptq":
    return [s for s in seeds if sorted(per_seed.get(str(s), {})) != sorted(str(b) for b in bits)]
  return [s for s in seeds if str(s) not in per_seed]


def ptq_intervals(holder: Mapping, bit_widths: Sequence[int], seeds: Sequence[int], minority: Optional[np.ndarray],
                  num_resamples: int) -> dict:
  """{bits: fqjax.analysis.stats.intervals} of one PTQ variant (``holder`` has "per_seed"), from each seed's
  groups.paired_counts [G, 4]; bit-widths whose entries lack the counts (older results) are left out."""
  out = {}
  for b in bit_widths:
    counts = [((holder["per_seed"][str(s)][str(b)].get("groups") or {}).get("paired_counts")) for s in seeds]
    if any(c is None for c in counts):
      continue
    out[str(b)] = stats.intervals(np.asarray(counts, np.int64), minority, num_resamples=num_resamples, seed=0)
  return out


def theory_table(holder: Mapping, bit_widths: Sequence[int], seeds: Sequence[int], fp_holder: Mapping) -> dict:
  """{bits: the second-order test's per-group means over seeds} of one explain variant.

  Per quantized bit-width b with "theory" entries: [G] means over seeds of "first_order",
  "second_order", "curvature_term", "grad_norm", each split's "observed_excess_loss", the mean
  "d_norm", and "bound" = ||g_a|| ||d|| + 1/2 lambda_max(H_a) ||d||^2 per seed (lambda_max from the
  full-precision entry of ``fp_holder``, converged Lanczos runs only; null without one), with the
  Spearman and Pearson correlations over groups of the estimate against each split's observed loss.
  """
  out = {}
  for b in bit_widths:
    entries = [(holder["per_seed"].get(str(s)) or {}).get(str(b), {}).get("theory") for s in seeds]
    if int(b) >= FULL or any(e is None for e in entries):
      continue
    mean = lambda key: finite_mean(np.asarray([e[key] for e in entries], np.float64), axis=0)
    row = {k: mean(k).tolist() for k in ("first_order", "second_order", "curvature_term", "grad_norm")}
    row["d_norm"] = float(np.mean([e["d_norm"] for e in entries]))
    row["bound"] = _bound(entries, [(fp_holder["per_seed"].get(str(s)) or {}).get(str(FULL)) for s in seeds])
    row["observed_excess_loss"], row["correlations"] = {}, {}
    for split in entries[0]["observed_excess_loss"]:
      observed = finite_mean(np.asarray([e["observed_excess_loss"][split] for e in entries], np.float64), axis=0)
      row["observed_excess_loss"][split] = observed.tolist()
      row["correlations"][split] = metrics.correlations(row["second_order"], observed)
    out[str(b)] = row
  return out


def _bound(entries: Sequence[Mapping], fp_entries: Sequence[Optional[Mapping]]) -> Optional[list]:
  """Mean over seeds of metrics.bound with each seed's full-precision top eigenvalue; None if any is missing."""
  bounds = []
  for e, fp in zip(entries, fp_entries):
    curv = (fp or {}).get("curvature") or {}
    if "top_eigenvalue" not in curv:
      return None
    top = np.asarray([np.nan if v is None else v for v in curv["top_eigenvalue"]], np.float64)
    top[~np.asarray(curv.get("converged", [True] * len(top)), bool)] = np.nan
    bounds.append(metrics.bound(np.asarray(e["grad_norm"], np.float64), e["d_norm"], top))
  return finite_mean(np.asarray(bounds), axis=0).tolist()


TABLE_COLUMNS = (("accuracy", "max"), ("worst_group_accuracy", "max"), ("fairness_violation", "min"),
                 ("size_bytes", "min"), ("steps", "min"), ("train_s", "min"))


def summarize_mitigation(per_seed: Mapping, methods, bit_widths, seeds) -> dict:
  """{method: {bits: summary over seeds}} plus the best method per column and bit-width.

  Methods whose value is missing (NaN: no test rows behind it) are not candidates for "best";
  a column with no value for any method has best None.
  """
  summary: dict = {}
  for method in methods:
    summary[method] = {}
    for b in bit_widths:
      runs = [per_seed[str(s)][method][str(b)] for s in seeds]
      s = metrics.summarize_over_seeds(runs)
      for key in ("size_bytes", "train_s", "steps"):
        s[key] = metrics.mean_std([r.get(key, np.nan) for r in runs])
      w_bits = {r.get("w_bits") for r in runs}
      s["w_bits"] = w_bits.pop() if len(w_bits) == 1 else None
      summary[method][str(b)] = s
  best = {}
  for b in bit_widths:
    best[str(b)] = {}
    for column, direction in TABLE_COLUMNS:
      values = {mth: summary[mth][str(b)][column]["mean"] for mth in methods}
      values = {k: v for k, v in values.items() if v is not None and np.isfinite(v)}  # no data: not a candidate
      pick = max if direction == "max" else min
      best[str(b)][column] = pick(values, key=lambda k: values[k]) if values else None
  return {"summary": summary, "best": best}
