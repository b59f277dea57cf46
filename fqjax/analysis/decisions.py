"""The one decision rule behind every judgement (docs/RULES.md, sections 1 and 2), and the groups bootstrap.

A judgement has a statistic T, B bootstrap replicates T*_r of it, a claimed direction s (+1: T > 0 is claimed,
-1: T < 0) and a margin delta > 0. Its one-sided bootstrap p-values (with the +1 correction, so never 0):

  p_hold    = (1 + #{s T*_r <= delta}) / (B + 1)      evidence that s T > delta
  p_against = (1 + #{s T*_r >= -delta}) / (B + 1)     evidence that s T < -delta
  p_equiv   = max((1 + #{T*_r >= delta}), (1 + #{T*_r <= -delta})) / (B + 1)    TOST: |T| < delta

Within a claim the judgements form a family; each kind of p-value is Holm-adjusted over it, and at level alpha:
holds (adjusted p_hold < alpha), does not hold (adjusted p_against or p_equiv < alpha), else inconclusive.

Pure NumPy: no JAX.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from fqjax.analysis.metrics import finite_mean

ALPHA = 0.05
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


def _replicates(replicates) -> np.ndarray:
  reps = np.asarray(replicates, np.float64).reshape(-1)
  reps = reps[np.isfinite(reps)]
  if reps.size == 0:
    raise ValueError("no finite bootstrap replicate: the statistic is undefined in every resample.")
  return reps


def p_values(replicates, direction: int, margin: float) -> dict:
  """{"hold", "against", "equiv"}: the one-sided bootstrap p-values of the module docstring.

  replicates: [B] float (non-finite ones, resamples where T is undefined, are left out); direction: +1 or -1;
  margin: delta > 0.
  """
  if direction not in (1, -1):
    raise ValueError(f"direction must be +1 or -1, got {direction!r}.")
  if not margin > 0:
    raise ValueError(f"margin must be > 0, got {margin!r}.")
  reps = _replicates(replicates)
  b, signed = reps.size, direction * reps
  frac = lambda count: (1.0 + float(count)) / (b + 1.0)
  return {"hold": frac(np.sum(signed <= margin)), "against": frac(np.sum(signed >= -margin)),
          "equiv": max(frac(np.sum(reps >= margin)), frac(np.sum(reps <= -margin)))}


def holm(p: Sequence[float]) -> np.ndarray:
  """Holm's step-down adjusted p-values [m] of raw p-values [m] (NaN stays NaN and is not counted in m).

  Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
  """
  p = np.asarray(p, np.float64)
  out = np.full(p.shape, np.nan)
  finite = np.flatnonzero(np.isfinite(p))
  m = finite.size
  if m == 0:
    return out
  order = finite[np.argsort(p[finite], kind="stable")]
  running = 0.0
  for i, idx in enumerate(order):
    running = max(running, min(1.0, (m - i) * p[idx]))
    out[idx] = running
  return out


def decide(p_hold: float, p_against: float, p_equiv: float, alpha: float = ALPHA) -> dict:
  """The outcome of one judgement from its (adjusted) p-values: {"status", "why"}."""
  if p_hold < alpha:
    return {"status": HOLDS, "why": "beyond the margin in the claimed direction"}
  if p_against < alpha:
    return {"status": DOES_NOT_HOLD, "why": "beyond the margin in the opposite direction"}
  if p_equiv < alpha:
    return {"status": DOES_NOT_HOLD, "why": "equivalent to no effect (TOST within the margin)"}
  return {"status": INCONCLUSIVE, "why": "the interval reaches inside the margin and beyond it"}


def judge_family(judgements: Mapping[str, Mapping], alpha: float = ALPHA) -> dict:
  """Holm-adjusted decisions for a family of judgements.

  judgements: {name: {"replicates": [B], "direction": +1 / -1, "margin": delta, "point": T, ...}}; a judgement
  without replicates (not tested) is carried through unchanged and not counted in the family.
  Returns {"judgements": {name: {..., "p_raw": {...}, "p_holm": {...}, "status", "why", "interval": [lo, hi],
  "detectable": half-width + margin}}, "family_size": m, "verdict", "counts": {status: n}}.
  """
  tested = {k: v for k, v in judgements.items() if v.get("replicates") is not None}
  raw = {k: p_values(v["replicates"], v["direction"], v["margin"]) for k, v in tested.items()}
  names = list(raw)
  adjusted = {kind: dict(zip(names, holm([raw[n][kind] for n in names]))) for kind in ("hold", "against", "equiv")}
  out = {}
  for name, j in judgements.items():
    if name not in raw:
      out[name] = dict(j)
      continue
    reps = _replicates(j["replicates"])
    lo, hi = np.percentile(reps, [2.5, 97.5])
    p_adj = {kind: float(adjusted[kind][name]) for kind in adjusted}
    out[name] = {**{k: v for k, v in j.items() if k != "replicates"}, "interval": [float(lo), float(hi)],
                 "detectable": float((hi - lo) / 2 + j["margin"]), "p_raw": raw[name], "p_holm": p_adj,
                 **decide(p_adj["hold"], p_adj["against"], p_adj["equiv"], alpha)}
  statuses = [out[n]["status"] for n in names]
  counts = {s: statuses.count(s) for s in (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)}
  return {"judgements": out, "family_size": len(names), "verdict": family_verdict(statuses), "counts": counts}


def family_verdict(statuses: Sequence[str]) -> str:
  """A claim's verdict from its judgements' adjusted outcomes (docs/RULES.md, section 2)."""
  if not statuses:
    return "not tested"
  held, against = HOLDS in statuses, DOES_NOT_HOLD in statuses
  if held and against:
    return "depends"
  if held:
    return HOLDS
  if against:
    return DOES_NOT_HOLD
  return INCONCLUSIVE


def group_bootstrap(values, minority, statistic: Callable[[np.ndarray, np.ndarray], float], *,
                    num_resamples: int = 1000, seed: int = 0) -> np.ndarray:
  """Replicates [R] of a group-level statistic: seeds drawn with replacement, then, within each drawn seed, the
  minority groups drawn with replacement from the minority and the majority from the majority.

  values: [S, G] float (a group's stored value per seed; NaN = missing); minority: [G] bool;
  statistic(v [S', G'], minority [G']) -> float on a resample (the seeds' rows and the groups' columns in drawn
  order; duplicates repeat). Returns [R] float64 (NaN where the statistic is undefined).
  """
  values = np.asarray(values, np.float64)
  minority = np.asarray(minority, bool)
  if values.ndim != 2 or minority.shape != (values.shape[1],):
    raise ValueError(f"values must be [S, G] and minority [G] bool, got {values.shape} and {minority.shape}.")
  rng = np.random.default_rng(seed)
  sides = [np.flatnonzero(minority), np.flatnonzero(~minority)]
  num_seeds = values.shape[0]
  out = np.empty(int(num_resamples))
  for r in range(int(num_resamples)):
    rows = rng.integers(0, num_seeds, num_seeds)
    cols = np.concatenate([rng.choice(side, side.size, replace=True) for side in sides if side.size])
    out[r] = statistic(values[np.ix_(rows, cols)], minority[cols])
  return out


def side_difference(values: np.ndarray, minority: np.ndarray) -> float:
  """Minority mean minus majority mean of per-group means over seeds (NaN-aware; NaN if a side is empty)."""
  per_group = np.asarray(finite_mean(values, axis=0), np.float64)
  mino, majo = per_group[minority], per_group[~minority]
  mino, majo = mino[np.isfinite(mino)], majo[np.isfinite(majo)]
  if mino.size == 0 or majo.size == 0:
    return float("nan")
  return float(mino.mean() - majo.mean())


def relative_margin(full_precision_values, fraction: float = 0.05) -> Optional[float]:
  """docs/RULES.md's relative margin: ``fraction`` x the mean |full-precision value| over groups and seeds."""
  v = np.abs(np.asarray(full_precision_values, np.float64))
  v = v[np.isfinite(v)]
  if v.size == 0 or not v.mean() > 0:
    return None
  return float(fraction * v.mean())
