"""Plain-text result tables, formatted in one place from the summaries stored in results.json.

Nothing here recomputes a statistic: each cell is a ``metrics.mean_std`` dict ({"mean", "std", "n"})
that the runner stored (``ptq.summary[bits]``, ``mitigate.summary[method][bits]``) and the best method
per column that ``mitigate.summarize`` stored (``mitigate.best[bits][column]``). No JAX.

  ptq_table(results)                   the PTQ sweep: bits, size KB, accuracy, worst group, fairness violation
                                       (mean±std over seeds), the 95% intervals of the worst group and of D
                                       (minority minus majority accuracy drop), and per-group accuracy (mean)
  ablation_table(results["mitigate"])  the ablation: mean±std per method and bit-width, * = best per column
  claims_lines(results)                one line per claim: '  name: verdict (why)'
  interval_cell(node)                  '[low, high]' of a stored 95% interval

A cell with no data (mean null / NaN / missing, n = 0: no test rows behind it) prints as ``EMPTY``.
``dig``, ``finite`` and ``mean_std_cell`` are the look-up and cell formats the report shares (it writes 'mean ± std').
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

EMPTY = "empty"
UNFINISHED = "({stage} has not finished: no summary over seeds yet; rerun the {stage} stage)"
# The ablation's columns: (key in a summary, header, scale, format). "Best" is read from mitigate.best.
ABLATION_COLUMNS = (("accuracy", "accuracy", 1.0, "{:.3f}"),
                    ("worst_group_accuracy", "worst group", 1.0, "{:.3f}"),
                    ("fairness_violation", "fairness violation", 1.0, "{:.3f}"),
                    ("size_bytes", "size KB", 1 / 1024, "{:.1f}"),
                    ("steps", "steps", 1.0, "{:.0f}"),
                    ("train_s", "train s", 1.0, "{:.1f}"))


def dig(node: Any, *path) -> Any:
  """node[path[0]][path[1]]... with str keys (JSON); None where a key is missing or a node is not a mapping."""
  for key in path:
    if not isinstance(node, Mapping) or str(key) not in node:
      return None
    node = node[str(key)]
  return node


def finite(x: Any) -> Optional[float]:
  """float(x) when it is a finite number; None for None (JSON null), NaN, inf or a non-number."""
  try:
    x = float(x)
  except (TypeError, ValueError):
    return None
  return x if math.isfinite(x) else None


def mean_std_cell(ms: Optional[Mapping], fmt: str = "{:.3f}", sep: str = "±", scale: float = 1.0) -> str:
  """'mean<sep>std' of a mean_std dict (both times ``scale``); 'mean' alone without a std; EMPTY without a mean.

  >>> mean_std_cell({"mean": 0.5, "std": 0.01, "n": 2})
  '0.500±0.010'
  """
  mean, std = finite((ms or {}).get("mean")), finite((ms or {}).get("std"))
  if mean is None:
    return EMPTY
  text = fmt.format(mean * scale)
  return text if std is None else f"{text}{sep}{fmt.format(std * scale)}"


def ptq_size_bytes(results: Mapping, bits: Any) -> Optional[float]:
  """Storage size of the model at ``bits``: ptq.summary[bits].size_bytes mean (the same in every seed),
  else the first seed's ptq.per_seed entry (results.json written before size_bytes was summarized);
  None when neither is there."""
  size = finite(dig(results, "ptq", "summary", bits, "size_bytes", "mean"))
  if size is None and results.get("seeds"):
    size = finite(dig(results, "ptq", "per_seed", results["seeds"][0], bits, "size_bytes"))
  return size


def ptq_table(results: Mapping) -> str:
  """The PTQ sweep from ``results["ptq"]["summary"]``, one row per bit-width in ``ptq.bit_widths`` order.

  Columns: bits, size KB (``ptq_size_bytes`` / 1024), accuracy, worst group, fairness violation as
  'mean±std' (3 decimals), then one column per group (first 8 characters of its name): the mean
  of its accuracy over seeds. ``(no ptq results)`` when the ptq stage did not run, UNFINISHED when
  it has no summary (some configured seed has no entry yet).
  """
  if "ptq" not in results:
    return "(no ptq results)"
  p = results["ptq"]
  if not isinstance(p.get("summary"), Mapping):
    return UNFINISHED.format(stage="ptq")
  names = results["dataset"]["group_names"]
  intervals = p.get("intervals") if isinstance(p.get("intervals"), Mapping) else {}
  ci_header = f" {'worst 95% CI':>14} {'D 95% CI':>16}" if intervals else ""
  lines = [f"{'bits':>4} {'size KB':>8} {'accuracy':>14} {'worst group':>14} {'fairness viol.':>15}{ci_header}  "
           + " ".join(f"{n[:8]:>8}" for n in names)]
  for b in p["bit_widths"]:
    s = p["summary"][str(b)]
    size = mean_std_cell({"mean": ptq_size_bytes(results, b)}, "{:.1f}", scale=1 / 1024)
    cell = lambda key: mean_std_cell(s.get(key))
    groups = " ".join(f"{mean_std_cell({'mean': g.get('mean')}):>8}" for g in s["groups"]["accuracy"])
    ci = ""
    if intervals:
      iv = intervals.get(str(b)) or {}
      ci = f" {interval_cell(iv.get('worst_group_accuracy')):>14} {interval_cell(iv.get('drop_difference')):>16}"
    lines.append(f"{b:>4} {size:>8} {cell('accuracy'):>14} {cell('worst_group_accuracy'):>14} "
                 f"{cell('fairness_violation'):>15}{ci}  {groups}")
  return "\n".join(lines)


def interval_cell(node: Optional[Mapping], fmt: str = "{:.3f}") -> str:
  """'[low, high]' of a {"low", "high"} dict; EMPTY when either end is missing.

  >>> interval_cell({"mean": 0.5, "low": 0.4, "high": 0.6})
  '[0.400, 0.600]'
  """
  low, high = finite((node or {}).get("low")), finite((node or {}).get("high"))
  return EMPTY if low is None or high is None else f"[{fmt.format(low)}, {fmt.format(high)}]"


def _ablation_row(b: Any, method: str, s: Mapping, best: Mapping, label: str = "", width: int = 13) -> str:
  """One row: the mean±std columns carry '*' (best) or ' ' after them; size KB, steps and train s are means.
  ``label``: the method cell (default ``method``), ``width`` its column's width."""
  def marked(col):
    text = mean_std_cell(s.get(col))
    return text + ("*" if text != EMPTY and best.get(col) == method else " ")

  def plain(col, scale=1.0, fmt="{:.1f}"):
    return mean_std_cell({"mean": (s.get(col) or {}).get("mean")}, fmt, scale=scale)

  return (f"{b:>4} {label or method:<{width}} {marked('accuracy'):>14} {marked('worst_group_accuracy'):>14} "
          f"{marked('fairness_violation'):>15} {plain('size_bytes', 1 / 1024):>8} "
          f"{plain('steps', fmt='{:.0f}'):>6} {plain('train_s'):>8}")


def ablation_table(section: Mapping) -> str:
  """The mitigation ablation from ``section["summary"][method][bits]`` and ``section["best"][bits]``.

  section: results["mitigate"]. One row per (bit-width, method) in ``bit_widths`` x ``methods`` order;
  accuracy, worst group and fairness violation as 'mean±std' with '*' after the best method of the
  column at that bit-width, size KB and train s as means (1 decimal), steps (optimizer steps) as an
  integer mean. A method that ran at other weight bits than the target (summary "w_bits", e.g.
  qat_equal_size matching mixed precision's size) shows them: 'qat_equal_size (5b)'. UNFINISHED
  without a summary.
  """
  if not isinstance(section.get("summary"), Mapping) or not isinstance(section.get("best"), Mapping):
    return UNFINISHED.format(stage="mitigate")

  def label(method, b):  # the weight bits used, where they are not the target (None: mixed precision)
    w = dig(section, "summary", method, b, "w_bits")
    return f"{method} ({w}b)" if isinstance(w, int) and not isinstance(w, bool) and w != int(b) else method

  # The widest label sets the method column, so a '(5b)' suffix does not shift the number columns.
  width = max([13] + [len(label(m, b)) for b in section["bit_widths"] for m in section["methods"]])
  lines = [f"{'bits':>4} {'method':<{width}} {'accuracy':>14} {'worst group':>14} {'fairness viol.':>15} "
           f"{'size KB':>8} {'steps':>6} {'train s':>8}"]
  for b in section["bit_widths"]:
    best = section["best"][str(b)]
    lines += [_ablation_row(b, method, section["summary"][method][str(b)], best, label(method, b), width)
              for method in section["methods"]]
  return "\n".join(lines)


def claims_lines(results: Mapping) -> str:
  """'  claim_name: verdict' per claim of ``results["claims"]``, with ' (why)' when not tested and, for
  "depends", how many judgements (variant | definition) give each verdict; '' without claims."""
  if "claims" not in results:
    return ""
  lines = []
  for name, c in results["claims"].items():
    if not isinstance(c, Mapping):
      continue
    extra = f" ({c['why']})" if c.get("why") else ""
    if isinstance(c.get("by_verdict"), Mapping):
      total = sum(len(v) for v in c["by_verdict"].values())
      extra = " (" + ", ".join(f"{verdict}: {len(names)}" for verdict, names in c["by_verdict"].items()) + \
          f" of {total} judgements; report.md lists them)"
    lines.append(f"  {name}: {c['verdict']}{extra}")
  return "\n".join(lines)
