"""What the report's figures and sections share: constants, numbers and their formatting, the
context of one results.json, and file writes with readable permissions.

PTQ and ablation numbers are read from the summaries the runner stored (ptq.summary[bits],
mitigate.summary[method][bits], mitigate.best[bits]), formatted by fqjax.analysis.tables' cell rules; only
the explain section, which stores no summary, is averaged here (``explain_ms``: mean and sample
std over seeds of [S, ...] stacks, NaN ignored).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from fqjax.analysis import claims as claims_lib
from fqjax.outputs import results as results_lib
from fqjax.analysis.metrics import finite_mean
from fqjax.analysis.tables import ABLATION_COLUMNS, EMPTY, finite, mean_std_cell  # noqa: F401  (shared with the text tables)
from fqjax.analysis.tables import dig

FULL = 32
FIGURES_DIR = "figures"
FIGURE_NAMES = ("ptq_group_accuracy", "ptq_fairness", "ptq_variants", "ptq_variant_groups", "explain_weights",
                "explain_logits_softmax", "explain_curvature", "explain_density", "explain_theory", "mitigate_ablation",
                "mitigate_pareto")


# ----------------------------------------------------------------------------
# Numbers: stacking over seeds, mean and std, formatting
# ----------------------------------------------------------------------------

def floats(value: Any) -> np.ndarray:
  """A number or (nested) list with nulls -> float64 array with NaN."""
  if isinstance(value, (list, tuple)):
    return np.asarray([floats(v) for v in value], np.float64)
  return np.asarray(np.nan if value is None else value, np.float64)


def _stack(per_seed: Mapping, seeds: Sequence, getter: Callable[[Mapping], Any]) -> Optional[np.ndarray]:
  """[S, ...] array of getter(per_seed[seed]) over the seeds that have a value of a common shape."""
  rows = []
  for s in seeds:
    entry = per_seed.get(str(s)) if isinstance(per_seed, Mapping) else None
    value = getter(entry) if entry is not None else None
    if value is not None:
      try:
        rows.append(floats(value))
      except (TypeError, ValueError):
        continue
  if not rows or any(r.shape != rows[0].shape for r in rows):
    return None
  return np.stack(rows)


def _mean_std(stack: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Mean and sample std (ddof=1; 0 for one value) over axis 0, ignoring NaN; NaN where no value is left."""
  if stack is None:
    return np.asarray(np.nan), np.asarray(np.nan)
  stack = np.asarray(stack, np.float64)
  ok = np.isfinite(stack)
  n = ok.sum(axis=0)
  mean = finite_mean(stack, axis=0)
  sq = np.where(ok, stack - mean, 0.0) ** 2
  std = np.where(n > 1, np.sqrt(sq.sum(axis=0) / np.maximum(n - 1, 1)), 0.0)
  return mean, np.where(n == 0, np.nan, std)


def num(x: Any, fmt: str = "{:.3f}") -> str:
  """A number in ``fmt``; '–' for a missing or non-finite value."""
  x = finite(x)
  return "–" if x is None else fmt.format(x)


def pm(mean: Any, std: Any, fmt: str = "{:.3f}") -> str:
  """'mean ± std' of numbers computed here (explain stacks); 'mean' without a std; '–' without a mean."""
  return "–" if finite(mean) is None else mean_std_cell({"mean": mean, "std": std}, fmt, " ± ")


def summary_cell(ms: Optional[Mapping], fmt: str = "{:.3f}", scale: float = 1.0) -> str:
  """A stored summary cell (metrics.mean_std dict) as 'mean ± std'; EMPTY when n = 0 (no data behind it),
  '–' when the statistic is not stored at all (``ms`` None: an older results.json)."""
  return "–" if not isinstance(ms, Mapping) else mean_std_cell(ms, fmt, " ± ", scale)


def mean_std_at(ms: Optional[Mapping]) -> tuple[float, float]:
  """(mean, std) of a stored mean_std dict, NaN for what is missing (for figures)."""
  ms = ms if isinstance(ms, Mapping) else {}
  mean, std = finite(ms.get("mean")), finite(ms.get("std"))
  return (np.nan if mean is None else mean), (np.nan if std is None else std)


def bits_label(b: int) -> str:
  return f"{b} (FP)" if int(b) >= FULL else str(b)


def sorted_bits(bits: Sequence) -> list[int]:
  """Full precision first, then fewer and fewer bits (figures read left to right as bits shrink)."""
  return sorted({int(b) for b in bits}, reverse=True)


def rel(minority: Optional[np.ndarray], values: np.ndarray) -> str:
  """'minority / majority' means of per-group values."""
  if minority is None or values is None or np.ndim(values) != 1 or len(values) != len(minority):
    return "–"
  values = np.asarray(values, np.float64)
  if not np.isfinite(values).any():
    return "–"
  side = lambda mask: num(finite_mean(values[mask]), "{:.3g}") if np.isfinite(values[mask]).any() else EMPTY
  return f"{side(minority)} / {side(~minority)}"


FILE_MODE = 0o644  # mkstemp makes 0600 files; a report is meant to be read (served, shared)


def write_text(path: str, text: str) -> None:
  results_lib.atomic_write_text(path, text)
  os.chmod(path, FILE_MODE)


class Ctx:
  """What every section needs: results, group names / counts, the minority mask, seeds."""

  def __init__(self, results: Mapping, workdir: str):
    self.results = results
    self.workdir = workdir
    ds = results.get("dataset", {})
    self.names = [str(n) for n in ds.get("group_names", [])]
    self.num_groups = int(ds.get("num_groups", len(self.names)) or len(self.names))
    if len(self.names) != self.num_groups:
      self.names = [f"group {i}" for i in range(self.num_groups)]
    self.train_counts = dig(ds, "counts", "train")
    try:  # the claims' rule: train count below half the median (claims.minority_threshold)
      self.minority = claims_lib.minority_mask(results)
      self.minority_threshold = claims_lib.minority_threshold(results)
    except (KeyError, TypeError, ValueError):
      self.minority, self.minority_threshold = None, None
    self.seeds = [str(s) for s in results.get("seeds", [])]

  def is_minority(self, g: int) -> bool:
    return self.minority is not None and bool(self.minority[g])

  def group_label(self, g: int) -> str:
    n = f" (n={self.train_counts[g]})" if self.train_counts and g < len(self.train_counts) else ""
    return f"{self.names[g]}{n}{', minority' if self.is_minority(g) else ''}"

  def size_order(self) -> list[int]:
    if self.train_counts and len(self.train_counts) == self.num_groups:
      return [int(g) for g in np.argsort(np.asarray(self.train_counts), kind="stable")]
    return list(range(self.num_groups))


def ptq_summary(ctx: Ctx, bits: Any) -> Mapping:
  """ptq.summary[bits] as stored (metrics.summarize_over_seeds output); {} when it is not there."""
  s = dig(ctx.results, "ptq", "summary", bits)
  return s if isinstance(s, Mapping) else {}


def explain_bits(ctx: Ctx) -> list[int]:
  return sorted_bits(dig(ctx.results, "explain", "bit_widths") or [])


def explain_ms(ctx: Ctx, bits: int, *path) -> tuple[np.ndarray, np.ndarray]:
  return _mean_std(_stack(ctx.results["explain"].get("per_seed", {}), ctx.seeds,
                          lambda e: dig(e, bits, *path)))
