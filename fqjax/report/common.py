"""What the report's figures and sections share: constants, numbers over seeds and their
formatting, the context of one results.json, and file writes with readable permissions.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from fqjax import claims as claims_lib
from fqjax import results as results_lib

FULL = 32
FIGURES_DIR = "figures"
FIGURE_NAMES = ("ptq_group_accuracy", "ptq_fairness", "explain_weights", "explain_logits_softmax",
                "explain_curvature", "mitigate_ablation")
# Ablation columns: (key, header, direction of "best", scale, format).
ABLATION_COLUMNS = (("accuracy", "accuracy", "max", 1.0, "{:.3f}"),
                    ("worst_group_accuracy", "worst group", "max", 1.0, "{:.3f}"),
                    ("fairness_violation", "fairness violation", "min", 1.0, "{:.3f}"),
                    ("size_bytes", "size KB", "min", 1 / 1024, "{:.1f}"),
                    ("train_s", "train s", "min", 1.0, "{:.1f}"))


# ----------------------------------------------------------------------------
# Numbers: stacking over seeds, mean and std, formatting
# ----------------------------------------------------------------------------

def _dig(node: Any, *path) -> Any:
  """node[path[0]][path[1]]...; None where a key is missing or a node is not a mapping."""
  for key in path:
    if not isinstance(node, Mapping) or str(key) not in node:
      return None
    node = node[str(key)]
  return node


def _floats(value: Any) -> np.ndarray:
  """A number or (nested) list with nulls -> float64 array with NaN."""
  if isinstance(value, (list, tuple)):
    return np.asarray([_floats(v) for v in value], np.float64)
  return np.asarray(np.nan if value is None else value, np.float64)


def _stack(per_seed: Mapping, seeds: Sequence, getter: Callable[[Mapping], Any]) -> Optional[np.ndarray]:
  """[S, ...] array of getter(per_seed[seed]) over the seeds that have a value of a common shape."""
  rows = []
  for s in seeds:
    entry = per_seed.get(str(s)) if isinstance(per_seed, Mapping) else None
    value = getter(entry) if entry is not None else None
    if value is not None:
      try:
        rows.append(_floats(value))
      except (TypeError, ValueError):
        continue
  if not rows or any(r.shape != rows[0].shape for r in rows):
    return None
  return np.stack(rows)


def _nanmean(values: Any, axis: Optional[int] = None) -> np.ndarray:
  """Mean of the finite entries over ``axis``; NaN where there are none (an empty group), without a warning."""
  values = np.asarray(values, np.float64)
  finite = np.isfinite(values)
  n = finite.sum(axis=axis)
  total = np.where(finite, values, 0.0).sum(axis=axis)
  return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def _mean_std(stack: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Mean and sample std (ddof=1; 0 for one value) over axis 0, ignoring NaN; NaN where no value is left."""
  if stack is None:
    return np.asarray(np.nan), np.asarray(np.nan)
  stack = np.asarray(stack, np.float64)
  finite = np.isfinite(stack)
  n = finite.sum(axis=0)
  mean = _nanmean(stack, axis=0)
  sq = np.where(finite, stack - mean, 0.0) ** 2
  std = np.where(n > 1, np.sqrt(sq.sum(axis=0) / np.maximum(n - 1, 1)), 0.0)
  return mean, np.where(n == 0, np.nan, std)


def _count(stack: Optional[np.ndarray]) -> np.ndarray:
  """How many seeds have a value, per entry over axis 0 (0: no data, e.g. a group with no test rows)."""
  if stack is None:
    return np.asarray(0)
  return np.isfinite(np.asarray(stack, np.float64)).sum(axis=0)


EMPTY = "empty"  # a cell with no data at all (a group with no test rows): n = 0


def _num(x: Any, fmt: str = "{:.3f}") -> str:
  try:
    x = float(x)
  except (TypeError, ValueError):
    return "–"
  return fmt.format(x) if np.isfinite(x) else "–"


def _pm(mean: Any, std: Any, fmt: str = "{:.3f}") -> str:
  m = _num(mean, fmt)
  return m if m == "–" or not np.isfinite(float(std)) else f"{m} ± {_num(std, fmt)}"


def _bits_label(b: int) -> str:
  return f"{b} (FP)" if int(b) >= FULL else str(b)


def _sorted_bits(bits: Sequence) -> list[int]:
  """Full precision first, then fewer and fewer bits (figures read left to right as bits shrink)."""
  return sorted({int(b) for b in bits}, reverse=True)


def _rel(minority: Optional[np.ndarray], values: np.ndarray) -> str:
  """'minority / majority' means of per-group values."""
  if minority is None or values is None or np.ndim(values) != 1 or len(values) != len(minority):
    return "–"
  values = np.asarray(values, np.float64)
  if not np.isfinite(values).any():
    return "–"
  side = lambda mask: _num(_nanmean(values[mask]), "{:.3g}") if np.isfinite(values[mask]).any() else EMPTY
  return f"{side(minority)} / {side(~minority)}"


_FILE_MODE = 0o644  # mkstemp makes 0600 files; a report is meant to be read (served, shared)


def _write_text(path: str, text: str) -> None:
  results_lib.atomic_write_text(path, text)
  os.chmod(path, _FILE_MODE)


class _Ctx:
  """What every section needs: results, group names / counts, the minority mask, seeds."""

  def __init__(self, results: Mapping, workdir: str):
    self.results = results
    self.workdir = workdir
    ds = results.get("dataset", {})
    self.names = [str(n) for n in ds.get("group_names", [])]
    self.num_groups = int(ds.get("num_groups", len(self.names)) or len(self.names))
    if len(self.names) != self.num_groups:
      self.names = [f"group {i}" for i in range(self.num_groups)]
    self.train_counts = _dig(ds, "counts", "train")
    try:
      self.minority = claims_lib.minority_mask(results)
    except (KeyError, TypeError, ValueError):
      self.minority = None
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


def _explain_bits(ctx: _Ctx) -> list[int]:
  return _sorted_bits(_dig(ctx.results, "explain", "bit_widths") or [])


def _explain_ms(ctx: _Ctx, bits: int, *path) -> tuple[np.ndarray, np.ndarray]:
  return _mean_std(_stack(ctx.results["explain"].get("per_seed", {}), ctx.seeds,
                          lambda e: _dig(e, bits, *path)))


def _ablation_summary(ctx: _Ctx) -> Optional[dict]:
  """{method: {bits: {column: (mean, std, n)}}} from mitigate.per_seed (tolerates unfinished runs)."""
  m = ctx.results.get("mitigate")
  if not m:
    return None
  out = {}
  for method in m.get("methods", []):
    out[method] = {}
    for b in m.get("bit_widths", []):
      cols = {}
      for key, *_ in ABLATION_COLUMNS:
        stack = _stack(m.get("per_seed", {}), ctx.seeds, lambda e: _dig(e, method, b, key))
        mean, std = _mean_std(stack)
        cols[key] = (float(mean), float(std), 0 if stack is None else int(np.isfinite(stack).sum()))
      out[method][str(b)] = cols
  return out
